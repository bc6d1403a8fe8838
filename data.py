"""
Images for every stage: folders of images, the ADM crops, and a built-in dataset.

train_vmae.py, train_dit.py, evaluate.py and the demo all read images the same way, so the
loading lives here once:
- `ImageFolder`: class subfolders (ImageNet layout, labels from sorted folder names) or a flat
  folder (CelebA-HQ, one class). Grayscale, RGBA, CMYK and palette images become RGB; files PIL
  cannot read are skipped with a count.
- `center_crop_arr`: ADM's centre crop (latent extraction, evaluation); `random_resized_crop`
  plus a horizontal flip is the authors' VMAE training augmentation.
- `BuiltinShapes`: a class-conditional, procedurally drawn dataset (deterministic from a seed,
  no download) so the whole pipeline runs offline.
- `ResumableSampler`: a DistributedSampler-style shard that can start mid-epoch and hands every
  item its own augmentation seed, so training resumes exactly and augmentation does not depend on
  the number of ranks or workers.

Images come out as float tensors (3, H, W) in [-1, 1], with an integer label.
"""

import colorsys
import copy
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import fileio
from common import seed_for
from metrics import psnr_per_image

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.gif')

# -----------------------------------------------------------------------------
# crops and conversion

def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: halve with BOX while the short side is >= 2x the target (cheap
    anti-aliasing), BICUBIC-resize the short side to the target, then crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    w, h = pil_image.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def random_resized_crop(pil_image, image_size, rng, scale=(0.75, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop (BICUBIC), driven by `rng` (a random.Random) so that a
    seed fixes the crop."""
    w, h = pil_image.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:  # fall back to the largest centred crop within the allowed aspect ratios
        aspect = w / h
        cw, ch = (w, round(w / ratio[0])) if aspect < ratio[0] else (round(h * ratio[1]), h) if aspect > ratio[1] else (w, h)
        cw, ch = min(cw, w), min(ch, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    return pil_image.resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + cw, top + ch))


def to_tensor(pil_image):
    """PIL RGB image -> float tensor (3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(pil_image, dtype=np.uint8).copy())  # (H, W, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x):
    """Images in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3), rounded as the authors' decoder
    output (clamp(127.5 x + 128) then truncate = round half up)."""
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images, path, ncol, row_labels=None, upscale=1):
    """Write images (B, 3, H, W) in [-1, 1] as a PNG grid of `ncol` columns; small images are
    upscaled (nearest, so pixels stay honest) and each row can carry a text label on its left."""
    images = to_uint8(images.detach().float().cpu()).numpy()  # (B, H, W, 3)
    B, H, W, _ = images.shape
    nrow = -(-B // ncol)
    h, w, pad = H * upscale, W * upscale, 2
    font = ImageFont.load_default(size=max(12, min(24, h // 4)))
    label_w = 0 if not row_labels else int(max(font.getlength(t) for t in row_labels)) + 12
    grid = Image.new('RGB', (label_w + ncol * (w + pad) + pad, nrow * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
        grid.paste(tile, (label_w + pad + c * (w + pad), pad + r * (h + pad)))
    for r, text in enumerate(row_labels or []):
        draw.text((6, pad + r * (h + pad) + h // 2), text, fill=(0, 0, 0), font=font, anchor='lm')
    with fileio.atomic_write(path) as f:  # a temporary file, renamed when complete: no half-written grid
        grid.save(f, format='JPEG' if path.lower().endswith(('.jpg', '.jpeg')) else 'PNG')  # by name: the file ends in .tmp


def fixed_val_batch(data, image_size, train_set, n=8):
    """The same n centre-cropped images every time, for a trainer's reconstruction PNGs: the held-out
    split of the built-in data, or images spread over the training folder."""
    if data == 'builtin':
        dataset = build_dataset('builtin', image_size, split='val')
    else:
        dataset = copy.copy(train_set)
        dataset.train = dataset.flip = False
    indices = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    return torch.stack([dataset[i][0] for i in indices])


@torch.no_grad()
def save_reconstructions(model, images, path):
    """Originals (top) vs an autoencoder's reconstructions from the posterior mean (bottom) -> PNG; returns
    their PSNR (dB) as uint8 images."""
    model.eval()
    recon = model.decode(model.encode(images.to(next(model.parameters()).device)).mode()).float().cpu()
    model.train()
    save_grid(torch.cat([images, recon]), path, ncol=len(images), row_labels=['original', 'reconstruction'],
              upscale=max(1, 128 // images.shape[-1]))
    return float(psnr_per_image(to_uint8(images).numpy(), to_uint8(recon).numpy()).mean())


def open_rgb(path):
    """Open any image PIL reads (grayscale, RGBA, CMYK, palette, 16-bit) as 8-bit RGB."""
    with Image.open(path) as img:
        img.load()
        if img.mode == 'RGBA' or (img.mode == 'P' and 'transparency' in img.info):
            img = img.convert('RGBA')
            background = Image.new('RGBA', img.size, (255, 255, 255, 255))  # transparent -> white, not black
            return Image.alpha_composite(background, img).convert('RGB')
        if img.mode.startswith('I'):  # 16-bit grayscale: PIL's convert would clip at 255 instead of rescaling
            arr = np.asarray(img, dtype=np.float64)
            return Image.fromarray(np.uint8(np.clip(np.round(arr / 257.0), 0, 255))).convert('RGB')
        return img.convert('RGB')

# -----------------------------------------------------------------------------
# image folders

class ImageFolder(torch.utils.data.Dataset):
    """Images under `root`: class subfolders (labels = sorted folder names) or a flat folder
    (one class). `train=True` applies random-resized-crop + flip, else ADM's centre crop.
    Items are fetched as dataset[(index, aug_seed)] (see ResumableSampler) or dataset[index]."""

    def __init__(self, root, image_size, train=False, flip=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder '{root}' does not exist: pass a folder of images (class subfolders or flat) or 'builtin'")
        self.root, self.image_size, self.train = root, image_size, train
        self.flip = train if flip is None else flip
        self.classes, self.samples = scan_image_folder(root)
        if not self.samples:
            raise ValueError(f"no images found in '{root}' (looked for {', '.join(IMG_EXTENSIONS)} in it and its subfolders)")
        self.samples, self.skipped = drop_unreadable(self.samples)
        if not self.samples:
            raise ValueError(f"none of the images in '{root}' could be read")
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, seed_for(0, 0, item))
        if not 0 <= index < len(self):  # the skip below wraps around: without this, `for x, y in dataset` never ends
            raise IndexError(f"index {index} out of range for {len(self)} images")
        rng = random.Random(seed)
        for attempt in range(len(self.samples)):  # a file that passed the header check may still fail to decode
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = open_rgb(path)
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                print(f"warning: skipping unreadable image {path}: {e}")
        img = random_resized_crop(img, self.image_size, rng) if self.train else center_crop_arr(img, self.image_size)
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img), label


def scan_image_folder(root):
    """-> (class names, [(path, label)]). Subfolders holding images are classes; otherwise the
    folder is flat and everything is class 0."""
    def images_under(d):
        return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(d, followlinks=True)
                      for f in fs if f.lower().endswith(IMG_EXTENSIONS))
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    per_class = [(name, images_under(os.path.join(root, name))) for name in subdirs]
    per_class = [(name, files) for name, files in per_class if files]
    if per_class:
        classes = [name for name, _ in per_class]
        return classes, [(f, label) for label, (_, files) in enumerate(per_class) for f in files]
    flat = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS))
    return [os.path.basename(os.path.normpath(root))], [(f, 0) for f in flat]


def drop_unreadable(samples):
    """Keep the files whose header PIL can parse (cheap: no decode); report how many were not."""
    def readable(sample):
        try:
            with Image.open(sample[0]) as img:
                return img.size[0] > 0 and img.size[1] > 0
        except Exception:  # PIL raises many types for junk files; any of them means unreadable
            return False
    with ThreadPoolExecutor(max_workers=16) as pool:
        ok = list(pool.map(readable, samples, chunksize=256))
    kept = [s for s, good in zip(samples, ok) if good]
    skipped = len(samples) - len(kept)
    if skipped:
        first = next(s[0] for s, good in zip(samples, ok) if not good)
        print(f"warning: skipped {skipped} unreadable file(s) of {len(samples)} (first: {first})")
    return kept, skipped

# -----------------------------------------------------------------------------
# the built-in dataset

BUILTIN_CLASSES = [  # (name, shape, hue); every class differs from the others in shape and in colour
    ('red disc', 'disc', 0.00), ('orange square', 'square', 0.08), ('yellow triangle', 'triangle', 0.15),
    ('green ring', 'ring', 0.33), ('cyan cross', 'cross', 0.50), ('blue diamond', 'diamond', 0.62),
    ('violet stripes', 'stripes', 0.75), ('pink star', 'star', 0.90), ('white checker', 'checker', None),
    ('teal two-dots', 'dots', 0.45),
]


class BuiltinShapes(torch.utils.data.Dataset):
    """Ten classes of coloured shapes on textured backgrounds, drawn on the fly. Each image is a
    function of (seed, split, index): position, size, rotation, colour jitter and background vary.
    `flip` mirrors with probability 1/2 per item (seeded like ImageFolder's augmentation)."""

    splits = {'train': 0, 'val': 1}

    def __init__(self, image_size=32, split='train', per_class=1000, seed=0, flip=False):
        if split not in self.splits:
            raise ValueError(f"split must be one of {list(self.splits)}, got '{split}'")
        self.image_size, self.split, self.per_class, self.seed, self.flip = image_size, split, per_class, seed, flip
        self.classes = [name for name, _, _ in BUILTIN_CLASSES]
        self.num_classes = len(self.classes)

    def __len__(self):
        return self.per_class * self.num_classes

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, seed_for(0, 0, item))
        if not 0 <= index < len(self):  # any index would draw an image: without this, `for x, y in dataset` never ends
            raise IndexError(f"index {index} out of range for {len(self)} images")
        label = index % self.num_classes
        img = draw_shape(label, self.rng(index), self.image_size)
        if self.flip and random.Random(seed).random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img), label

    def rng(self, index):
        return np.random.default_rng([self.seed, self.splits[self.split], index])

    def image_and_mask(self, index):
        """The unflipped image of item `index` (PIL) and its exact segmentation (H, W) uint8: 1 background, 2 the
        shape (pixels it covers at least half of); the segmented built-in set of the compression analyses."""
        return draw_shape(index % self.num_classes, self.rng(index), self.image_size, with_mask=True)


def draw_shape(label, rng, size, supersample=4, with_mask=False):
    """One image of class `label`: a noisy vertical-gradient background and the class's shape in its
    colour, the shape's coverage drawn at 4x resolution and averaged down (anti-aliased edges).
    with_mask: -> (image, labels (size, size) uint8, 1 background and 2 where the coverage is >= 1/2)."""
    _, shape, hue = BUILTIN_CLASSES[label]
    top, bottom = rng.uniform(0.05, 0.35, size=3), rng.uniform(0.05, 0.35, size=3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    background = (1 - ramp) * top + ramp * bottom + rng.normal(0, 0.02, size=(size, size, 3))  # (size, size, 3)
    if hue is None:
        color = rng.uniform(0.85, 1.0, size=3)
    else:
        color = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.02, 0.02)) % 1, rng.uniform(0.75, 1), rng.uniform(0.8, 1)))
    s = size * supersample
    radius = s * rng.uniform(0.22, 0.34)
    cx, cy = rng.uniform(radius, s - radius, size=2)
    mask = Image.new('L', (s, s), 0)
    draw_primitive(ImageDraw.Draw(mask), shape, cx, cy, radius, rng.uniform(0, 2 * math.pi), 255, s)
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255  # (size, size, 1)
    img = Image.fromarray(np.uint8(np.clip((1 - alpha) * background + alpha * color, 0, 1) * 255 + 0.5), 'RGB')
    return (img, np.uint8(1 + (alpha[..., 0] >= 0.5))) if with_mask else img


def draw_primitive(draw, shape, cx, cy, r, angle, color, s):
    def polygon(n, radius, phase, inner=None):
        pts = []
        for k in range(n * (2 if inner else 1)):
            rad = inner if inner and k % 2 else radius
            a = phase + k * math.pi / (n if inner else n / 2)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == 'disc':
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == 'ring':
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=max(1, int(r * 0.35)))
    elif shape == 'square':
        draw.polygon(polygon(4, r * 1.1, angle), fill=color)
    elif shape == 'diamond':
        pts = [(cx + r * 1.2 * math.cos(angle + k * math.pi / 2) * (0.6 if k % 2 else 1),
                cy + r * 1.2 * math.sin(angle + k * math.pi / 2) * (0.6 if k % 2 else 1)) for k in range(4)]
        draw.polygon(pts, fill=color)
    elif shape == 'triangle':
        draw.polygon(polygon(3, r * 1.15, angle), fill=color)
    elif shape == 'star':
        draw.polygon(polygon(5, r * 1.2, angle, inner=r * 0.5), fill=color)
    elif shape == 'cross':
        w = r * 0.38
        for a in (angle, angle + math.pi / 2):
            dx, dy, px, py = r * math.cos(a), r * math.sin(a), w * -math.sin(a), w * math.cos(a)
            draw.polygon([(cx - dx - px, cy - dy - py), (cx + dx - px, cy + dy - py),
                          (cx + dx + px, cy + dy + py), (cx - dx + px, cy - dy + py)], fill=color)
    elif shape == 'stripes':  # full-image stripes: a texture class rather than an object
        period = s / 4
        for k in range(-8, 9):
            off = k * period
            dx, dy = math.cos(angle), math.sin(angle)
            x0, y0 = s / 2 + off * dx, s / 2 + off * dy
            draw.line([(x0 - 2 * s * dy, y0 + 2 * s * dx), (x0 + 2 * s * dy, y0 - 2 * s * dx)], fill=color, width=int(period / 2.5))
    elif shape == 'checker':  # full-image texture, its phase set by `angle`
        cell = s / 4
        shift = angle / (2 * math.pi) * 2 * cell
        for i in range(-1, 5):
            for j in range(-1, 5):
                if (i + j) % 2 == 0:
                    x, y = i * cell + shift, j * cell + shift * 0.5
                    draw.rectangle((x, y, x + cell, y + cell), fill=color)
    elif shape == 'dots':
        dx, dy = 0.55 * r * math.cos(angle), 0.55 * r * math.sin(angle)
        for sign in (-1, 1):
            x, y = cx + sign * dx, cy + sign * dy
            draw.ellipse((x - r * 0.42, y - r * 0.42, x + r * 0.42, y + r * 0.42), fill=color)
    else:
        raise ValueError(f"unknown shape {shape}")

# -----------------------------------------------------------------------------
# dataset construction and sampling

def build_dataset(data, image_size, train=False, flip=None, split='train'):
    """'builtin' -> BuiltinShapes (split 'train' or 'val'); anything else is an image folder."""
    if data == 'builtin':
        return BuiltinShapes(image_size, split=split, flip=train if flip is None else flip)
    return ImageFolder(data, image_size, train=train, flip=flip)


def worker_count(requested):
    """Loader workers: as asked, but no more than the CPUs this process may use (a laptop has few)."""
    return min(requested, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())


def training_loader(dataset, micro_batch_size, accum, d, seed, num_workers, what='images'):
    """-> (loader, sampler, steps per epoch) of a training run on `d` (common.Dist). Each rank reads its
    shard in an order that ResumableSampler makes a function of (seed, epoch, index). The workers persist
    across epochs: starting them anew costs seconds, much of an epoch on a small folder."""
    sampler = ResumableSampler(len(dataset), d.rank, d.world_size, seed)
    workers = worker_count(num_workers)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=d.device.type == 'cuda')
    steps_per_epoch = sampler.per_rank // (micro_batch_size * accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} {what} cannot fill one step of batch_size {micro_batch_size * accum * d.world_size}: "
                         f"lower --batch_size")
    return loader, sampler, steps_per_epoch


