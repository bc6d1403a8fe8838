"""
Train the DiT on an autoencoder's latents: extract the latents once, then rectified-flow training.

1. Extraction (skipped when out_dir/latents is complete; resumable; sharded over ranks): every image
   is centre-cropped and encoded with the autoencoder (a VMAE or a convolutional baseline), and the
   posterior moments (mean || log-variance) of the image and of its mirror are stored in a
   memory-mapped array with the labels, as the authors did. Per-channel mean/std are measured on 10k
   latents.
2. Training: each item takes the image or its mirror (p = 1/2) and its latent: a fresh posterior
   sample for a VMAE, the posterior mean for a convolutional model (the authors' choices; --posterior),
   standardised by those statistics; the DiT learns the velocity of the straight path from noise.
   AdamW at a constant lr, EMA from step 0; checkpoints carry the latent statistics.

On a CPU, the small models on the built-in dataset (a few minutes; needs a trained VMAE-small):
$ python train_dit.py configs/dit_small.py --autoencoder out/vmae_small/last.pt
ImageNet, DiT-B/1, 8 GPUs (the paper: batch 1024, 100k steps), on the VMAE or on a baseline:
$ torchrun --standalone --nproc_per_node=8 train_dit.py configs/dit_imagenet.py --data /data/imagenet/train --autoencoder out/vmae_stage3/last.pt
$ torchrun --standalone --nproc_per_node=8 train_dit.py configs/dit_imagenet.py --data /data/imagenet/train --autoencoder out/sdvae/last.pt --out_dir out/dit_sdvae
Multi-node as in train_vmae.py; continue a stopped run with the same command plus --resume.
"""

import copy
import dataclasses
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import autoencoders
import common
import data
import dit
import fileio


@dataclasses.dataclass
class Config:
    # data, autoencoder and output
    data: str = 'builtin'          # image folder (class subfolders, or flat = unconditional) or 'builtin'
    image_size: int = 256
    autoencoder: str = ''          # train_vmae.py's last.pt, the authors' vmaef8d16.pth, a diffusers vae/ folder
    posterior: str = 'auto'        # the latent: sample (VMAE), mode (convolutional models), or auto: as the authors per model
    out_dir: str = 'out/dit'
    latents: str = ''              # where the latents live ('' = out_dir/latents); share it between runs
    latent_dtype: str = 'float32'  # float32 as the authors; float16 halves the disk (ImageNet: 335 GB -> 168 GB)
    extract_batch_size: int = 64
    # model
    model: str = 'DiT-B/1'
    qk_norm: bool = True           # the paper's fix for attention-logit growth (off in the authors' CelebA-HQ run)
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (0 for unconditional data)
    # optimisation: the authors' LightningDiT recipe
    batch_size: int = 1024         # global batch per step
    micro_batch_size: int = 128    # per rank per forward pass
    lr: float = 2e-4               # constant, no warm-up
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    ema_decay: float = 0.9999
    max_steps: int = 100_000
    # system
    device: str = 'auto'
    dtype: str = ''                # autocast of training and extraction: bf16, fp16 (CUDA) or fp32; '' = bf16 on a GPU, fp32 on a CPU
    compile: bool = False
    num_workers: int = 8
    seed: int = 0
    # logging, checkpoints and sample grids
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_every: int = 20_000       # also keep out_dir/ckpt_<step>.pt (0: only last.pt)
    sample_every: int = 10_000     # a PNG grid of EMA samples
    sample_steps: int = 50         # Euler steps for those grids (sample.py defaults to 250)
    sample_cfg_scale: float = 4.0
    resume: bool = False


