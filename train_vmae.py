"""
Train the VMAE: stage 1 (masked VAE pre-training at 128 px) and stage 3 (fine-tuning at 256 px).

The defaults reproduce the authors' stage-1 run; configs/ holds one file per stage. Any setting
can be overridden: `python train_vmae.py [config files...] --name value`.

On a CPU, the small preset on the built-in dataset (a few minutes):
$ python train_vmae.py configs/vmae_small.py
One GPU:
$ python train_vmae.py configs/vmae_stage1.py --data /data/imagenet/train
One node, 8 GPUs:
$ torchrun --standalone --nproc_per_node=8 train_vmae.py configs/vmae_stage1.py --data /data/imagenet/train
Two nodes of 8 GPUs (run on each, with its --node_rank; add NCCL_IB_DISABLE=1 without InfiniBand):
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 --master_port=1234 train_vmae.py ...
Stage 3 (256 px, no mask, posterior mean, MSE + 10 x LPIPS, decoder only), from the stage-1 weights:
$ torchrun --standalone --nproc_per_node=8 train_vmae.py configs/vmae_stage3.py --data /data/imagenet/train --init_from out/vmae_stage1/last.pt
Continue a run that stopped (same command plus --resume):
$ python train_vmae.py configs/vmae_small.py --resume
"""

import copy
import dataclasses
import math
import os

import torch

import common
import data
import metrics
import vmae


@dataclasses.dataclass
class Config:
    # data and output
    data: str = 'builtin'          # image folder (class subfolders or flat) or 'builtin'
    image_size: int = 128
    out_dir: str = 'out/vmae'
    # model
    model: str = 'VMAE-f8d16'      # a key of vmae.VMAE_models
    init_from: str = ''            # start from these weights (stage 3: the stage-1 last.pt; the authors' files work too)
    # objective, Eq. 2 (defaults: the authors' stage 1)
    mask_ratio: float = 0.25
    sample_posterior: bool = True  # decode a posterior sample (stage 1) or the mean (stage 3)
    mask_weight: float = 0.5
    visible_weight: float = 0.5
    perceptual_weight: float = 0.5
    kl_weight: float = 1e-6
    kl_target_std: float = 1e-3
    kl_standard: bool = False      # textbook VAE KL instead (the VAE baseline)
    input_noise_std: float = 0.0   # > 0: the denoising-autoencoder baseline (noise on the input, clean target)
    train_encoder: bool = True     # False: freeze the encoder and to_latent (stage 3 as the paper describes)
    # optimisation (lr = blr x batch_size / 256)
    batch_size: int = 2048         # global batch per optimizer step; micro-batches x ranks x accumulation
    micro_batch_size: int = 128    # per rank per forward pass
    blr: float = 1e-4
    min_lr: float = 0.0
    warmup_epochs: float = 10.0
    epochs: float = 400.0          # length of the cosine schedule
    stop_epoch: float = 0.0        # stop early at this epoch (0: run the whole schedule)
    max_steps: int = 0             # > 0: the schedule in optimizer steps instead, whatever the data's size (small recipes)
    warmup_steps: int = 0          # with max_steps: the linear warm-up, in steps
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 0.0         # 0: no clipping (the authors)
    # system
    device: str = 'auto'           # auto, cpu, cuda
    dtype: str = 'bf16'            # bf16, fp16 or fp32 autocast on CUDA (CPU runs fp32)
    compile: bool = False          # torch.compile the model
    num_workers: int = 8
    seed: int = 0
    # logging and checkpoints
    log_every: int = 50
    ckpt_every: int = 1000         # write out_dir/last.pt every N steps (and at the end)
    keep_every: int = 0            # also keep out_dir/ckpt_<step>.pt every N steps (0: never)
    image_every: int = 1000        # originals vs reconstructions PNG every N steps
    resume: bool = False           # continue from out_dir/last.pt


