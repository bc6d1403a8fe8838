"""
Evaluation: ADM-compatible FID / sFID / IS / precision / recall in plain PyTorch, reconstruction metrics
of any autoencoder (a VMAE or a convolutional baseline), and the paper's latent analyses (section 5:
smoothness, perceptual compression).

Generation metrics reproduce OpenAI's guided-diffusion evaluator (TensorFlow) without TensorFlow: the
FID Inception-v3 of the TF graph (inception.py) and the metrics as ADM defines them (metrics.py).
Statistics are float64 and TF32 is off while features are computed, so the numbers do not depend on
the GPU generation. This file reads the inputs, shards the feature extraction over ranks, caches the
statistics next to the inputs and runs the commands; analyses.py holds the section-5 analyses.

Usage:
    python evaluate.py fid VIRTUAL_imagenet256_labeled.npz samples.npz  # FID, sFID, IS, precision, recall
    torchrun --nproc_per_node 8 evaluate.py fid REF.npz samples.npz     # Inception features sharded over GPUs
    python evaluate.py fid ref_images/ sample_images/ --image_size 256  # folders (ADM centre crop to 256)
    python evaluate.py recon --autoencoder vmae.pt --data imagenet/val     # L1, MSE, PSNR, SSIM, LPIPS, rFID
    python evaluate.py recon --autoencoder sdvae.pt --data builtin --no_rfid --no_lpips   # offline, no weights
    python evaluate.py smoothness --autoencoder vmae.pt --data imagenet/val --latent_stats dit.pt
    python evaluate.py compression --autoencoder vmae.pt --data ADE/images --masks ADE/annotations
    python evaluate.py solvers --dit dit.pt                             # Euler vs Heun against a fine reference
    python evaluate.py recognition --dit dit.pt --data builtin          # do samples show their class?
`python evaluate.py REF SAMPLES` (without `fid`) also works. Inception weights: --inception PATH,
else the torch hub cache (downloaded there when online).
"""

import argparse
import dataclasses
import json
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import common
import dit
import fileio
from analyses import (SMOOTHNESS_EPS, SegmentationMasks, evaluate_compression, evaluate_reconstruction, heun_match, measure_latent_std,
                      plot_smoothness, plot_solvers, recognition_study, solver_study, thumbnail_side, train_classifier)
from autoencoders import load_autoencoder, load_generator
from common import exact_fp32, gather_shards, print0, seeded_noise, shard_bounds
from data import BUILTIN_CLASSES, IMG_EXTENSIONS, BuiltinShapes, build_dataset, center_crop_arr, open_rgb
from dit import read_latent_stats
from inception import FID_WEIGHTS_SHA256_PREFIX, inception_weights_path, load_inception
from metrics import METRIC_LABELS, frechet_distance, inception_score, precision_recall, statistics
from vmae import lpips_vgg

#################################################################################
#                              Image inputs                                     #
#################################################################################

class NpzImages:
    """`arr_0` of an ADM-style .npz (uint8, (N, H, W, 3)), read in row ranges straight out of the zip,
    so 50k images at 256 px (9.8 GB) never sit in memory at once. Other arrays (`mu`, ...) stay untouched."""

    def __init__(self, path):
        self.path = path
        self.keys = npz_keys(path)
        self.has_images = 'arr_0' in self.keys
        if not self.has_images:
            return
        with zipfile.ZipFile(path) as zf, zf.open('arr_0.npy') as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
            self.shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3 or fortran:
            hint = ' (channels first: transpose to (N, H, W, 3))' if len(self.shape) == 4 and self.shape[1] == 3 else ''
            raise ValueError(f"arr_0 in '{path}' is {dtype} {tuple(self.shape)}{hint}; the evaluator takes uint8 images (N, H, W, 3) in 0..255, as ADM's")

    def __len__(self):
        return self.shape[0] if self.has_images else 0

    def batches(self, start, stop, batch_size):
        row_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open('arr_0.npy') as f:
            f.seek(self.offset + start * row_bytes)  # one seek, then sequential reads
            for i in range(start, stop, batch_size):
                n = min(batch_size, stop - i)
                yield np.frombuffer(bytearray(f.read(n * row_bytes)), np.uint8).reshape(n, *self.shape[1:])  # writable, for torch

    def stored_statistics(self):
        """ADM's rule: if the file holds `mu`, use its mu/sigma (and mu_s/sigma_s) instead of computing them."""
        if 'mu' not in self.keys:
            return None
        expected = {'mu': (2048,), 'sigma': (2048, 2048), 'mu_s': (2023,), 'sigma_s': (2023, 2023)}
        with np.load(self.path) as f:
            stats = {k: f[k].astype(np.float64) for k in expected if k in f}
        for k, v in stats.items():
            if v.shape != expected[k]:
                raise ValueError(f"'{k}' in '{self.path}' has shape {v.shape}, expected {expected[k]} (Inception pool_3 / mixed_6 statistics)")
        if 'sigma' not in stats:
            raise ValueError(f"'{self.path}' has 'mu' but no 'sigma'")
        return stats

    def fingerprint(self):
        st = os.stat(self.path)
        return {'file': os.path.basename(self.path), 'bytes': st.st_size, 'mtime_ns': st.st_mtime_ns, 'n': len(self)}