def check_config(cfg):
    """Settings that would run but mislead, refused before any work."""
    if cfg.model not in dit.DiT_models:
        raise ValueError(f"unknown model '{cfg.model}': choose one of {list(dit.DiT_models)}")
    if cfg.image_size < 8 or cfg.image_size % 8:  # every autoencoder here downsamples by 8
        raise ValueError(f"--image_size must be a positive multiple of 8, got {cfg.image_size}")
    for name, allowed in (('dtype', ('', 'bf16', 'fp16', 'fp32')), ('latent_dtype', ('float32', 'float16')),
                          ('posterior', ('auto', 'sample', 'mode'))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got '{getattr(cfg, name)}'")
    for name in ('extract_batch_size', 'batch_size', 'micro_batch_size', 'max_steps', 'log_every', 'ckpt_every', 'sample_every'):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ('weight_decay', 'grad_clip', 'keep_every', 'num_workers', 'seed'):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    if not (0 <= cfg.class_dropout_prob < 1 and 0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1 and 0 <= cfg.ema_decay <= 1):
        raise ValueError("--class_dropout_prob, --beta1 and --beta2 must be in [0, 1), --ema_decay in [0, 1]")
    if cfg.lr <= 0 or cfg.sample_steps < 2:
        raise ValueError(f"--lr must be positive and --sample_steps at least 2, got {cfg.lr} and {cfg.sample_steps}")
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
    latent_dir = cfg.latents or os.path.join(cfg.out_dir, 'latents')
    resume_from = fileio.read_checkpoint(last_path) if cfg.resume else None  # a wrong file fails before any work
    if resume_from is not None and (resume_from.get('kind') != 'dit' or 'optimizer' not in resume_from):
        raise ValueError(f"--resume: {last_path} is not a train_dit.py run's checkpoint: choose the --out_dir of such a run")

    # 1. latents (the autoencoder is needed to extract them and to decode the sample grids)
    ae_path = cfg.autoencoder or (resume_from['config']['autoencoder'] if resume_from else read_meta(latent_dir).get('autoencoder', ''))
    if not ae_path:
        raise ValueError("no autoencoder given: pass --autoencoder (a train_vmae.py checkpoint, the authors' vmaef8d16.pth, "
                         "or a diffusers vae/ folder)")
    autoencoder = autoencoders.load_autoencoder(ae_path, device, img_size=cfg.image_size)
    posterior = cfg.posterior if cfg.posterior != 'auto' else autoencoders.dit_latent(autoencoder)
    source = {'data': cfg.data, 'image_size': cfg.image_size, 'autoencoder_sha256': fileio.file_sha256(ae_path),
              'posterior': posterior, 'dtype': cfg.latent_dtype}
    if resume_from is not None:  # the run continues on the latent space it started on, or not at all
        common.check_same_settings(resume_from['config'], {k: source[k] for k in ('autoencoder_sha256', 'posterior')},
                                   f"the DiT run in {cfg.out_dir}", "resume with the autoencoder and --posterior it was trained on")
    meta = read_meta(latent_dir)
    if meta:  # complete latents: reused only when they come from this run's data, size, autoencoder and posterior
        common.check_same_settings(meta, source, f"the latents folder {latent_dir}", "use another --latents folder, or delete it to extract again")
    else:
        meta = extract_latents(autoencoder, cfg, source, ae_path, latent_dir, dist, dtype)
    dataset = LatentDataset(latent_dir, meta)
    stats = {k: torch.tensor(meta[k], device=device) for k in ('mean', 'std')}

    loader, sampler, steps_per_epoch = data.training_loader(dataset, cfg.micro_batch_size, accum, dist, cfg.seed, cfg.num_workers, 'latents')

    # 2. model, EMA and optimizer; an unconditional dataset (one class) gets no label dropout and no null class
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    num_classes = meta['num_classes']
    model = dit.DiT_models[cfg.model](input_size=meta['shape'][-1], in_channels=meta['shape'][1] // 2,
                                      num_classes=num_classes, use_qknorm=cfg.qk_norm,
                                      class_dropout_prob=cfg.class_dropout_prob if num_classes > 1 else 0.0).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # fused: one pass over each tensor without temporaries; on a CPU the default per-tensor loop takes several times longer
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=True)
    ctx, scaler = common.mixed_precision(device, dtype)
    step = 0
    if resume_from is not None:
        model.load_state_dict(resume_from['model'])
        ema.load_state_dict(resume_from['ema'])
        optimizer.load_state_dict(resume_from['optimizer'])
        scaler.load_state_dict(resume_from['scaler'])
        step = resume_from['step']
        say(f"resumed from {last_path} at step {step}")
        common.note_config_changes(resume_from['config'], dataclasses.replace(cfg, posterior=posterior))
        del resume_from  # the optimizer state it holds is large
    say(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(dataset)} latents "
        f"{tuple(meta['shape'][1:])} | {num_classes} classes | {dist.world_size} rank(s) x {cfg.micro_batch_size} x {accum} "
        f"accumulation = {cfg.batch_size} per step | {cfg.max_steps} steps | {device} {dtype}")
    train_model = common.wrap_for_training(model, cfg.compile, dist)

    log = common.RunLog(cfg.out_dir, dist.master, step, cfg.max_steps)
    meter = common.Meter(['loss'], device)
    model.train()
    for step, micro_batches in data.step_batches(loader, sampler, step, steps_per_epoch, accum):
        if step >= cfg.max_steps:
            break
        torch.manual_seed(common.seed_for(cfg.seed, dist.rank, step))  # posterior, noise, t and label dropout follow (seed, rank, step)
        for micro, (moments, y) in enumerate(micro_batches):
            moments, y = moments.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
            mean, logvar = moments.chunk(2, dim=1)
            if posterior == 'sample':  # a fresh posterior sample each time the item is drawn
                mean = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            x1 = dit.standardise(mean, stats)
            if dist.ddp:  # all-reduce the gradients only once, after the last micro-batch
                train_model.require_backward_grad_sync = micro == accum - 1
            with ctx:
                loss = dit.flow_loss(train_model, x1, y).mean()
            scaler.scale(loss / accum).backward()
            meter.add({'loss': loss})
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        dit.update_ema(ema, model, cfg.ema_decay)
        step += 1
        log.step(cfg.batch_size)

        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or last:
            means = meter.average(step, last_path)  # raises on NaN/inf before anything is saved
            log.log(step, {'loss': means['loss'], 'epoch': step / steps_per_epoch})
        if dist.master and (step % cfg.sample_every == 0 or last):
            save_sample_grid(ema, autoencoder, stats, meta, cfg, step)
        if dist.master and (step % cfg.ckpt_every == 0 or last):
            ckpt = dit.dit_checkpoint(model, ema, {k: v.cpu() for k, v in stats.items()}, optimizer=optimizer.state_dict(),
                                      scaler=scaler.state_dict(), step=step, classes=meta['classes'],
                                      config={**dataclasses.asdict(cfg), 'autoencoder': os.path.abspath(ae_path),
                                              'autoencoder_sha256': meta['autoencoder_sha256'], 'posterior': posterior})
            fileio.save_checkpoint(ckpt, last_path)  # atomic: a crash mid-write keeps the last good one
            if cfg.keep_every and step % cfg.keep_every == 0:
                fileio.save_checkpoint(ckpt, os.path.join(cfg.out_dir, f'ckpt_{step:07d}.pt'))
    log.close()
    say(f"done: {last_path}")
    common.cleanup_distributed()


