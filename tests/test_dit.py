"""
Tests for dit.py: the model, the flow objective, the Euler/CFG sampler and checkpoint loading.
CPU only, tiny models. Run with: python -m pytest tests/test_dit.py -q
"""

import math

import pytest
import torch

from dit import (DiT, DiT_models, LabelEmbedder, RotaryEmbedding2D, TimestepEmbedder, dit_checkpoint, euler_sample,
                 flow_loss, flow_sample, guided_velocity, infer_model_args, load_dit, timestep_grid)
from dit import RMSNorm


def tiny_dit(**kwargs):
    args = dict(input_size=8, patch_size=1, in_channels=6, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    return DiT(**{**args, **kwargs})


def randomised(model, seed=0):
    """All weights random (adaLN-Zero would otherwise make every output 0), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs(model, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = model.args['input_size']
    x = torch.randn(n, model.in_channels, size, size, generator=gen)
    return x, torch.rand(n, generator=gen), torch.randint(0, model.num_classes, (n,), generator=gen)


def count_forwards(model):
    """Records the batch size of every model call."""
    batch_sizes = []
    model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    return batch_sizes


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize('lightning', [True, False])
def test_initial_output_is_exactly_zero(lightning):
    flags = dict(use_qknorm=lightning, use_swiglu=lightning, use_rmsnorm=lightning, use_rope=lightning)
    model = tiny_dit(**flags).train()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


def test_unpatchify_orders_tokens_h_w_p_q_c():
    model = tiny_dit(patch_size=2, in_channels=3)
    tokens = torch.arange(16 * 12, dtype=torch.float32).reshape(1, 16, 12)  # 4x4 tokens of 2x2x3 values
    img = model.unpatchify(tokens)
    assert img.shape == (1, 3, 8, 8)
    for h, w, p, q, c in [(0, 0, 0, 0, 0), (1, 2, 0, 1, 2), (3, 3, 1, 1, 1), (2, 0, 1, 0, 0)]:
        assert img[0, c, 2 * h + p, 2 * w + q] == tokens[0, 4 * h + w, (2 * p + q) * 3 + c]


def test_adaln_chunks_are_shift_scale_gate():
    # with the conditioning weights zeroed, each modulation vector is its slice of the bias
    model = randomised(tiny_dit())
    block, final, hidden = model.blocks[0], model.final_layer, 64
    with torch.no_grad():
        block.adaLN_modulation[1].weight.zero_()
        final.adaLN_modulation[1].weight.zero_()
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation[1].bias.split(hidden)
    shift, scale = final.adaLN_modulation[1].bias.split(hidden)
    x, c = torch.randn(2, 5, hidden), torch.randn(2, hidden)
    h = x + gate_msa * block.attn(block.norm1(x) * (1 + scale_msa) + shift_msa)
    h = h + gate_mlp * block.mlp(block.norm2(h) * (1 + scale_mlp) + shift_mlp)
    torch.testing.assert_close(block(x, c), h)
    torch.testing.assert_close(final(x, c), final.linear(final.norm_final(x) * (1 + scale) + shift))


def test_fixed_embeddings_follow_the_authors_conventions():
    # time: raw t (not 1000 t), cosines first; position: first half of the dims encodes the column
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.5]), 256)[0]
    torch.testing.assert_close(emb[[0, 128]], torch.tensor([math.cos(0.5), math.sin(0.5)]))
    pos = tiny_dit(hidden_size=64).pos_embed[0]  # (64 tokens, 64 dims): 8 x 8 grid
    row0_col1, row1_col0 = 1, 8
    torch.testing.assert_close(pos[row0_col1, [0, 16, 32, 48]], torch.tensor([math.sin(1), math.cos(1), 0.0, 1.0]))
    torch.testing.assert_close(pos[row1_col0, [0, 16, 32, 48]], torch.tensor([0.0, 1.0, math.sin(1), math.cos(1)]))


def test_tiny_preset_is_small_and_runs():
    model = DiT_models['DiT-T/1'](input_size=8, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    x, t, y = inputs(randomised(model), n=2)
    assert model(x, t, y).shape == (2, 16, 8, 8)


def test_dit_b1_parameter_count():
    with torch.device('meta'):
        imagenet = DiT_models['DiT-B/1']()
        celeba = DiT_models['DiT-B/1'](use_qknorm=False, num_classes=1, class_dropout_prob=0.0)
    trainable = sum(p.numel() for p in imagenet.parameters() if p.requires_grad)
    assert trainable == 130_336_528
    assert trainable + imagenet.pos_embed.numel() == 131_122_960  # the authors count their frozen table too
    assert sum(p.numel() for p in celeba.parameters() if p.requires_grad) == 129_566_992


def test_label_dropout_uses_the_null_class():
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.1)
    assert embedder.embedding_table.num_embeddings == 11
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20000,))
    dropped = embedder.token_drop(labels)
    kept = dropped != 10
    assert abs((~kept).float().mean().item() - 0.1) < 0.01  # 5 standard errors
    assert torch.equal(dropped[kept], labels[kept])
    table = embedder.embedding_table.weight
    always = LabelEmbedder(10, 8, dropout_prob=1.0).train()
    assert torch.equal(always(labels[:4]), always.embedding_table.weight[torch.tensor([10] * 4)])
    embedder.eval()
    assert torch.equal(embedder(labels[:4]), table[labels[:4]])
    force = torch.tensor([1, 0, 1, 0])
    assert torch.equal(embedder(labels[:4], force_drop_ids=force), table[torch.where(force == 1, 10, labels[:4])])


def test_unconditional_model_has_one_row_and_no_guidance():
    model = randomised(tiny_dit(num_classes=1, class_dropout_prob=0.0)).train()
    assert model.y_embedder.embedding_table.num_embeddings == 1
    assert model.null_label is None
    x, t, y = inputs(model)
    model(x, t, y)  # training mode never drops to a missing row
    with pytest.raises(ValueError, match='null label'):
        euler_sample(model.eval(), x, y, steps=3, cfg_scale=4.0, cfg_interval_start=0.0)


def test_rope_preserves_norms_and_depends_only_on_relative_position():
    rope = RotaryEmbedding2D(head_dim=16, grid_size=4)
    q = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(rope(q).norm(dim=-1), q.norm(dim=-1))
    # the same query and key vector at every position: logits then vary only with the offset
    qs = rope(torch.randn(16).expand(1, 1, 16, 16))
    ks = rope(torch.randn(16).expand(1, 1, 16, 16))
    logits = (qs @ ks.transpose(-1, -2)).reshape(4, 4, 4, 4)  # (row_q, col_q, row_k, col_k)
    torch.testing.assert_close(logits[1:, :, 1:, :], logits[:-1, :, :-1, :])
    torch.testing.assert_close(logits[:, 1:, :, 1:], logits[:, :-1, :, :-1])
    assert (logits[0, 0, 0, 0] - logits[0, 0, 1, 0]).abs() > 1e-3
    assert (logits[0, 0, 0, 0] - logits[0, 0, 0, 1]).abs() > 1e-3


def test_rope_layout_rows_first_then_columns():
    # head dims 0..7 turn with the row and 8..15 with the column, pair k by pos * 10000^(-k / 4)
    rope = RotaryEmbedding2D(head_dim=16, grid_size=4)
    row1_col0, row0_col1 = 4, 1
    angle = torch.tensor([1.0, 1.0, 10000 ** -0.25, 10000 ** -0.25])
    torch.testing.assert_close(rope.freqs_cos[row1_col0, :4], angle.cos())
    torch.testing.assert_close(rope.freqs_cos[row1_col0, 8:], torch.ones(8))
    torch.testing.assert_close(rope.freqs_sin[row0_col1, 8:12], angle.sin())
    torch.testing.assert_close(rope.freqs_cos[row0_col1, :8], torch.ones(8))
    x = torch.zeros(1, 1, 16, 16)
    x[..., row1_col0, 0] = 1.0  # the pair (x0, x1) = (1, 0) turns by 1 radian
    torch.testing.assert_close(rope(x)[0, 0, row1_col0, :2], torch.tensor([math.cos(1), math.sin(1)]))


def assert_same_values_and_gradients(fn, reference, base, param_pairs=()):
    """fn and reference agree on a copy of base each: the outputs, and for one random incoming gradient the
    input's gradients and those of each (parameter of fn, parameter of reference) pair."""
    x, x_ref = base.clone().requires_grad_(), base.clone().requires_grad_()
    out, ref = fn(x), reference(x_ref)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for p, p_ref in param_pairs:
        torch.testing.assert_close(p.grad, p_ref.grad)


@pytest.mark.parametrize('layout', ['contiguous', 'attention'])
def test_rope_is_the_pairwise_rotation_forward_and_backward(layout):
    # the complex product equals x * cos + rotate(x) * sin with rotate(x)_(2k, 2k+1) = (-x_2k+1, x_2k), the
    # authors' form, for a contiguous (N, H, T, d) input and for the attention's (N, T, H, d) memory layout
    rope = RotaryEmbedding2D(head_dim=16, grid_size=4)

    def pairwise(x):
        pairs = x.unflatten(-1, (-1, 2))
        return x * rope.freqs_cos + torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2) * rope.freqs_sin
    base = torch.randn(2, 3, 16, 16) if layout == 'contiguous' else torch.randn(2, 16, 3, 16).transpose(1, 2)
    assert_same_values_and_gradients(rope, pairwise, base)
    assert rope(base.bfloat16()).dtype == torch.float32  # as the real form's products with the fp32 tables