def npz_keys(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{path}' not found")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"'{path}' is not an .npz archive (expected arr_0 = uint8 images (N, H, W, 3), as ADM's reference batches and sample.py write)")
    with zipfile.ZipFile(path) as zf:
        return [n.removesuffix('.npy') for n in zf.namelist()]


class FolderImages:
    """Image files under a folder (recursively, sorted by path), as uint8 (H, W, 3). With image_size,
    each is centre-cropped to image_size^2 the ADM way; without, all must share one size."""

    def __init__(self, root, image_size=None):
        self.path, self.image_size = root.rstrip('/'), image_size
        self.files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root, followlinks=True)
                            for f in fs if f.lower().endswith(IMG_EXTENSIONS))
        if not self.files:
            raise ValueError(f"no images found in '{root}' (looked for {', '.join(IMG_EXTENSIONS)})")
        self.has_images = True

    def __len__(self):
        return len(self.files)

    def load(self, path):
        try:
            img = open_rgb(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image '{path}': {e}") from None
        return np.asarray(center_crop_arr(img, self.image_size) if self.image_size else img, dtype=np.uint8)

    def batches(self, start, stop, batch_size):
        with ThreadPoolExecutor(8) as pool:  # PIL decodes outside the GIL
            for i in range(start, stop, batch_size):
                images = list(pool.map(self.load, self.files[i:min(i + batch_size, stop)]))
                sizes = {im.shape for im in images}
                if len(sizes) > 1:
                    raise ValueError(f"images in '{self.path}' differ in size ({', '.join(f'{s[1]}x{s[0]}' for s in sorted(sizes)[:2])}): "
                                     f"pass --image-size N to centre-crop them to N x N")
                yield np.stack(images)

    def stored_statistics(self):
        return None

    def fingerprint(self):
        stats = [os.stat(f) for f in self.files]
        return {'folder': os.path.basename(self.path), 'n': len(self.files), 'bytes': sum(s.st_size for s in stats),
                'mtime_ns': max(s.st_mtime_ns for s in stats), 'image_size': self.image_size}


def open_images(path, image_size=None):
    """An .npz (arr_0) or a folder of images."""
    if os.path.isdir(path):
        return FolderImages(path, image_size)
    return NpzImages(path)

#################################################################################
#                          Feature extraction                                   #
#################################################################################

FEATURE_DIMS = {'pool': 2048, 'logits': 1008, 'spatial': 2023}


def prefetch(iterable):
    """Yield the items of `iterable`, producing the next one in a thread while the caller uses this one."""
    iterator = iter(iterable)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(next, iterator, None)
        while (item := future.result()) is not None:
            future = pool.submit(next, iterator, None)
            yield item


@torch.no_grad()
def extract_features(inception, images, d, batch_size=64, desc='features'):
    """Inception features of all images, this rank computing its contiguous shard.
    -> {'pool': (N, 2048), 'logits': (N, 1008), 'spatial': (N, 2023)} float32 numpy, input order."""
    start, stop = shard_bounds(len(images), d.rank, d.world_size)
    parts = {k: [torch.zeros(0, dim)] for k, dim in FEATURE_DIMS.items()}
    with exact_fp32(), tqdm(total=stop - start, desc=desc, unit='img', disable=not d.master) as bar:
        for batch in prefetch(images.batches(start, stop, batch_size)):
            x = torch.from_numpy(batch).to(d.device).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
            for k, v in zip(FEATURE_DIMS, inception(x)):
                parts[k].append(v.cpu())
            bar.update(len(batch))
    return {k: gather_shards(torch.cat(v), len(images), d).numpy() for k, v in parts.items()}

#################################################################################
#                        Statistics and their cache                             #
#################################################################################

def cache_path(images):
    """The sidecar next to the input: the user's npz is never rewritten (the authors' evaluator did)."""
    return images.path + '.inception_stats.npz'


def read_cache(path, key):
    """The cached arrays if `path` exists and was written for `key` (same input files, same weights)."""
    try:
        with np.load(path) as f:
            if str(f['key']) == key:
                return {k: f[k] for k in f.files if k != 'key'}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # absent, partial or foreign file: recompute
        pass
    return None


def write_cache(path, key, arrays):
    try:
        with fileio.atomic_write(path) as f:  # a file object: np.savez appends no suffix
            np.savez(f, key=np.array(key), **arrays)
    except OSError as e:  # a read-only dataset folder is fine: just no cache
        print0(f"warning: could not write the statistics cache {path}: {e}")


def inception_statistics(inception, images, d, batch_size=64, use_cache=True, desc='features'):
    """pool features and logits of `images` with the statistics of pool (mu, sigma) and spatial
    (mu_s, sigma_s) features, read from the sidecar cache when it matches. Returned on rank 0 only."""
    path = cache_path(images)
    key = json.dumps({'input': images.fingerprint(), 'inception_sha256': inception.sha256, 'version': 1}, sort_keys=True)
    cached = read_cache(path, key) if use_cache and d.master else None
    if d.ddp:  # rank 0 decides, so that all ranks agree on whether to extract
        flag = [cached is not None]
        dist.broadcast_object_list(flag, src=0)
        hit = flag[0]
    else:
        hit = cached is not None
    if hit:
        print0(f"{images.path}: statistics from {path}")
        return cached
    features = extract_features(inception, images, d, batch_size, desc)
    if not d.master:
        return None
    mu, sigma = statistics(features['pool'])
    mu_s, sigma_s = statistics(features['spatial'])
    result = dict(pool=features['pool'], logits=features['logits'], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    if use_cache:
        write_cache(path, key, result)
    return result

#################################################################################
#                             Generation metrics                                #
#################################################################################

def evaluate_generation(ref, samples, inception, d, batch_size=64, use_cache=True, pr_fp16=True):
    """ADM's five numbers for a reference (npz or folder) and samples. Returned on rank 0 only."""
    ref_stats, smp_stats = ref.stored_statistics(), samples.stored_statistics()
    if not samples.has_images:
        raise ValueError(f"'{samples.path}' has no arr_0: the samples must be images (uint8 (N, H, W, 3)), as sample.py writes")
    if not ref.has_images and ref_stats is None:
        raise ValueError(f"'{ref.path}' has neither arr_0 (images) nor mu/sigma (statistics): not a reference batch")
    ref_feats = inception_statistics(inception, ref, d, batch_size, use_cache, 'reference') if ref.has_images else {}
    smp = inception_statistics(inception, samples, d, batch_size, use_cache, 'samples')
    if not d.master:
        return None
    # ADM's rule, for both files: stored statistics win; arr_0's features still serve precision/recall and IS
    ref_feats, smp = {**ref_feats, **(ref_stats or {})}, {**smp, **(smp_stats or {})}
    results = {'FID': frechet_distance(smp['mu'], smp['sigma'], ref_feats['mu'], ref_feats['sigma'])}
    results['sFID'] = frechet_distance(smp['mu_s'], smp['sigma_s'], ref_feats['mu_s'], ref_feats['sigma_s']) if 'mu_s' in ref_feats else None
    results['IS'] = inception_score(smp['logits'])
    if 'pool' in ref_feats:
        results['precision'], results['recall'] = precision_recall(ref_feats['pool'], smp['pool'], fp16=pr_fp16, device=d.device)
    else:
        print0(f"note: '{ref.path}' holds statistics only (no arr_0): no precision/recall")
        results['precision'] = results['recall'] = None
    info = {'ref': ref.path, 'samples': samples.path, 'n_ref': len(ref), 'n_samples': len(samples),
            'ref_statistics': 'stored in the npz' if ref_stats else 'computed',
            'sample_statistics': 'stored in the npz' if smp_stats else 'computed', 'pr_distances': 'fp16' if pr_fp16 else 'fp32'}
    return results, info

#################################################################################
#                                     CLI                                       #
#################################################################################

@dataclasses.dataclass
class FidConfig:
    ref: str = common.positional()      # reference: ADM reference batch .npz (arr_0, optional mu/sigma/mu_s/sigma_s) or image folder
    samples: str = common.positional()  # samples: .npz with arr_0 (uint8 (N, H, W, 3), as sample.py writes) or image folder
    image_size: int = 0                 # centre-crop folder images to this size (ADM crop); npz files are used as they are
    cache: bool = True                  # read and write <input>.inception_stats.npz (--no_cache: neither)
    pr_fp32: bool = False               # float32 precision/recall distances instead of ADM's fp16
    inception: str = ''                 # pt_inception-2015-12-05-6726825d.pth; '': the torch hub cache's, downloaded there when online
    allow_random_inception: bool = False  # accept Inception weights other than the FID file (tests only)
    device: str = 'auto'                # 'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu', 'cuda'
    batch_size: int = 64                # images per Inception forward, per rank
    out: str = ''                       # JSON path; '': <samples>.metrics.json


@dataclasses.dataclass
class AutoencoderConfig:
    autoencoder: str = common.aliases('', 'vmae')  # a VMAE or convolutional checkpoint (train_vmae.py's, the authors'), or a diffusers vae/ folder; required
    data: str = ''                      # image folder (e.g. ImageNet val); recon and smoothness also take 'builtin'; required
    image_size: int = 0                 # evaluation size; 0: the autoencoder's
    num_images: int = 0                 # use only the first N images (0: all)
    device: str = 'auto'                # 'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu', 'cuda'
    batch_size: int = 32                # images per batch, per rank
    out: str = ''                       # JSON path; '': next to the autoencoder checkpoint


@dataclasses.dataclass
class ReconConfig(AutoencoderConfig):
    rfid: bool = True                   # rFID (needs the Inception weights; --no_rfid skips it)
    lpips: bool = True                  # LPIPS (needs torchvision's VGG16 weights; --no_lpips skips it)
    num_workers: int = 4                # data-loading processes per rank
    inception: str = ''                 # pt_inception-2015-12-05-6726825d.pth; '': the torch hub cache's, downloaded there when online
    allow_random_inception: bool = False  # accept Inception weights other than the FID file (tests only)


@dataclasses.dataclass
class SmoothnessConfig(ReconConfig):
    eps: tuple[float, ...] = SMOOTHNESS_EPS  # noise levels, in latent stds
    latent_stats: str = ''              # train_dit.py checkpoint or meta.json, or the authors' latents_stats.pt; '': measure the std
    seed: int = 0                       # the latent noise of image i is drawn from (seed, i)


@dataclasses.dataclass
class CompressionConfig(AutoencoderConfig):
    masks: str = ''                     # label PNGs named like the images (ADE20K) or CelebAMask-HQ part masks; required


@dataclasses.dataclass
class SamplingConfig:
    dit: str = ''                       # train_dit.py checkpoint; required
    autoencoder: str = common.aliases('', 'vmae')  # the autoencoder that decodes its latents; '': the one the DiT was trained on
    num_samples: int = 100              # class-balanced samples (label i % classes), noise from (seed, i)
    cfg_scale: float | None = None      # guidance; default: 4 for class-conditional DiTs, 1 for unconditional ones
    cfg_interval_start: float = 0.1     # no guidance for t below this
    shift: float = 0.3                  # the time grid's shift, as sample.py
    seed: int = 0
    batch_size: int = 250               # samples per DiT batch
    device: str = 'auto'                # 'auto', 'cpu' or 'cuda'
    out: str = ''                       # JSON path; '': next to the DiT checkpoint


@dataclasses.dataclass
class SolversConfig(SamplingConfig):
    latent_stats: str = ''              # for a DiT checkpoint without them (the authors' latents_stats.pt)
    reference_steps: int = 1000         # Heun steps of the reference integration
    cfg_channels: int = 0               # guide only latent channels [0, k); 0 = all


@dataclasses.dataclass
class RecognitionConfig(SamplingConfig):
    data: str = ''                      # real images of its classes to train the judge on: 'builtin' or a folder of class subfolders; required
    held_out: str = ''                  # real images of the same classes the judge never sees, its bar; '': builtin's val split
    num_samples: int = 500              # class-balanced samples (label i % classes), noise from (seed, i)
    steps: int = 50                     # sampler steps (the paper: 250)
    solver: str = 'euler'               # euler or heun
    seed: int = 1                       # noise seed (sample.py's grids use 0)


def format_value(v):
    return 'n/a' if v is None else f'{v:.4f}'


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print('  '.join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))), flush=True)


