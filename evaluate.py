"""
Evaluation: ADM-compatible FID / sFID / IS / precision / recall in plain PyTorch, and the reconstruction
metrics of Table 1 for any autoencoders (VMAEs or convolutional baselines, several at once).

Generation metrics reproduce OpenAI's guided-diffusion evaluator (TensorFlow) without TensorFlow: the
FID Inception-v3 of the TF graph (inception.py), the inputs and their cached features (below; this file
owns that cache format) and the metrics as ADM defines them (metrics.py). Statistics are float64 and TF32
is off while features are computed, so the numbers do not depend on the GPU generation. The paper's
latent analyses (section 5) build on the reconstruction pass here: `python -m paper --help`.

Usage:
    python evaluate.py fid VIRTUAL_imagenet256_labeled.npz samples.npz  # FID, sFID, IS, precision, recall
    torchrun --nproc_per_node 8 evaluate.py fid REF.npz samples.npz     # Inception features sharded over GPUs
    python evaluate.py fid ref_images/ sample_images/ --image_size 256  # folders (ADM centre crop to 256)
    python evaluate.py recon --autoencoder vmae.pt sdvae.pt --data imagenet/val   # Table 1: L1, MSE, PSNR, SSIM, LPIPS, rFID
    python evaluate.py recon --autoencoder ae.pt --data builtin --rfid false --lpips false   # offline, no weights
Inception weights: --inception PATH, else the torch hub cache (downloaded there when online).
"""

import dataclasses
import json
import math
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import common
import fileio
from autoencoders import load_autoencoders
from common import exact_fp32, format_value, gather_shards, print0, print_table, seeded_noise, shard_bounds
from data import IMG_EXTENSIONS, build_dataset, center_crop_arr, open_rgb, to_uint8
from inception import FID_WEIGHTS_SHA256_PREFIX, inception_weights_path, load_inception
from metrics import (METRIC_LABELS, frechet_distance, inception_score, precision_recall, reconstruction_metrics,
                     statistics)
from vmae import lpips_vgg

#################################################################################
#                                   Commands                                    #
#################################################################################

@dataclasses.dataclass
class FidConfig:
    ref: str = common.positional()      # reference: ADM reference batch .npz (arr_0, optional mu/sigma/mu_s/sigma_s) or image folder
    samples: str = common.positional()  # samples: .npz with arr_0 (uint8 (N, H, W, 3), as sample.py writes) or image folder
    image_size: int = 0                 # centre-crop folder images to this size (ADM crop); npz files are used as they are
    cache: bool = True                  # read and write <input>.inception_stats.npz (false: neither)
    pr_fp32: bool = False               # float32 precision/recall distances instead of ADM's fp16
    inception: str = ''                 # pt_inception-2015-12-05-6726825d.pth; '': the torch hub cache's, downloaded there when online
    allow_random_inception: bool = False  # accept Inception weights other than the FID file (tests only)
    device: str = 'auto'                # 'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu', 'cuda'
    batch_size: int = 64                # images per Inception forward, per rank
    out: str = ''                       # JSON path; '': <samples>.metrics.json


@dataclasses.dataclass
class AutoencoderConfig:
    autoencoder: tuple[str, ...] = ()   # one or more: VMAE or convolutional checkpoints (ours, the authors'), diffusers vae/ folders; required
    names: tuple[str, ...] = ()         # their names in tables and plots; default: the run folder (out/sdvae/last.pt -> sdvae)
    data: str = ''                      # image folder (e.g. ImageNet val), or 'builtin'; required
    image_size: int = 0                 # evaluation size; 0: the first autoencoder's
    num_images: int = 0                 # use only the first N images (0: all)
    device: str = 'auto'                # 'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu', 'cuda'
    batch_size: int = 32                # images per batch, per rank
    out: str = ''                       # JSON path, the PNG beside it; '': next to the checkpoint (one), analysis/<command>.json (several)


@dataclasses.dataclass
class ReconConfig(AutoencoderConfig):
    rfid: bool = True                   # rFID (needs the Inception weights; false skips it)
    lpips: bool = True                  # LPIPS (needs torchvision's VGG16 weights; false skips it)
    num_workers: int = 4                # data-loading processes per rank
    inception: str = ''                 # pt_inception-2015-12-05-6726825d.pth; '': the torch hub cache's, downloaded there when online
    allow_random_inception: bool = False  # accept Inception weights other than the FID file (tests only)

def inception_info(inception):
    """What the JSON records of the Inception weights: their hash, and whether they are the FID file."""
    return dict(inception_sha256=inception.sha256, fid_weights=inception.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX))


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
    common.write_results(output_path(cfg, 'fid'), {**results, **info, **inception_info(inception)}, cfg)