@pytest.mark.parametrize('layout', ['tokens', 'heads'])
def test_rmsnorm_gradient_is_autograd_of_the_formula(layout):
    # the written-out backward against autograd on x / sqrt(mean(x^2) + eps) * weight, on (N, T, D) tokens
    # and on per-head slices of a fused projection (QK-norm's non-contiguous input)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
    weight = norm.weight.detach().clone().requires_grad_()
    base = torch.randn(2, 5, 8) if layout == 'tokens' else torch.randn(2, 5, 3, 2, 8)[:, :, 0]
    assert_same_values_and_gradients(norm, lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * weight,
                                     base, [(norm.weight, weight)])
    # bf16 activations are normalised in fp32; the gradient comes back in the input's dtype
    x16 = base.bfloat16().requires_grad_()
    out16 = norm(x16)
    out16.sum().backward()
    assert out16.dtype == torch.float32 and x16.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- guidance

def test_cfg_scale_one_is_the_conditional_forward():
    model = randomised(tiny_dit())
    x, t, y = inputs(model)
    expected = model(x, t, y)
    batch_sizes = count_forwards(model)
    assert torch.equal(model.forward_with_cfg(x, t, y, cfg_scale=1.0), expected)
    assert batch_sizes == [3]  # no unconditional half at all


