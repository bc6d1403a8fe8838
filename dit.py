"""
The latent diffusion transformer of LDMAE: a DiT with the LightningDiT options, its rectified-flow
objective, Euler and Heun samplers with classifier-free guidance, presets and a checkpoint loader.

References:
- DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023.
- LightningDiT: Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent
  Diffusion Models", CVPR 2025 (RMSNorm, SwiGLU, QK-norm, 2D RoPE).
- LDMAE: Lee et al., "Latent Diffusion Models with Masked AutoEncoders", ICCV 2025 (DiT-B/1 on
  16x32x32 VMAE latents).

Time runs from t=0 (pure noise) to t=1 (data) and the network predicts the velocity data - noise.
Parameter and buffer names follow the authors' LightningDiT, so their checkpoints load strictly.

Usage:
    model = DiT_models['DiT-B/1'](num_classes=1000)
    loss = flow_loss(model, latents, labels).mean()
    latents = euler_sample(model.eval(), torch.randn(8, 16, 32, 32), labels, cfg_scale=4.0)
"""

import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import read_checkpoint, strip_wrapper_prefixes


def modulate(x, shift, scale):
    # x: (N, T, D); shift, scale: (N, 1, D), broadcast over the tokens
    return x * (1 + scale) + shift


#################################################################################
#          Embedding Layers for Latent Patches, Timesteps and Labels            #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar flow times t in [0, 1] into vector representations."""
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) times -> (N, dim) features [cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / (dim / 2)).
        The raw t in [0, 1] goes in, not 1000 t: the authors' checkpoints were trained that way."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]                     # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Embeds class labels into vector representations. In training, each label is replaced by the null
    class (id num_classes) with probability dropout_prob, which teaches the unconditional velocity used
    by classifier-free guidance. The null row exists only when dropout_prob > 0, so an unconditional
    model (num_classes=1, dropout_prob=0, as the authors' CelebA-HQ DiT) has a one-row table."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replaces labels by the null class: at random, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, force_drop_ids=None):
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) tokens, one per p x p patch, in row-major order."""
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        # contiguous: the conv's output is (N, D, T) in memory, a layout every later op would inherit
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


#################################################################################
#                     Attention and MLP: the Parts of a Block                   #
#################################################################################

class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, rms(x) = sqrt(mean(x^2) + eps), taken in fp32 so that bf16
    activations keep their scale."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def block_norm(dim, use_rmsnorm):
    """The pre-norm of a block: RMSNorm with a learnable weight, or DiT's affine-free LayerNorm."""
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class SwiGLU(nn.Module):
    """w3(SiLU(a) * b) with [a, b] = w12(x). w12 is one fused Linear, as in the authors' checkpoints."""
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Mlp(nn.Module):
    """DiT's MLP: fc2(GELU(fc1(x))) with the tanh-approximated GELU (the VMAE's Mlp uses the exact one)."""
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class RotaryEmbedding2D(nn.Module):
    """2D rotary position embedding (EVA-02 style) for a grid_size x grid_size token map in row-major order.
    Head dims [0, d/2) rotate with the token's row and [d/2, d) with its column. In each half the pair
    (2k, 2k+1) rotates by the angle pos * theta^(-k / (d/4)), so q.k depends only on relative position.
    The cos/sin tables are (persistent) buffers because the authors' checkpoints contain them."""
    def __init__(self, head_dim, grid_size, theta=10000.0):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)                   # (d/4,)
        angles = torch.outer(torch.arange(grid_size).float(), freqs).repeat_interleave(2, -1)  # (g, d/2)
        rows = angles[:, None, :].expand(grid_size, grid_size, half)                       # (g, g, d/2)
        cols = angles[None, :, :].expand(grid_size, grid_size, half)                       # (g, g, d/2)
        angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)  # (T, d)
        self.register_buffer('freqs_cos', angles.cos())
        self.register_buffer('freqs_sin', angles.sin())

    def forward(self, x):
        # x: (N, H, T, d). Each pair (x_2k, x_2k+1) is a point in the plane, turned by its token's angle:
        # (x_2k, x_2k+1) -> (x_2k cos - x_2k+1 sin, x_2k sin + x_2k+1 cos), in the tables' precision (fp32)
        x = x.to(self.freqs_cos.dtype)
        even, odd = x[..., 0::2], x[..., 1::2]                          # (N, H, T, d/2) each
        cos, sin = self.freqs_cos[:, 0::2], self.freqs_sin[:, 0::2]     # (T, d/2): the angle of each pair
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)  # (N, H, T, d)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, optional per-head QK-norm and optional RoPE."""
    def __init__(self, dim, num_heads, use_qknorm, use_rmsnorm):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if use_qknorm:
            # with RMSNorm off, LightningDiT falls back to an ordinary (affine, eps 1e-5) LayerNorm here
            self.q_norm = RMSNorm(head_dim) if use_rmsnorm else nn.LayerNorm(head_dim)
            self.k_norm = RMSNorm(head_dim) if use_rmsnorm else nn.LayerNorm(head_dim)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        N, T, D = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)   # each (N, T, H, D / H)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)          # each (N, H, T, D / H)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)            # (N, H, T, D / H)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))   # (N, T, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""
    def __init__(self, hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm):
        super().__init__()
        self.norm1 = block_norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, use_qknorm, use_rmsnorm)
        self.norm2 = block_norm(hidden_size, use_rmsnorm)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        # SwiGLU keeps the MLP's parameter count with 2/3 of its width (2048 for DiT-B)
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * mlp_hidden_dim)) if use_swiglu else Mlp(hidden_size, mlp_hidden_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, rope=None):
        # each (N, 1, D), broadcast over the tokens
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: modulated norm, then a per-token Linear to p * p * C values."""
    def __init__(self, hidden_size, patch_size, out_channels, use_rmsnorm):
        super().__init__()
        self.norm_final = block_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)   # (N, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, predicting the flow velocity of latents.
    The defaults are the authors' LDMAE ImageNet model (LightningDiT-B/1 on 16x32x32 latents).
    The use_* switches are LightningDiT's: QK-norm is off in the authors' CelebA-HQ model, and with all
    four off the block is the original DiT's (LayerNorm, GELU MLP, no RoPE), for ablations and for
    loading checkpoints of either kind (load_dit reads the switches off the keys)."""
    def __init__(self, input_size=32, patch_size=1, in_channels=16, hidden_size=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 use_qknorm=True, use_swiglu=True, use_rmsnorm=True, use_rope=True):
        super().__init__()
        # everything needed to rebuild this model; stored in our checkpoints (see dit_checkpoint)
        self.args = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, use_qknorm=use_qknorm, use_swiglu=use_swiglu, use_rmsnorm=use_rmsnorm,
            use_rope=use_rope,
        )
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # a fixed sin-cos table, added even with RoPE as the authors do; a buffer since it is never trained
        self.register_buffer('pos_embed', get_2d_sincos_pos_embed(hidden_size, grid_size))
        self.feat_rope = RotaryEmbedding2D(hidden_size // num_heads, grid_size) if use_rope else None
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm) for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self):
        # Initialize transformer layers:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)

        # Initialize label embedding table and timestep embedding MLP:
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero-out adaLN modulation layers, so every block starts as the identity:
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

        # Zero-out output layers, so the initial velocity is exactly 0:
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_label(self):
        """The label of the unconditional velocity, or None when the model was trained without one."""
        return self.num_classes if self.y_embedder.dropout_prob > 0 else None

    def unpatchify(self, x):
        """x: (N, T, p * p * C) with each token ordered (row in patch, column in patch, channel)
        returns: (N, C, H, W)"""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)            # (N, h, w, p, q, C)
        x = torch.einsum('nhwpqc->nchpwq', x)               # (N, C, h, p, w, q)
        return x.reshape(x.shape[0], c, h * p, w * p)       # (N, C, H, W)

    def forward(self, x, t, y):
        """x: (N, C, H, W) latents at flow times t: (N,) in [0, 1] (0 = noise), y: (N,) labels -> (N, C, H, W) velocity"""
        x = self.x_embedder(x) + self.pos_embed     # (N, T, D), where T = H * W / patch_size ** 2
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c, self.feat_rope)          # (N, T, D)
        x = self.final_layer(x, c)                   # (N, T, patch_size ** 2 * C)
        return self.unpatchify(x)                    # (N, C, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval_start=0.0, cfg_channels=None):
        """Guided velocity (see guided_velocity) under the name DiT's and LightningDiT's code calls."""
        return guided_velocity(self, x, t, y, cfg_scale, self.null_label, cfg_interval_start, cfg_channels)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(dim, grid):
    """(1, grid*grid, dim) float32 table for a row-major grid, MAE convention (as vmae.py's): the first dim/2
    channels encode the column, the last dim/2 the row; each half is dim/4 sines then dim/4 cosines of
    pos * 10000^(-k/(dim/4)), computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing='ij')                          # (g, g) each
    angles = [p.flatten()[:, None] * omega[None] for p in (cols, rows)]           # (g*g, dim/4) each
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float().unsqueeze(0)


#################################################################################
#                                  DiT Configs                                  #
#################################################################################

def DiT_XL_1(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=1, num_heads=16, **kwargs)
def DiT_XL_2(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)
def DiT_XL_4(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)
def DiT_L_1(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=1, num_heads=16, **kwargs)
def DiT_L_2(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)
def DiT_L_4(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)
def DiT_B_1(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=1, num_heads=12, **kwargs)
def DiT_B_2(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)
def DiT_B_4(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)
def DiT_S_1(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=1, num_heads=6, **kwargs)
def DiT_S_2(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)
def DiT_S_4(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)
# tiny (1.4M parameters at 16 channels): for tests and CPU demos
def DiT_T_1(**kwargs): return DiT(depth=4, hidden_size=128, patch_size=1, num_heads=2, **kwargs)
def DiT_T_2(**kwargs): return DiT(depth=4, hidden_size=128, patch_size=2, num_heads=2, **kwargs)


DiT_models = {
    'DiT-XL/1': DiT_XL_1, 'DiT-XL/2': DiT_XL_2, 'DiT-XL/4': DiT_XL_4,
    'DiT-L/1':  DiT_L_1,  'DiT-L/2':  DiT_L_2,  'DiT-L/4':  DiT_L_4,
    'DiT-B/1':  DiT_B_1,  'DiT-B/2':  DiT_B_2,  'DiT-B/4':  DiT_B_4,
    'DiT-S/1':  DiT_S_1,  'DiT-S/2':  DiT_S_2,  'DiT-S/4':  DiT_S_4,
    'DiT-T/1':  DiT_T_1,  'DiT-T/2':  DiT_T_2,
}


#################################################################################
#                  Flow Objective and Euler / Heun Sampler                      #
#################################################################################

def flow_loss(model, x1, y):
    """Rectified-flow loss: x_t = t * x1 + (1 - t) * x0 with noise x0 ~ N(0, I), target velocity x1 - x0,
    t = sigmoid(n) with n ~ N(0, 1) (logit-normal, which favours the middle of the path).
    x1: (N, ...) data latents, y: (N,) labels. Returns the per-sample MSE, (N,); the caller averages."""
    x0 = torch.randn_like(x1)
    t = torch.sigmoid(torch.randn(x1.shape[0], device=x1.device, dtype=x1.dtype))
    t_ = t.view(-1, *[1] * (x1.ndim - 1))                   # (N, 1, ...) to broadcast
    xt = t_ * x1 + (1 - t_) * x0
    # the model may run under bf16 autocast; the loss is taken in fp32
    return (model(xt, t, y).float() - (x1 - x0).float()).pow(2).flatten(1).mean(1)


def guided_velocity(model, x, t, y, cfg_scale, null_label, cfg_interval_start=0.0, cfg_channels=None):
    """Classifier-free guidance for any velocity model: v = v_u + s * (v_c - v_u).
    s = 1, or every t below cfg_interval_start, is one plain conditional call model(x, t, y). Otherwise
    one batched call on [x, x] with labels [y, null_label]; samples with t < cfg_interval_start still
    get v_c. cfg_channels=k guides only channels [0, k) and gives the rest v_c: DiT and LightningDiT
    guide 3 channels, and the authors' scales were tuned that way. None guides all channels. The velocity is
    fp32 even where the model runs under bf16 autocast: the guidance and the sampler's state stay fp32."""
    guided = t >= cfg_interval_start
    if cfg_scale == 1 or not guided.any():
        return model(x, t, y).float()
    if null_label is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs a null label, but this model has no unconditional class")
    y_null = torch.full_like(y, null_label)
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float().chunk(2)  # (N, C, ...) each
    k = cfg_channels or x.shape[1]
    v = torch.cat([v_uncond[:, :k] + cfg_scale * (v_cond[:, :k] - v_uncond[:, :k]), v_cond[:, k:]], dim=1)
    return torch.where(guided.view(-1, *[1] * (x.ndim - 1)), v, v_cond)


