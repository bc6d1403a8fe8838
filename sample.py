"""
Sample images from a trained DiT + VMAE: a PNG grid, or an ADM-format .npz for FID.

Noise -> Euler (or Heun) steps with classifier-free guidance (dit.flow_sample) -> de-standardise with the
latent statistics stored in the DiT checkpoint -> VMAE decoder -> uint8. The EMA weights are used.

A grid of one class (the default checkpoints: out/dit/last.pt and the VMAE it was trained on):
$ python sample.py --class 130
Several classes, own paths, the authors' checkpoints (their DiT needs their latents_stats.pt):
$ python sample.py --class 1 88 250 --dit out/dit_imagenet/last.pt --n 8
$ python sample.py --class 130 --dit 0100000.pt --latent_stats latents_stats.pt --autoencoder vmaef8d16.pth
50k class-balanced samples for the ADM evaluator (resumable; the same images whatever the number of GPUs):
$ torchrun --standalone --nproc_per_node=8 sample.py --dit out/dit_imagenet/last.pt --num_fid_samples 50000
The paper's sampler (guidance on latent channels 0-2 only, scale 10) for its FID numbers:
$ torchrun ... sample.py --num_fid_samples 50000 --cfg_scale 10 --cfg_channels 3
"""

import dataclasses
import os
import time

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
    dit: str = 'out/dit/last.pt'   # train_dit.py checkpoint or the authors' LightningDiT .pt
    autoencoder: str = ''          # VMAE or convolutional checkpoint (default: the one the DiT was trained on)
    latent_stats: str = ''         # per-channel latent mean/std for a DiT checkpoint without them (the authors' latents_stats.pt)
    classes: tuple[int, ...] = dataclasses.field(default=(), metadata={'flag': 'class'})  # --class: indices for the grid (omit for unconditional models)
    n: int = 8                     # samples per class in the grid
    num_fid_samples: int = 0       # write this many class-balanced samples to an ADM .npz instead of a grid
    batch_size: int = 64           # per GPU
    steps: int = 250               # time-grid points: steps - 1 model evaluations with Euler, about twice that with Heun
    solver: str = 'euler'          # euler (the paper's) or heun (second order: fewer steps for the same error)
    cfg_scale: float | None = None  # v_u + s (v_c - v_u); 1 = no guidance (default: 4 class-conditional, 1 unconditional)
    cfg_channels: int = 0          # guide only latent channels [0, k); 0 = all. The paper used 3 with scale 10
    cfg_interval_start: float = 0.1  # no guidance for t below this (t = 0 is noise)
    shift: float = 0.3             # timestep shift s: t -> s t / (1 + (s - 1) t); 0 = uniform
    weights: str = 'ema'           # ema or model
    seed: int = 0
    out: str = ''                  # output .png (grid) or .npz (FID); default under samples/
    dtype: str = ''                # the DiT's autocast: bf16 or fp32; '' = bf16 on a GPU, fp32 on a CPU (noise, time grid and ODE state stay fp32)
    compile: bool = False          # torch.compile the DiT (its first batches compile it: worth it for 50k samples)
    device: str = 'auto'           # auto, cpu, cuda


def parse_args(argv=None):
    return common.parse_config(Config, argv, description=__doc__)


def check_args(args):
    """Values that would run but mislead (decoded noise, an empty grid), refused before any work."""
    for name, least in (('steps', 2), ('n', 1), ('batch_size', 1), ('num_fid_samples', 0), ('cfg_channels', 0), ('shift', 0), ('seed', 0)):
        if getattr(args, name) < least:
            raise ValueError(f"--{name} must be at least {least}, got {getattr(args, name)}")
    if not 0 <= args.cfg_interval_start <= 1:
        raise ValueError(f"--cfg_interval_start must be in [0, 1], got {args.cfg_interval_start}")
    if args.dtype not in ('', 'bf16', 'fp32'):
        raise ValueError(f"--dtype must be bf16 or fp32 (or '' for bf16 on a GPU, fp32 on a CPU), got '{args.dtype}'")
    if args.solver not in dit.SOLVERS or args.weights not in ('ema', 'model'):
        raise ValueError(f"--solver must be one of {', '.join(dit.SOLVERS)} and --weights ema or model, got '{args.solver}', '{args.weights}'")
    common.check_device(args.device)


def main(args):
    check_args(args)
    out = output_path(args)
    dist = common.setup_distributed(args.device)
    common.speed_settings()
    device = dist.device
    dtype = common.resolve_dtype(args.dtype, device)
    model, stats, vae, classes = load_models(args, device)
    if args.cfg_channels > model.in_channels:
        raise ValueError(f"--cfg_channels {args.cfg_channels} is more than the DiT's {model.in_channels} latent channels: "
                         f"use 1..{model.in_channels}, or 0 for all")
    if args.compile:
        model = torch.compile(model)
    if args.num_fid_samples:
        write_fid_samples(model, vae, stats, args, out, dist, dtype)
    elif dist.master:
        write_grid(model, vae, stats, classes, args, out, dtype)
    common.cleanup_distributed()


def output_path(args):
    """--out, or a name under samples/ that spells out the settings; checked before any sampling."""
    if args.num_fid_samples:
        out = args.out or os.path.join('samples', f"{os.path.splitext(os.path.basename(args.dit))[0]}_cfg{args.cfg_scale}"
                                                  f"_ch{args.cfg_channels or 'all'}_{args.solver}{args.steps}_seed{args.seed}"
                                                  f"_{args.num_fid_samples}.npz")
        fileio.check_output_file(out, '--out (with --num_fid_samples, an ADM .npz)', ('.npz',))
    else:
        out = args.out or os.path.join('samples', 'grid_' + '_'.join(map(str, args.classes)) + '.png')
        fileio.check_output_file(out, '--out (a grid image)', ('.png', '.jpg', '.jpeg'))
    return out


