"""
The paper's analyses of an autoencoder's latent space (Lee et al., ICCV 2025, section 5), for a VMAE or a
convolutional baseline alike (figures.py draws them; `python -m paper` runs them):
- smoothness (Fig. 6): how reconstructions degrade as the latents are perturbed by eps x the
  per-channel latent std x N(0, I): `common.seeded_noise` draws the noise, `measure_latent_std` the std,
  evaluate.py's `evaluate_reconstruction` the metrics;
- perceptual compression (Figs. 4, 7, 8): within-segment variance and semantic disentanglement of
  latent tokens against raw pixel patches, on segmentation masks (ADE20K label PNGs, CelebAMask-HQ
  parts, or the built-in shapes with their exact masks); k-means maps and 2-D projections of the tokens;
- the radar of Fig. 2: one score per property from the JSONs of the commands above.
"""

import itertools
import math
import os
import re

import numpy as np
import scipy.stats
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import exact_fp32, seeded_noise
from data import BuiltinShapes, center_crop_arr, open_rgb, scan_image_folder
from dit import LatentStats
from vmae import patchify

# -----------------------------------------------------------------------------
# latent smoothness (Fig. 6)

SMOOTHNESS_EPS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3)


@torch.no_grad()
def measure_latent_std(model, dataset, d, batch_size=32, num_workers=4, seed=0, sample=True):
    """Per-channel std (unbiased, over images and positions) of posterior samples (or, sample=False, the
    posterior means) of `dataset`'s images: the latents a DiT learns, measured as train_dit.py measures
    them (the authors: 10k training images). -> (C,) float32 on the CPU, the same on every rank."""
    indices = range(d.rank, len(dataset), d.world_size)  # any split will do: the sums are all-reduced
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    stats = LatentStats(model.latent_dim, d.device)
    with exact_fp32():
        for i, (x, _) in enumerate(tqdm(loader, desc='latent std', disable=not d.master)):
            posterior = model.encode(x.to(d.device))
            noise = seeded_noise(seed + 1, indices[i * batch_size:(i + 1) * batch_size], posterior.mean.shape[1:])
            stats.add(posterior.mean + posterior.std * noise.to(d.device) if sample else posterior.mean)
    if d.ddp:
        dist.all_reduce(stats.sums)
    return stats.result()['std'].float().cpu()


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


def channel_scale(features, labels):
    """Per-channel mean and std (population) of the labelled tokens of every image together: the one
    scale on which sigma^2 and rho are measured, shared by all images of an evaluation set.
    features: list of (n_i, d) per image; labels: list of (n_i,) segment ids, 0 = unlabelled."""
    f = torch.cat([torch.as_tensor(np.asarray(x), dtype=torch.float64)[torch.as_tensor(np.asarray(l)) > 0]
                   for x, l in zip(features, labels)])
    return f.mean(0), f.std(0, unbiased=False).clamp_min(1e-12)  # a constant channel becomes 0