def timestep_grid(steps, shift=0.0, knot=None):
    """steps times from 0 (noise) to 1 (data). A shift s > 0 maps t -> s * t / (1 + (s - 1) * t), which for
    s < 1 packs the steps near the noise end: LightningDiT's s = 0.3 puts 68 of 249 steps below t = 0.1.
    A knot inside (0, 1) is added as one more time (unless the grid already holds it)."""
    t = torch.linspace(0, 1, steps)
    if shift > 0:
        t = shift * t / (1 + (shift - 1) * t)
    if knot is not None and 0 < knot < 1 and not torch.isclose(t, torch.tensor(knot)).any():
        t = torch.sort(torch.cat([t, torch.tensor([float(knot)])])).values
    return t


def heun_knot(solver, cfg_scale, cfg_interval_start):
    """Where Heun's grid gets an extra time: at the guidance switch, when there is one. The velocity jumps
    there, and a step across the jump is only first-order accurate; with a knot no step straddles it."""
    return cfg_interval_start if solver == 'heun' and cfg_scale != 1 else None


SOLVERS = ('euler', 'heun')


@torch.no_grad()
def flow_sample(model, z, y, steps=250, solver='euler', shift=0.3, cfg_scale=1.0, cfg_interval_start=0.1,
                cfg_channels=None, null_label=None, progress=False):
    """Integrates dx/dt = v(x, t) from the noise z (N, ...) at t=0 to data at t=1 on timestep_grid(steps, shift).
    'euler' (the paper's): the slope at each step's left end; steps - 1 evaluations, first order.
    'heun' (the explicit trapezoid rule): also the slope at the right end, at the Euler prediction, and
    the mean of the two: second order where v is smooth. Guidance switching on at cfg_interval_start
    makes v jump, so a guided Heun grid gets a knot there (heun_knot) and both evaluations of a step are
    guided as its left end is. model: a DiT in eval mode or any model(x, t, y) with t of shape (N,);
    null_label defaults to the model's. The defaults are the authors'; ImageNet: cfg_scale=10, cfg_channels=3."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver '{solver}': choose one of {SOLVERS}")
    if null_label is None:
        null_label = getattr(model, 'null_label', None)

    def velocity(x, t, scale):
        return guided_velocity(model, x, t.expand(x.shape[0]), y, cfg_scale=scale, null_label=null_label, cfg_channels=cfg_channels)

    t_grid = timestep_grid(steps, shift, knot=heun_knot(solver, cfg_scale, cfg_interval_start)).to(z.device)
    step_pairs = zip(t_grid[:-1], t_grid[1:])
    if progress:
        from tqdm import tqdm
        step_pairs = tqdm(step_pairs, total=len(t_grid) - 1)
    x = z
    for t_cur, t_next in step_pairs:
        scale = cfg_scale if t_cur >= cfg_interval_start else 1.0  # no guidance near the noise end
        dt = t_next - t_cur
        v = velocity(x, t_cur, scale)
        if solver == 'euler':
            x = x + dt * v
        else:  # heun: the mean of the slopes at both ends, the right one taken at the Euler prediction
            x_euler = x + dt * v
            x = x + dt * (v + velocity(x_euler, t_next, scale)) / 2
    return x


def euler_sample(model, z, y, steps=250, **kwargs):
    """The paper's sampler: flow_sample with Euler steps (the name DiT-style code calls)."""
    return flow_sample(model, z, y, steps, 'euler', **kwargs)


