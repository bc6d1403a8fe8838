"""
The autoencoder seam: what train_dit.py, sample.py and evaluate.py need of an autoencoder, stated once,
and the registry that loads any of them from its checkpoint.

Every autoencoder (vmae.VMAE; the paper's baselines, paper/convae.py's ConvAE) has:
    encode(x)    images (B, 3, H, W) in [-1, 1] -> a posterior with .mean and .logvar (B, C, h, w),
                 .sample() and .mode() (vmae.DiagonalGaussian)
    decode(z)    latents (B, C, h, w) -> images (B, 3, H, W) on the [-1, 1] scale
    img_size, patch_size (= H / h), latent_dim (= C), grid (= h = w)
    dit_latent   the latent a DiT learns from it: 'sample' (a fresh posterior sample each time an image is
                 drawn) or 'mode' (the posterior mean)
and its file records its `kind`, a key of REGISTRY, whose loader reads it. Bring your own autoencoder: a
file of your own with the model and `load(path, device='cpu', img_size=None)` (the model in eval mode),
checkpoints saved with 'kind': 'yours', and one line in REGISTRY (see the README).
"""

import importlib
import os

import torch

import dit
import fileio
from common import print0

REGISTRY = {  # kind -> (module, its loader)
    'vmae': ('vmae', 'load_vmae'),
    'convae': ('paper.convae', 'load_convae'),  # the paper's convolutional baselines and SD3's VAE, from the wing
}


def autoencoder_kind(path):
    """The registry's kind of any file an autoencoder loader reads: the kind our checkpoints record, or for
    the authors' and diffusers' files, the one their weights' names give; a one-line ValueError otherwise."""
    if os.path.isdir(path) or path.endswith('.safetensors'):
        return 'convae'  # diffusers VAE folders (SD3's vae/)
    ckpt = fileio.read_checkpoint(path, 'autoencoder checkpoint')
    weights = ckpt.get('model') if isinstance(ckpt, dict) else None
    if isinstance(ckpt, dict) and ckpt.get('kind') in REGISTRY:
        return ckpt['kind']
    if isinstance(weights, dict) and any(k.endswith('to_latent.weight') for k in weights):
        return 'vmae'  # the authors' vmaef8d16.pth
    if isinstance(weights, dict) and any(k.endswith('encoder.conv_in.weight') for k in weights):
        return 'convae'  # diffusers-named KL autoencoder weights
    found = f"kind '{ckpt['kind']}'" if isinstance(ckpt, dict) and 'kind' in ckpt else \
        f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"'{path}' is not an autoencoder checkpoint: expected one of the kinds {', '.join(REGISTRY)} (train_vmae.py's, "
                     f"the authors' vmaef8d16.pth, a convolutional KL autoencoder or a diffusers vae/ folder); found {found}")


def load_autoencoder(path, device='cpu', img_size=None):
    """Any registered autoencoder in eval mode (a torch file is read twice: once to see what it is), with
    `.path` the file it came from, so that what is made with it can record its hash."""
    module, loader = REGISTRY[autoencoder_kind(path)]
    model = getattr(importlib.import_module(module), loader)(path, device, img_size=img_size)
    dit_latent(model)
    model.path = path
    return model


def dit_latent(autoencoder):
    """'sample' or 'mode': the latent a DiT learns from this autoencoder (its class says which)."""
    kind = getattr(autoencoder, 'dit_latent', None)
    if kind not in ('sample', 'mode'):
        raise ValueError(f"{type(autoencoder).__name__} does not say which latent a DiT learns from it: give the class "
                         f"dit_latent = 'sample' or 'mode' (see autoencoders.py)")
    return kind


def autoencoder_names(paths, names=()):
    """`names` (--names), or each checkpoint's run folder (out/sdvae/last.pt -> sdvae), else its file or folder name."""
    if names:
        if len(names) != len(paths):
            raise ValueError(f"--names gives {len(names)} names for {len(paths)} autoencoders")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # the names key the results: a repeated one would keep one autoencoder's row and drop the other's
            raise ValueError(f"--names gives {', '.join(repr(n) for n in twice)} more than once: give each autoencoder its own name")
        return list(names)
    def name(path):
        path = os.path.normpath(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        return os.path.basename(os.path.dirname(path)) or stem if stem == 'last' or stem.startswith('ckpt_') else stem
    names = [name(p) for p in paths]
    return [n if names.count(n) == 1 else f'{n}_{i}' for i, n in enumerate(names)]


def load_autoencoders(paths, names=(), device='cpu', image_size=0):
    """-> ({name: autoencoder} in eval mode, their image size): image_size, else the first one's, for all."""
    models, size = {}, image_size or None
    for name, path in zip(autoencoder_names(paths, names), paths):
        models[name] = load_autoencoder(path, device, size)
        size = models[name].img_size
        print0(f"{name}: {type(models[name]).__name__} {path} at {size} px")
    return models, size


def load_generator(dit_path, autoencoder_path='', latent_stats='', weights='ema', device='cpu'):
    """-> (DiT, latent statistics {'mean', 'std'} (C,) on device, autoencoder): everything that turns
    noise into images. The statistics default to those in the DiT checkpoint and the autoencoder to the
    one it was trained on; every mismatch is a one-line error."""
    if not os.path.isfile(dit_path):
        raise FileNotFoundError(f"DiT checkpoint {dit_path} not found: pass --dit (train_dit.py writes <out_dir>/last.pt; "
                                f"the demo's is out/demo/dit/last.pt)")
    model = dit.load_dit(dit_path, device, weights)
    config = model.meta.get('config', {})
    stats = dit.read_latent_stats(latent_stats) if latent_stats else model.latent_stats
    if stats is None:
        raise ValueError(f"{dit_path} carries no latent statistics (the authors' checkpoints do not): pass --latent_stats "
                         f"(their latents_stats.pt, or a train_dit.py latents/meta.json)")
    path = autoencoder_path or config.get('autoencoder', '')
    if not path:
        raise ValueError(f"no autoencoder to decode with: pass --autoencoder (the one the DiT {dit_path} was trained on)")
    if autoencoder_path and config.get('autoencoder_sha256') not in (None, fileio.file_sha256(autoencoder_path)):
        print0(f"note: decoding with {autoencoder_path}, not the autoencoder this DiT was trained on ({config.get('autoencoder')}): "
               f"right for a decoder fine-tuned with the encoder frozen, wrong otherwise")
    autoencoder = load_autoencoder(path, device, img_size=config.get('image_size'))
    shape = (model.in_channels, model.args['input_size'], model.args['input_size'])
    if (autoencoder.latent_dim, autoencoder.grid, autoencoder.grid) != shape:
        raise ValueError(f"the autoencoder {path} makes latents of shape ({autoencoder.latent_dim}, {autoencoder.grid}, "
                         f"{autoencoder.grid}) but the DiT {dit_path} models {shape}: pass the one the DiT was trained on")
    return model, {k: torch.as_tensor(v, dtype=torch.float32).flatten().to(device) for k, v in stats.items()}, autoencoder