def write_results(path, obj, cfg, inception=None):
    """The results as JSON, with what produced them: the command's settings, torch, the Inception weights."""
    obj = {**obj, 'config': dataclasses.asdict(cfg), 'torch': torch.__version__}
    if inception is not None:
        obj.update(inception_sha256=inception.sha256, fid_weights=inception.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX))
    fileio.write_json(path, obj)
    print(f"wrote {path}", flush=True)


def load_inception_for(cfg, d):
    path = inception_weights_path(cfg.inception, d.master)
    model = load_inception(path, d.device, cfg.allow_random_inception)
    print0(f"Inception: {path} (sha256 {model.sha256[:16]}...)" + ('' if model.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX) else
                                                                  '  WARNING: not the FID weights, numbers are not comparable'))
    return model


def run_fid(cfg, d):
    ref, samples = open_images(cfg.ref, cfg.image_size), open_images(cfg.samples, cfg.image_size)
    inception = load_inception_for(cfg, d)
    out = evaluate_generation(ref, samples, inception, d, cfg.batch_size, cfg.cache, not cfg.pr_fp32)
    if not d.master:
        return
    results, info = out
    print_table(['metric', 'value'], [[METRIC_LABELS[k], format_value(v)] for k, v in results.items()])
    write_results(cfg.out or samples.path + '.metrics.json', {**results, **info}, cfg, inception)