def guidance_scale(model, cfg_scale=None):
    """The guidance scale to sample `model` with: by default 4 for a class-conditional model and 1 (none)
    for an unconditional one, which has no null class and so cannot be guided."""
    if cfg_scale is None:
        return 1.0 if model.null_label is None else 4.0
    if cfg_scale != 1 and model.null_label is None:
        raise ValueError(f"this DiT was trained without a null class, so it cannot be guided: use --cfg_scale 1 (got {cfg_scale})")
    return cfg_scale


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (sampling uses the EMA weights)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


#################################################################################
#                              Latent Statistics                                #
#################################################################################

class LatentStats:
    """Per-channel mean and unbiased std of latents, accumulated batch by batch in float64. The DiT learns
    standardised latents (z - mean) / std; sampling maps them back. `sums` (count, sum, sum of squares per
    channel) can be all-reduced over ranks before `result()`."""
    def __init__(self, channels, device='cpu'):
        self.sums = torch.zeros(3, channels, dtype=torch.float64, device=device)

    def add(self, z):
        z = torch.as_tensor(z).to(self.sums.device, torch.float64).transpose(0, 1).flatten(1)  # (N, C, ...) -> (C, N * ...)
        self.sums += torch.stack([torch.full_like(z[:, 0], z.shape[1]), z.sum(1), z.pow(2).sum(1)])

    def result(self):
        n, total, total_sq = self.sums
        return {'mean': total / n, 'std': ((total_sq - total * total / n) / (n - 1)).sqrt()}


