"""
Train an autoencoder: the VMAE's stage 1 (masked VAE pre-training at 128 px) and stage 3 (fine-tuning at
256 px), and the paper's convolutional baselines (AE, DAE, VAE, SD-VAE with its PatchGAN; convae.py).

The defaults reproduce the authors' stage-1 run; configs/ holds one file per stage or baseline. Any
setting can be overridden: `python train_vmae.py [config files...] --name value`.

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
The baselines, e.g. SD-VAE (L1 + LPIPS + KL + PatchGAN) on ImageNet, or the small AE on a CPU:
$ torchrun --standalone --nproc_per_node=8 train_vmae.py configs/sdvae_imagenet.py --data /data/imagenet/train
$ python train_vmae.py configs/ae_small.py
"""

import copy
import dataclasses
import math
import os

import torch

import common
import convae
import data
import fileio
import metrics
import vmae


@dataclasses.dataclass
class Config:
    # data and output
    data: str = 'builtin'          # image folder (class subfolders or flat) or 'builtin'
    image_size: int = 128
    out_dir: str = 'out/vmae'
    # model
    model: str = 'VMAE-f8d16'      # a key of vmae.VMAE_models or convae.ConvAE_models (the baselines)
    init_from: str = ''            # start from these weights (stage 3: the stage-1 last.pt; the authors' files work too)
    # objective, Eq. 2 (defaults: the authors' stage 1)
    mask_ratio: float = 0.25
    sample_posterior: bool = True  # decode a posterior sample (stage 1) or the mean (stage 3)
    mask_weight: float = 0.5
    visible_weight: float = 0.5    # the pixel loss's weight on visible patches (every pixel, without a mask)
    perceptual_weight: float = 0.5
    kl_weight: float = 1e-6
    kl_target_std: float = 1e-3
    kl_standard: bool = False      # textbook VAE KL to N(0, I) instead (the VAE and SD-VAE baselines)
    input_noise_std: float = 0.0   # > 0: a denoising autoencoder (noise on the input, clean target)
    train_encoder: bool = True     # False: freeze the encoder (stage 3 as the paper describes)
    # the convolutional baselines (paper App. A): LDM's summed losses, and SD-VAE's PatchGAN
    pixel_loss: str = 'mse'        # mse, or l1 (SD-VAE); a VMAE's is mse
    disc_weight: float = 0.0       # > 0: SD-VAE's adversarial loss, scaled by the adaptive weight (ConvAE only)
    disc_start: int = 50001        # optimizer step at which the discriminator switches on (LDM's kl-f8)
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
    """Settings that would run but make no sense, refused before any work. Every preset downsamples by 8."""
    if cfg.model not in {**vmae.VMAE_models, **convae.ConvAE_models}:
        raise ValueError(f"unknown model '{cfg.model}': choose one of {list(vmae.VMAE_models) + list(convae.ConvAE_models)}")
    if is_convolutional(cfg) and cfg.mask_ratio > 0:
        raise ValueError(f"{cfg.model} is convolutional and cannot drop patches: set --mask_ratio 0")
    if not is_convolutional(cfg) and (cfg.pixel_loss != 'mse' or cfg.disc_weight > 0):
        raise ValueError(f"{cfg.model} is a VMAE: --pixel_loss l1 and --disc_weight are for the convolutional baselines")
    common.check_settings(
        cfg, choices={'dtype': ('bf16', 'fp16', 'fp32'), 'pixel_loss': ('mse', 'l1')},
        at_least={'image_size': 8, 'mask_ratio': 0, 'mask_weight': 0, 'visible_weight': 0, 'perceptual_weight': 0, 'kl_weight': 0,
                  'input_noise_std': 0, 'batch_size': 1, 'micro_batch_size': 1, 'min_lr': 0, 'warmup_epochs': 0, 'stop_epoch': 0,
                  'weight_decay': 0, 'beta1': 0, 'beta2': 0, 'grad_clip': 0, 'num_workers': 0, 'seed': 0, 'log_every': 1,
                  'ckpt_every': 1, 'keep_every': 0, 'image_every': 1, 'max_steps': 0, 'warmup_steps': 0, 'disc_weight': 0,
                  'disc_start': 0},
        multiple_of={'image_size': 8}, above={'kl_target_std': 0, 'blr': 0, 'epochs': 0},
        below={'mask_ratio': 1, 'beta1': 1, 'beta2': 1})
    fileio.check_output_dir(cfg.out_dir)