#################################################################################
#                                Latent Extraction                              #
#################################################################################

class LatentDataset(torch.utils.data.Dataset):
    """Posterior moments (2C, h, w) of an image or its mirror (chosen by the item's seed), and the label."""

    def __init__(self, latent_dir, meta):
        self.path = os.path.join(latent_dir, 'latents.npy')
        self.labels = np.load(os.path.join(latent_dir, 'labels.npy'))
        self.num_items = meta['num_items']
        self.moments = None  # opened in each worker: a memmap must not be pickled into the workers

    def __len__(self):
        return self.num_items

    def __getitem__(self, item):
        index, seed = item
        if self.moments is None:
            self.moments = np.load(self.path, mmap_mode='r')  # (N, 2 views, 2C, h, w)
        view = seed & 1  # the seed's lowest bit: unflipped or mirrored, p = 1/2
        return torch.from_numpy(np.array(self.moments[index, view])), int(self.labels[index])


def read_meta(latent_dir):
    """latent_dir/meta.json, written once extraction is complete ({} before)."""
    path = os.path.join(latent_dir, 'meta.json')
    meta = json.load(open(path)) if os.path.isfile(path) else {}
    return meta if meta.get('complete') else {}  # an older version wrote it before the rows


@torch.no_grad()
def extract_latents(autoencoder, cfg, source, ae_path, latent_dir, dist, dtype):
    """Encode every image and its mirror into latent_dir/latents.npy (N, 2, 2C, h, w), sharded over
    the ranks and resumable (common.ShardedArrays, bound to `source`); meta.json, with the latent
    statistics, is written only once every row is on disk."""
    dataset = data.build_dataset(cfg.data, cfg.image_size, train=False, flip=False)
    shape = [2, 2 * autoencoder.latent_dim, autoencoder.grid, autoencoder.grid]
    # the encoder's precision binds an unfinished extraction (no folder mixes two), not the reuse of finished latents
    store = common.ShardedArrays(latent_dir, len(dataset), {'latents': (shape, cfg.latent_dtype), 'labels': ((), np.int64)},
                                 {**source, 'autocast': dtype}, dist)
    batches = store.todo(cfg.extract_batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=data.worker_count(cfg.num_workers))
    common.print0(f"extracting latents of {len(dataset)} images into {latent_dir} ({int((~store.done).sum())} left)")
    for rows, (x, y) in zip(batches, tqdm(loader, disable=not dist.master, desc='extract')):
        moments = encode_moments(autoencoder, x.to(dist.device), dtype)
        store.write(rows, latents=moments.cpu().numpy(), labels=y.numpy())
    if store.finish():
        stats = latent_statistics(store.arrays['latents'], cfg.seed, source['posterior'] == 'sample')
        store.remove()
        fileio.write_json(os.path.join(latent_dir, 'meta.json'), {
            **source, 'autocast': dtype, 'autoencoder': os.path.abspath(ae_path), 'num_items': len(dataset), 'num_classes': dataset.num_classes,
            'classes': dataset.classes, 'shape': shape, 'complete': True, **stats})
    common.barrier()
    return read_meta(latent_dir)


