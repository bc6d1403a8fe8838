"""
The Inception-v3 of FID, IS and ADM's evaluator, in PyTorch: the 2015-12-05 TensorFlow graph's block
variants with pytorch-fid's port of its weights, fed uint8 images through the graph's own
preprocessing (TF1 bilinear resize to 299, then (x - 128) / 128). One forward gives the three
feature sets ADM's evaluator reads:
- pool_3 (2048-d), for FID and precision/recall;
- the 1008-way logits without the fc bias, for IS;
- the first 7 channels of Mixed_6d.branch1x1 (TF "mixed_6/conv", 17 x 17 x 7 = 2023-d, NHWC order), for sFID.

References: Szegedy et al. Rethinking the Inception Architecture. 2016; Heusel et al. 2017 (FID);
pytorch-fid's weights, https://github.com/mseitzer/pytorch-fid

It imports nothing of the project but fileio, so it can be copied on its own.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fileio import file_sha256, read_checkpoint

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
            print(f"downloading the FID Inception weights to {cached}", flush=True)
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
                         f"its numbers are not comparable with published ones; pass --allow_random_inception to use it anyway (tests, debugging)")
    state_dict = read_checkpoint(path, 'Inception weights file')
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
