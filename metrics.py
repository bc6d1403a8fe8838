"""
The metrics, as pure functions of features or images: nothing here loads a model or reads a file.

Generation (on Inception features, see inception.py), as OpenAI's guided-diffusion evaluator defines them:
- FID and sFID: scipy's sqrtm with ADM's eps retry and imaginary-part check, on float64 statistics;
- IS: over consecutive 5000-image splits;
- improved precision and recall: k=3 manifolds with fp16 distances.
Reconstruction (on uint8 images (N, H, W, 3), one value per image): PSNR, SSIM, LPIPS.

References: Dhariwal & Nichol 2021 (the evaluator), https://github.com/openai/guided-diffusion/tree/main/evaluations;
Heusel et al. 2017 (FID); Nash et al. 2021 (sFID); Salimans et al. 2016 (IS); Kynkaanniemi et al.
2019 (precision and recall); Wang et al. 2004 (SSIM); Zhang et al. 2018 (LPIPS).
"""

import math
import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F

from common import exact_fp32, print0

# how tables, plots and JSON name the metrics
METRIC_LABELS = {'FID': 'FID', 'sFID': 'sFID', 'IS': 'IS', 'precision': 'precision', 'recall': 'recall',
                 'l1': 'L1', 'mse': 'MSE', 'psnr': 'PSNR', 'ssim': 'SSIM', 'lpips': 'LPIPS', 'rfid': 'rFID'}

#################################################################################
#                             Generation metrics                                #
#################################################################################

def statistics(features):
    """Mean and covariance (unbiased, rows are images) in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


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


def reconstruction_metrics(recon, original, lpips_net=None):
    """Per-image L1, MSE (both on [0, 1] images), PSNR, SSIM and, with `lpips_net`, LPIPS of uint8
    reconstructions against uint8 originals, both (B, H, W, 3) tensors on any device.
    -> {name: (B,) float64 CPU tensor}"""
    a, b = recon.cpu().numpy(), original.cpu().numpy()
    diff = (recon.double() - original.double()) / 255
    values = {'l1': diff.abs().flatten(1).mean(1).cpu(), 'mse': diff.pow(2).flatten(1).mean(1).cpu(),
              'psnr': torch.from_numpy(psnr_per_image(a, b)), 'ssim': torch.from_numpy(ssim_per_image(a, b))}
    if lpips_net is not None:
        values['lpips'] = torch.from_numpy(lpips_per_image(lpips_net, a, b))
    return values
