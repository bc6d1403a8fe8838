"""
VMAE: the Variational Masked AutoEncoder of LDMAE.

A symmetric ViT autoencoder on 8x8 patches. The encoder sees only the visible patches (MAE-style
random masking); `to_latent` gives a Gaussian posterior (mean and log-variance, 16 channels per
patch) whose variance a KL term pulls toward a small target std while the mean stays free; the
decoder fills in mask tokens, restores patch order and predicts pixels through a per-token linear
layer followed by a 3x3 convolution over the RGB image. Losses (Eq. 2 of the paper): masked-patch
MSE, visible-patch MSE, LPIPS on the full reconstruction and the KL.

References:
- Lee, Shin, Choi, Lee. Latent Diffusion Models with Masked AutoEncoders. ICCV 2025.
  Authors' code: https://github.com/isno0907/ldmae (this file matches its inference model:
  same parameter names, so their vmaef8d16.pth loads here, and the same outputs).
- He et al. Masked Autoencoders Are Scalable Vision Learners. CVPR 2022 (masking, sin-cos tables).

Usage:
    model = load_vmae('vmaef8d16.pth', 'cuda')    # or VMAE_models['VMAE-f8d16'](img_size=256)
    posterior = model.encode(x)                    # x: (B, 3, 256, 256) in [-1, 1]
    z = posterior.sample()                         # (B, 16, 32, 32)
    x_rec = model.decode(z)                        # (B, 3, 256, 256), [-1, 1] scale, unclamped
"""

import dataclasses
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import read_checkpoint, strip_wrapper_prefixes

#################################################################################
#                              Transformer Blocks                               #
#################################################################################

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the authors' timm blocks


