"""
Train the paper's convolutional baselines (App. A): AE, DAE, VAE and SD-VAE with its PatchGAN (convae.py).

The same loop as train_vmae.py, copied rather than branched, with LDM's objective (summed pixel loss +
LPIPS + KL, convae.convae_loss) and, for SD-VAE, a discriminator: its own optimizer and DDP wrapper, the
adaptive weight and a switch-on step. paper/configs/ holds one file per baseline. Run from the
repository root:

On a CPU, the small AE on the built-in dataset (a few minutes):
$ python -m paper.train_convae paper/configs/ae_small.py
SD-VAE (L1 + LPIPS + KL + PatchGAN) on ImageNet, 8 GPUs:
$ torchrun --standalone --nproc_per_node=8 -m paper.train_convae paper/configs/sdvae_imagenet.py --data /data/imagenet/train
Continue a run that stopped (same command plus --resume).
"""

import dataclasses
import os

import torch

import common
import data
import fileio
import vmae
from paper import convae


@dataclasses.dataclass
class Config:
    # data and output
    data: str = 'builtin'          # image folder (class subfolders or flat) or 'builtin'
    image_size: int = 256
    out_dir: str = 'out/convae'
    # model
    model: str = 'SD3-VAE'         # a key of convae.ConvAE_models
    init_from: str = ''            # start from these weights (ours, diffusers-named ones, or a diffusers vae/ folder)
    # objective (LDM's, summed over pixels): pixel loss + LPIPS + KL (+ the PatchGAN's)
    sample_posterior: bool = True  # decode a posterior sample (VAE, SD-VAE) or the mean (AE, DAE)
    pixel_loss: str = 'l1'         # l1 (SD-VAE) or mse
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    kl_standard: bool = True       # textbook KL to N(0, I) (VAE, SD-VAE); false: to N(mu, kl_target_std^2)
    kl_target_std: float = 1e-3
    input_noise_std: float = 0.0   # > 0: a denoising autoencoder (noise on the input, clean target)
    disc_weight: float = 0.0       # > 0: SD-VAE's adversarial loss (0.5), scaled by the adaptive weight
    disc_start: int = 50001        # optimizer step at which the discriminator switches on (LDM's kl-f8)
    # optimisation (lr = blr x batch_size / 256), LDM's Adam betas
    batch_size: int = 256          # global batch per optimizer step; micro-batches x ranks x accumulation
    micro_batch_size: int = 32     # per rank per forward pass
    blr: float = 1e-5
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    epochs: float = 20.0           # length of the cosine schedule
    stop_epoch: float = 0.0        # stop early at this epoch (0: run the whole schedule)
    max_steps: int = 0             # > 0: the schedule in optimizer steps instead (small recipes)
    warmup_steps: int = 0          # with max_steps: the linear warm-up, in steps
    weight_decay: float = 0.0
    beta1: float = 0.5
    beta2: float = 0.9
    grad_clip: float = 0.0
    # system
    device: str = 'auto'           # auto, cpu, cuda
    dtype: str = ''                # autocast: bf16, fp16 (CUDA) or fp32; '' = bf16 on a GPU, fp32 on a CPU
    compile: bool = False          # torch.compile the model (and the discriminator)
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
    if cfg.model not in convae.ConvAE_models:
        raise ValueError(f"unknown model '{cfg.model}': choose one of {list(convae.ConvAE_models)}")
    if cfg.image_size < 8 or cfg.image_size % 8:  # the encoder halves the resolution three times
        raise ValueError(f"--image_size must be a positive multiple of 8, got {cfg.image_size}")
    if cfg.dtype not in ('', 'bf16', 'fp16', 'fp32') or cfg.pixel_loss not in ('l1', 'mse'):
        raise ValueError(f"--dtype must be bf16, fp16 or fp32 and --pixel_loss l1 or mse, got '{cfg.dtype}', '{cfg.pixel_loss}'")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise ValueError("--beta1 and --beta2 must be in [0, 1)")
    for name in ('batch_size', 'micro_batch_size', 'log_every', 'ckpt_every', 'image_every'):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ('pixel_weight', 'perceptual_weight', 'kl_weight', 'input_noise_std', 'disc_weight', 'disc_start', 'min_lr',
                 'warmup_epochs', 'stop_epoch', 'max_steps', 'warmup_steps', 'weight_decay', 'grad_clip', 'num_workers', 'seed',
                 'keep_every'):
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

    # the model and its starting weights first, so that a wrong file fails before the data scan
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = convae.ConvAE_models[cfg.model](img_size=cfg.image_size)
    resume_from = None
    if cfg.resume:
        resume_from = fileio.read_checkpoint(last_path)
        if resume_from.get('kind') != 'convae' or 'optimizer' not in resume_from:
            raise ValueError(f"--resume: {last_path} is not a train_convae.py run's checkpoint: choose the --out_dir of such a run")
        common.load_checked(model, resume_from['model'], f"--resume: {last_path}", cfg.model)
    elif cfg.init_from:
        common.load_checked(model, convae.read_convae(cfg.init_from)[1], f"--init_from {cfg.init_from}", cfg.model)
    model.to(device)
    perceptual = vmae.lpips_vgg().to(device) if cfg.perceptual_weight > 0 else None  # offline without VGG16: stop now

    # data: each rank reads its shard; ResumableSampler makes the order and augmentation a function of (seed, epoch, index)
    dataset = data.build_dataset(cfg.data, cfg.image_size, train=True)
    loader, sampler, steps_per_epoch = data.training_loader(dataset, cfg.micro_batch_size, accum, dist, cfg.seed, cfg.num_workers)
    if cfg.max_steps:
        total_steps, warmup_steps = cfg.max_steps, cfg.warmup_steps
    else:
        total_steps, warmup_steps = max(1, round(cfg.epochs * steps_per_epoch)), round(cfg.warmup_epochs * steps_per_epoch)
    stop_step = min(total_steps, round(cfg.stop_epoch * steps_per_epoch)) if cfg.stop_epoch else total_steps
    lr = cfg.blr * cfg.batch_size / 256
    val_images = data.fixed_val_batch(cfg.data, cfg.image_size, dataset)

    optimizer = common.adamw(model, lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    # SD-VAE's PatchGAN: its own Adam (fused, as the autoencoder's AdamW) at the same rate; it learns only from step disc_start on
    disc = convae.NLayerDiscriminator().to(device) if cfg.disc_weight > 0 else None
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2), fused=True) if disc else None
    optimizers = [optimizer] + ([disc_optimizer] if disc else [])
    ctx, scaler = common.mixed_precision(device, dtype)
    step = 0
    if resume_from is not None:  # exact: the data order and every random draw follow (seed, step)
        optimizer.load_state_dict(resume_from['optimizer'])
        scaler.load_state_dict(resume_from['scaler'])
        if disc:
            disc.load_state_dict(resume_from['discriminator'])
            disc_optimizer.load_state_dict(resume_from['disc_optimizer'])
        step = resume_from['step']
        say(f"resumed from {last_path} at step {step}")
        common.note_config_changes(resume_from['config'], cfg)
        del resume_from
    say(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(dataset)} images | "
        f"{dist.world_size} rank(s) x {cfg.micro_batch_size} x {accum} accumulation = {cfg.batch_size} per step | lr {lr:.3g} | "
        f"{stop_step} steps ({stop_step / steps_per_epoch:.3g} epochs) | {device} {dtype}"
        + (f" | PatchGAN from step {cfg.disc_start}" if disc else ""))
    train_model = common.wrap_for_training(model, cfg.compile, dist)
    train_disc = common.wrap_for_training(disc, cfg.compile, dist) if disc else None

    log = common.RunLog(cfg.out_dir, dist.master, step, stop_step)
    logged = ['loss', 'rec'] + ['lpips'] * (cfg.perceptual_weight > 0) + ['kl'] * (cfg.kl_weight > 0) + ['g_loss', 'd_weight', 'd_loss'] * bool(disc)
    meter = common.Meter(logged, device)
    model.train()
    for step, micro_batches in data.step_batches(loader, sampler, step, steps_per_epoch, accum):
        if step >= stop_step:
            break
        torch.manual_seed(common.seed_for(cfg.seed, dist.rank, step))  # input and posterior noise follow (seed, rank, step)
        gan_factor = convae.disc_factor_at(step, cfg.disc_start) if disc else 0.0
        for micro, (x, _) in enumerate(micro_batches):
            x = x.to(device, non_blocking=True)
            if dist.ddp:  # all-reduce the gradients only once, after the last micro-batch
                train_model.require_backward_grad_sync = micro == accum - 1
                if disc:
                    train_disc.require_backward_grad_sync = micro == accum - 1
            with ctx:
                inputs = x + cfg.input_noise_std * torch.randn_like(x) if cfg.input_noise_std > 0 else x
                recon, posterior = train_model(inputs, cfg.sample_posterior)
                loss, nll, terms = convae.convae_loss(
                    x, recon, posterior, cfg.pixel_loss, pixel_weight=cfg.pixel_weight, perceptual_weight=cfg.perceptual_weight,
                    kl_weight=cfg.kl_weight, kl_standard=cfg.kl_standard, kl_target_std=cfg.kl_target_std, perceptual=perceptual)
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
            for group in opt.param_groups:
                group['lr'] = common.cosine_lr(step, lr, cfg.min_lr, warmup_steps, total_steps)
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
            log.log(step, {**means, 'lr': optimizer.param_groups[0]['lr'], 'epoch': step / steps_per_epoch})
        if dist.master and (step % cfg.image_every == 0 or last):
            psnr = data.save_reconstructions(model, val_images, os.path.join(cfg.out_dir, f'recon_{step:07d}.png'))
            log.log(step, {'val_psnr': psnr})
        if dist.master and (step % cfg.ckpt_every == 0 or last):
            state = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg))
            if disc:
                state.update(discriminator=disc.state_dict(), disc_optimizer=disc_optimizer.state_dict())
            ckpt = convae.convae_checkpoint(model, **state)
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