def test_forward_with_cfg_is_manual_guidance_on_all_or_three_channels():
    model = randomised(tiny_dit())
    x, t, y = inputs(model)
    v_cond, v_uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    expected = v_uncond + 4.0 * (v_cond - v_uncond)
    batch_sizes = count_forwards(model)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 4.0), expected, atol=1e-5, rtol=1e-5)
    three = model.forward_with_cfg(x, t, y, 4.0, cfg_channels=3)
    torch.testing.assert_close(three[:, :3], expected[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(three[:, 3:], v_cond[:, 3:], atol=1e-5, rtol=1e-5)
    assert (three[:, 3:] - expected[:, 3:]).abs().max() > 1e-2
    assert batch_sizes == [6, 6]  # one batched call each


class LabelVelocity:
    """A fake model whose velocity is its label, so guidance is plain arithmetic; records its calls."""
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return torch.zeros_like(x) + y.float().view(-1, 1, 1, 1)


def test_guidance_interval():
    model, x, y = LabelVelocity(), torch.zeros(2, 4, 1, 1), torch.tensor([2, 5])
    below = guided_velocity(model, x, torch.full((2,), 0.05), y, 3.0, null_label=9, cfg_interval_start=0.1)
    assert torch.equal(below[:, 0, 0, 0], torch.tensor([2.0, 5.0]))  # conditional velocity
    assert model.calls[-1][0] == 2
    above = guided_velocity(model, x, torch.full((2,), 0.5), y, 3.0, null_label=9, cfg_interval_start=0.1)
    assert torch.equal(above[:, 0, 0, 0], 9 + 3.0 * (torch.tensor([2.0, 5.0]) - 9))
    assert model.calls[-1][0] == 4 and torch.equal(model.calls[-1][1], torch.tensor([2, 5, 9, 9]))
    mixed = guided_velocity(model, x, torch.tensor([0.05, 0.5]), y, 3.0, null_label=9, cfg_interval_start=0.1)
    assert torch.equal(mixed[:, 0, 0, 0], torch.tensor([2.0, 9 + 3.0 * (5 - 9)]))
    assert [size for size, _ in model.calls] == [2, 4, 4]  # one call per velocity


def test_sampler_calls_with_interval_and_without_guidance():
    model = LabelVelocity()
    euler_sample(model, torch.zeros(2, 4, 1, 1), torch.tensor([2, 5]), steps=250, shift=0.3,
                 cfg_scale=10.0, cfg_interval_start=0.1, null_label=9)
    batch_sizes = [size for size, _ in model.calls]
    assert len(batch_sizes) == 249
    assert batch_sizes == [2] * 68 + [4] * 181  # the authors' 68 unguided steps, all at the noisy start
    model.calls.clear()
    euler_sample(model, torch.zeros(2, 4, 1, 1), torch.tensor([2, 5]), steps=250, cfg_scale=1.0)
    assert [size for size, _ in model.calls] == [2] * 249
    with pytest.raises(ValueError, match='null label'):
        euler_sample(model, torch.zeros(2, 4, 1, 1), torch.tensor([2, 5]), steps=3, cfg_scale=2.0)


def test_sampler_takes_the_null_label_from_the_model():
    model = randomised(tiny_dit(num_classes=7))
    seen = []
    model.y_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x, _, y = inputs(model, n=2)
    euler_sample(model, x, y, steps=3, cfg_scale=2.0, cfg_interval_start=0.0, progress=True)
    assert len(seen) == 2 and torch.equal(seen[0], torch.cat([y, torch.tensor([7, 7])]))


# ----------------------------------------------------------------------------- sampler and objective

def test_timestep_grid():
    grid = timestep_grid(250, 0.3)
    assert len(grid) == 250 and grid[0] == 0 and grid[-1] == 1
    steps = grid.diff()
    assert (steps > 0).all()
    assert abs(steps[0].item() - 0.0012082) < 1e-6 and abs(steps[-1].item() - 0.0132626) < 1e-6
    # dt/du = 0.3 at the noise end and 1/0.3 at the data end of a uniform u grid
    assert abs(steps[0].item() * 249 / 0.3 - 1) < 0.01 and abs(steps[-1].item() * 249 * 0.3 - 1) < 0.01
    assert (grid[:-1] < 0.1).sum() == 68  # against 25 without the shift
    torch.testing.assert_close(timestep_grid(11, 0.0), torch.linspace(0, 1, 11))


GAUSSIANS = [([0.7], [0.3]), ([1.0, -2.0, 0.5], [0.5, 2.0, 1.0])]


def sampled_gaussian(mean, std, steps, solver='euler'):
    """For data N(m, s^2) (per dim) on the path x_t = t x1 + (1 - t) x0 the exact velocity is
    E[x1 - x0 | x_t = x] = m + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) * (x - t m).
    The field is affine in x, so both solvers map z -> A z + B: pushing z = 0 and z = 1 through the
    sampler gives the mean B and std |A| of the samples exactly, with no Monte Carlo error."""
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)

    def velocity(x, t, y):
        t = t[:, None]
        return m + (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t)**2) * (x - t * m)

    z = torch.stack([torch.zeros(len(mean)), torch.ones(len(mean))]).double()
    out = flow_sample(velocity, z, torch.zeros(2, dtype=torch.long), steps=steps, solver=solver, shift=0.3)
    return out[0], out[1] - out[0], m, s