def check_config(cfg):
    """Settings that would run but make no sense, refused before any work. Every VMAE preset has 8 x 8 patches."""
    if cfg.model not in vmae.VMAE_models:
        raise ValueError(f"unknown model '{cfg.model}': choose one of {list(vmae.VMAE_models)}")
    common.check_settings(
        cfg, choices={'dtype': ('bf16', 'fp16', 'fp32')},
        at_least={'image_size': 8, 'mask_ratio': 0, 'mask_weight': 0, 'visible_weight': 0, 'perceptual_weight': 0, 'kl_weight': 0,
                  'input_noise_std': 0, 'batch_size': 1, 'micro_batch_size': 1, 'min_lr': 0, 'warmup_epochs': 0, 'stop_epoch': 0,
                  'weight_decay': 0, 'beta1': 0, 'beta2': 0, 'grad_clip': 0, 'num_workers': 0, 'seed': 0, 'log_every': 1,
                  'ckpt_every': 1, 'keep_every': 0, 'image_every': 1, 'max_steps': 0, 'warmup_steps': 0},
        multiple_of={'image_size': 8}, above={'kl_target_std': 0, 'blr': 0, 'epochs': 0},
        below={'mask_ratio': 1, 'beta1': 1, 'beta2': 1})


def main(cfg):
    check_config(cfg)
    dist = common.setup_distributed(cfg.device)
    common.enable_tf32()
    device = dist.device
    say = common.print0
    accum = common.accumulation_steps(cfg.batch_size, cfg.micro_batch_size, dist)
    last_path = common.run_checkpoint_path(cfg.out_dir, cfg.resume)

    # read the checkpoints first, so a wrong file fails before the data scan
    resume_from = common.read_run_checkpoint(last_path, 'vmae') if cfg.resume else None
    init_weights = vmae.read_vmae(cfg.init_from)[1] if cfg.init_from and not cfg.resume else None
    perceptual = vmae.lpips_vgg().to(device) if cfg.perceptual_weight > 0 else None  # offline without VGG16: stop now

    # data: each rank reads its shard; ResumableSampler makes the order and augmentation a function of (seed, epoch, index)
    dataset = data.build_dataset(cfg.data, cfg.image_size, train=True)
    loader, sampler, steps_per_epoch = data.training_loader(dataset, cfg.micro_batch_size, accum, dist, cfg.seed, cfg.num_workers)
    if cfg.max_steps:  # a fixed number of steps: a folder of 1,000 photos trains as long as the 10,000 built-in images
        total_steps, warmup_steps = cfg.max_steps, cfg.warmup_steps
    else:  # the paper's recipes count epochs of ImageNet
        total_steps, warmup_steps = max(1, round(cfg.epochs * steps_per_epoch)), round(cfg.warmup_epochs * steps_per_epoch)
    stop_step = min(total_steps, round(cfg.stop_epoch * steps_per_epoch)) if cfg.stop_epoch else total_steps
    lr = cfg.blr * cfg.batch_size / 256
    weights = vmae.LossWeights(cfg.mask_weight, cfg.visible_weight, cfg.perceptual_weight, cfg.kl_weight,
                               cfg.kl_target_std, cfg.kl_standard)
    val_images = fixed_val_batch(cfg, dataset)

    # model: the mask token exists only when masking is on, so DDP sees no unused parameters
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = vmae.VMAE_models[cfg.model](img_size=cfg.image_size, mask_token=cfg.mask_ratio > 0)
    if init_weights is not None:
        model.load_weights(init_weights)
    if not cfg.train_encoder:
        for module in (model.patch_embed, model.blocks, model.norm, model.to_latent):
            module.requires_grad_(False)
    model.to(device)
    optimizer = make_optimizer(model, lr, cfg)
    say(f"{cfg.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters | "
        f"{len(dataset)} images | {dist.world_size} rank(s) x {cfg.micro_batch_size} x {accum} accumulation = "
        f"{cfg.batch_size} per step | lr {lr:.3g} | {stop_step} steps ({stop_step / steps_per_epoch:.3g} epochs) | {device} {cfg.dtype}")
    ctx, scaler = common.mixed_precision(device, cfg.dtype)
    step = 0
    if resume_from is not None:
        model.load_weights(resume_from['model'])
        step = common.restore_run(resume_from, optimizer, scaler, cfg, last_path)
        del resume_from  # the optimizer state it holds is large
    train_model = common.wrap_for_training(model, cfg.compile, dist)

    log = common.RunLog(cfg.out_dir, dist.master, step, stop_step)
    meter = common.Meter(['loss', 'mse_masked', 'mse_visible', 'lpips', 'kl'], device)
    logged = ['loss', 'mse_visible'] + (['mse_masked'] if cfg.mask_ratio > 0 else []) + \
        (['lpips'] if weights.perceptual > 0 else []) + (['kl'] if weights.kl > 0 else [])
    model.train()
    for step, micro_batches in data.step_batches(loader, sampler, step, steps_per_epoch, accum):
        if step >= stop_step:
            break
        torch.manual_seed(common.seed_for(cfg.seed, dist.rank, step))  # masks and posterior noise follow (seed, rank, step): resume is exact
        for micro, (x, _) in enumerate(micro_batches):
            x = x.to(device, non_blocking=True)
            if dist.ddp:  # all-reduce the gradients only once, after the last micro-batch
                train_model.require_backward_grad_sync = micro == accum - 1
            with ctx:
                noisy = x + cfg.input_noise_std * torch.randn_like(x) if cfg.input_noise_std > 0 else x
                recon, mask, posterior = train_model(noisy, cfg.mask_ratio, cfg.sample_posterior)
                loss, terms = vmae.vmae_loss(x, recon, mask, posterior, model.patch_size, weights, perceptual)
            scaler.scale(loss / accum).backward()
            meter.add({'loss': loss, **terms})
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for g in optimizer.param_groups:
            g['lr'] = lr_at(step, lr, cfg.min_lr, warmup_steps, total_steps)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log.step(cfg.batch_size)

        last = step == stop_step
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or last:
            means = meter.average(step, last_path)  # raises on NaN/inf before anything is saved
            log.log(step, {**{k: means[k] for k in logged}, 'lr': optimizer.param_groups[0]['lr'], 'epoch': step / steps_per_epoch})
        if dist.master and (step % cfg.image_every == 0 or last):
            log.log(step, {'val_psnr': save_reconstructions(model, val_images, cfg, step)})
        if dist.master and (step % cfg.ckpt_every == 0 or last):
            ckpt = vmae.vmae_checkpoint(model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                                        config=dataclasses.asdict(cfg))  # the data order and random draws follow (seed, step)
            common.save_run_checkpoint(ckpt, cfg.out_dir, step, cfg.keep_every)
    log.close()
    say(f"done: {last_path}")
    common.cleanup_distributed()


