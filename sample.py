"""
Sample images from a trained DiT + VMAE: a PNG grid, or an ADM-format .npz for FID.

Noise -> Euler steps with classifier-free guidance (dit.euler_sample) -> de-standardise with the
latent statistics stored in the DiT checkpoint -> VMAE decoder -> uint8. The EMA weights are used.

A grid of one class (the default checkpoints: out/dit/last.pt and the VMAE it was trained on):
$ python sample.py --class 130
Several classes, own paths, the authors' checkpoints (their DiT needs their latents_stats.pt):
$ python sample.py --class 1 88 250 --dit out/dit_imagenet/last.pt --n 8
$ python sample.py --class 130 --dit 0100000.pt --latent-stats latents_stats.pt --vmae vmaef8d16.pth
50k class-balanced samples for the ADM evaluator (resumable; the same images whatever the number of GPUs):
$ torchrun --standalone --nproc_per_node=8 sample.py --dit out/dit_imagenet/last.pt --num-fid-samples 50000
The paper's sampler (guidance on latent channels 0-2 only, scale 10) for its FID numbers:
$ torchrun ... sample.py --num-fid-samples 50000 --cfg-scale 10 --cfg-channels 3
"""

import argparse
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import common
import data
import dit
import vmae


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--dit', default='out/dit/last.pt', help='train_dit.py checkpoint or the authors\' LightningDiT .pt')
    p.add_argument('--vmae', default='', help='VMAE checkpoint (default: the one the DiT was trained on)')
    p.add_argument('--latent-stats', default='', help='per-channel latent mean/std for a DiT checkpoint without them (the authors\' latents_stats.pt)')
    p.add_argument('--class', dest='classes', type=int, nargs='*', default=None, help='class indices for the grid (omit for unconditional models)')
    p.add_argument('--n', type=int, default=8, help='samples per class in the grid')
    p.add_argument('--num-fid-samples', type=int, default=0, help='write this many class-balanced samples to an ADM .npz instead of a grid')
    p.add_argument('--batch-size', type=int, default=64, help='per GPU')
    p.add_argument('--steps', type=int, default=250, help='Euler grid points (steps - 1 model evaluations)')
    p.add_argument('--cfg-scale', type=float, default=None,
                   help='v_u + s (v_c - v_u); 1 = no guidance (default: 4 for class-conditional models, 1 for unconditional ones)')
    p.add_argument('--cfg-channels', type=int, default=0, help='guide only latent channels [0, k); 0 = all. The paper used 3 with scale 10')
    p.add_argument('--cfg-interval-start', type=float, default=0.1, help='no guidance for t below this (t = 0 is noise)')
    p.add_argument('--shift', type=float, default=0.3, help='timestep shift s: t -> s t / (1 + (s - 1) t); 0 = uniform')
    p.add_argument('--weights', choices=['ema', 'model'], default='ema')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='', help='output .png (grid) or .npz (FID); default under samples/')
    p.add_argument('--device', default='auto')
    return p.parse_args(argv)


def main(args):
    dist = common.setup_distributed(args.device)
    common.enable_tf32()
    device = dist.device
    model, stats, vae, classes = load_models(args, device)
    if args.num_fid_samples:
        write_fid_samples(model, vae, stats, args, dist)
    elif dist.master:
        write_grid(model, vae, stats, classes, args, device)
    common.cleanup_distributed()


def load_models(args, device):
    """The DiT (EMA or raw weights), its latent statistics, the VMAE that decodes its latents and
    the class names; every mismatch is a one-line error. Also settles the default guidance scale."""
    if not os.path.isfile(args.dit):
        raise FileNotFoundError(f"DiT checkpoint {args.dit} not found: pass --dit (train_dit.py writes <out_dir>/last.pt; "
                                f"the demo's is out/demo/dit/last.pt)")
    model = dit.load_dit(args.dit, device, args.weights)
    config = model.meta.get('config', {})
    if args.cfg_scale is None:  # the default: guide class-conditional models; an unconditional one cannot be
        args.cfg_scale = 1.0 if model.null_label is None else 4.0
    elif args.cfg_scale != 1 and model.null_label is None:
        raise ValueError(f"this DiT was trained without a null class, so it cannot be guided: use --cfg-scale 1 (got {args.cfg_scale})")
    stats = vmae.read_latent_stats(args.latent_stats) if args.latent_stats else model.latent_stats
    if stats is None:
        raise ValueError(f"{args.dit} carries no latent statistics (the authors' checkpoints do not): pass --latent-stats "
                         f"(their latents_stats.pt, or a train_dit.py latents/meta.json)")
    vmae_path = args.vmae or config.get('vmae', '')
    if not vmae_path:
        raise ValueError(f"no VMAE to decode with: pass --vmae (the checkpoint {args.dit} was trained on)")
    if args.vmae and config.get('vmae_sha256') not in (None, common.file_sha256(args.vmae)):
        common.print0(f"note: decoding with {args.vmae}, not the VMAE this DiT was trained on ({config.get('vmae')}): "
                      f"right for a decoder fine-tuned with the encoder frozen, wrong otherwise")
    C, H, W = model.in_channels, model.model_args['input_size'], model.model_args['input_size']
    vae = vmae.load_vmae(vmae_path, device, img_size=config.get('image_size'))
    if (vae.latent_dim, vae.grid, vae.grid) != (C, H, W):
        raise ValueError(f"the VMAE {vmae_path} makes latents of shape ({vae.latent_dim}, {vae.grid}, {vae.grid}) but the "
                         f"DiT {args.dit} models ({C}, {H}, {W}): pass the VMAE the DiT was trained on")
    return model, {k: torch.as_tensor(v, dtype=torch.float32).flatten().to(device) for k, v in stats.items()}, vae, model.meta.get('classes')


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