@pytest.mark.parametrize('mean, std', GAUSSIANS)
def test_euler_sampler_reaches_a_gaussian(mean, std):
    mean_250, std_250, m, s = sampled_gaussian(mean, std, 250)
    _, std_1000, _, _ = sampled_gaussian(mean, std, 1000)
    # Euler follows the mean path t * m exactly (v = m on it), so only rounding is left in the mean.
    torch.testing.assert_close(mean_250, m, atol=1e-5, rtol=0)
    # Euler is first order: the std is off by about c / steps (c <= 3 here, 0.011 at most with 250
    # steps), hence 0.015, and quadrupling the steps must divide the error by about 4.
    torch.testing.assert_close(std_250, s, atol=0.015, rtol=0)
    ratio = (std_250 - s).abs() / (std_1000 - s).abs()
    assert ((ratio > 3.5) & (ratio < 4.5)).all()
    assert torch.equal(euler_sample(lambda x, t, y: x * 0 + 1, torch.zeros(1, 2), torch.zeros(1), steps=5),
                       flow_sample(lambda x, t, y: x * 0 + 1, torch.zeros(1, 2), torch.zeros(1), steps=5, solver='euler'))


@pytest.mark.parametrize('mean, std', GAUSSIANS)
def test_heun_sampler_is_second_order(mean, std):
    mean_25, std_25, m, s = sampled_gaussian(mean, std, 25, 'heun')
    _, std_100, _, _ = sampled_gaussian(mean, std, 100, 'heun')
    _, std_400, _, _ = sampled_gaussian(mean, std, 400, 'heun')
    _, euler_std_250, _, _ = sampled_gaussian(mean, std, 250)
    torch.testing.assert_close(mean_25, m, atol=1e-5, rtol=0)
    # second order: quadrupling the steps divides the error by about 16 (Euler's by 4); the narrow
    # Gaussian (s = 0.3) bends the field near t = 1, so its ratio nears 16 only from above 100 steps
    ratio = (std_100 - s).abs() / (std_400 - s).abs()
    assert ((ratio > 12) & (ratio < 22)).all(), ratio
    # and 25 Heun steps (48 evaluations) already beat 250 Euler steps (249 evaluations) here
    assert ((std_25 - s).abs() < (euler_std_250 - s).abs()).all()