def load_model_and_data(cfg, d):
    model = load_autoencoder(cfg.autoencoder, d.device, cfg.image_size or None)
    dataset = build_dataset(cfg.data, model.img_size, train=False, split='val')
    if cfg.num_images:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.num_images, len(dataset))))
    print0(f"{type(model).__name__} {cfg.autoencoder} at {model.img_size} px; {len(dataset)} images from {cfg.data} (ADM centre crop"
           f"{'' if cfg.data == 'builtin' else '; the authors evaluate_tokenizer.py used Resize + CenterCrop instead'})")
    return model, dataset


def reconstruction_tools(cfg, d):
    inception = load_inception_for(cfg, d) if cfg.rfid else None
    lpips_net = lpips_vgg(pretrained=True).to(d.device) if cfg.lpips else None
    return inception, lpips_net


def run_recon(cfg, d):
    model, dataset = load_model_and_data(cfg, d)
    inception, lpips_net = reconstruction_tools(cfg, d)
    latent_numbers = model.latent_dim * model.grid ** 2
    side = thumbnail_side(latent_numbers)
    results = evaluate_reconstruction(model, dataset, d, (0.0,), None, cfg.batch_size, cfg.num_workers, inception, lpips_net,
                                      thumbnail_side=side)
    if not d.master:
        return
    metrics, thumbnail = results[0.0], results['thumbnail']
    print_table(['metric', type(model).__name__, f'{side}x{side} thumbnail'],
                [[METRIC_LABELS[k], format_value(v), format_value(thumbnail[k]) if k in thumbnail else ''] for k, v in metrics.items()])
    print(f"(the thumbnail, bicubic down and up, is the largest with no more numbers than the latent: {3 * side * side} vs {latent_numbers})")
    if thumbnail['exact']:
        print(f"(its PSNR is infinite: it copies {thumbnail['exact']} flat images exactly)")
    write_results(cfg.out or cfg.autoencoder.rstrip('/') + '.recon.json', {**metrics, 'data': cfg.data, 'n_images': len(dataset), 'image_size': model.img_size,
                                                       'latent_numbers': latent_numbers, 'thumbnail': thumbnail}, cfg, inception)