def standardise(z, stats):
    """(N, C, H, W) latents -> (z - mean) / std per channel: what the DiT is trained on."""
    return (z - stats['mean'].view(1, -1, 1, 1).to(z)) / stats['std'].view(1, -1, 1, 1).to(z)


def destandardise(x, stats):
    """The inverse of standardise: DiT samples back to the autoencoder's latent scale."""
    return x * stats['std'].view(1, -1, 1, 1).to(x) + stats['mean'].view(1, -1, 1, 1).to(x)


def read_latent_stats(path):
    """Per-channel mean and std (C,) float32 of the latents a DiT was trained on, from a train_dit.py
    checkpoint ('latent_stats'), a JSON with 'mean' and 'std' (train_dit.py's latents/meta.json), or
    the authors' latents_stats.pt ({'mean', 'std'} of shape (1, C, 1, 1))."""
    if path.endswith('.json'):
        try:
            with open(path) as f:
                stats = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"latent statistics '{path}' not found") from None
        except ValueError as e:
            raise ValueError(f"'{path}' is not valid JSON ({e})") from None
    else:
        ckpt = read_checkpoint(path, 'latent statistics file')
        stats = ckpt.get('latent_stats', ckpt) if isinstance(ckpt, dict) else None
    if not (isinstance(stats, dict) and stats.get('mean') is not None and stats.get('std') is not None):
        raise ValueError(f"'{path}' holds no latent statistics: expected a train_dit.py checkpoint or latents/meta.json, "
                         f"or the authors' latents_stats.pt (a dict with 'mean' and 'std')")
    return {k: torch.as_tensor(stats[k], dtype=torch.float32).flatten() for k in ('mean', 'std')}


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

