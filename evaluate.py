"""
Evaluation: ADM-compatible FID / sFID / IS / precision / recall in plain PyTorch, reconstruction
metrics of a VMAE, and the paper's latent analyses (section 5: smoothness, perceptual compression).

Generation metrics reproduce OpenAI's guided-diffusion evaluator (TensorFlow) without TensorFlow:
- Inception-v3 in its FID form (the TF graph's block variants) with pytorch-fid's port of the TF
  weights, fed uint8 images through the graph's own preprocessing: TF1 bilinear resize to 299, then
  (x - 128) / 128;
- pool_3 (2048-d) for FID and precision/recall; the 1008-way logits without the fc bias for IS; the
  first 7 channels of Mixed_6d.branch1x1 (TF "mixed_6/conv", 17 x 17 x 7 = 2023-d, NHWC order) for sFID;
- the metrics as ADM defines them: scipy's sqrtm with its eps retry and imaginary-part check,
  IS over consecutive 5000-image splits, k=3 manifolds with fp16 distances.
Statistics are float64 and TF32 is off while features are computed, so the numbers do not depend on
the GPU generation.

References:
- Dhariwal & Nichol. Diffusion Models Beat GANs on Image Synthesis. 2021: the evaluator and its
  reference batches, https://github.com/openai/guided-diffusion/tree/main/evaluations
- Heusel et al. 2017 (FID); Nash et al. 2021 (sFID); Salimans et al. 2016 (IS); Kynkaanniemi et
  al. 2019 (improved precision and recall); Wang et al. 2004 (SSIM); Zhang et al. 2018 (LPIPS).
- Lee, Shin, Choi, Lee. Latent Diffusion Models with Masked AutoEncoders. ICCV 2025 (section 5).

Usage:
    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples.npz     # FID, sFID, IS, precision, recall
    torchrun --nproc_per_node 8 evaluate.py REF.npz samples.npz        # Inception features sharded over GPUs
    python evaluate.py ref_images/ sample_images/ --image-size 256     # folders (ADM centre crop to 256)
    python evaluate.py recon --vmae vmae.pt --data imagenet/val        # L1, MSE, PSNR, SSIM, LPIPS, rFID
    python evaluate.py recon --vmae vmae.pt --data builtin --no-rfid --no-lpips   # offline, no weights
    python evaluate.py smoothness --vmae vmae.pt --data imagenet/val --latent-stats dit.pt
    python evaluate.py compression --vmae vmae.pt --data ADE/images --masks ADE/annotations
Inception weights: --inception PATH, else the torch hub cache (downloaded there when online).
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import socket
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
import scipy.special
import scipy.stats
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import cleanup_distributed, clear_errors, file_sha256, print0, seed_for, setup_distributed
from data import IMG_EXTENSIONS, build_dataset, center_crop_arr, open_rgb, scan_image_folder, to_uint8
from vmae import load_vmae, lpips_vgg, patchify, read_checkpoint, read_latent_stats

FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_SHA256_PREFIX = '6726825d'  # torch hub naming: the file name carries the start of its SHA-256

#################################################################################
#                      Inception-v3, FID (TF graph) variant                     #
#################################################################################

class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm with TF's eps 0.001, ReLU."""

    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3, stride-1 average pool as TF's SAME padding computes it: padded zeros are not counted
    (torchvision's Inception counts them; the FID graph does not)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (35x35)."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17) with factorised 7x7 convolutions."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branches(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(tf_avg_pool(x)),
        ]

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (8x8). The TF graph pools with an average in 7b but a 3x3 max in 7c (a quirk
    every FID port keeps)."""

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = tf_avg_pool(x) if self.pool == 'avg' else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the 2015-12-05 TF graph that FID, IS and ADM's evaluator use. Parameter names
    match pytorch-fid's pt_inception-2015-12-05-6726825d.pth (566 entries, strict load)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool='avg')
        self.Mixed_7c = InceptionE(2048, pool='max')
        self.fc = nn.Linear(2048, 1008)  # 1008 TF classes; only the weight is used (ADM's IS drops the bias)

    def forward(self, images):
        """images: (B, 3, H, W) uint8, any H and W. -> pool (B, 2048), logits (B, 1008) without the
        fc bias, spatial (B, 2023): Mixed_6d.branch1x1 channels 0..6 flattened in (h, w, c) order."""
        x = resize_tf1_bilinear(images.float(), 299)
        x = (x - 128) / 128                         # the graph's Sub 128, Mul 1/128: [-1, 0.9921875], not [-1, 1]
        x = self.Conv2d_1a_3x3(x)                   # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                   # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                   # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                   # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                   # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        mixed_6_conv = branches[0]                  # TF "mixed_6/conv": (B, 192, 17, 17), after BN and ReLU
        x = self.Mixed_6e(torch.cat(branches, 1))   # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048): TF "pool_3"
        logits = pool.mm(self.fc.weight.T)          # (B, 1008)
        spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).flatten(1)  # (B, 17, 17, 7) -> (B, 2023), index (h*17 + w)*7 + c
        return pool, logits, spatial


def resize_tf1_bilinear(x, size):
    """TF1's ResizeBilinear (align_corners=False, no half-pixel centres), as inside ADM's graph.
    x: float32 (B, C, H, W) -> (B, C, size, size). Source coordinate = dst * (in / out) in float32,
    low tap floored, high tap clamped to the border, lerp along x and then along y. No anti-aliasing,
    so downsampling aliases exactly as TF does. (torch's bilinear uses half-pixel centres: not the same.)"""
    def taps(n_in):
        scale = torch.tensor(n_in, dtype=torch.float32) / size  # float32 division, as TF computes the scale
        src = torch.arange(size, dtype=torch.float32) * scale
        lo = src.long()                                           # floor: src >= 0
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo.float()).to(x.device)

    y_lo, y_hi, dy = taps(x.shape[2])
    x_lo, x_hi, dx = taps(x.shape[3])
    top, bottom = x[:, :, y_lo], x[:, :, y_hi]                    # (B, C, size, W)
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx  # (B, C, size, size)
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy[:, None]

