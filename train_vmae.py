"""
Train the VMAE: stage 1 (masked VAE pre-training at 128 px) and stage 3 (fine-tuning at 256 px).

The defaults reproduce the authors' stage-1 run; configs/ holds one file per stage. Any setting can be
overridden: `python train_vmae.py [config files...] --name value`. (The paper's convolutional baselines
have their own trainer: paper/train_convae.py.)

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

import dataclasses
import os

import torch

import common
import data
import fileio
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
    latent_noise: float = 0.0      # > 0: decode latents + eps x channel std x N(0, I), eps ~ U(0, this) (not the paper's; an ablation)
    mask_weight: float = 0.5
    visible_weight: float = 0.5    # the MSE's weight on visible patches (every patch, without a mask)
    perceptual_weight: float = 0.5
    kl_weight: float = 1e-6
    kl_target_std: float = 1e-3
    train_encoder: bool = True     # false: freeze the encoder (stage 3 as the paper describes)
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
    dtype: str = ''                # autocast: bf16, fp16 (CUDA) or fp32; '' = bf16 on a GPU, fp32 on a CPU
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
    """Settings that would run but mislead, refused before any work."""
    if cfg.model not in vmae.VMAE_models:
        raise ValueError(f"unknown model '{cfg.model}': choose one of {list(vmae.VMAE_models)}")
    if cfg.image_size < 8 or cfg.image_size % 8:  # patches of 8 x 8
        raise ValueError(f"--image_size must be a positive multiple of 8, got {cfg.image_size}")
    if cfg.dtype not in ('', 'bf16', 'fp16', 'fp32'):
        raise ValueError(f"--dtype must be one of bf16, fp16, fp32, got '{cfg.dtype}'")
    if not (0 <= cfg.mask_ratio < 1 and 0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise ValueError("--mask_ratio, --beta1 and --beta2 must be in [0, 1)")
    for name in ('batch_size', 'micro_batch_size', 'log_every', 'ckpt_every', 'image_every'):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ('mask_weight', 'visible_weight', 'perceptual_weight', 'kl_weight', 'latent_noise', 'min_lr', 'warmup_epochs', 'stop_epoch',
                 'max_steps', 'warmup_steps', 'weight_decay', 'grad_clip', 'num_workers', 'seed', 'keep_every'):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    if cfg.blr <= 0 or cfg.epochs <= 0 or cfg.kl_target_std <= 0:
        raise ValueError(f"--blr, --epochs and --kl_target_std must be positive, got {cfg.blr}, {cfg.epochs}, {cfg.kl_target_std}")
    common.check_device(cfg.device)
    fileio.check_output_dir(cfg.out_dir)


def main(cfg):
    check_config(cfg)
    dist = common.setup_distributed(cfg.device)
    common.speed_settings()
    device, say = dist.device, common.print0
    dtype = common.resolve_dtype(cfg.dtype, device)
    accum = common.accumulation_steps(cfg.batch_size, cfg.micro_batch_size, dist)
    last_path = os.path.join(cfg.out_dir, 'last.pt')
    if cfg.resume and not os.path.isfile(last_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
    if not cfg.resume and os.path.isfile(last_path):
        raise ValueError(f"{last_path} exists: pass --resume to continue that run, or choose another --out_dir")

    # the model and its starting weights first, so that a wrong file fails before the data scan; the mask
    # token exists only when masking is on, so DDP sees no unused parameters
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = vmae.VMAE_models[cfg.model](img_size=cfg.image_size, mask_token=cfg.mask_ratio > 0)
    resume_from = None
    if cfg.resume:
        resume_from = fileio.read_checkpoint(last_path)
        if resume_from.get('kind') != 'vmae' or 'optimizer' not in resume_from:
            raise ValueError(f"--resume: {last_path} is not a train_vmae.py run's checkpoint: choose the --out_dir of such a run")
        common.load_checked(model, resume_from['model'], f"--resume: {last_path}", cfg.model)
    elif cfg.init_from:
        common.load_checked(model, vmae.read_vmae(cfg.init_from)[1], f"--init_from {cfg.init_from}", cfg.model)
    if not cfg.train_encoder:  # stage 3: only the decoder learns, so the latent space stays the one stage 1 made
        for module in model.encoder_modules():
            module.requires_grad_(False)
    model.to(device)
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
    weights = vmae.LossWeights(mask=cfg.mask_weight, visible=cfg.visible_weight, perceptual=cfg.perceptual_weight,
                               kl=cfg.kl_weight, kl_target_std=cfg.kl_target_std)
    val_images = data.fixed_val_batch(cfg.data, cfg.image_size, dataset)

    optimizer = common.adamw(model, lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    ctx, scaler = common.mixed_precision(device, dtype)
    step = 0
    if resume_from is not None:  # exact: the data order and every random draw follow (seed, step)
        optimizer.load_state_dict(resume_from['optimizer'])
        scaler.load_state_dict(resume_from['scaler'])
        step = resume_from['step']
        say(f"resumed from {last_path} at step {step}")
        common.note_config_changes(resume_from['config'], cfg)
        del resume_from  # the optimizer state it holds is large
    say(f"{cfg.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters | "
        f"{len(dataset)} images | {dist.world_size} rank(s) x {cfg.micro_batch_size} x {accum} accumulation = "
        f"{cfg.batch_size} per step | lr {lr:.3g} | {stop_step} steps ({stop_step / steps_per_epoch:.3g} epochs) | {device} {dtype}")
    train_model = common.wrap_for_training(model, cfg.compile, dist)

    log = common.RunLog(cfg.out_dir, dist.master, step, stop_step)
    logged = ['loss', 'mse_visible'] + ['mse_masked'] * (cfg.mask_ratio > 0) + ['lpips'] * (weights.perceptual > 0) + ['kl'] * (weights.kl > 0)
    meter = common.Meter(logged, device)
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
                recon, mask, posterior = train_model(x, cfg.mask_ratio, cfg.sample_posterior, cfg.latent_noise)
                loss, terms = vmae.vmae_loss(x, recon, mask, posterior, model.patch_size, weights, perceptual)
            scaler.scale(loss / accum).backward()
            meter.add({'loss': loss, **terms})
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group['lr'] = common.cosine_lr(step, lr, cfg.min_lr, warmup_steps, total_steps)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log.step(cfg.batch_size)

        last = step == stop_step
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or last:
            means = meter.average(step, last_path)  # raises on NaN/inf before anything is saved
            log.log(step, {**means, 'lr': optimizer.param_groups[0]['lr'], 'epoch': step / steps_per_epoch})
        if dist.master and (step % cfg.image_every == 0 or last):
            psnr = data.save_reconstructions(model, val_images, os.path.join(cfg.out_dir, f'recon_{step:07d}.png'))
            log.log(step, {'val_psnr': psnr})
        if dist.master and (step % cfg.ckpt_every == 0 or last):
            ckpt = vmae.vmae_checkpoint(model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                                        config=dataclasses.asdict(cfg))
            fileio.save_checkpoint(ckpt, last_path)  # atomic: a crash mid-write keeps the last good one
            if cfg.keep_every and step % cfg.keep_every == 0:
                fileio.save_checkpoint(ckpt, os.path.join(cfg.out_dir, f'ckpt_{step:07d}.pt'))
    log.close()
    say(f"done: {last_path}")
    common.cleanup_distributed()


if __name__ == '__main__':
    config = common.parse_config(Config, description=__doc__.split('\n\n')[0])
    with common.clear_errors():
        main(config)