CHECKPOINT_VERSION = 1


def dit_checkpoint(model, ema, latent_stats=None, **extra):
    """The checkpoint dict train_dit.py saves and load_dit reads:
        kind          'dit'
        version       CHECKPOINT_VERSION
        model_args    the full DiT constructor kwargs (model.args): DiT(**model_args) rebuilds it
        model, ema    state dicts of the trained weights and of their EMA (sampling uses the EMA)
        latent_stats  {'mean': (C,), 'std': (C,)} that standardised the training latents, or None
        **extra       anything else the trainer keeps (optimizer state, step, config, ...)
    model and ema must be the unwrapped DiT modules (not DDP or torch.compile wrappers)."""
    return {'kind': 'dit', 'version': CHECKPOINT_VERSION, 'model_args': dict(model.args),
            'model': model.state_dict(), 'ema': ema.state_dict(), 'latent_stats': latent_stats, **extra}


def infer_model_args(state_dict):
    """Reads the DiT constructor kwargs off a LightningDiT state dict (the authors' checkpoints carry no
    model arguments). A label table of one row is an unconditional model; n > 1 rows are n - 1 classes
    plus the null class. Heads come from the QK-norm or RoPE widths, else a head dim of 64 is assumed;
    the MLP ratio is 4, as in every LightningDiT preset."""
    hidden_size, in_channels, patch_size, _ = state_dict['x_embedder.proj.weight'].shape
    grid_size = math.isqrt(state_dict['pos_embed'].shape[1])
    table_rows = state_dict['y_embedder.embedding_table.weight'].shape[0]
    if 'blocks.0.attn.q_norm.weight' in state_dict:
        head_dim = state_dict['blocks.0.attn.q_norm.weight'].shape[0]
    elif 'feat_rope.freqs_cos' in state_dict:
        head_dim = state_dict['feat_rope.freqs_cos'].shape[1]
    else:
        head_dim = 64
    return dict(
        input_size=grid_size * patch_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
        depth=1 + max(int(key.split('.')[1]) for key in state_dict if key.startswith('blocks.')),
        num_heads=hidden_size // head_dim, mlp_ratio=4.0,
        class_dropout_prob=0.1 if table_rows > 1 else 0.0, num_classes=max(table_rows - 1, 1),
        use_qknorm='blocks.0.attn.q_norm.weight' in state_dict, use_swiglu='blocks.0.mlp.w12.weight' in state_dict,
        use_rmsnorm='blocks.0.norm1.weight' in state_dict, use_rope='feat_rope.freqs_cos' in state_dict,
    )