def latent_std_for(cfg, model, dataset, d):
    """--latent_stats' std, else one measured on the evaluated images. -> (std (C,), where it came from)"""
    if cfg.latent_stats:
        std, source = read_latent_stats(cfg.latent_stats)['std'], f"from {cfg.latent_stats}"
    else:
        std = measure_latent_std(model, dataset, d, cfg.batch_size, cfg.num_workers, cfg.seed)
        source = f"measured on posterior samples of the {len(dataset)} evaluated images"
    if len(std) != model.latent_dim:
        raise ValueError(f"the latent statistics have {len(std)} channels, the autoencoder {model.latent_dim}")
    print0(f"latent std per channel {source}: " + ' '.join(f'{s:.3g}' for s in std.tolist()))
    return std, source


def run_smoothness(cfg, d):
    model, dataset = load_model_and_data(cfg, d)
    inception, lpips_net = reconstruction_tools(cfg, d)
    std, source = latent_std_for(cfg, model, dataset, d)
    results = evaluate_reconstruction(model, dataset, d, cfg.eps, std, cfg.batch_size, cfg.num_workers, inception, lpips_net, cfg.seed)
    if not d.master:
        return
    names = list(results[cfg.eps[0]])
    print_table(['eps', *[METRIC_LABELS[k] for k in names]], [[f'{e:g}', *[format_value(results[e][k]) for k in names]] for e in cfg.eps])
    out = cfg.out or cfg.autoencoder.rstrip('/') + '.smoothness.json'
    write_results(out, {'eps': {f'{e:g}': results[e] for e in cfg.eps}, 'latent_std': std.tolist(), 'latent_std_source': source,
                        'data': cfg.data, 'n_images': len(dataset), 'seed': cfg.seed}, cfg, inception)
    plot_smoothness(results, os.path.splitext(out)[0] + '.png')