def test_heun_steps_never_straddle_the_guidance_switch():
    """A guided Heun grid gets a knot at cfg_interval_start; both evaluations of a step are guided as its
    left end is: unguided (a batch of N) up to the switch, guided (a batch of 2N) from it on."""
    model = LabelVelocity()
    flow_sample(model, torch.zeros(2, 4, 1, 1), torch.tensor([2, 5]), steps=11, solver='heun', shift=0.0,
                cfg_scale=10.0, cfg_interval_start=0.25, null_label=9)
    # steps [0, .1], [.1, .2], [.2, .25] unguided, then [.25, .3], ... guided: 11 steps, 22 evaluations
    assert [size for size, _ in model.calls] == [2] * 6 + [4] * 16
    model = LabelVelocity()  # no guidance: no knot, the plain grid's 10 steps
    flow_sample(model, torch.zeros(2, 4, 1, 1), torch.tensor([2, 5]), steps=11, solver='heun', shift=0.0, cfg_interval_start=0.25)
    assert [size for size, _ in model.calls] == [2] * 20
    assert torch.equal(timestep_grid(11, 0.0, knot=0.25)[2:5], torch.tensor([0.2, 0.25, 0.3]))
    assert torch.equal(timestep_grid(11, 0.0, knot=0.5), timestep_grid(11, 0.0))  # a knot on the grid adds nothing
    with pytest.raises(ValueError, match='unknown solver'):
        flow_sample(model, torch.zeros(2, 4, 1, 1), torch.tensor([2, 5]), steps=3, solver='rk4')


def test_flow_loss_is_zero_for_the_exact_velocity():
    x1 = torch.randn(64, 4, 8, 8, dtype=torch.float64)

    def oracle(xt, t, y):
        t = t.view(-1, 1, 1, 1)
        x0 = (xt - t * x1) / (1 - t)
        return x1 - x0

    loss = flow_loss(oracle, x1, torch.zeros(64, dtype=torch.long))
    assert loss.shape == (64,)
    assert loss.max() < 1e-12
    wrong_sign = flow_loss(lambda xt, t, y: -oracle(xt, t, y), x1, torch.zeros(64, dtype=torch.long))
    assert wrong_sign.min() > 0.5


def test_flow_times_are_logit_normal():
    seen = {}

    def zero_model(xt, t, y):
        seen['t'] = t
        return torch.zeros_like(xt)

    torch.manual_seed(0)
    loss = flow_loss(zero_model, torch.zeros(20000, 1), torch.zeros(20000, dtype=torch.long))
    logit = torch.logit(seen['t'].double())
    assert ((seen['t'] > 0) & (seen['t'] < 1)).all()
    assert abs(logit.mean().item()) < 0.035 and abs(logit.std().item() - 1) < 0.025  # 5 standard errors
    assert abs(loss.mean().item() - 1) < 0.05  # target -x0 against a zero prediction: E[x0^2] = 1