def load_dit(path, device='cpu', weights='ema'):
    """Loads a DiT for sampling: the EMA weights (weights='ema', falling back to 'model' when a file has no
    EMA) or the raw ones (weights='model'), in eval mode, on device. Reads our own checkpoints (see
    dit_checkpoint) and the authors' LightningDiT ones, whose architecture is inferred from the keys.
    The returned model carries .latent_stats ({'mean': (C,), 'std': (C,)} or None) and .meta (what our
    trainer stored beside the weights: 'config', 'classes', 'step'; empty for the authors' files)."""
    def wrong_file(found):
        return ValueError(f"{path}: expected a DiT checkpoint (a dict with 'ema' or 'model' weights), found {found}")

    checkpoint = read_checkpoint(path, 'DiT checkpoint')
    if not isinstance(checkpoint, dict):
        raise wrong_file(f"a {type(checkpoint).__name__}")
    if not {'ema', 'model'} & checkpoint.keys():
        raise wrong_file(f"a dict with keys {sorted(map(str, checkpoint))[:8]}")
    if checkpoint.get('kind', 'dit') != 'dit':
        raise wrong_file(f"a checkpoint of kind {checkpoint['kind']!r}")
    if checkpoint.get('version', CHECKPOINT_VERSION) > CHECKPOINT_VERSION:
        raise wrong_file(f"format version {checkpoint['version']} (this code reads up to {CHECKPOINT_VERSION})")
    if weights == 'model' and 'model' not in checkpoint:
        raise ValueError(f"{path} holds only EMA weights: sample with the EMA")

    key = 'ema' if weights == 'ema' and 'ema' in checkpoint else 'model'
    state_dict = strip_wrapper_prefixes(checkpoint[key])
    if 'model_args' in checkpoint:
        model_args = checkpoint['model_args']
    elif {'x_embedder.proj.weight', 'pos_embed', 'y_embedder.embedding_table.weight'} <= state_dict.keys():
        model_args = infer_model_args(state_dict)
    else:
        raise wrong_file(f"weights with keys like {list(state_dict)[:4]}")
    model = DiT(**model_args)
    model.load_state_dict(state_dict)
    model.latent_stats = checkpoint.get('latent_stats')
    model.meta = {k: checkpoint[k] for k in ('config', 'classes', 'step') if k in checkpoint} if 'kind' in checkpoint else {}
    return model.to(device).eval()