def run_compression(cfg, d):
    if d.ddp:
        raise ValueError("compression runs in one process (it only encodes): start it with python, not torchrun")
    model = load_autoencoder(cfg.autoencoder, d.device, cfg.image_size or None)
    results = evaluate_compression(model, cfg.data, SegmentationMasks(cfg.masks), model.img_size, d.device,
                                   cfg.num_images, cfg.batch_size)
    print_table(['features', 'sigma^2', 'rho', 'images with rho'],
                [[k, format_value(results[k]['sigma2']), format_value(results[k]['rho']), results[k]['n_rho']] for k in ('latent', 'pixel')])
    write_results(cfg.out or cfg.autoencoder.rstrip('/') + '.compression.json', {**results, 'data': cfg.data, 'masks': cfg.masks,
                                                             'image_size': model.img_size}, cfg)


def run_solvers(cfg, d):
    if d.ddp:
        raise ValueError("solvers runs in one process: start it with python, not torchrun")
    model, stats, autoencoder = load_generator(cfg.dit, cfg.autoencoder, cfg.latent_stats, 'ema', d.device)
    guidance = dict(cfg_scale=dit.guidance_scale(model, cfg.cfg_scale), cfg_interval_start=cfg.cfg_interval_start,
                    cfg_channels=cfg.cfg_channels or None, shift=cfg.shift)
    size = model.model_args['input_size']
    noise = seeded_noise(cfg.seed, range(cfg.num_samples), (model.in_channels, size, size)).to(d.device)
    labels = [i % model.num_classes for i in range(cfg.num_samples)]
    builtin = model.meta.get('classes') == [name for name, _, _ in BUILTIN_CLASSES]  # the shape check knows only these
    classifier = train_classifier(BuiltinShapes(autoencoder.img_size, flip=True), colour_blind=True) if builtin else None
    rows = solver_study(model, autoencoder, stats, labels, noise, reference_steps=cfg.reference_steps,
                        batch_size=cfg.batch_size, classifier=classifier, **guidance)
    print_table(['solver', 'steps', 'DiT forwards', 'latent RMSE', 'PSNR', 'recognised'],
                [[r['solver'], r['steps'], r['forwards'], f"{r['latent_rmse']:.2e}", f"{r['psnr']:.2f}",
                  format_value(r['recognised'])] for r in rows])
    euler = next(r for r in rows if (r['solver'], r['steps']) == ('euler', 250))
    match = heun_match(rows)
    print(f"Euler-250 ({euler['forwards']} forwards): " + (f"matched by Heun-{match['steps']} ({match['forwards']} forwards)"
                                                           if match else "not matched by any Heun run here"))
    out = cfg.out or cfg.dit + '.solvers.json'
    write_results(out, {'rows': rows, 'heun_matching_euler_250': match and match['steps'], 'n_samples': cfg.num_samples,
                        'guidance': {k: v for k, v in guidance.items()}}, cfg)
    plot_solvers(rows, os.path.splitext(out)[0] + '.png')