# ----------------------------------------------------------------------------- checkpoints

# The authors' LightningDiT-B/1 ImageNet checkpoint, from official-checkpoint-keys.md: all keys except
# the 12 blocks, then the keys of blocks.0, repeated for blocks.0..11 (183 keys).
OFFICIAL_TOP_LEVEL = {
    'pos_embed': (1, 1024, 768),
    'x_embedder.proj.weight': (768, 16, 1, 1),
    'x_embedder.proj.bias': (768,),
    't_embedder.mlp.0.weight': (768, 256),
    't_embedder.mlp.0.bias': (768,),
    't_embedder.mlp.2.weight': (768, 768),
    't_embedder.mlp.2.bias': (768,),
    'y_embedder.embedding_table.weight': (1001, 768),
    'feat_rope.freqs_cos': (1024, 64),
    'feat_rope.freqs_sin': (1024, 64),
    'final_layer.norm_final.weight': (768,),
    'final_layer.linear.weight': (16, 768),
    'final_layer.linear.bias': (16,),
    'final_layer.adaLN_modulation.1.weight': (1536, 768),
    'final_layer.adaLN_modulation.1.bias': (1536,),
}
OFFICIAL_BLOCK = {
    'norm1.weight': (768,),
    'norm2.weight': (768,),
    'attn.qkv.weight': (2304, 768),
    'attn.qkv.bias': (2304,),
    'attn.q_norm.weight': (64,),
    'attn.k_norm.weight': (64,),
    'attn.proj.weight': (768, 768),
    'attn.proj.bias': (768,),
    'mlp.w12.weight': (4096, 768),
    'mlp.w12.bias': (4096,),
    'mlp.w3.weight': (768, 2048),
    'mlp.w3.bias': (768,),
    'adaLN_modulation.1.weight': (4608, 768),
    'adaLN_modulation.1.bias': (4608,),
}


def official_shapes(celeba=False):
    shapes = dict(OFFICIAL_TOP_LEVEL)
    for i in range(12):
        shapes.update({f'blocks.{i}.{key}': shape for key, shape in OFFICIAL_BLOCK.items()})
    if celeba:  # the authors' CelebA-HQ model: no QK-norm, one class without a null row
        shapes = {key: shape for key, shape in shapes.items() if not key.endswith(('q_norm.weight', 'k_norm.weight'))}
        shapes['y_embedder.embedding_table.weight'] = (1, 768)
    return shapes


@pytest.mark.parametrize('celeba', [False, True])
def test_official_keys_match_and_architecture_is_inferred(celeba):
    shapes = official_shapes(celeba)
    assert len(shapes) == (159 if celeba else 183)
    inferred = infer_model_args({key: torch.empty(shape, device='meta') for key, shape in shapes.items()})
    assert inferred['num_classes'] == (1 if celeba else 1000) and inferred['use_qknorm'] == (not celeba)
    with torch.device('meta'):
        preset = DiT_models['DiT-B/1'](use_qknorm=not celeba, num_classes=inferred['num_classes'],
                                       class_dropout_prob=inferred['class_dropout_prob'])
        rebuilt = DiT(**inferred)
    for model in (preset, rebuilt):
        assert {key: tuple(v.shape) for key, v in model.state_dict().items()} == shapes


def test_official_checkpoint_loads_strictly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state_dict = {key: 0.02 * torch.randn(shape, generator=gen) for key, shape in official_shapes().items()}
    path = tmp_path / 'official.pt'
    config = {'model': {'model_type': 'LightningDiT-B/1', 'use_qknorm': True}, 'data': {'num_classes': 1000}}
    torch.save({'ema': state_dict, 'model': state_dict, 'config': config}, path)
    model = load_dit(str(path))
    assert not model.training and model.latent_stats is None and model.null_label == 1000
    direct = DiT_models['DiT-B/1']()
    direct.load_state_dict(state_dict, strict=True)
    # same constructor arguments (heads included, which no shape shows) and the same weights give the
    # same output; a B/1 forward costs seconds on CPU, so the outputs are compared on a small model below
    assert model.args == direct.args
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in direct.state_dict().items())