def main(cfg):
    check_config(cfg)
    dist = common.setup_distributed(cfg.device)
    common.speed_settings()
    device = dist.device
    say = common.print0
    accum = common.accumulation_steps(cfg.batch_size, cfg.micro_batch_size, dist)
    last_path = common.run_checkpoint_path(cfg.out_dir, cfg.resume)
    convolutional = is_convolutional(cfg)
    kind = 'convae' if convolutional else 'vmae'

    # read the checkpoints first, so a wrong file fails before the data scan
    resume_from = common.read_run_checkpoint(last_path, kind) if cfg.resume else None
    init_weights = read_weights(cfg.init_from, convolutional) if cfg.init_from and not cfg.resume else None
    perceptual = vmae.lpips_vgg().to(device) if cfg.perceptual_weight > 0 else None  # offline without VGG16: stop now

    # model: the mask token exists only when masking is on, so DDP sees no unused parameters; its starting
    # weights are loaded now, so weights of another shape fail before the data scan
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    if resume_from is not None:
        load_checked(model, resume_from['model'], f"--resume: {last_path}", cfg)
    elif init_weights is not None:
        load_checked(model, init_weights, f"--init_from {cfg.init_from}", cfg)

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

    if not cfg.train_encoder:
        for module in encoder_modules(model):
            module.requires_grad_(False)
    model.to(device)
    optimizer = make_optimizer(model, lr, cfg)
    # SD-VAE's PatchGAN: its own Adam (fused, as the autoencoder's AdamW) at the same rate; it learns only from step disc_start on
    disc = convae.NLayerDiscriminator().to(device) if cfg.disc_weight > 0 else None
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2), fused=True) if disc else None
    optimizers = [optimizer] + ([disc_optimizer] if disc else [])
    say(f"{cfg.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters | "
        f"{len(dataset)} images | {dist.world_size} rank(s) x {cfg.micro_batch_size} x {accum} accumulation = "
        f"{cfg.batch_size} per step | lr {lr:.3g} | {stop_step} steps ({stop_step / steps_per_epoch:.3g} epochs) | {device} {cfg.dtype}"
        + (f" | PatchGAN from step {cfg.disc_start}" if disc else ""))
    ctx, scaler = common.mixed_precision(device, cfg.dtype)
    step = 0
    if resume_from is not None:
        if disc:
            disc.load_state_dict(resume_from['discriminator'])
            disc_optimizer.load_state_dict(resume_from['disc_optimizer'])
        step = common.restore_run(resume_from, optimizer, scaler, cfg, last_path)
        del resume_from  # the optimizer state it holds is large
    train_model = common.wrap_for_training(model, cfg.compile, dist)
    train_disc = common.wrap_for_training(disc, cfg.compile, dist) if disc else None

    log = common.RunLog(cfg.out_dir, dist.master, step, stop_step)
    meter = common.Meter(['loss', 'mse_masked', 'mse_visible', 'rec', 'lpips', 'kl', 'g_loss', 'd_weight', 'd_loss'], device)
    logged = ['loss'] + (['rec'] if convolutional else ['mse_visible'] + (['mse_masked'] if cfg.mask_ratio > 0 else [])) + \
        (['lpips'] if weights.perceptual > 0 else []) + (['kl'] if weights.kl > 0 else []) + (['g_loss', 'd_weight', 'd_loss'] if disc else [])
    model.train()
    for step, micro_batches in data.step_batches(loader, sampler, step, steps_per_epoch, accum):
        if step >= stop_step:
            break
        torch.manual_seed(common.seed_for(cfg.seed, dist.rank, step))  # masks and posterior noise follow (seed, rank, step): resume is exact
        gan_factor = convae.disc_factor_at(step, cfg.disc_start) if disc else 0.0
        for micro, (x, _) in enumerate(micro_batches):
            x = x.to(device, non_blocking=True)
            if dist.ddp:  # all-reduce the gradients only once, after the last micro-batch
                train_model.require_backward_grad_sync = micro == accum - 1
                if disc:
                    train_disc.require_backward_grad_sync = micro == accum - 1
            with ctx:
                inputs = x + cfg.input_noise_std * torch.randn_like(x) if cfg.input_noise_std > 0 else x
                if convolutional:
                    recon, posterior = train_model(inputs, cfg.sample_posterior)
                    loss, nll, terms = convae.convae_loss(
                        x, recon, posterior, cfg.pixel_loss, pixel_weight=weights.visible, perceptual_weight=weights.perceptual,
                        kl_weight=weights.kl, kl_standard=weights.kl_standard, kl_target_std=weights.kl_target_std, perceptual=perceptual)
                else:
                    recon, mask, posterior = train_model(inputs, cfg.mask_ratio, cfg.sample_posterior)
                    loss, terms = vmae.vmae_loss(x, recon, mask, posterior, model.patch_size, weights, perceptual)
                if gan_factor > 0:  # the generator's side: D frozen, its gradient scaled to the reconstruction's at the last layer
                    disc.requires_grad_(False)
                    terms['g_loss'] = convae.generator_loss(disc(recon))
                    terms['d_weight'] = cfg.disc_weight * convae.adaptive_weight(nll, terms['g_loss'], model.decoder.conv_out.weight)
                    loss = loss + terms['d_weight'] * gan_factor * terms['g_loss']
            scaler.scale(loss / accum).backward()
            if gan_factor > 0:  # the discriminator's side, on detached images, real and fake in separate calls (BatchNorm)
                disc.requires_grad_(True)
                with ctx:
                    terms['d_loss'] = gan_factor * convae.hinge_d_loss(train_disc(x), train_disc(recon.detach()))
                scaler.scale(terms['d_loss'] / accum).backward()
            meter.add({'loss': loss, **terms})
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            for g in opt.param_groups:
                g['lr'] = lr_at(step, lr, cfg.min_lr, warmup_steps, total_steps)
        scaler.step(optimizer)
        if gan_factor > 0:
            scaler.step(disc_optimizer)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        step += 1
        log.step(cfg.batch_size)

        last = step == stop_step
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or last:
            means = meter.average(step, last_path)  # raises on NaN/inf before anything is saved
            log.log(step, {**{k: means[k] for k in logged}, 'lr': optimizer.param_groups[0]['lr'], 'epoch': step / steps_per_epoch})
        if dist.master and (step % cfg.image_every == 0 or last):
            log.log(step, {'val_psnr': save_reconstructions(model, val_images, cfg, step)})
        if dist.master and (step % cfg.ckpt_every == 0 or last):
            # the data order and random draws follow (seed, step), so these states are all a resume needs
            state = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg))
            if disc:
                state.update(discriminator=disc.state_dict(), disc_optimizer=disc_optimizer.state_dict())
            ckpt = (convae.convae_checkpoint if convolutional else vmae.vmae_checkpoint)(model, **state)
            common.save_run_checkpoint(ckpt, cfg.out_dir, step, cfg.keep_every)
    log.close()
    say(f"done: {last_path}")
    common.cleanup_distributed()