class Block(nn.Module):
    """Pre-norm ViT block."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, N, D), row-major tokens


class SmoothingHead(nn.Module):
    """Per-token linear to pixels, un-patchify, then a 3x3 conv over the RGB image: the conv sees
    across patch borders, which removes the blocky seams a pure per-patch head leaves."""

    def __init__(self, dim, patch_size, in_chans):
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.linear_pred = nn.Linear(dim, patch_size ** 2 * in_chans)
        self.conv_smoother = nn.Conv2d(in_chans, in_chans, kernel_size=3, padding=1)

    def forward(self, x):
        x = unpatchify(self.linear_pred(x), self.patch_size, self.in_chans)  # (B, N, p*p*3) -> (B, 3, H, W)
        return self.conv_smoother(x)

#################################################################################
#                                   Posterior                                   #
#################################################################################

class DiagonalGaussian:
    """Gaussian with diagonal covariance from `moments` = mean || log-variance along `dim`."""

    def __init__(self, moments, dim=1):
        self.mean, logvar = moments.float().chunk(2, dim=dim)  # fp32 even under autocast: exp() and the KL need it
        self.logvar = logvar.clamp(-30.0, 20.0)  # the authors' clamp: keeps exp() finite early in training
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self):
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self):
        return self.mean

    def kl(self, target_std=1e-3, standard=False):
        """Per-element KL. Default (the authors' VMAE): KL(N(mu, var) || N(mu, target_std^2)),
        which regularises only the variance and leaves the mean free. `standard=True`: the
        textbook VAE KL to N(0, I), mean term included."""
        if standard:
            return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        target_var = target_std ** 2
        return 0.5 * (self.var / target_var - 1.0 - self.logvar + np.log(target_var))

#################################################################################
#                                 VMAE Model                                    #
#################################################################################

class VMAE(nn.Module):
    """Symmetric ViT encoder/decoder with a Gaussian latent per patch."""
    # a DiT learns a fresh posterior sample each time (the authors'): the KL term keeps its std near 1e-3
    dit_latent = 'sample'

    def __init__(self, img_size=256, patch_size=8, in_chans=3, embed_dim=192, depth=12, num_heads=12,
                 decoder_embed_dim=192, decoder_depth=12, decoder_num_heads=12, mlp_ratio=4.0,
                 latent_dim=16, mask_token=True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.args = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                         decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
                         mlp_ratio=mlp_ratio, latent_dim=latent_dim, mask_token=mask_token)
        self.img_size, self.patch_size, self.in_chans, self.latent_dim = img_size, patch_size, in_chans, latent_dim
        self.grid = img_size // patch_size
        num_patches = self.grid ** 2

        # encoder: fixed sin-cos positions, no class token
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.register_buffer('pos_embed', torch.zeros(1, num_patches, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.to_latent = nn.Linear(embed_dim, 2 * latent_dim)  # mean || log-variance

        # decoder: two stacked linears as in the authors' model (from_latent, then decoder_embed)
        self.from_latent = nn.Linear(latent_dim, decoder_embed_dim)
        self.decoder_embed = nn.Linear(decoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim)) if mask_token else None
        self.register_buffer('decoder_pos_embed', torch.zeros(1, num_patches, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = SmoothingHead(decoder_embed_dim, patch_size, in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid))
        self.decoder_pos_embed.copy_(get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid))
        # patch embedding initialised like a Linear on its flattened (D, 3*p*p) view (MAE); bias keeps the default
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # conv_smoother keeps PyTorch's default init, as the authors'

    def random_masking(self, x, mask_ratio):
        """Per-sample random masking by shuffling (MAE). x: (B, N, D).
        -> kept tokens (B, N_keep, D), mask (B, N) with 1 = removed, ids_restore (B, N)."""
        B, N, D = x.shape
        n_keep = int(N * (1 - mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(B, N, device=x.device), dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(B, N, device=x.device)
        mask[:, :n_keep] = 0
        return x, torch.gather(mask, 1, ids_restore), ids_restore

    def encoder_modules(self):
        """The modules that make the latent; the rest decodes it. Stage 3 freezes these."""
        return self.patch_embed, self.blocks, self.norm, self.to_latent

    def encode_tokens(self, x, mask_ratio=0.0):
        """Images (B, 3, H, W) -> posterior moments of the visible tokens (B, N_vis, 2 * latent_dim),
        mask (B, N) or None, ids_restore (B, N) or None."""
        self.check_size(x)
        x = self.patch_embed(x) + self.pos_embed             # (B, N, D)
        mask = ids_restore = None
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio)  # (B, N_vis, D)
        for block in self.blocks:
            x = block(x)
        return self.to_latent(self.norm(x)), mask, ids_restore

    def decode_tokens(self, z, ids_restore=None):
        """Latent tokens (B, N_vis, latent_dim) -> image (B, 3, H, W). With ids_restore, mask tokens
        fill the removed positions and the original order is restored."""
        x = self.decoder_embed(self.from_latent(z))           # (B, N_vis, D_dec)
        if ids_restore is not None:
            B, N = ids_restore.shape
            x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, N - x.shape[1], -1)], dim=1)  # (B, N, D_dec), shuffled
            x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))     # original order
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def encode(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> posterior with mean/logvar of shape (B, latent_dim, H/p, W/p)."""
        moments, _, _ = self.encode_tokens(x)                 # (B, N, 2C)
        B = moments.shape[0]
        moments = moments.transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # (B, 2C, h, w)
        return DiagonalGaussian(moments, dim=1)

    def decode(self, z):
        """Latents (B, latent_dim, h, w) -> images (B, 3, H, W) in [-1, 1] scale, not clamped."""
        if tuple(z.shape[1:]) != (self.latent_dim, self.grid, self.grid):
            raise ValueError(f"this VMAE decodes latents of shape (B, {self.latent_dim}, {self.grid}, {self.grid}), got {tuple(z.shape)}")
        return self.decode_tokens(z.flatten(2).transpose(1, 2))  # (B, h*w, C) tokens

    def forward(self, x, mask_ratio=0.0, sample_posterior=True, latent_noise=0.0):
        """Training pass. -> reconstruction (B, 3, H, W), mask (B, N) or None, posterior over the
        visible tokens (mean of shape (B, N_vis, latent_dim)). latent_noise > 0: the decoder sees the
        latent perturbed as the smoothness test perturbs it (see perturb_latents)."""
        moments, mask, ids_restore = self.encode_tokens(x, mask_ratio)
        posterior = DiagonalGaussian(moments, dim=-1)
        z = posterior.sample() if sample_posterior else posterior.mode()
        if latent_noise > 0:
            z = perturb_latents(z, latent_noise)
        return self.decode_tokens(z, ids_restore), mask, posterior

    def check_size(self, x):
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"this VMAE is built for {self.img_size}x{self.img_size} images, got "
                             f"{x.shape[-2]}x{x.shape[-1]}: build or load it with img_size={x.shape[-1]}")

    def load_weights(self, state_dict):
        """Strictly load weights from our checkpoints or the authors' (stage-1 or final) files:
        drops their LPIPS copy (`perceptual_loss.*`), a `mask_token` this model does not use, wrapper
        prefixes, and resizes position tables from another image size the way the authors did."""
        sd = {k: v for k, v in strip_wrapper_prefixes(state_dict).items() if not k.startswith('perceptual_loss.')}
        if self.mask_token is None:
            sd.pop('mask_token', None)
        elif 'mask_token' not in sd:  # e.g. masked training started from a final (mask-free) model
            sd['mask_token'] = self.mask_token.detach().clone()
        for key in ('pos_embed', 'decoder_pos_embed'):
            if key in sd and sd[key].shape != getattr(self, key).shape:
                sd[key] = resize_pos_embed(sd[key], self.grid)
        self.load_state_dict(sd, strict=True)