def test_official_format_output_matches_direct_load(tmp_path):
    # a small model saved the authors' way (no model_args): inferred, loaded, and run like the original
    original = randomised(tiny_dit(hidden_size=128, patch_size=2))
    path = tmp_path / 'small_official.pt'
    torch.save({'ema': original.state_dict(), 'model': {}, 'config': {'seed': 0}}, path)
    model = load_dit(str(path))
    assert model.args == original.args
    x, t, y = inputs(original)
    assert torch.equal(model(x, t, y), original(x, t, y))


@pytest.mark.parametrize('flags', [
    dict(),
    dict(use_qknorm=False, num_classes=1, class_dropout_prob=0.0),
    dict(use_qknorm=True, use_rmsnorm=False, use_swiglu=False, use_rope=False),
    dict(use_qknorm=False, use_rmsnorm=False, use_swiglu=False, use_rope=False, patch_size=2),
])
def test_infer_model_args_round_trip(flags):
    # without QK-norm and RoPE the head dim cannot be read and is taken as 64, as here
    model = tiny_dit(**{**dict(hidden_size=128), **flags})
    assert infer_model_args(model.state_dict()) == model.args


def test_own_checkpoint_round_trip(tmp_path):
    model, ema = randomised(tiny_dit(), seed=0), randomised(tiny_dit(), seed=1)
    stats = {'mean': torch.randn(6), 'std': torch.rand(6) + 0.5}
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / 'ckpt.pt'
    torch.save(dit_checkpoint(model, ema, stats, step=7, opt=opt.state_dict(), config={'lr': 2e-4}), path)
    loaded = load_dit(str(path))
    assert not loaded.training and loaded.args == ema.args
    torch.testing.assert_close(loaded.latent_stats, stats, rtol=0, atol=0)
    x, t, y = inputs(ema)
    assert torch.equal(loaded(x, t, y), ema(x, t, y))

    without_ema = dit_checkpoint(model, ema)
    del without_ema['ema']
    torch.save(without_ema, path)
    loaded = load_dit(str(path))
    assert loaded.latent_stats is None
    assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_wrapper_prefixes_are_stripped(tmp_path):
    ema = randomised(tiny_dit())
    x, t, y = inputs(ema)
    for prefix in ['module.', '_orig_mod.', 'module._orig_mod.']:
        state_dict = {prefix + key: value for key, value in ema.state_dict().items()}
        for checkpoint in [{**dit_checkpoint(ema, ema), 'ema': state_dict}, {'ema': state_dict}]:
            torch.save(checkpoint, tmp_path / 'wrapped.pt')
            assert torch.equal(load_dit(str(tmp_path / 'wrapped.pt'))(x, t, y), ema(x, t, y))


SIDE_EFFECTS = []


def record_side_effect(message):
    SIDE_EFFECTS.append(message)


class Malicious:
    """Unpickling this calls record_side_effect: a stand-in for code hidden in a checkpoint."""
    def __reduce__(self):
        return record_side_effect, ('code from the checkpoint ran',)


@pytest.mark.parametrize('content', ['text', 'random dict', 'vmae', 'vmae kind', 'tensor', 'code'])
def test_wrong_files_raise_a_clear_error(tmp_path, content):
    path = tmp_path / 'wrong.pt'
    vmae_weights = {'pos_embed': torch.zeros(1, 4, 8), 'patch_embed.proj.weight': torch.zeros(8, 3, 8, 8)}
    if content == 'text':
        path.write_text('not a checkpoint\n')
    else:
        torch.save({
            'random dict': {'foo': 1, 'bar': [1, 2]},
            'vmae': {'model': vmae_weights},
            'vmae kind': {'kind': 'vmae', 'version': 1, 'model': vmae_weights},
            'tensor': torch.zeros(3),
            'code': {'model': Malicious()},
        }[content], path)
    with pytest.raises(ValueError) as error:
        load_dit(str(path))
    message = str(error.value)
    assert '\n' not in message and str(path) in message and 'expected a DiT checkpoint' in message
    assert SIDE_EFFECTS == []


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        load_dit(str(tmp_path / 'nope.pt'))