def run_recognition(cfg, d):
    if d.ddp:
        raise ValueError("recognition runs in one process: start it with python, not torchrun")
    if cfg.data != 'builtin' and not cfg.held_out:
        raise ValueError("evaluate.py recognition on a folder needs --held_out: real images of the same classes that --data does not hold")
    model, stats, autoencoder = load_generator(cfg.dit, cfg.autoencoder, '', 'ema', d.device)
    if model.num_classes < 2:
        raise ValueError(f"{cfg.dit} is an unconditional DiT: its samples have no class to recognise")
    size = autoencoder.img_size
    train_set = build_dataset(cfg.data, size, train=True, flip=True)
    held_out = BuiltinShapes(size, split='val', per_class=200) if cfg.data == 'builtin' and not cfg.held_out else build_dataset(cfg.held_out, size)
    for name, images in (('--data', train_set), ('--held_out', held_out)):
        if images.classes != model.meta.get('classes', images.classes):
            raise ValueError(f"the classes of {name} ({', '.join(images.classes[:5])}, ...) are not those the DiT was trained on "
                             f"({', '.join(model.meta['classes'][:5])}, ...)")
    # every built-in class has its own hue: the judge must go by shape, so it is colour-blind there
    rates = recognition_study(model, autoencoder, stats, train_set, held_out, colour_blind=cfg.data == 'builtin',
                              num_samples=cfg.num_samples, seed=cfg.seed, batch_size=cfg.batch_size, steps=cfg.steps,
                              solver=cfg.solver, shift=cfg.shift, cfg_scale=dit.guidance_scale(model, cfg.cfg_scale),
                              cfg_interval_start=cfg.cfg_interval_start)
    real, samples = (sum(rates[k]) / len(rates[k]) for k in ('real', 'samples'))
    print_table(['class', 'real held-out', 'samples'],
                [[name, f'{r:.2f}', f'{s:.2f}'] for name, r, s in zip(train_set.classes, rates['real'], rates['samples'])])
    print(f"recognised as their class: samples {100 * samples:.1f}% of {cfg.num_samples}, real held-out images "
          f"{100 * real:.1f}% of {len(held_out)} ({100 * samples / real:.0f}% of the real rate; "
          f"{'colour-blind' if cfg.data == 'builtin' else 'colour'} judge trained on {len(train_set)} images of {cfg.data})")
    write_results(cfg.out or cfg.dit + '.recognition.json', {**rates, 'real_mean': real, 'samples_mean': samples,
                                                            'classes': train_set.classes}, cfg)