def segment_statistics(features, labels, mean, std):
    """Within-segment variance sigma^2 and semantic disentanglement rho of one image's tokens, on the
    evaluation set's scale (channel_scale). features: (n, d); labels: (n,) segment ids, 0 = unlabelled
    (dropped). Sec. 5.2 of the paper names the two quantities without formulas; the choices made here:
    - sigma^2: every channel standardised once over the whole set (not per image, so that images and
      encoders of any width share one scale, on which pure noise has variance 1); then the variance of
      each channel inside each segment of two or more tokens, averaged over channels and segments.
      0: features constant inside segments, however they differ across segments or images.
    - rho: affinity(i, j) = (1 + cos(f_i, f_j)) / 2 in [0, 1] on the standardised features; rho = mean
      affinity over pairs of tokens in one segment (i != j) / mean affinity over pairs in different
      segments, as the paper's intra / inter-cluster affinity ratio (> 1: a token is closer to its own
      segment than to the others; 1: segments are not told apart, as for noise or for tokens all alike).
    -> (sigma2, rho); sigma2 is nan without a segment of two tokens, rho also without two segments."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    l = torch.as_tensor(np.asarray(labels))
    mean, std = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (mean, std))
    f, l = (f[l > 0] - mean) / std, l[l > 0]
    segments, inverse, counts = torch.unique(l, return_inverse=True, return_counts=True)
    seg_means = torch.zeros(len(segments), f.shape[1], dtype=f.dtype).index_add_(0, inverse, f) / counts.unsqueeze(1)
    seg_var = torch.zeros_like(seg_means).index_add_(0, inverse, (f - seg_means[inverse]).pow(2)) / counts.unsqueeze(1)
    if not (counts > 1).any():
        return math.nan, math.nan
    sigma2 = seg_var[counts > 1].mean().item()
    u = F.normalize(f, dim=1)
    affinity = (1 + u @ u.T) / 2                                   # (n, n)
    same = l[:, None] == l[None, :]
    intra = same & ~torch.eye(len(l), dtype=torch.bool)
    if same.all():
        return sigma2, math.nan
    return sigma2, (affinity[intra].mean() / affinity[~same].mean()).item()


def compression_statistics(features, labels):
    """sigma^2 and rho (segment_statistics) of each image, on the set's shared scale, averaged over the
    images. features, labels: lists per image. -> {'sigma2', 'rho', 'n_rho' (images with a rho)}; a ValueError
    where no image has a segment of two tokens (no sigma^2) or two segments (no rho)."""
    sizes = [np.unique(np.asarray(l)[np.asarray(l) > 0], return_counts=True)[1] for l in labels]  # each image's segments, in tokens
    if not any((n > 1).any() for n in sizes):  # refused, not averaged into nan with a RuntimeWarning
        raise ValueError(f"the masks of the {len(labels)} images label no segment of two or more latent tokens, so sigma^2 is "
                         f"undefined: give masks with labelled segments (label 0 is unlabelled)")
    if not any((n > 1).any() and len(n) > 1 for n in sizes):
        raise ValueError(f"none of the {len(labels)} images has two labelled segments, so rho is undefined: give masks that "
                         f"label at least two segments per image")
    mean, std = channel_scale(features, labels)
    values = np.array([segment_statistics(f, l, mean, std) for f, l in zip(features, labels)]).reshape(-1, 2)
    return {'sigma2': float(np.nanmean(values[:, 0])), 'rho': float(np.nanmean(values[:, 1])),
            'n_rho': int(np.sum(~np.isnan(values[:, 1])))}


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


def builtin_masked_images(image_size, num_images=0):
    """(image, label image) pairs of the held-out built-in images with their exact masks (1 background,
    2 the shape): a segmented set that needs no download, for the tests and the small study."""
    dataset = BuiltinShapes(image_size, split='val')
    for index in range(min(num_images or len(dataset), len(dataset))):
        image, labels = dataset.image_and_mask(index)
        yield image, as_label_image(labels.astype(np.int64))[0]


def shared_patch_size(models):
    """The downsampling factor of every model of {name: autoencoder}: their tokens are compared on one grid."""
    patch = {m.patch_size for m in models.values()}
    if len(patch) != 1:
        raise ValueError(f"the autoencoders downsample by different factors {sorted(patch)}: compare ones with the same grid")
    return patch.pop()


@torch.no_grad()
def token_features(models, pairs, device, batch_size=32, keep_images=False):
    """Per image: each model's latent tokens (posterior mean, (h*w, C)), the raw p x p pixel patches on the
    same grid ((h*w, p*p*3), values in [0, 1]) and the majority segment label of each patch.
    models: {name: autoencoder}, all with the same patch size; pairs: (image, label image) as masked_images.
    -> {'labels': [(h*w,)], 'pixel': [...], name: [...], 'images': [uint8 (H, W, 3)] if keep_images}"""
    p = shared_patch_size(models)
    out = {'labels': [], 'pixel': [], 'images': [], **{name: [] for name in models}}
    pairs = iter(pairs)
    with exact_fp32():
        while batch := list(itertools.islice(pairs, batch_size)):
            images = np.stack([np.asarray(img) for img, _ in batch])
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float()                                 # (B, 3, H, W) 0..255
            for name, model in models.items():
                out[name] += model.encode((x / 127.5 - 1).to(device)).mean.flatten(2).transpose(1, 2).cpu()  # (h*w, C) each
            out['pixel'] += patchify(x / 255, p)                                                     # (h*w, p*p*3) each
            out['labels'] += [patch_labels(np.asarray(label_img).astype(np.int64), p) for _, label_img in batch]
            out['images'] += list(images) if keep_images else []
    return out


def evaluate_compression(models, pairs, device, batch_size=32):
    """sigma^2 and rho (compression_statistics) of each model's latent tokens and of raw pixel patches, over
    the images that have masks. -> {name: {...}, 'pixel': {...}, 'n_images'}"""
    tokens = token_features(models, pairs, device, batch_size)
    results = {name: compression_statistics(tokens[name], tokens['labels']) for name in [*models, 'pixel']}
    return {**results, 'n_images': len(tokens['labels'])}


def kmeans(x, k, seed=0, iters=100):
    """Lloyd's k-means with k-means++ seeding on (n, d) features -> cluster of each row (n,). Clusters are
    numbered by size, largest first, so that colours compare across encoders."""
    x = torch.as_tensor(x, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):  # k-means++: the next centre far from those chosen, with probability ~ distance^2
        d2 = torch.cdist(x, centres).min(1).values.pow(2)
        centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        moved = torch.stack([x[assign == c].mean(0) if (assign == c).any() else centres[c] for c in range(k)])
        if torch.equal(moved, centres):
            break
        centres = moved
    order = torch.argsort(torch.bincount(assign, minlength=k), descending=True, stable=True)
    return torch.argsort(order)[assign]


def standardise_tokens(tokens, labels=None):
    """Per-image token sets on the set's shared scale (channel_scale: over the labelled tokens of every image,
    or over all of them without labels), so that clusters and projections see what sigma^2 and rho see."""
    labels = labels if labels is not None else [np.ones(len(t), np.int64) for t in tokens]
    mean, std = channel_scale(tokens, labels)
    return [(torch.as_tensor(np.asarray(t), dtype=torch.float64) - mean) / std for t in tokens]


def project_2d(features):
    """(n, d) -> (n, 2): the centred features on their two principal axes (PCA by SVD), largest first."""
    f = torch.as_tensor(features, dtype=torch.float64)
    f = f - f.mean(0)
    _, _, v = torch.linalg.svd(f, full_matrices=False)
    return f @ v[:2].T


def radar_scores(recon, smoothness=None, compression=None, generation=None):
    """Fig. 2's axes, one raw score per autoencoder, higher is better, from the commands' JSON results
    ({'autoencoders': {name: ...}}); an axis is left out when its input is missing:
    - smoothness: minus the mean rise of rFID over the perturbed levels (eps > 0) from eps = 0, or the mean
      change of PSNR when rFID was not measured (Fig. 6: a smooth latent decodes perturbed latents well);
    - compression: rho - sigma^2 on the latent tokens (Fig. 7: the ideal is sigma^2 0 with rho high);
    - PSNR (pixel reconstruction), and -rFID (or -LPIPS without rFID; neither when both were skipped);
    - -gFID of a DiT on each autoencoder's latents ({name: evaluate.py fid JSON}).
    -> {axis: {name: score}}"""
    names = list(recon['autoencoders'])
    rows = {name: recon['autoencoders'][name] for name in names}
    for what, results in (('smoothness', smoothness and smoothness['autoencoders']), ('compression', compression and compression['autoencoders']),
                          ('generation', generation)):
        if results and set(names) - set(results):
            raise ValueError(f"the {what} results have no {sorted(set(names) - set(results))} (they have {sorted(results)}): "
                             f"give every command the same autoencoders, with the same --names")
    perceptual = next((k for k in ('rfid', 'lpips') if all(k in r for r in rows.values())), None)
    axes = {}
    if smoothness:
        def rise(name, curve):
            levels = {float(e): m for e, m in curve.items()}
            if 0.0 not in levels:  # the change is measured from the unperturbed latents
                raise ValueError(f"the smoothness results of '{name}' have no eps = 0 (only {', '.join(curve)}): "
                                 f"run python -m paper smoothness with 0 among --eps")
            base, perturbed = levels[0.0], [m for e, m in levels.items() if e > 0]
            key = 'rfid' if 'rfid' in base else 'psnr'
            change = float(np.mean([m[key] - base[key] for m in perturbed]))
            return -change if key == 'rfid' else change
        axes['smoothness'] = {n: rise(n, smoothness['autoencoders'][n]['eps']) for n in names}
    if compression:
        axes['compression'] = {n: compression['autoencoders'][n]['rho'] - compression['autoencoders'][n]['sigma2'] for n in names}
    axes['PSNR'] = {n: rows[n]['psnr'] for n in names}
    if perceptual:
        axes[perceptual.upper().replace('RFID', 'rFID')] = {n: -rows[n][perceptual] for n in names}
    if generation:
        axes['gFID'] = {n: -generation[n]['FID'] for n in names}
    return axes


def rescale(scores, inner=0.2):
    """Each axis linearly rescaled over the autoencoders: the best to 1 (the outer ring), the worst to
    `inner` (the inner ring), as the paper's Fig. 2; an axis where all are equal goes to 1."""
    out = {}
    for axis, values in scores.items():
        lo, hi = min(values.values()), max(values.values())
        out[axis] = {n: 1.0 if hi == lo else inner + (1 - inner) * (v - lo) / (hi - lo) for n, v in values.items()}
    return out