def perturb_latents(z, max_eps):
    """Latent tokens z (B, N, C) + eps x each channel's std x N(0, I), eps drawn uniformly from [0, max_eps]
    per image: the perturbation of the smoothness test (Fig. 6) as training noise, so a decoder learns to
    decode it. The std is the batch's, detached: the noise follows the latent's scale and is no target."""
    std = z.detach().flatten(0, 1).std(0, correction=0)          # (C,); population std: defined for one token too
    eps = max_eps * torch.rand(z.shape[0], 1, 1, device=z.device)  # (B, 1, 1)
    return z + eps * std * torch.randn_like(z)

#################################################################################
#                                    Losses                                     #
#################################################################################

@dataclasses.dataclass
class LossWeights:
    """Weights of Eq. 2. Defaults are the authors' stage-1 run: 0.5 masked MSE + 0.5 visible MSE
    + 0.5 LPIPS + 1e-6 KL to N(mu, (1e-3)^2). (Their --visible_loss_ratio 0.75 was never passed to
    the model, so 0.5/0.5 is what ran.)"""
    mask: float = 0.5          # lambda_M, masked-patch MSE
    visible: float = 0.5       # visible-patch MSE (L_R)
    perceptual: float = 0.5    # lambda_P, LPIPS on the full reconstruction
    kl: float = 1e-6           # lambda_reg
    kl_target_std: float = 1e-3
    kl_standard: bool = False  # True: textbook VAE KL (the VAE baseline of Tables 1 and 3)