def make_optimizer(model, lr, cfg):
    """AdamW with weight decay on weight matrices (and the mask token) only, as timm's
    param_groups_weight_decay that the authors used; frozen tensors are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{'params': decay, 'weight_decay': cfg.weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    fused = torch.cuda.is_available() and next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step, lr, min_lr, warmup_steps, total_steps):
    """Linear warm-up from 0, then a half-cycle cosine to min_lr at the end of the schedule."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fixed_val_batch(cfg, train_set, n=8):
    """The same n centre-cropped images every time: the held-out split of the built-in data, or
    images spread over the training folder."""
    if cfg.data == 'builtin':
        dataset = data.build_dataset('builtin', cfg.image_size, split='val')
    else:
        dataset = copy.copy(train_set)
        dataset.train = dataset.flip = False
    indices = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    return torch.stack([dataset[i][0] for i in indices])


@torch.no_grad()
def save_reconstructions(model, images, cfg, step):
    """Originals (top) vs reconstructions from the posterior mean (bottom) -> PNG; returns their PSNR."""
    model.eval()
    device = next(model.parameters()).device
    recon = model.decode(model.encode(images.to(device)).mode()).float().cpu()
    model.train()
    data.save_grid(torch.cat([images, recon]), os.path.join(cfg.out_dir, f'recon_{step:07d}.png'), ncol=len(images),
                   row_labels=['original', 'reconstruction'], upscale=max(1, 128 // cfg.image_size))
    return float(metrics.psnr_per_image(data.to_uint8(images).numpy(), data.to_uint8(recon).numpy()).mean())


if __name__ == '__main__':
    config = common.parse_config(Config, description=__doc__.split('\n\n')[0])
    with common.clear_errors():
        main(config)