def step_batches(loader, sampler, start_step, steps_per_epoch, accum):
    """Endless (step, [accum micro-batches]) from `start_step` on: epoch e = step // steps_per_epoch,
    and a run resumed mid-epoch restarts the sampler at the exact next item."""
    step = start_step
    while True:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, step_in_epoch * accum * loader.batch_size)
        batches = iter(loader)
        for _ in range(step_in_epoch, steps_per_epoch):
            yield step, [next(batches) for _ in range(accum)]
            step += 1


class ResumableSampler(torch.utils.data.Sampler):
    """Shard `rank` of a seeded per-epoch permutation (DistributedSampler's layout: the tail that
    does not divide evenly is dropped). `set_epoch(epoch, start)` skips the first `start` items of
    this rank's shard, so a resumed run sees exactly the batches it would have seen. Yields
    (index, augmentation seed) pairs; the seed depends only on (seed, epoch, index)."""

    def __init__(self, num_items, rank=0, world_size=1, seed=0, shuffle=True):
        self.num_items, self.rank, self.world_size, self.seed, self.shuffle = num_items, rank, world_size, seed, shuffle
        self.per_rank = num_items // world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_items)
        shard = order[: self.per_rank * self.world_size][self.rank::self.world_size][self.start:].tolist()
        return iter([(i, seed_for(self.seed, self.epoch, i)) for i in shard])

    def __len__(self):
        return self.per_rank - self.start