@dataclasses.dataclass
class Command:
    config: type
    run: Callable
    required: tuple  # flags without a sensible default, checked before any work
    help: str


COMMANDS = {
    'fid': Command(FidConfig, run_fid, (), 'ADM-compatible FID, sFID, IS, precision and recall of SAMPLES against REF.'),
    'recon': Command(ReconConfig, run_recon, ('autoencoder', 'data'),
                     'Reconstruction metrics of an autoencoder from the posterior mean: L1, MSE, PSNR, SSIM, LPIPS, rFID.'),
    'smoothness': Command(SmoothnessConfig, run_smoothness, ('autoencoder', 'data'),
                          'Latent smoothness (Fig. 6): reconstruction metrics from latents perturbed by eps x channel std x N(0, I).'),
    'compression': Command(CompressionConfig, run_compression, ('autoencoder', 'data', 'masks'),
                           'Perceptual compression (Fig. 7): within-segment variance and disentanglement of latents vs pixels.'),
    'solvers': Command(SolversConfig, run_solvers, ('dit',),
                       'Sampler accuracy: Euler and Heun at several step counts against a fine reference, same noise.'),
    'recognition': Command(RecognitionConfig, run_recognition, ('dit', 'data'),
                           'Do samples show their class? A small classifier trained on real images judges samples and held-out real images.'),
}


def check_config(cfg):
    """Settings that would run but make no sense, refused before any work; 0 keeps its meaning (the
    autoencoder's size, all images). An autoencoder command's image size must give whole latents (f8)."""
    if isinstance(cfg, FidConfig):
        return common.check_settings(cfg, at_least={'batch_size': 1, 'image_size': 1}, zero_ok=('image_size',))
    if isinstance(cfg, SamplingConfig):
        common.check_settings(cfg, at_least={'num_samples': 1, 'batch_size': 1, 'seed': 0, 'cfg_interval_start': 0, 'shift': 0})
        if isinstance(cfg, SolversConfig):
            return common.check_settings(cfg, at_least={'reference_steps': 2, 'cfg_channels': 0})
        return common.check_settings(cfg, at_least={'steps': 2}, choices={'solver': dit.SOLVERS})
    common.check_settings(cfg, at_least={'batch_size': 1, 'num_images': 0, 'image_size': 8}, multiple_of={'image_size': 8},
                          zero_ok=('image_size',))
    if isinstance(cfg, ReconConfig):  # recon, smoothness
        common.check_settings(cfg, at_least={'num_workers': 0})
    if isinstance(cfg, SmoothnessConfig):
        common.check_settings(cfg, at_least={'eps': 0, 'seed': 0})


def parse_command(argv):
    """-> (command name, its config). Each command's flags come from its config dataclass."""
    parser = argparse.ArgumentParser(prog='evaluate.py', description=__doc__.split('\n\n')[0],
                                     epilog='`evaluate.py REF SAMPLES` (no command) is `evaluate.py fid REF SAMPLES`.')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='{' + ','.join(COMMANDS) + '}')
    parsers = {}
    for name, command in COMMANDS.items():
        parsers[name] = subparsers.add_parser(name, help=command.help, description=command.help)
        common.add_config_arguments(parsers[name], command.config)
    if argv and argv[0] not in COMMANDS and argv[0] not in ('-h', '--help'):
        argv = ['fid', *argv]  # backward compatibility: generation metrics were the command-less default before sub-commands
    args = parser.parse_args(argv)
    return args.command, common.config_from_args(COMMANDS[args.command].config, args, parsers[args.command])


def main(argv=None):
    name, cfg = parse_command(sys.argv[1:] if argv is None else list(argv))
    command = COMMANDS[name]
    with common.clear_errors():
        missing = [f'--{flag}' for flag in command.required if not getattr(cfg, flag)]
        if missing:
            raise ValueError(f"evaluate.py {name} needs {' and '.join(missing)} (see evaluate.py {name} -h)")
        check_config(cfg)
        d = common.setup_distributed(cfg.device)
        command.run(cfg, d)
        common.cleanup_distributed()  # not on an error: a rank that fails leaves, and torchrun stops the others


if __name__ == '__main__':
    main()