# -----------------------------------------------------------------------------
# weights

def inception_weights_path(path=None, master=True):
    """--inception PATH, else the torch hub cache, downloading pytorch-fid's file there if needed."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights '{path}' not found (--inception): it should be {os.path.basename(FID_WEIGHTS_URL)} from {FID_WEIGHTS_URL}")
        return path
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(FID_WEIGHTS_URL))
    if master and not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # torch's downloader sets none: a firewalled node would hang instead of failing
        try:
            print0(f"downloading the FID Inception weights to {cached}")
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, cached)
        except Exception as e:  # URLError, timeouts, HTTP errors: all mean "no weights"
            raise FileNotFoundError(f"no FID Inception weights: downloading {FID_WEIGHTS_URL} failed ({type(e).__name__}); "
                                    f"download it elsewhere and put it at {cached}, or pass --inception PATH") from None
        finally:
            socket.setdefaulttimeout(timeout)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's download
    return cached


def load_inception(path, device='cpu', allow_random=False):
    """FIDInceptionV3 in eval mode from a pytorch-fid state dict (strict). Any file whose SHA-256 does not
    start with 6726825d is refused unless allow_random: features of other weights (e.g. the random ones
    the tests write) must never be reported as FID. The model's .sha256 identifies the weights."""
    sha = file_sha256(path)
    if not sha.startswith(FID_WEIGHTS_SHA256_PREFIX) and not allow_random:
        raise ValueError(f"'{path}' is not pytorch-fid's FID Inception file (sha256 {sha[:8]}..., expected {FID_WEIGHTS_SHA256_PREFIX}...): "
                         f"its numbers are not comparable with published ones; pass --allow-random-inception to use it anyway (tests, debugging)")
    state_dict = read_checkpoint(path)
    model = FIDInceptionV3()
    if not isinstance(state_dict, dict):
        raise ValueError(f"'{path}' holds a {type(state_dict).__name__}, not an Inception state dict")
    missing, unexpected = sorted(set(model.state_dict()) - set(state_dict)), sorted(set(state_dict) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"'{path}' is not a FID Inception state dict: {len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"'{path}' does not fit the FID Inception: {str(e).splitlines()[-1].strip()}") from None
    model.sha256 = sha
    return model.to(device).eval().requires_grad_(False)

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


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for matmuls and cuDNN convolutions (PyTorch leaves cuDNN's on by default), so features
    and distances do not depend on the GPU generation. No autocast anywhere in this file."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def shard_bounds(n, rank, world_size):
    """Contiguous shard [start, stop) of rank: concatenating the shards in rank order gives the input order."""
    return n * rank // world_size, n * (rank + 1) // world_size


def gather_shards(x, n, d):
    """Every rank's shard of an (n, ...) CPU tensor, concatenated in rank order (exactly n rows, input
    order), on the CPU of every rank."""
    if not d.ddp:
        return x
    sizes = [stop - start for start, stop in (shard_bounds(n, r, d.world_size) for r in range(d.world_size))]
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=d.device)  # all_gather needs equal shapes
    padded[:len(x)] = x.to(d.device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()


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

def statistics(features):
    """Mean and covariance (unbiased, rows are images) in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


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
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:  # a file object: np.savez appends no suffix; rename makes the write atomic
            np.savez(f, key=np.array(key), **arrays)
        os.replace(tmp, path)
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

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), as ADM computes it (FID on pool
    statistics, sFID on spatial ones): scipy's sqrtm; if its result is not finite, retry with eps added
    to both diagonals; a complex result is kept (real part) only if the imaginary parts of its diagonal
    are below 1e-3, else ValueError."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # ADM passed disp=False: a singular product is handled below, not printed
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            print0(f"warning: sqrtm of a singular product; adding {eps} to the covariance diagonals (as ADM)")
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the Frechet distance is undefined here: sqrtm(S1 S2) has imaginary diagonal parts up to "
                             f"{np.abs(np.diagonal(covmean).imag).max():.3g} (> 1e-3); are there enough images for a {len(sigma1)}-d covariance?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """ADM's Inception Score: softmax over all 1008 logits; consecutive splits of split_size rows (no
    shuffling: store samples in random class order, 50k -> 10 splits); per split exp(mean_i KL(p(y|x_i)
    || mean_j p(y|x_j))); the mean over splits. Float64 log-softmax where ADM used float32 softmax: the
    same value to ~1e-6 relative, but no NaN when a probability underflows."""
    logits = np.asarray(logits, dtype=np.float64)
    scores = []
    for i in range(0, len(logits), split_size):
        log_p = scipy.special.log_softmax(logits[i:i + split_size], axis=1)          # (n, 1008)
        log_marginal = scipy.special.logsumexp(log_p, axis=0) - math.log(len(log_p))  # log mean_j p(y|x_j)
        kl = (np.exp(log_p) * (log_p - log_marginal)).sum(1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores))


def pairwise_sq_distances(u, v, fp16=True):
    """Squared Euclidean distances (len(u), len(v)) as ||u||^2 - 2 u.v + ||v||^2, clamped at 0 (ADM's
    DistanceBlock). fp16=True follows ADM: inputs and every intermediate result rounded to float16
    (products accumulated in float32, as TF's GPU kernels do), and the block recomputed in float32 if
    any distance is not finite in float16. fp16=False: float32 throughout."""
    if fp16:
        half = lambda t: t.half().float()  # round to float16, keep computing in float32
        u, v = half(u), half(v)
        norm_u, norm_v = half(half(u * u).sum(1)), half(half(v * v).sum(1))
        d = half(half(norm_u[:, None] - half(2 * half(u @ v.T))) + norm_v[None, :]).clamp_min(0)
        if torch.isfinite(d).all():
            return d
    return ((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]).clamp_min(0)


def manifold_radii(features, k, batch_size, fp16):
    """Squared distance of each point to its k-th nearest neighbour in the same set, the point itself
    counting as the 0th (ADM: duplicates shrink radii, possibly to 0)."""
    radii = torch.empty(len(features), device=features.device)
    for i in range(0, len(features), batch_size):
        rows = features[i:i + batch_size]
        d = torch.cat([pairwise_sq_distances(rows, features[j:j + batch_size], fp16)
                       for j in range(0, len(features), batch_size)], 1)  # (rows, N)
        radii[i:i + batch_size] = d.kthvalue(k + 1, dim=1).values
    return radii


@torch.no_grad()
def precision_recall(ref_features, sample_features, k=3, batch_size=10000, fp16=True, device='cpu'):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them on pool features:
    a point is inside a set's manifold if its squared distance to some member is <= that member's
    k-NN radius. precision = fraction of samples inside the reference manifold, recall = fraction of
    references inside the sample manifold. Blocks of batch_size rows and fp16 distances as ADM
    (fp16=False: float32; they differ by ~1e-3). -> (precision, recall)"""
    ref = torch.as_tensor(np.asarray(ref_features, np.float32), device=device)
    smp = torch.as_tensor(np.asarray(sample_features, np.float32), device=device)
    if min(len(ref), len(smp)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} images in each set (got {len(ref)} and {len(smp)})")
    with exact_fp32():
        ref_radii, smp_radii = manifold_radii(ref, k, batch_size, fp16), manifold_radii(smp, k, batch_size, fp16)
        ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
        smp_inside = torch.zeros(len(smp), dtype=torch.bool, device=device)
        for i in range(0, len(ref), batch_size):
            for j in range(0, len(smp), batch_size):
                d = pairwise_sq_distances(ref[i:i + batch_size], smp[j:j + batch_size], fp16)  # (refs, samples)
                ref_inside[i:i + batch_size] |= (d <= smp_radii[None, j:j + batch_size]).any(1)
                smp_inside[j:j + batch_size] |= (d <= ref_radii[i:i + batch_size, None]).any(0)
    return smp_inside.double().mean().item(), ref_inside.double().mean().item()


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
#                          Reconstruction metrics                               #
#################################################################################

def check_image_pair(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two uint8 arrays (N, H, W, 3) of one shape, got {a.dtype} {a.shape} and {b.dtype} {b.shape}")
    return a, b


def psnr_per_image(a, b):
    """PSNR in dB of uint8 images (N, H, W, 3), one value per image: 10 log10(255^2 / MSE), the MSE over
    all pixels and channels. Identical images give inf (as scikit-image), so a mean over a set holding
    an exact copy is inf."""
    a, b = check_image_pair(a, b)
    mse = ((a.astype(np.float64) - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide='ignore'):
        return 10 * np.log10(255.0 ** 2 / mse)


def gaussian_window(size=11, sigma=1.5):
    x = np.arange(size, dtype=np.float64) - size // 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim_per_image(a, b, chunk=16):
    """SSIM (Wang et al. 2004) of uint8 images (N, H, W, 3), one value per image: 11-tap Gaussian window
    with sigma 1.5, K1 0.01, K2 0.03, data range 255, population (co)variances; per RGB channel, then
    averaged over the channels and the valid interior (windows inside the image), as scikit-image with
    gaussian_weights=True. torchmetrics, which the authors' evaluate_tokenizer.py used, reflect-pads and
    averages the full map: ~5e-3 apart on 256^2 images."""
    a, b = check_image_pair(a, b)
    if min(a.shape[1:3]) < 11:
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels, got {a.shape[2]} x {a.shape[1]}")
    w = torch.from_numpy(gaussian_window())
    w_row, w_col = w.view(1, 1, 1, 11).repeat(3, 1, 1, 1), w.view(1, 1, 11, 1).repeat(3, 1, 1, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, w_row, groups=3), w_col, groups=3)  # separable, 'valid': interior only
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for i in range(0, len(a), chunk):  # float64 maps of 16 images at 256^2: ~100 MB
        x = torch.from_numpy(a[i:i + chunk]).permute(0, 3, 1, 2).double()  # (n, 3, H, W)
        y = torch.from_numpy(b[i:i + chunk]).permute(0, 3, 1, 2).double()
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))  # (n, 3, H-10, W-10)
        out.append(s.mean((1, 2, 3)))
    return torch.cat(out).numpy()


@torch.no_grad()
def lpips_per_image(net, a, b):
    """LPIPS distances of uint8 images (N, H, W, 3) with `net` (vmae.lpips_vgg()), one per image."""
    a, b = check_image_pair(a, b)
    device = next(net.parameters()).device
    to_pm1 = lambda t: torch.from_numpy(t).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    return net(to_pm1(a), to_pm1(b)).flatten().cpu().numpy().astype(np.float64)


def image_noise(seed, indices, shape):
    """One N(0, I) draw of `shape` per image, seeded by (seed, image index): the same noise whatever the
    batch size or the number of ranks."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(seed, int(i)))) for i in indices])


@torch.no_grad()
def evaluate_reconstruction(model, dataset, d, eps_list=(0.0,), latent_std=None, batch_size=32, num_workers=4,
                            inception=None, lpips_net=None, seed=0):
    """Reconstruct each image from its posterior mean (plus eps * latent_std * noise, per channel, for
    each eps) and compare the uint8 reconstruction with the uint8 original (what saved PNGs would hold).
    -> {eps: {'l1', 'mse' (both on [0, 1] images), 'psnr', 'ssim', ['lpips'], ['rfid']}}: means over
    images, on rank 0 (None on the others)."""
    start, stop = shard_bounds(len(dataset), d.rank, d.world_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, stop)), batch_size=batch_size,
                                         num_workers=num_workers)
    names = ['l1', 'mse', 'psnr', 'ssim'] + (['lpips'] if lpips_net is not None else [])
    per_image = {eps: {k: [torch.zeros(0, dtype=torch.float64)] for k in names} for eps in eps_list}
    pools = {key: [torch.zeros(0, 2048)] for key in ['original', *eps_list]} if inception is not None else {}
    index = start
    with exact_fp32():
        for x, _ in tqdm(loader, desc='reconstruction', disable=not d.master):
            x = x.to(d.device)
            original = to_uint8(x)                                    # (B, H, W, 3): the crop, exactly (it came from uint8)
            mean = model.encode(x).mean                               # (B, C, h, w)
            noise = image_noise(seed, range(index, index + len(x)), mean.shape[1:]).to(d.device)
            index += len(x)
            if inception is not None:
                pools['original'].append(inception(original.permute(0, 3, 1, 2))[0].cpu())
            for eps in eps_list:
                z = mean + eps * latent_std.to(d.device).view(1, -1, 1, 1) * noise if eps else mean
                recon = to_uint8(model.decode(z))
                a, b = recon.cpu().numpy(), original.cpu().numpy()
                diff = (recon.double() - original.double()) / 255
                values = {'l1': diff.abs().flatten(1).mean(1).cpu(), 'mse': diff.pow(2).flatten(1).mean(1).cpu(),
                          'psnr': torch.from_numpy(psnr_per_image(a, b)), 'ssim': torch.from_numpy(ssim_per_image(a, b))}
                if lpips_net is not None:
                    values['lpips'] = torch.from_numpy(lpips_per_image(lpips_net, a, b))
                for k, v in values.items():
                    per_image[eps][k].append(v)
                if inception is not None:
                    pools[eps].append(inception(recon.permute(0, 3, 1, 2))[0].cpu())
    gather = lambda parts: gather_shards(torch.cat(parts), len(dataset), d).numpy()
    results = {eps: {k: float(gather(v).mean()) for k, v in metrics.items()} for eps, metrics in per_image.items()}
    pools = {key: gather(parts) for key, parts in pools.items()}
    if not d.master:
        return None
    if inception is not None:
        mu_ref, sigma_ref = statistics(pools['original'])
        for eps in eps_list:
            results[eps]['rfid'] = frechet_distance(*statistics(pools[eps]), mu_ref, sigma_ref)
    return results

# -----------------------------------------------------------------------------
# latent smoothness (Fig. 6)

SMOOTHNESS_EPS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3)


@torch.no_grad()
def measure_latent_std(model, dataset, d, batch_size=32, num_workers=4, seed=0):
    """Per-channel std (unbiased, over images and positions) of posterior samples of `dataset`'s images,
    as the DiT's latent statistics are computed (the authors: sampled latents, 10k training images)."""
    start, stop = shard_bounds(len(dataset), d.rank, d.world_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, stop)), batch_size=batch_size,
                                         num_workers=num_workers)
    sums = torch.zeros(3, model.latent_dim, dtype=torch.float64, device=d.device)  # count, sum, sum of squares
    index = start
    with exact_fp32():
        for x, _ in tqdm(loader, desc='latent std', disable=not d.master):
            posterior = model.encode(x.to(d.device))
            noise = image_noise(seed + 1, range(index, index + len(x)), posterior.mean.shape[1:]).to(d.device)
            index += len(x)
            z = (posterior.mean + posterior.std * noise).double().transpose(0, 1).flatten(1)  # (C, B*h*w)
            sums += torch.stack([torch.full_like(z[:, 0], z.shape[1]), z.sum(1), z.pow(2).sum(1)])
    if d.ddp:
        dist.all_reduce(sums)
    n, s1, s2 = sums
    return ((s2 - s1 * s1 / n) / (n - 1)).sqrt().float().cpu()