def is_convolutional(cfg):
    return cfg.model in convae.ConvAE_models


def build_model(cfg):
    if is_convolutional(cfg):
        return convae.ConvAE_models[cfg.model](img_size=cfg.image_size)
    return vmae.VMAE_models[cfg.model](img_size=cfg.image_size, mask_token=cfg.mask_ratio > 0)


def load_checked(model, weights, source, cfg):
    """model.load_weights, with weights of another shape refused in one line (load_state_dict's own error
    lists every tensor). Position tables are left out: load_weights resizes them to the image size."""
    theirs = fileio.strip_wrapper_prefixes(weights)
    differ = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in model.state_dict().items()
              if k in theirs and theirs[k].shape != v.shape and not k.endswith('pos_embed')]
    if differ:
        raise ValueError(f"{source} holds weights of another shape than --model {cfg.model} ({len(differ)} tensors differ, "
                         f"e.g. {differ[0]}): pass the --model that made it")
    model.load_weights(weights)


def read_weights(path, convolutional):
    """--init_from: the state dict of a checkpoint of the same family (ours or the authors')."""
    return (convae.read_convae if convolutional else vmae.read_vmae)(path)[1]


def encoder_modules(model):
    """What --train_encoder false freezes: everything that makes the latents."""
    if isinstance(model, convae.ConvAE):
        return (model.encoder,)
    return model.patch_embed, model.blocks, model.norm, model.to_latent


def make_optimizer(model, lr, cfg):
    """AdamW with weight decay on weight matrices (and the mask token) only, as timm's
    param_groups_weight_decay that the authors used; frozen tensors are left out. Fused, as train_dit.py's."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{'params': decay, 'weight_decay': cfg.weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=True)


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