def output_path(cfg, command):
    """--out, else beside the input: the samples (fid), the checkpoint of a single autoencoder; with
    several, analysis/<command>.json."""
    if cfg.out:
        return cfg.out
    if command == 'fid':
        return cfg.samples.rstrip('/') + '.metrics.json'
    if len(cfg.autoencoder) == 1:
        return cfg.autoencoder[0].rstrip('/') + f'.{command}.json'
    return os.path.join('analysis', f'{command}.json')


def evaluation_images(cfg, size):
    dataset = build_dataset(cfg.data, size, train=False, split='val')
    if cfg.num_images:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.num_images, len(dataset))))
    print0(f"{len(dataset)} images from {cfg.data} (ADM centre crop"
           f"{'' if cfg.data == 'builtin' else '; the authors evaluate_tokenizer.py used Resize + CenterCrop instead'})")
    return dataset


def reconstruction_tools(cfg, d):
    inception = load_inception_for(cfg, d) if cfg.rfid else None
    lpips_net = lpips_vgg(pretrained=True).to(d.device) if cfg.lpips else None
    return inception, lpips_net


def run_recon(cfg, d):
    """Table 1: one column per autoencoder, and the thumbnail of the first one's latent size."""
    models, size = load_autoencoders(cfg.autoencoder, cfg.names, d.device, cfg.image_size)
    dataset = evaluation_images(cfg, size)
    inception, lpips_net = reconstruction_tools(cfg, d)
    results = {}
    for (name, model), path in zip(models.items(), cfg.autoencoder):
        latent_numbers = model.latent_dim * model.grid ** 2
        out = evaluate_reconstruction(model, dataset, d, (0.0,), None, cfg.batch_size, cfg.num_workers, inception, lpips_net,
                                      thumbnail_side=thumbnail_side(latent_numbers))
        if d.master:
            results[name] = {**out[0.0], 'latent_numbers': latent_numbers, 'thumbnail': out['thumbnail'], 'path': path}
    if not d.master:
        return
    first = next(iter(results.values()))  # the thumbnail is of the first one's latent size
    thumbnail, side = first['thumbnail'], first['thumbnail']['side']
    print_table(['metric', *results, f'{side}x{side} thumbnail'],
                [[METRIC_LABELS[k], *[format_value(r[k]) for r in results.values()], format_value(thumbnail[k]) if k in thumbnail else '']
                 for k in ('l1', 'mse', 'psnr', 'ssim', 'lpips', 'rfid') if k in first])
    print(f"(the thumbnail, bicubic down and up, is the largest with no more numbers than the latent: {3 * side * side} vs "
          f"{first['latent_numbers']})")
    if thumbnail['exact']:
        print(f"(its PSNR is infinite: it copies {thumbnail['exact']} flat images exactly)")
    common.write_results(output_path(cfg, 'recon'), {'autoencoders': results, 'data': cfg.data, 'n_images': len(dataset),
                                                     'image_size': size, **(inception_info(inception) if inception else {})}, cfg)

#################################################################################
#                  Reconstruction Metrics over a Dataset (Table 1)              #
#################################################################################