def load_models(args, device):
    """The DiT (EMA or raw weights), its latent statistics, the autoencoder that decodes its latents and
    the class names (autoencoders.load_generator). Also settles the default guidance scale."""
    model, stats, autoencoder = autoencoders.load_generator(args.dit, args.autoencoder, args.latent_stats, args.weights, device)
    args.cfg_scale = dit.guidance_scale(model, args.cfg_scale)
    return model, stats, autoencoder, model.meta.get('classes')


def check_classes(model, classes):
    """The labels to sample: the requested classes, or class 0 of an unconditional model."""
    if model.num_classes == 1:
        if classes:
            raise ValueError("this DiT is unconditional (trained on one class): omit --class")
        return [0]
    if not classes:
        raise ValueError(f"this DiT is class-conditional: pass --class with indices in 0..{model.num_classes - 1}")
    bad = [c for c in classes if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is out of range: this DiT has {model.num_classes} classes (0..{model.num_classes - 1})")
    return classes


def sampler_settings(args):
    """The flags that set dit.flow_sample: steps, solver, time shift and guidance."""
    return dict(steps=args.steps, solver=args.solver, shift=args.shift, cfg_scale=args.cfg_scale,
                cfg_interval_start=args.cfg_interval_start, cfg_channels=args.cfg_channels or None)


@torch.no_grad()
def generate(model, autoencoder, stats, labels, indices, seed, sampler, dtype='fp32', progress=False):
    """Images (B, 3, H, W) in [-1, 1] for these labels: the whole sampling path. Sample i's noise comes from
    (seed, i) alone, so an image depends on neither the batch size nor the number of GPUs."""
    device = stats['mean'].device
    size = model.args['input_size']
    z = common.seeded_noise(seed, indices, (model.in_channels, size, size)).to(device)      # noise (B, C, h, w), fp32
    y = torch.as_tensor(labels, device=device)
    with common.autocast(device, dtype):  # the DiT's forwards; the sampler keeps its state in fp32 (a bf16 one drifts)
        latents = dit.flow_sample(model, z, y, progress=progress, **sampler)  # integrate the flow: noise -> standardised latents
    latents = dit.destandardise(latents, stats)                              # x * std + mean: the autoencoder's latent scale
    return autoencoder.decode(latents)                                       # (B, 3, H, W), in fp32


def write_grid(model, vae, stats, classes, args, out, dtype):
    labels_wanted = check_classes(model, args.classes)
    labels = [c for c in labels_wanted for _ in range(args.n)]
    t0 = time.time()
    batches = [range(i, min(len(labels), i + args.batch_size)) for i in range(0, len(labels), args.batch_size)]
    images = torch.cat([generate(model, vae, stats, [labels[i] for i in rows], rows, args.seed, sampler_settings(args), dtype, progress=True)
                        for rows in batches])
    names = [classes[c] if classes else f'class {c}' for c in labels_wanted] if model.num_classes > 1 else None
    data.save_grid(images, out, ncol=args.n, row_labels=names, upscale=max(1, 128 // images.shape[-1]))
    print(f"wrote {out} ({len(labels)} samples, {(time.time() - t0) / len(labels):.2f} s per image, cfg {args.cfg_scale}, "
          f"{args.solver} {args.steps} steps, {dtype})")


def write_fid_samples(model, vae, stats, args, out, dist, dtype):
    """Exactly N samples, labels i % num_classes (balanced, and mixed so that every 5000-image IS
    split sees all classes), as arr_0 uint8 (N, H, W, 3) and arr_1 labels in one .npz. Batches go
    to the ranks round-robin and their rows are kept on disk as they finish, so a killed run resumes,
    with any batch size or number of GPUs, but only with the same models and sampler."""
    n, size = args.num_fid_samples, vae.img_size
    contents = {'dit_sha256': fileio.file_sha256(args.dit), 'weights': args.weights, 'autoencoder_sha256': fileio.file_sha256(vae.path),
                'latent_mean': stats['mean'].tolist(), 'latent_std': stats['std'].tolist(), 'seed': args.seed, 'dtype': dtype,
                **sampler_settings(args)}
    store = common.ShardedArrays(out + '.parts', n, {'images': ((size, size, 3), np.uint8), 'labels': ((), np.int64)}, contents, dist)
    batches = store.todo(args.batch_size)
    common.print0(f"sampling {n} images into {out} ({int((~store.done).sum())} left)")
    for rows in tqdm(batches, disable=not dist.master, desc='sampling'):
        labels = [i % model.num_classes for i in rows]
        images = generate(model, vae, stats, labels, rows, args.seed, sampler_settings(args), dtype)
        store.write(rows, images=data.to_uint8(images).cpu().numpy(), labels=np.array(labels))   # uint8 (B, H, W, 3)
    if store.finish():
        with fileio.atomic_write(out) as f:  # a file object: np.savez adds no '.npz' to the name
            np.savez(f, arr_0=store.arrays['images'], arr_1=store.arrays['labels'])
        store.remove(('images', 'labels'))
        print(f"wrote {out}: arr_0 {store.arrays['images'].shape} uint8, arr_1 labels")
    common.barrier()


if __name__ == '__main__':
    arguments = parse_args()
    with common.clear_errors():
        main(arguments)