@torch.no_grad()
def generate(model, vae, stats, labels, indices, args, device):
    """Images (B, 3, H, W) in [-1, 1] for these labels; sample i's noise comes from (seed, i) alone,
    so the result does not depend on the batch size or the number of GPUs."""
    C, S = model.in_channels, model.model_args['input_size']
    z = torch.stack([torch.randn(C, S, S, generator=torch.Generator().manual_seed(common.seed_for(args.seed, i))) for i in indices])
    y = torch.as_tensor(labels, device=device)
    latents = dit.euler_sample(model, z.to(device), y, steps=args.steps, shift=args.shift, cfg_scale=args.cfg_scale,
                               cfg_interval_start=args.cfg_interval_start, cfg_channels=args.cfg_channels or None)
    return vae.decode(latents * stats['std'].view(1, -1, 1, 1) + stats['mean'].view(1, -1, 1, 1))


def write_grid(model, vae, stats, classes, args, device):
    labels_wanted = check_classes(model, args.classes)
    labels = [c for c in labels_wanted for _ in range(args.n)]
    t0 = time.time()
    images = torch.cat([generate(model, vae, stats, labels[i:i + args.batch_size], range(i, min(len(labels), i + args.batch_size)), args, device)
                        for i in tqdm(range(0, len(labels), args.batch_size), desc='sampling')])
    names = [classes[c] if classes else f'class {c}' for c in labels_wanted] if model.num_classes > 1 else None
    out = args.out or os.path.join('samples', 'grid_' + '_'.join(map(str, labels_wanted)) + '.png')
    data.save_grid(images, out, ncol=args.n, row_labels=names, upscale=max(1, 128 // images.shape[-1]))
    print(f"wrote {out} ({len(labels)} samples, {(time.time() - t0) / len(labels):.2f} s per image, cfg {args.cfg_scale}, {args.steps} steps)")


def write_fid_samples(model, vae, stats, args, dist):
    """Exactly N samples, labels i % num_classes (balanced, and mixed so that every 5000-image IS
    split sees all classes), as arr_0 uint8 (N, H, W, 3) and arr_1 labels in one .npz. Batches go
    to the ranks round-robin and are kept on disk as they finish, so a killed run resumes."""
    n = args.num_fid_samples
    out = args.out or os.path.join('samples', f"{os.path.splitext(os.path.basename(args.dit))[0]}_cfg{args.cfg_scale}"
                                              f"_ch{args.cfg_channels or 'all'}_steps{args.steps}_seed{args.seed}_{n}.npz")
    size = vae.img_size
    store = common.ShardedArrays(out + '.parts', n, args.batch_size, {'images': ((size, size, 3), np.uint8), 'labels': ((), np.int64)}, dist)
    todo = store.todo()
    common.print0(f"sampling {n} images into {out} ({len(todo)} of {len(store.done)} batches left on rank 0)")
    for b, rows in tqdm(todo, disable=not dist.master, desc='sampling'):
        labels = [i % model.num_classes for i in rows]
        images = generate(model, vae, stats, labels, rows, args, dist.device)
        store.write(b, images=data.to_uint8(images).cpu().numpy(), labels=np.array(labels))
    if store.finish():
        np.savez(out + '.tmp.npz', arr_0=store.arrays['images'], arr_1=store.arrays['labels'])
        os.replace(out + '.tmp.npz', out)
        for name in ('images', 'labels', 'done'):
            os.remove(os.path.join(out + '.parts', f'{name}.npy'))
        os.rmdir(out + '.parts')
        print(f"wrote {out}: arr_0 {store.arrays['images'].shape} uint8, arr_1 labels")
    common.barrier()


if __name__ == '__main__':
    arguments = parse_args()
    with common.clear_errors():
        main(arguments)
