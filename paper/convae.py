"""
ConvAE: the convolutional KL autoencoder of LDM and Stable Diffusion 3 (diffusers' AutoencoderKL),
with the pieces of SD-VAE's adversarial training (PatchGAN, hinge loss, adaptive weight).

A ResNet encoder halves the resolution three times and ends in a Gaussian posterior with 16
channels per latent pixel; a mirrored decoder (one more resnet per level) doubles it back with
nearest-neighbour upsampling and a conv. A single-head self-attention sits in the middle of each,
at 1/8 resolution. This is the SD-VAE baseline of the LDMAE paper (Tables 1 and 3). It has the
interface every autoencoder has (autoencoders.py), so latent extraction, sampling, metrics and
analyses take it as they take the VMAE.

Parameter names equal diffusers' AutoencoderKL, so its state dicts, and Stable Diffusion 3's released
vae/ folder (config.json + diffusion_pytorch_model.safetensors), load strictly without renaming.

References:
- Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models. CVPR 2022
  (the KL autoencoder and its L1 + LPIPS + KL + PatchGAN objective).
- Esser et al. Scaling Rectified Flow Transformers for High-Resolution Image Synthesis. ICML 2024
  (SD3: 16 latent channels, no quant convs).
- Esser, Rombach, Ommer. Taming Transformers for High-Resolution Image Synthesis. CVPR 2021
  (the adaptive adversarial weight); Isola et al. pix2pix, CVPR 2017 (the PatchGAN).

Usage:
    model = load_convae('sd3/vae', 'cuda')           # or ConvAE_models['SD3-VAE'](img_size=256)
    posterior = model.encode(x)                      # x: (B, 3, 256, 256) in [-1, 1]
    z = posterior.mode()                             # (B, 16, 32, 32)
    x_rec = model.decode(z)                          # (B, 3, 256, 256), [-1, 1] scale, unclamped
"""

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import read_checkpoint, strip_wrapper_prefixes
from vmae import DiagonalGaussian

#################################################################################
#                                Building Blocks                                #
#################################################################################

def group_norm(groups, channels):
    return nn.GroupNorm(groups, channels, eps=1e-6)  # 1e-6 everywhere in this model, not PyTorch's 1e-5


class ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 `conv_shortcut` only where the channel count changes."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = group_norm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # the reference's dropout is 0 everywhere: left out
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Halves H and W: zero-pad one column right and one row below, then a 3x3 stride-2 conv without
    padding. Symmetric padding=1 gives the same shapes but other numbers, so released weights need this."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour, then a 3x3 conv (no transposed conv, so no checkerboard)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class MidAttention(nn.Module):
    """One head as wide as the channels (512 in SD3, scale 1/sqrt(512)) over all latent pixels,
    with a residual. Tokens cost quadratic memory: 1,024 at 256 px, 4,096 at 512 px."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = group_norm(groups, ch)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.Sequential(nn.Linear(ch, ch))  # diffusers' to_out.1 is Dropout(0): no weights

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)                             # (B, H*W, C), row-major
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # default scale 1/sqrt(C)
        return x + self.to_out(h).transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (the state dict lists the attention first)."""

    def __init__(self, ch, groups):
        super().__init__()
        self.attentions = nn.ModuleList([MidAttention(ch, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Level(nn.Module):
    """One resolution level: resnets (the first changes the channels), then the resampler if any.
    `resample` is 'down', 'up' or None; diffusers keeps it in a list named after its kind, and an
    empty list adds no keys."""

    def __init__(self, in_ch, out_ch, n_resnets, groups, resample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_resnets)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if resample == 'down' else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if resample == 'up' else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.downsamplers, *self.upsamplers):
            x = layer(x)
        return x


def levels(channels, n_resnets, groups, resample):
    """A Level per entry of `channels`, each taking the previous one's width; all but the last resample."""
    last = len(channels) - 1
    return nn.ModuleList([Level(channels[max(i - 1, 0)], ch, n_resnets, groups, resample if i < last else None)
                          for i, ch in enumerate(channels)])


class Encoder(nn.Module):
    """(B, 3, H, W) -> moments (B, 2 * latent_dim, H/8, W/8): mean || log-variance."""

    def __init__(self, in_chans, channels, layers_per_block, latent_dim, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(in_chans, channels[0], 3, padding=1)
        self.down_blocks = levels(channels, layers_per_block, groups, 'down')
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = group_norm(groups, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_dim, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """(B, latent_dim, h, w) -> (B, 3, 8h, 8w). Channels run the encoder's in reverse; each level
    has one resnet more than the encoder's and changes the width in its first resnet."""

    def __init__(self, in_chans, channels, layers_per_block, latent_dim, groups):
        super().__init__()
        channels = channels[::-1]
        self.conv_in = nn.Conv2d(latent_dim, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups)
        self.up_blocks = levels(channels, layers_per_block + 1, groups, 'up')
        self.conv_norm_out = group_norm(groups, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], in_chans, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # no tanh: pixels are meant to lie in [-1, 1]

#################################################################################
#                                 ConvAE Model                                  #
#################################################################################

class ConvAE(nn.Module):
    """The KL autoencoder without quant convs: the encoder output is the posterior, the decoder takes
    raw latents (no scaling or shift inside; the project standardises latents per channel itself).

    `img_size` is the nominal image size, as for the VMAE: it sets `grid` (the latent side the DiT
    and the sampler use) and is saved with the model. The network itself is convolutional, so encode
    and decode take any image whose sides are multiples of 8 (`patch_size`, the downsampling factor)."""
    # a DiT learns the posterior mean (the authors'): the AE and DAE objectives never train a variance
    dit_latent = 'mode'

    def __init__(self, img_size=256, in_chans=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_dim=16, norm_num_groups=32):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        self.patch_size = 2 ** (len(block_out_channels) - 1)
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the downsampling factor {self.patch_size}")
        self.args = dict(img_size=img_size, in_chans=in_chans, block_out_channels=block_out_channels,
                         layers_per_block=layers_per_block, latent_dim=latent_dim, norm_num_groups=norm_num_groups)
        self.img_size, self.in_chans, self.latent_dim = img_size, in_chans, latent_dim
        self.grid = img_size // self.patch_size
        parts = (in_chans, block_out_channels, layers_per_block, latent_dim, norm_num_groups)
        self.encoder = Encoder(*parts)
        self.decoder = Decoder(*parts)
        # PyTorch's default init, as diffusers and LDM

    def encode(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> posterior with mean/logvar of shape (B, latent_dim, H/8, W/8)."""
        self.check_size(x)
        return DiagonalGaussian(self.encoder(x), dim=1)

    def decode(self, z):
        """Latents (B, latent_dim, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] scale, not clamped."""
        if z.ndim != 4 or z.shape[1] != self.latent_dim:
            raise ValueError(f"this ConvAE decodes latents of shape (B, {self.latent_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype))  # posteriors are fp32 whatever the model's dtype

    def forward(self, x, sample_posterior=True):
        """Training pass (LDM samples the posterior) -> reconstruction (B, 3, H, W), posterior."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def load_weights(self, state_dict):
        """Strict load, DDP/compile prefixes stripped; convolutional, so weights fit any img_size."""
        self.load_state_dict(strip_wrapper_prefixes(state_dict), strict=True)

    def check_size(self, x):
        # other sides would be floored silently by the stride-2 convs (65x63 px -> an 8x7 latent)
        if x.ndim != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"this ConvAE takes (B, C, H, W) images with H and W multiples of {self.patch_size}, "
                             f"got shape {tuple(x.shape)}")

#################################################################################
#                 Training Objectives: AE, DAE, VAE and SD-VAE                  #
#################################################################################
# The four baselines of the paper (App. A) differ only in these terms (train_convae.py assembles them):
#   AE:     squared error                       DAE: the same, from an input with Gaussian noise added
#   VAE:    squared error + kl_weight x KL(q(z|x) || N(0, I)), decoding a posterior sample
#   SD-VAE: LDM's LPIPSWithDiscriminator: L1 + LPIPS + kl_weight x KL, and from step disc_start the
#           generator term d_weight x g_loss, d_weight = disc_weight x adaptive_weight(nll, g_loss,
#           decoder.conv_out.weight); the discriminator D then learns from hinge_d_loss(D(x), D(x_rec))
#           on detached images, real and fake in separate calls (its BatchNorm sees each alone).
# The reductions are LDM's: sums over pixels (or latents) per sample, averaged over the batch, so one
# image's NLL is 3HW x (mean error + LPIPS). kl_weight 1e-6 and the GAN weights were tuned for these sums.

def convae_loss(x, x_rec, posterior, pixel_loss='l1', pixel_weight=1.0, perceptual_weight=0.0, kl_weight=0.0,
                kl_standard=True, kl_target_std=1e-3, perceptual=None):
    """-> (loss, nll, terms). nll = per-sample sum of pixel_weight x |x - x_rec| (or its square) +
    perceptual_weight x LPIPS broadcast onto all 3HW values, mean over the batch; loss = nll + kl_weight
    x KL (to N(0, I), or the VMAE's variance-only KL with kl_standard=False) summed over latents per
    sample. The adversarial term is the trainer's, because its weight needs the graph. Logged terms are
    per-value means (rec, lpips), to read beside the VMAE's, and the per-sample KL."""
    error = (x_rec.float() - x.float()).abs()
    error = error.pow(2) if pixel_loss == 'mse' else error
    per_sample = error[0].numel()  # 3HW
    terms = {'rec': error.mean()}
    nll = pixel_weight * error.sum() / len(x)
    if perceptual_weight > 0:
        terms['lpips'] = perceptual(x_rec, x).float().mean()
        nll = nll + perceptual_weight * per_sample * terms['lpips']
    loss = nll
    if kl_weight > 0:
        terms['kl'] = posterior.kl(kl_target_std, kl_standard).flatten(1).sum(1).mean()
        loss = loss + kl_weight * terms['kl']
    return loss, nll, terms


def generator_loss(logits_fake):
    """The autoencoder's adversarial term: raise D's logits on its reconstructions."""
    return -logits_fake.float().mean()

class NLayerDiscriminator(nn.Module):
    """PatchGAN: a map of real/fake logits, one per 70x70 patch ((B, 1, 30, 30) at 256 px). Layout,
    names (`main.{idx}`) and init of taming-transformers, BatchNorm version (2,765,633 parameters)."""

    def __init__(self, in_chans=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_chans, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),  # BatchNorm brings the bias
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))  # raw logits
        self.main = nn.Sequential(*layers)
        self.apply(discriminator_init)

    def forward(self, x):
        return self.main(x)


def discriminator_init(m):
    """DCGAN init: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02) and shifts 0; conv biases keep
    PyTorch's default."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: pushes real logits above +1 and fake ones below -1, and stops pushing
    once they are there (no reward for ever larger margins, unlike the log loss)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def adaptive_weight(nll_loss, g_loss, last_layer, max_weight=1e4):
    """||d nll / dW|| / (||d g_loss / dW|| + 1e-4) at W = `last_layer` (the decoder's conv_out.weight):
    scales the adversarial gradient to the size of the reconstruction gradient where both reach the
    image, so one GAN weight works through training as both losses drift. Clamped to [0, max_weight]
    and detached (a weight, not a path for gradients); the caller multiplies it by disc_weight.
    Needs a graph (training): in validation, use 0 instead."""
    nll_grad, = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def disc_factor_at(step, start, factor=1.0):
    """The adversarial terms' factor: 0 before step `start` (the autoencoder first learns to
    reconstruct, or D wins too easily), `factor` from then on. `step` counts batches, as LDM's did."""
    return factor if step >= start else 0.0

#################################################################################
#                              Presets and Loading                              #
#################################################################################

def SD3_VAE(**kwargs):
    """Stable Diffusion 3's VAE: f8, 16 latent channels, widths 128-512, 2 resnets a level (83.82M)."""
    return ConvAE(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_dim=16, norm_num_groups=32, **kwargs)


def ConvAE_small(**kwargs):
    """Widths 16-64, 1 resnet a level, 8 groups, f8d16 (1.0M): trains in minutes on a CPU at 32 px
    (full-resolution width dominates the cost: 32 there would make it twice as slow)."""
    return ConvAE(block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_dim=16, norm_num_groups=8, **kwargs)


def ConvAE_tiny(**kwargs):
    """Widths 8-16, 1 resnet a level, 4 groups, f8d16: for tests."""
    return ConvAE(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_dim=16, norm_num_groups=4, **kwargs)


ConvAE_models = {'SD3-VAE': SD3_VAE, 'ConvAE-small': ConvAE_small, 'ConvAE-tiny': ConvAE_tiny}


CHECKPOINT_VERSION = 1


def convae_checkpoint(model, **extra):
    """The dict a trainer saves and load_convae reads: kind 'convae', the format version, `model_args`
    (model.args: ConvAE(**model_args) rebuilds the model), the plain model's state dict under 'model'
    (unwrapped from DDP or torch.compile), and whatever else the trainer keeps (`extra`: the
    discriminator, optimizer states, step, config, ...)."""
    return {'kind': 'convae', 'version': CHECKPOINT_VERSION, 'model_args': dict(model.args),
            'model': model.state_dict(), **extra}


def read_convae(path):
    """-> (constructor kwargs, state dict) of a ConvAE from
    - our checkpoints (see convae_checkpoint);
    - the authors' files: diffusers key names under 'model', arguments read off the shapes;
    - a diffusers AutoencoderKL folder, e.g. SD3's vae/ (config.json + diffusion_pytorch_model.safetensors),
      given as the folder or its .safetensors file.
    Files from outside carry no image size: img_size is 256, the paper's. Anything else is a one-line
    ValueError that says what the file holds."""
    if os.path.isdir(path) or str(path).endswith('.safetensors'):
        return read_diffusers_folder(path)
    ckpt = read_checkpoint(path, 'convolutional autoencoder checkpoint')
    if isinstance(ckpt, dict) and ckpt.get('kind') == 'convae':
        if ckpt.get('version', CHECKPOINT_VERSION) > CHECKPOINT_VERSION:
            raise ValueError(f"'{path}' is a ConvAE checkpoint of format version {ckpt['version']}; this code reads up to {CHECKPOINT_VERSION}")
        return dict(ckpt['model_args']), strip_wrapper_prefixes(ckpt['model'])
    weights = strip_wrapper_prefixes(ckpt['model']) if isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict) else {}
    if {'encoder.conv_in.weight', 'decoder.conv_in.weight'} <= weights.keys():
        return args_from_shapes(weights, path), {k: v.float() for k, v in weights.items()}
    raise ValueError(f"'{path}' is not a convolutional autoencoder checkpoint: expected one with kind 'convae', "
                     f"diffusers AutoencoderKL weights under 'model', or a diffusers VAE folder; found {describe(ckpt)}")


def load_convae(path, device='cpu', img_size=None):
    """A ConvAE in eval mode from any file read_convae reads; `img_size` overrides the nominal size."""
    args, state_dict = read_convae(path)
    args.update({'img_size': img_size} if img_size else {})
    model = ConvAE(**args)
    expected = model.state_dict().keys()
    if expected != state_dict.keys():
        raise ValueError(f"'{path}' does not hold the weights of ConvAE({args}): missing {sorted(expected - state_dict.keys())[:3]}, "
                         f"unexpected {sorted(state_dict.keys() - expected)[:3]}")
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


def describe(ckpt):
    if not isinstance(ckpt, dict):
        return type(ckpt).__name__
    if 'kind' in ckpt:
        return f"kind '{ckpt['kind']}'"
    if isinstance(ckpt.get('model'), dict):
        return f"weights under 'model' with keys like {sorted(map(str, ckpt['model']))[:4]}"
    return f"keys {sorted(map(str, ckpt))[:8]}"


def quant_conv_error(path):
    return ValueError(f"'{path}' is a VAE with quant_conv/post_quant_conv (SD1/SDXL style); only the SD3 layout "
                      f"without them is supported")


def args_from_shapes(sd, path):
    """Constructor arguments of diffusers-named weights. The group count is in no shape: every released
    model of this family uses 32, so 32 is assumed, and widths it does not divide are refused rather
    than guessed (a wrong guess would load and silently compute something else)."""
    if 'quant_conv.weight' in sd:
        raise quant_conv_error(path)
    n_levels = len({k.split('.')[2] for k in sd if k.startswith('encoder.down_blocks.')})
    channels = tuple(sd[f'encoder.down_blocks.{i}.resnets.0.conv1.weight'].shape[0] for i in range(n_levels))
    if any(c % 32 for c in channels):
        raise ValueError(f"'{path}': widths {channels} are not multiples of 32, and the GroupNorm group count is not "
                         f"stored in the weights: save the model with convae_checkpoint to keep its arguments")
    return dict(img_size=256, in_chans=sd['encoder.conv_in.weight'].shape[1], block_out_channels=channels,
                layers_per_block=len({k.split('.')[4] for k in sd if k.startswith('encoder.down_blocks.0.resnets.')}),
                latent_dim=sd['decoder.conv_in.weight'].shape[1], norm_num_groups=32)


def read_diffusers_folder(path):
    """(args, float32 state dict) of a diffusers AutoencoderKL folder. Its scaling_factor and
    shift_factor (1.5305, 0.0609 for SD3) are not read: the project standardises latents per channel,
    which subsumes one scale and shift shared by all channels."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or '.'
    weights_file = os.path.join(folder, 'diffusion_pytorch_model.safetensors') if os.path.isdir(path) else path
    config_file = os.path.join(folder, 'config.json')
    for f in (config_file, weights_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"'{f}' not found: a diffusers VAE folder holds config.json and diffusion_pytorch_model.safetensors")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"'{config_file}' is not a JSON config ({type(e).__name__}: {str(e)[:100]})") from None
    check_diffusers_config(config, config_file)
    from safetensors import SafetensorError  # only this reader needs the package
    from safetensors.torch import load_file
    try:
        state_dict = load_file(weights_file)
    except SafetensorError as e:
        raise ValueError(f"'{weights_file}' is not a safetensors file ({str(e)[:100]})") from None
    args = dict(img_size=256, in_chans=config.get('in_channels', 3), block_out_channels=tuple(config['block_out_channels']),
                layers_per_block=config['layers_per_block'], latent_dim=config['latent_channels'],
                norm_num_groups=config['norm_num_groups'])
    return args, {k: v.float() for k, v in state_dict.items()}  # the released files may be fp16


def check_diffusers_config(config, config_file):
    """One-line errors for configs this model cannot follow. Absent fields take diffusers' defaults
    (quant convs on: older SD1 configs do not name them)."""
    if not isinstance(config, dict) or config.get('_class_name', 'AutoencoderKL') != 'AutoencoderKL':
        found = config.get('_class_name') if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"'{config_file}' is not an AutoencoderKL config (found {found})")
    if config.get('use_quant_conv', True) or config.get('use_post_quant_conv', True):
        raise quant_conv_error(config_file)
    check_field_types(config, config_file)
    blocks = set(config.get('down_block_types', ['DownEncoderBlock2D'])) | set(config.get('up_block_types', ['UpDecoderBlock2D']))
    if blocks - {'DownEncoderBlock2D', 'UpDecoderBlock2D'}:
        raise ValueError(f"'{config_file}': block types {sorted(blocks)} are not supported (only DownEncoderBlock2D/UpDecoderBlock2D)")
    for key, want in (('act_fn', 'silu'), ('mid_block_add_attention', True), ('out_channels', config.get('in_channels', 3))):
        if config.get(key, want) != want:
            raise ValueError(f"'{config_file}': {key}={config[key]!r} is not supported (this ConvAE needs {key}={want!r})")


def positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_field_types(config, config_file):
    """The fields read_diffusers_folder reads, present and of the right type (a string where a list of ints
    belongs would fail deep inside the model with an unrelated message)."""
    missing = [k for k in ('block_out_channels', 'layers_per_block', 'latent_channels', 'norm_num_groups') if k not in config]
    if missing:
        raise ValueError(f"'{config_file}' lacks {missing}")
    for key in ('in_channels', 'out_channels', 'layers_per_block', 'latent_channels', 'norm_num_groups'):
        if key in config and not positive_int(config[key]):
            raise ValueError(f"'{config_file}': {key} must be a positive integer, got {config[key]!r}")
    channels = config['block_out_channels']
    if not (isinstance(channels, list) and channels and all(positive_int(c) for c in channels)):
        raise ValueError(f"'{config_file}': block_out_channels must be a list of positive integers, got {channels!r}")
    if any(c % config['norm_num_groups'] for c in channels):
        raise ValueError(f"'{config_file}': norm_num_groups {config['norm_num_groups']} does not divide block_out_channels {channels}")
    for key in ('down_block_types', 'up_block_types'):
        if key in config and not (isinstance(config[key], list) and all(isinstance(b, str) for b in config[key])):
            raise ValueError(f"'{config_file}': {key} must be a list of block names, got {config[key]!r}")