@torch.no_grad()
def evaluate_reconstruction(model, dataset, d, eps_list=(0.0,), latent_std=None, batch_size=32, num_workers=4,
                            inception=None, lpips_net=None, seed=0, thumbnail_side=0):
    """Reconstruct each image from its posterior mean (plus eps * latent_std * noise, per channel, for
    each eps) and compare the uint8 reconstruction with the uint8 original (what saved PNGs would hold).
    -> {eps: {'l1', 'mse' (both on [0, 1] images), 'psnr', 'ssim', ['lpips'], ['rfid']}}: means over
    images, on rank 0 (None on the others). thumbnail_side > 0 adds the same metrics (no rFID) of that
    bicubic thumbnail under 'thumbnail', in the same pass, with 'exact': how many images it copies
    exactly (flat ones: their PSNR, and so the mean's, is infinite)."""
    start, stop = shard_bounds(len(dataset), d.rank, d.world_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, stop)), batch_size=batch_size,
                                         num_workers=num_workers)
    names = ['l1', 'mse', 'psnr', 'ssim'] + (['lpips'] if lpips_net is not None else [])
    per_image = {eps: {k: [torch.zeros(0, dtype=torch.float64)] for k in names} for eps in [*eps_list] + ['thumbnail'] * bool(thumbnail_side)}
    pools = {key: [torch.zeros(0, 2048)] for key in ['original', *eps_list]} if inception is not None else {}
    index = start
    with exact_fp32():
        for x, _ in tqdm(loader, desc='reconstruction', disable=not d.master):
            x = x.to(d.device)
            original = to_uint8(x)                                    # (B, H, W, 3): the crop, exactly (it came from uint8)
            mean = model.encode(x).mean                               # (B, C, h, w)
            noise = seeded_noise(seed, range(index, index + len(x)), mean.shape[1:]).to(d.device)
            index += len(x)
            if inception is not None:
                pools['original'].append(inception(original.permute(0, 3, 1, 2))[0].cpu())
            if thumbnail_side:
                thumbnails = torch.from_numpy(thumbnail_reconstruction(original.cpu().numpy(), thumbnail_side)).to(d.device)
                for k, v in reconstruction_metrics(thumbnails, original, lpips_net).items():
                    per_image['thumbnail'][k].append(v)
            for eps in eps_list:
                z = mean + eps * latent_std.to(d.device).view(1, -1, 1, 1) * noise if eps else mean
                recon = to_uint8(model.decode(z))
                for k, v in reconstruction_metrics(recon, original, lpips_net).items():
                    per_image[eps][k].append(v)
                if inception is not None:
                    pools[eps].append(inception(recon.permute(0, 3, 1, 2))[0].cpu())
    gather = lambda parts: gather_shards(torch.cat(parts), len(dataset), d).numpy()
    per_image = {eps: {k: gather(v) for k, v in metrics.items()} for eps, metrics in per_image.items()}
    results = {eps: {k: float(v.mean()) for k, v in metrics.items()} for eps, metrics in per_image.items()}
    if thumbnail_side:
        results['thumbnail'].update(side=thumbnail_side, exact=int(np.isinf(per_image['thumbnail']['psnr']).sum()))
    pools = {key: gather(parts) for key, parts in pools.items()}
    if not d.master:
        return None
    if inception is not None:
        mu_ref, sigma_ref = statistics(pools['original'])
        for eps in eps_list:
            results[eps]['rfid'] = frechet_distance(*statistics(pools[eps]), mu_ref, sigma_ref)
    return results


def thumbnail_reconstruction(images, side):
    """uint8 images (N, H, W, 3) squeezed to side x side and back with PIL's bicubic (antialiased)
    resize: side^2 x 3 numbers per image, the baseline an autoencoder of that size must beat."""
    def round_trip(a):
        return np.asarray(Image.fromarray(a).resize((side, side), Image.BICUBIC).resize(a.shape[1::-1], Image.BICUBIC))
    return np.stack([round_trip(a) for a in images])


def thumbnail_side(latent_numbers):
    """The side of the largest RGB thumbnail with no more numbers than the latent: the simplest compressor
    of an autoencoder's size, the baseline its reconstructions must beat (evaluate_reconstruction)."""
    return math.isqrt(latent_numbers // 3)

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
                                     f"pass --image_size N to centre-crop them to N x N")
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
#                                      CLI                                      #
#################################################################################

COMMANDS = {
    'fid': (FidConfig, 'ADM-compatible FID, sFID, IS, precision and recall of SAMPLES against REF.'),
    'recon': (ReconConfig, 'Reconstruction metrics of autoencoders from the posterior mean: L1, MSE, PSNR, SSIM, LPIPS, rFID.'),
}


def check_config(name, cfg):
    """What would run but mislead, and output paths that could not be written, refused before any work."""
    if name == 'recon' and not (cfg.autoencoder and cfg.data):
        raise ValueError("evaluate.py recon needs --autoencoder and --data (see evaluate.py recon -h)")
    if cfg.batch_size < 1 or cfg.image_size < 0 or (name == 'recon' and (cfg.image_size % 8 or cfg.num_images < 0 or cfg.num_workers < 0)):
        raise ValueError("--batch_size must be at least 1, --image_size 0 or a positive multiple of 8 (recon), "
                         "--num_images and --num_workers at least 0")
    common.check_device(cfg.device)
    fileio.check_output_file(output_path(cfg, name), '--out' if cfg.out else 'the default output')


def main(argv=None):
    with common.clear_errors():
        name, cfg = common.parse_command(COMMANDS, sys.argv[1:] if argv is None else list(argv), 'evaluate.py',
                                         __doc__.split('\n\n')[0])
        check_config(name, cfg)
        d = common.setup_distributed(cfg.device)
        {'fid': run_fid, 'recon': run_recon}[name](cfg, d)
        common.cleanup_distributed()  # not on an error: a rank that fails leaves, and torchrun stops the others


if __name__ == '__main__':
    main()