@torch.no_grad()
def encode_moments(autoencoder, x, dtype):
    """Posterior moments (B, 2 views, 2C, h, w) of images x and of their mirrors (the mirror is encoded, not the
    latent flipped), the encoder under `dtype` autocast; the moments come out fp32."""
    with common.autocast(x.device, dtype):
        both = [autoencoder.encode(view) for view in (x, x.flip(-1))]
    return torch.stack([torch.cat([p.mean, p.logvar], dim=1).float() for p in both], dim=1)


def latent_statistics(latents, seed, sample=True, num=10_000, chunk=1000):
    """Per-channel mean and (unbiased) std of one posterior sample (or the mean, sample=False) of each of
    `num` random unflipped latents, as the authors measured them, in float64."""
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(latents), size=min(num, len(latents)), replace=False))
    stats = dit.LatentStats(latents.shape[2] // 2)
    for start in range(0, len(index), chunk):
        moments = np.asarray(latents[index[start:start + chunk], 0], dtype=np.float64)  # (n, 2C, h, w)
        mean, logvar = np.split(moments, 2, axis=1)
        stats.add(torch.from_numpy(mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape) if sample else mean))
    return {k: v.tolist() for k, v in stats.result().items()}

#################################################################################
#                                  Sample Grids                                 #
#################################################################################

@torch.no_grad()
def save_sample_grid(ema, autoencoder, stats, meta, cfg, step, per_class=4, max_classes=10):
    """A grid of EMA samples (one row per class, fixed noise) -> out_dir/samples_<step>.png."""
    device = next(ema.parameters()).device
    classes = list(range(min(meta['num_classes'], max_classes)))
    y = torch.tensor(classes, device=device).repeat_interleave(per_class)
    _, channels, h, w = meta['shape']
    z = torch.randn(len(y), channels // 2, h, w, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    scale = cfg.sample_cfg_scale if ema.null_label is not None else 1.0
    images = autoencoder.decode(dit.destandardise(dit.euler_sample(ema, z, y, steps=cfg.sample_steps, cfg_scale=scale), stats))
    labels = [meta['classes'][c] for c in classes] if meta['num_classes'] > 1 else None
    data.save_grid(images, os.path.join(cfg.out_dir, f'samples_{step:07d}.png'), ncol=per_class, row_labels=labels,
                   upscale=max(1, 128 // cfg.image_size))


if __name__ == '__main__':
    config = common.parse_config(Config, description=__doc__.split('\n\n')[0])
    with common.clear_errors():
        main(config)