def patchify(imgs, p):
    """(B, C, H, W) -> (B, N, p*p*C), each patch ordered (row, column, channel)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum('nchpwq->nhwpqc', x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, c=3):
    """(B, N, p*p*C) -> (B, C, H, W), the inverse of patchify (square images)."""
    B, N, _ = x.shape
    h = int(N ** 0.5)
    x = torch.einsum('nhwpqc->nchpwq', x.reshape(B, h, h, p, p, c))
    return x.reshape(B, c, h * p, h * p)


def vmae_loss(imgs, recon, mask, posterior, patch_size, weights, perceptual=None):
    """Eq. 2 on one batch. imgs/recon: (B, 3, H, W); mask: (B, N), 1 = masked, or None.
    Returns (loss, dict of the unweighted terms)."""
    per_patch = (patchify(recon.float(), patch_size) - patchify(imgs.float(), patch_size)).pow(2).mean(-1)  # (B, N)
    terms = {}
    if mask is None:
        terms['mse_visible'] = per_patch.mean()
    else:
        terms['mse_visible'] = (per_patch * (1 - mask)).sum() / (1 - mask).sum()
        terms['mse_masked'] = (per_patch * mask).sum() / mask.sum()
    loss = weights.visible * terms['mse_visible'] + weights.mask * terms.get('mse_masked', 0.0)
    if weights.perceptual > 0:
        terms['lpips'] = perceptual(recon, imgs).mean()
        loss = loss + weights.perceptual * terms['lpips']
    if weights.kl > 0:
        # summed over channels, averaged over the batch and the visible tokens (authors' normalisation)
        kl = posterior.kl(weights.kl_target_std, weights.kl_standard).float()  # (B, N_vis, C)
        terms['kl'] = kl.sum(-1).mean()
        loss = loss + weights.kl * terms['kl']
    return loss, terms


def lpips_vgg(pretrained=True):
    """Frozen LPIPS (VGG16, v0.1 lin weights) in eval mode, inputs in [-1, 1]. The lin weights ship
    with the `lpips` package; the VGG16 backbone comes from torchvision's download (torch hub cache).
    pretrained=False gives a random backbone (tests; no download)."""
    import lpips
    from torch.hub import get_dir
    vgg_file = os.path.join(get_dir(), 'checkpoints', 'vgg16-397923af.pth')
    try:
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=`; the warning is not for our users
            warnings.filterwarnings('ignore', category=UserWarning, module='torchvision')
            net = lpips.LPIPS(net='vgg', pnet_rand=not pretrained, verbose=False)
    except Exception as e:  # torchvision raises URLError/RuntimeError/OSError when it cannot download
        raise FileNotFoundError(
            f"LPIPS needs torchvision's VGG16 weights and could not get them ({type(e).__name__}): put "
            f"vgg16-397923af.pth (https://download.pytorch.org/models/vgg16-397923af.pth) at {vgg_file}, "
            f"or train without LPIPS (--perceptual_weight 0)") from None
    # eval mode: the authors' LPIPS ran with its lin-layer dropout on during training; off is the exact expectation
    return net.eval().requires_grad_(False)

#################################################################################
#                          Sine/Cosine Position Tables                          #
#################################################################################

def get_2d_sincos_pos_embed(dim, grid):
    """(1, grid*grid, dim) table, MAE convention: the first dim/2 channels encode the column, the
    last dim/2 the row; each half is dim/4 sines then dim/4 cosines of pos * 10000^(-k/(dim/4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij')

    def embed_1d(pos):
        out = np.outer(pos.reshape(-1), omega)  # (grid*grid, dim/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def resize_pos_embed(table, grid):
    """Bilinearly resize a (1, g*g, D) table to (1, grid*grid, D) (align_corners=False), as the
    authors moved their 128-px (16x16) tables to 256 px (32x32)."""
    _, n, D = table.shape
    g = int(round(n ** 0.5))
    x = table.reshape(1, g, g, D).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    x = F.interpolate(x, size=(grid, grid), mode='bilinear', align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(table.dtype)

#################################################################################
#                              Presets and Loading                              #
#################################################################################

def VMAE_f8d16(**kwargs):
    """The paper's VMAE: patch 8, width 192, 12+12 blocks, 12 heads, 16 latent channels (10.80M)."""
    return VMAE(patch_size=8, embed_dim=192, depth=12, num_heads=12, decoder_embed_dim=192,
                decoder_depth=12, decoder_num_heads=12, latent_dim=16, **kwargs)


def VMAE_small(**kwargs):
    """Width 128, 4+4 blocks (1.6M): trains in minutes on a CPU."""
    return VMAE(patch_size=8, embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=128,
                decoder_depth=4, decoder_num_heads=4, latent_dim=16, **kwargs)


def VMAE_tiny(**kwargs):
    """Width 64, 2+2 blocks: for tests."""
    return VMAE(patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=64,
                decoder_depth=2, decoder_num_heads=2, latent_dim=16, **kwargs)


VMAE_models = {'VMAE-f8d16': VMAE_f8d16, 'VMAE-small': VMAE_small, 'VMAE-tiny': VMAE_tiny}


CHECKPOINT_VERSION = 1


def vmae_checkpoint(model, **extra):
    """The checkpoint dict train_vmae.py saves and load_vmae reads:
        kind        'vmae'
        version     CHECKPOINT_VERSION
        model_args  the VMAE constructor kwargs (model.args): VMAE(**model_args) rebuilds it
        model       the state dict of the plain VMAE (no DDP or torch.compile wrapper)
        **extra     anything else the trainer keeps (optimizer state, step, config, ...)"""
    return {'kind': 'vmae', 'version': CHECKPOINT_VERSION, 'model_args': dict(model.args, mask_token=model.mask_token is not None),
            'model': model.state_dict(), **extra}


def read_vmae(path):
    """-> (constructor kwargs, state dict) of a VMAE file: ours (see vmae_checkpoint) or the authors'
    vmaef8d16.pth and stage-1 checkpoints (weights under 'model', no arguments: read off the shapes).
    Anything else is a one-line ValueError that says what the file holds."""
    ckpt = read_checkpoint(path, 'VMAE checkpoint')
    if isinstance(ckpt, dict) and ckpt.get('kind') == 'vmae':
        if ckpt.get('version', CHECKPOINT_VERSION) > CHECKPOINT_VERSION:
            raise ValueError(f"'{path}' is a VMAE checkpoint of format version {ckpt['version']}; this code reads up to {CHECKPOINT_VERSION}")
        return dict(ckpt['model_args']), ckpt['model']
    if isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict) and 'to_latent.weight' in ckpt['model']:
        state_dict = strip_wrapper_prefixes(ckpt['model'])
        return authors_vmae_args(state_dict), state_dict
    found = f"kind '{ckpt['kind']}'" if isinstance(ckpt, dict) and 'kind' in ckpt else \
        f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"'{path}' is not a VMAE checkpoint: expected one written by train_vmae.py or the authors' "
                     f"vmaef8d16.pth (weights under 'model', with keys like to_latent.weight); found {found}")


def load_vmae(path, device='cpu', img_size=None):
    """A VMAE in eval mode from a train_vmae.py checkpoint or the authors' vmaef8d16.pth. The image size
    is the checkpoint's unless `img_size` is given, in which case the position tables are resized.
    The mask token, a training-only parameter, is dropped."""
    args, state_dict = read_vmae(path)
    args.update(mask_token=False, **({'img_size': img_size} if img_size else {}))
    model = VMAE(**args)
    model.load_weights(state_dict)
    return model.to(device).eval()


def authors_vmae_args(sd):
    """Constructor arguments for an authors' checkpoint, read off its shapes (their released model
    is f8d16 at 256 px; their stage-1 checkpoints hold 128-px tables)."""
    dim, in_chans, p, _ = sd['patch_embed.proj.weight'].shape
    dec_dim = sd['decoder_embed.weight'].shape[0]
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    dec_depth = len({k.split('.')[1] for k in sd if k.startswith('decoder_blocks.')})
    grid = int(round(sd['pos_embed'].shape[1] ** 0.5))
    # heads are not in the shapes: the authors' presets all use head dim 16
    return dict(img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=dim, depth=depth,
                num_heads=dim // 16, decoder_embed_dim=dec_dim, decoder_depth=dec_depth,
                decoder_num_heads=dec_dim // 16, latent_dim=sd['from_latent.weight'].shape[1], mask_token=False)
