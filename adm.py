"""
The inputs and features of ADM's generation metrics: sample batches (.npz, arr_0 uint8 (N, H, W, 3), as
OpenAI's reference batches and sample.py's) and image folders; FID Inception-v3 features sharded over
ranks; their statistics cached beside each input (this file owns that cache format); and the five
numbers of two image sets (FID, sFID, IS, precision, recall), computed by metrics.py.
"""

import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import fileio
from common import exact_fp32, gather_shards, print0, shard_bounds
from data import IMG_EXTENSIONS, center_crop_arr, open_rgb
from metrics import frechet_distance, inception_score, precision_recall, statistics

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