def plot_smoothness(results, path):
    """Metrics against eps as a PNG, if matplotlib is installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print0("note: matplotlib is not installed, so no plot (the table and JSON hold the numbers)")
        return
    eps = sorted(results)
    metrics = [k for k in ('rfid', 'psnr', 'ssim', 'lpips') if k in results[eps[0]]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3))
    for ax, k in zip(np.atleast_1d(axes), metrics):
        ax.plot(eps, [results[e][k] for e in eps], 'o-')
        ax.set_xlabel('eps (x latent std)')
        ax.set_title(METRIC_LABELS[k])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print0(f"plot: {path}")

# -----------------------------------------------------------------------------
# perceptual compression (Fig. 7)

# CelebAMask-HQ parts, labels 1..18 in this order; later parts overwrite earlier ones (the order the
# dataset's own label-map script and its users paint them in)
CELEBA_PARTS = ('skin', 'l_brow', 'r_brow', 'l_eye', 'r_eye', 'eye_g', 'l_ear', 'r_ear', 'ear_r',
                'nose', 'mouth', 'u_lip', 'l_lip', 'neck', 'neck_l', 'cloth', 'hair', 'hat')


class SegmentationMasks:
    """Label maps for images, from a folder of either
    - label PNGs named like the images (ADE20K: ADE_val_00000001.png for ADE_val_00000001.jpg), one
      integer label per pixel (0 = unlabelled); colour-coded PNGs: each colour is a label, black is 0;
    - CelebAMask-HQ part masks '{index:05d}_{part}.png' (any subfolders) for images '{index}.jpg'."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"mask folder '{root}' does not exist")
        pngs = [os.path.join(dp, f) for dp, _, fs in os.walk(root, followlinks=True) for f in fs if f.lower().endswith('.png')]
        self.labels, self.parts = {}, {}
        for path in pngs:
            m = re.fullmatch(r'(\d+)_(.+)\.png', os.path.basename(path))
            if m and m.group(2) in CELEBA_PARTS:
                self.parts.setdefault(int(m.group(1)), {})[m.group(2)] = path
            else:
                self.labels[os.path.splitext(os.path.basename(path))[0]] = path
        if not self.labels and not self.parts:
            raise ValueError(f"no masks found in '{root}' (label PNGs named like the images, or CelebAMask-HQ part masks)")

    def __call__(self, image_path, size):
        """(H, W) int64 label map of the image at `size` = (W, H), or None if it has no mask."""
        stem = os.path.splitext(os.path.basename(image_path))[0]
        if stem in self.labels:
            labels = read_label_png(self.labels[stem])
        elif stem.isdigit() and int(stem) in self.parts:
            labels = read_celeba_parts(self.parts[int(stem)])
        else:
            return None
        if labels.shape[::-1] != size:  # e.g. CelebAMask-HQ: 512^2 masks for 1024^2 images
            image, table = as_label_image(labels)
            labels = table[np.asarray(image.resize(size, Image.NEAREST))]
        return labels


