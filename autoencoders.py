"""
Any autoencoder wherever a VMAE is used: one loader that recognises what a checkpoint holds (a VMAE or a
convolutional KL autoencoder, ours or the authors', or a diffusers VAE folder such as SD3's), and the
loading of a DiT together with its latent statistics and the autoencoder that decodes its latents, and the
generation of images with them.

Both model files read their own formats (vmae.read_vmae, convae.read_convae); this file only decides
which one to ask, so train_dit.py, sample.py, evaluate.py and bench.py never care which they have.
"""

import os

import torch

import dit
import fileio
from common import print0, seeded_noise
from convae import load_convae
from vmae import VMAE, load_vmae


def autoencoder_kind(path):
    """'vmae' or 'convae' for any file either model file reads; a one-line ValueError otherwise."""
    if os.path.isdir(path) or path.endswith('.safetensors'):
        return 'convae'  # diffusers VAE folders (SD3's vae/)
    ckpt = fileio.read_checkpoint(path, 'autoencoder checkpoint')
    weights = ckpt.get('model') if isinstance(ckpt, dict) else None
    if isinstance(ckpt, dict) and ckpt.get('kind') in ('vmae', 'convae'):
        return ckpt['kind']
    if isinstance(weights, dict) and any(k.endswith('to_latent.weight') for k in weights):
        return 'vmae'
    if isinstance(weights, dict) and any(k.endswith('encoder.conv_in.weight') for k in weights):
        return 'convae'
    found = f"kind '{ckpt['kind']}'" if isinstance(ckpt, dict) and 'kind' in ckpt else \
        f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"'{path}' is not an autoencoder checkpoint: expected a VMAE (train_vmae.py's, or the authors' "
                     f"vmaef8d16.pth) or a convolutional KL autoencoder (ours, the authors' diffusers-named weights, "
                     f"or a diffusers vae/ folder); found {found}")


def dit_latent(autoencoder):
    """The latent a DiT learns from this autoencoder, as the authors: 'sample' (a fresh posterior sample)
    for a VMAE, whose KL term keeps its std near 1e-3; 'mode' (the posterior mean) for a convolutional one,
    whose AE and DAE objectives never train a variance."""
    return 'sample' if isinstance(autoencoder, VMAE) else 'mode'


def load_autoencoder(path, device='cpu', img_size=None):
    """A VMAE or ConvAE in eval mode (the file is read twice for torch files: once to see what it is), with
    `.path` the file it came from, so that what is made with it can record its hash."""
    model = {'vmae': load_vmae, 'convae': load_convae}[autoencoder_kind(path)](path, device, img_size=img_size)
    model.path = path
    return model


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


@torch.no_grad()
def generate(model, autoencoder, stats, labels, indices, seed=0, progress=False, **sampler):
    """Images (B, 3, H, W) in [-1, 1] for these labels: dit.flow_sample(**sampler: steps, solver, shift,
    guidance) then the decoder. Sample i's noise comes from (seed, i) alone, so the result depends on
    neither the batch size nor the number of GPUs."""
    size = model.args['input_size']
    device = stats['mean'].device
    z = seeded_noise(seed, indices, (model.in_channels, size, size)).to(device)
    latents = dit.flow_sample(model, z, torch.as_tensor(labels, device=device), progress=progress, **sampler)
    return autoencoder.decode(dit.destandardise(latents, stats))