def read_celeba_parts(parts):
    """{part name: binary mask PNG} -> label map, parts painted in CELEBA_PARTS order."""
    labels = None
    for label, part in enumerate(CELEBA_PARTS, 1):
        if part in parts:
            on = np.asarray(Image.open(parts[part]).convert('L')) > 127
            labels = np.zeros(on.shape, np.int64) if labels is None else labels
            labels[on] = label
    return labels


def read_label_png(path):
    """Integer labels of a label PNG; a colour PNG's colours become labels (black = 0)."""
    img = Image.open(path)
    if img.mode in ('RGB', 'RGBA'):
        rgb = np.asarray(img.convert('RGB')).astype(np.int64)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    return np.asarray(img).astype(np.int64)  # 'P', 'L', 'I', 'I;16': the pixel values are the labels


def as_label_image(labels):
    """A 'P'-mode image of a label map with the labels renumbered 0..K (0 stays unlabelled), and the table
    from the new ids back to the labels. PIL resizes 'P' images with NEAREST whatever filter is asked, so
    data.center_crop_arr crops it exactly like the image, without mixing labels."""
    values, inverse = np.unique(labels, return_inverse=True)
    table = values if values[0] == 0 else np.concatenate([[0], values])
    ids = inverse.reshape(labels.shape) + (values[0] != 0)
    if len(table) > 256:
        raise ValueError(f"a mask with {len(table) - 1} segments: at most 255 per image are supported")
    return Image.frombytes('P', (labels.shape[1], labels.shape[0]), ids.astype(np.uint8).tobytes()), table


def patch_labels(labels, p):
    """(H, W) label map -> (H/p * W/p,) majority label of each p x p patch, row-major (the VMAE's token
    order); ties go to the smaller label."""
    h, w = labels.shape[0] // p, labels.shape[1] // p
    patches = labels[:h * p, :w * p].reshape(h, p, w, p).transpose(0, 2, 1, 3).reshape(h * w, p * p)
    return scipy.stats.mode(patches, axis=1).mode


def segment_statistics(features, labels):
    """Within-segment variance sigma^2 and semantic disentanglement rho of one image's tokens.
    features: (n, d) token features; labels: (n,) segment ids, 0 = unlabelled (dropped).
    The paper does not define these precisely; the choices here are fixed:
    - normalisation: every feature channel is standardised over the image's labelled tokens, so
      channels weigh equally and 16-d latents compare with 192-d pixel patches;
    - sigma^2 = sum of squared deviations from the segment means / sum of squared deviations from the
      image mean: the fraction of feature variance left inside segments (0: constant per segment);
    - affinity(i, j) = (1 + cos(f_i, f_j)) / 2 in [0, 1] on the standardised features;
    - rho = mean affinity over pairs in one segment (i != j) / mean affinity over pairs in different
      segments (> 1: a token resembles its own segment more than the others).
    -> (sigma2, rho); rho is nan without two segments or without a segment of two tokens."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    l = torch.as_tensor(np.asarray(labels))
    f, l = f[l > 0], l[l > 0]
    if len(f) < 2:
        return math.nan, math.nan
    f = (f - f.mean(0)) / f.std(0, unbiased=False).clamp_min(1e-12)  # constant channels become 0
    total = f.pow(2).sum()
    segments, inverse = torch.unique(l, return_inverse=True)
    seg_means = torch.zeros(len(segments), f.shape[1], dtype=f.dtype).index_add_(0, inverse, f)
    seg_means /= torch.bincount(inverse, minlength=len(segments)).unsqueeze(1)
    sigma2 = ((f - seg_means[inverse]).pow(2).sum() / total).item() if total > 0 else math.nan
    u = F.normalize(f, dim=1)
    affinity = (1 + u @ u.T) / 2                                   # (n, n)
    same = l[:, None] == l[None, :]
    intra = same & ~torch.eye(len(l), dtype=torch.bool)
    if not intra.any() or same.all():
        return sigma2, math.nan
    return sigma2, (affinity[intra].mean() / affinity[~same].mean()).item()


def masked_images(images_root, masks, image_size, num_images=0):
    """(image, label image) pairs, both ADM-centre-cropped to image_size, for the images that have masks."""
    if not os.path.isdir(images_root):
        raise FileNotFoundError(f"image folder '{images_root}' does not exist")
    found = 0
    for path, _ in scan_image_folder(images_root)[1]:
        image = open_rgb(path)
        labels = masks(path, image.size)
        if labels is None:
            continue
        yield center_crop_arr(image, image_size), center_crop_arr(as_label_image(labels)[0], image_size)
        found += 1
        if found == num_images:
            return
    if not found:
        raise ValueError(f"none of the images in '{images_root}' has a mask in the mask folder (matched by file name)")


@torch.no_grad()
def evaluate_compression(model, images_root, masks, image_size, device, num_images=0, batch_size=32):
    """sigma^2 and rho of VMAE latent tokens (posterior mean) and of raw pixel patches on the same
    p x p grid, averaged over the images that have masks. -> {'latent': {...}, 'pixel': {...}, 'n_images'}"""
    stats = {'latent': [], 'pixel': []}
    pairs = masked_images(images_root, masks, image_size, num_images)
    with exact_fp32():
        while batch := list(itertools.islice(pairs, batch_size)):
            x = torch.from_numpy(np.stack([np.asarray(img) for img, _ in batch])).permute(0, 3, 1, 2).float()  # (B, 3, H, W) 0..255
            latents = model.encode((x / 127.5 - 1).to(device)).mean.flatten(2).transpose(1, 2).cpu()      # (B, h*w, C)
            pixels = patchify(x / 255, model.patch_size)                                                  # (B, h*w, p*p*3)
            for j, (_, label_img) in enumerate(batch):
                tokens = patch_labels(np.asarray(label_img).astype(np.int64), model.patch_size)
                stats['latent'].append(segment_statistics(latents[j], tokens))
                stats['pixel'].append(segment_statistics(pixels[j], tokens))
    summary = lambda values: {'sigma2': float(np.nanmean([v[0] for v in values])), 'rho': float(np.nanmean([v[1] for v in values])),
                              'n_rho': int(np.sum(~np.isnan([v[1] for v in values])))}
    return {'latent': summary(stats['latent']), 'pixel': summary(stats['pixel']), 'n_images': len(stats['latent'])}

#################################################################################
#                                     CLI                                       #
#################################################################################

METRIC_LABELS = {'FID': 'FID', 'sFID': 'sFID', 'IS': 'IS', 'precision': 'precision', 'recall': 'recall',
                 'l1': 'L1', 'mse': 'MSE', 'psnr': 'PSNR', 'ssim': 'SSIM', 'lpips': 'LPIPS', 'rfid': 'rFID'}


def format_value(v):
    return 'n/a' if v is None else f'{v:.4f}'


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print('  '.join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))), flush=True)


def write_json(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {path}", flush=True)


def load_inception_for(args, d):
    path = inception_weights_path(args.inception, d.master)
    model = load_inception(path, d.device, args.allow_random_inception)
    print0(f"Inception: {path} (sha256 {model.sha256[:16]}...)" + ('' if model.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX) else
                                                                  '  WARNING: not the FID weights, numbers are not comparable'))
    return model


def provenance(args, inception=None):
    info = {'args': vars(args), 'torch': torch.__version__}
    if inception is not None:
        info.update(inception_sha256=inception.sha256, fid_weights=inception.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX))
    return info


def run_generation(args, d):
    ref, samples = open_images(args.ref, args.image_size), open_images(args.samples, args.image_size)
    inception = load_inception_for(args, d)
    out = evaluate_generation(ref, samples, inception, d, args.batch_size, not args.no_cache, not args.pr_fp32)
    if not d.master:
        return
    results, info = out
    print_table(['metric', 'value'], [[METRIC_LABELS[k], format_value(v)] for k, v in results.items()])
    write_json(args.out or samples.path + '.metrics.json', {**results, **info, **provenance(args, inception)})


def load_model_and_data(args, d):
    model = load_vmae(args.vmae, d.device, args.image_size or None)
    dataset = build_dataset(args.data, model.img_size, train=False, split='val')
    if args.num_images:
        dataset = torch.utils.data.Subset(dataset, range(min(args.num_images, len(dataset))))
    print0(f"VMAE {args.vmae} at {model.img_size} px; {len(dataset)} images from {args.data} (ADM centre crop"
           f"{'' if args.data == 'builtin' else '; the authors evaluate_tokenizer.py used Resize + CenterCrop instead'})")
    return model, dataset


def reconstruction_tools(args, d):
    inception = None if args.no_rfid else load_inception_for(args, d)
    lpips_net = None if args.no_lpips else lpips_vgg(pretrained=True).to(d.device)
    return inception, lpips_net


def run_recon(args, d):
    model, dataset = load_model_and_data(args, d)
    inception, lpips_net = reconstruction_tools(args, d)
    results = evaluate_reconstruction(model, dataset, d, (0.0,), None, args.batch_size, args.num_workers, inception, lpips_net)
    if not d.master:
        return
    metrics = results[0.0]
    print_table(['metric', 'value'], [[METRIC_LABELS[k], format_value(v)] for k, v in metrics.items()])
    write_json(args.out or args.vmae + '.recon.json', {**metrics, 'data': args.data, 'n_images': len(dataset),
                                                      'image_size': model.img_size, **provenance(args, inception)})


def run_smoothness(args, d):
    model, dataset = load_model_and_data(args, d)
    inception, lpips_net = reconstruction_tools(args, d)
    if args.latent_stats:
        std, source = read_latent_stats(args.latent_stats)['std'], f"from {args.latent_stats}"
    else:
        std = measure_latent_std(model, dataset, d, args.batch_size, args.num_workers, args.seed)
        source = f"measured on posterior samples of the {len(dataset)} evaluated images"
    if len(std) != model.latent_dim:
        raise ValueError(f"the latent statistics have {len(std)} channels, the VMAE {model.latent_dim}")
    print0(f"latent std per channel {source}: " + ' '.join(f'{s:.3g}' for s in std.tolist()))
    eps_list = tuple(float(e) for e in args.eps.split(','))
    results = evaluate_reconstruction(model, dataset, d, eps_list, std, args.batch_size, args.num_workers,
                                      inception, lpips_net, args.seed)
    if not d.master:
        return
    names = list(results[eps_list[0]])
    print_table(['eps', *[METRIC_LABELS[k] for k in names]], [[f'{e:g}', *[format_value(results[e][k]) for k in names]] for e in eps_list])
    out = args.out or args.vmae + '.smoothness.json'
    write_json(out, {'eps': {f'{e:g}': results[e] for e in eps_list}, 'latent_std': std.tolist(), 'latent_std_source': source,
                     'data': args.data, 'n_images': len(dataset), 'seed': args.seed, **provenance(args, inception)})
    plot_smoothness(results, os.path.splitext(out)[0] + '.png')


def run_compression(args, d):
    if d.ddp:
        raise ValueError("compression runs in one process (it only encodes): start it with python, not torchrun")
    model = load_vmae(args.vmae, d.device, args.image_size or None)
    results = evaluate_compression(model, args.data, SegmentationMasks(args.masks), model.img_size, d.device,
                                   args.num_images, args.batch_size)
    print_table(['features', 'sigma^2', 'rho', 'images with rho'],
                [[k, format_value(results[k]['sigma2']), format_value(results[k]['rho']), results[k]['n_rho']] for k in ('latent', 'pixel')])
    write_json(args.out or args.vmae + '.compression.json', {**results, 'data': args.data, 'masks': args.masks,
                                                            'image_size': model.img_size, **provenance(args)})


def add_common_options(parser, batch_size):
    parser.add_argument('--device', default='auto', help="'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu', 'cuda'")
    parser.add_argument('--batch-size', type=int, default=batch_size)
    parser.add_argument('--out', default='', help='JSON path (default: next to the input)')


def add_inception_options(parser):
    parser.add_argument('--inception', default='', help='pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache, downloaded when online)')
    parser.add_argument('--allow-random-inception', action='store_true', help='accept Inception weights other than the FID file (tests only)')


def add_vmae_options(parser):
    parser.add_argument('--vmae', required=True, help="VMAE checkpoint (train_vmae.py, or the authors' vmaef8d16.pth)")
    parser.add_argument('--data', required=True, help="image folder (e.g. ImageNet val); recon and smoothness also take 'builtin'")
    parser.add_argument('--image-size', type=int, default=0, help="evaluation size (default: the VMAE's)")
    parser.add_argument('--num-images', type=int, default=0, help='use only the first N images (0: all)')


def build_parser(command):
    if command == 'generation':
        parser = argparse.ArgumentParser(prog='evaluate.py', description=
            'ADM-compatible FID, sFID, IS, precision and recall of SAMPLES against REF. Other commands: '
            '`evaluate.py recon|smoothness|compression -h`.')
        parser.add_argument('ref', help='reference: ADM reference batch .npz (arr_0, optional mu/sigma/mu_s/sigma_s) or image folder')
        parser.add_argument('samples', help='samples: .npz with arr_0 (uint8 (N, H, W, 3), as sample.py writes) or image folder')
        parser.add_argument('--image-size', type=int, default=0, help='centre-crop folder images to this size (ADM crop); npz files are used as they are')
        parser.add_argument('--no-cache', action='store_true', help='neither read nor write <input>.inception_stats.npz')
        parser.add_argument('--pr-fp32', action='store_true', help='float32 precision/recall distances instead of ADM fp16')
        add_inception_options(parser)
        add_common_options(parser, batch_size=64)
        return parser
    parser = argparse.ArgumentParser(prog=f'evaluate.py {command}', description={
        'recon': 'Reconstruction metrics of a VMAE from the posterior mean: L1, MSE, PSNR, SSIM, LPIPS, rFID.',
        'smoothness': 'Latent smoothness (Fig. 6): reconstruction metrics from latents perturbed by eps x channel std x N(0, I).',
        'compression': 'Perceptual compression (Fig. 7): within-segment variance and disentanglement of latents vs pixels.'}[command])
    add_vmae_options(parser)
    if command == 'compression':
        parser.add_argument('--masks', required=True, help='label PNGs named like the images (ADE20K) or CelebAMask-HQ part masks')
    else:
        parser.add_argument('--no-rfid', action='store_true', help='skip rFID (needs the Inception weights)')
        parser.add_argument('--no-lpips', action='store_true', help="skip LPIPS (needs torchvision's VGG16 weights)")
        parser.add_argument('--num-workers', type=int, default=4)
        add_inception_options(parser)
    if command == 'smoothness':
        parser.add_argument('--eps', default=','.join(f'{e:g}' for e in SMOOTHNESS_EPS), help='comma-separated noise levels')
        parser.add_argument('--latent-stats', default='', help="train_dit.py checkpoint or meta.json, or the authors' latents_stats.pt (default: measure the std)")
        parser.add_argument('--seed', type=int, default=0)
    add_common_options(parser, batch_size=32)
    return parser


COMMANDS = {'recon': run_recon, 'smoothness': run_smoothness, 'compression': run_compression}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else 'generation'
    args = build_parser(command).parse_args(argv[1:] if command in COMMANDS else argv)
    with clear_errors():
        d = setup_distributed(args.device)
        try:
            COMMANDS.get(command, run_generation)(args, d)
        finally:
            cleanup_distributed()


if __name__ == '__main__':
    main()
