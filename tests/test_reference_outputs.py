"""
The project's VMAE, DiT and FID Inception against outputs of the reference implementations.

tests/fixtures/reference_outputs.npz holds inputs and outputs computed by the reference code; these
tests rebuild the same weights from a seed recipe, run the project's models and compare. Key names
and shapes are checked elsewhere (test_vmae.py, test_dit.py, test_evaluate.py): here it is the numbers.

How the fixture was made (a scratch script outside the repository; none of the reference code is
copied here, only its outputs):
- VMAE: the authors' `MaskedAutoencoderViT` from isno0907/ldmae, commit
  a5e92a8ed9ce1ec6d434cd288ca9c4fd0da8facd, file VMAE/models_mae.py (timm 1.0.31 for PatchEmbed and
  Mlp; diffusers and taming stubbed, as they only provide output wrappers and LPIPS), built as their
  stage-1 model with the f8d16 preset's options at a small size (VMAE_CONFIG below): LayerNorm eps
  1e-6, no class token, `smooth_output=True`, `pred_with_conv=False`, `kl_loss_weight` set (32
  to_latent outputs), `fixed_std=1e-3`, mask token present. Outputs: `encode` (mean, log-variance,
  std), `decode` of a given latent and of the posterior mean, and a masked training pass composed of
  their methods (forward_encoder with mask ratio 0.25 after torch.manual_seed(MASK_SEED), to_latent,
  DiagonalGaussianDistribution with fixed_std, its mode, from_latent, forward_decoder, forward_loss
  and the KL normalisation of forward_vanilla), with no perceptual loss. Their inference copy
  (LDMAE/tokenizer/models_mae.py) gave the same encode/decode outputs.
- DiT: the authors' `LightningDiT` (LDMAE/models/lightningdit.py, same commit; torch.compile disabled,
  fairscale stubbed for the unused imports of rmsnorm.py), `learn_sigma=False`, `wo_shift=False`, in
  the four configurations of DIT_CONFIGS (each of QK-norm, SwiGLU, RMSNorm and RoPE on and off, the
  QK-norm with RMSNorm and with LayerNorm, patch 1 and 2, conditional and unconditional), in eval
  mode: `forward`, `forward_with_cfg` (guidance on 3 channels) and, for the full LightningDiT options,
  the gradients of sum(output * cotangent) with respect to the input and each parameter (per-tensor
  sum and L2 norm). Their RMSNorm and the LayerNorms their blocks build were also run alone on inputs
  of scale 1e-3, where the eps matters ('norms').
- Inception: pytorch-fid 0.3.0's `fid_inception_v3()` (torchvision 0.29 Inception3 patched with its
  FID blocks; the weight download replaced by the state dict below) through its `InceptionV3`
  wrapper (output block 3, resize_input=False, normalize_input=False) fed (x - 128) / 128 of 299x299
  uint8 images, so the project's TF1 resize is the identity; logits are the pool times fc.weight^T;
  `spatial` is Mixed_6d.branch1x1's output (a forward hook), channels 0..6 in (h, w, c) order.

Inputs are stored in the fixture (two 32x32 images in [-1, 1] and a latent for the VMAE; latents,
times and labels, the null label among them, for each DiT), except the Inception's two 299x299 images,
which `inception_input` draws. The reference's guided velocity is the first half of
forward_with_cfg([x, x], [t, t], [y, null], CFG_SCALE) with no guidance interval.

Weights: `transformer_weights` and `inception_weights` below, given the model's own state dict as a
template: every tensor in sorted name order from one torch.Generator (torch.rand, mapped to a uniform
law of the stated mean and std). Norm gains and biases are perturbed away from the identity, and in
the QK-norm models q and k are scaled by `qk_scale` so the norms' eps matters. The fixed position and
RoPE tables are not drawn: each implementation computes its own. The fixture stores a float64 sum of
the weights so a change of the generator reads as such, not as a model bug.

Tolerance: float32. Outputs of order 1 (up to 25 for the guided velocity): atol = rtol = TOL = 2e-5.
Inception (94 layers): atol = rtol = 1e-4. Gradients: the input gradient at TOL, per-parameter
gradient norms and (sums / norms) at 1e-4. When the fixture was made (CPU, torch 2.14, one thread) the
largest differences were: VMAE 1.4e-6, DiT 1.4e-6 (guided velocity 6.2e-6 on values up to 23.5),
input gradient 3.3e-6, gradient sums 3.1e-6 of their norm, norms and Inception 0 (the same operations
in the same order). The bugs these tests exist for exceed the tolerance by 20x (exact against tanh
GELU, both models) to 1e5x.

The fixture is regenerated only by that scratch script (kept outside the repository); if a test here fails, first suspect the
model, then the torch generator (the weights-sum check says which).
"""

import math
import os

import numpy as np
import pytest
import torch

import dit as dit_module
import vmae as vmae_module
from dit import DiT, load_dit
from inception import FIDInceptionV3
from vmae import VMAE, LossWeights, load_vmae, read_vmae, vmae_loss

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'reference_outputs.npz')
TOL = 2e-5

VMAE_CONFIG = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                   decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, mlp_ratio=4.0, latent_dim=16)
VMAE_SEED, MASK_SEED, MASK_RATIO = 11, 5, 0.25

DIT_CONFIGS = {
    # the authors' ImageNet model: every LightningDiT option
    'lightningdit': dict(seed=21, qk_scale=1e-3, model=dict(
        input_size=8, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
        class_dropout_prob=0.1, use_qknorm=True, use_swiglu=True, use_rmsnorm=True, use_rope=True)),
    # the authors' CelebA-HQ model: QK-norm off, unconditional (one label row)
    'celeba': dict(seed=22, qk_scale=1.0, model=dict(
        input_size=8, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=1,
        class_dropout_prob=0.0, use_qknorm=False, use_swiglu=True, use_rmsnorm=True, use_rope=True)),
    # the original DiT block (LayerNorm, tanh-GELU MLP, no RoPE), patch 2, head dim 64 (load_dit's guess)
    'dit': dict(seed=23, qk_scale=1.0, model=dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=2, num_classes=10,
        class_dropout_prob=0.1, use_qknorm=False, use_swiglu=False, use_rmsnorm=False, use_rope=False)),
    # QK-norm as LayerNorm (RMSNorm off) with RoPE and the GELU MLP, patch 2
    'qk_layernorm': dict(seed=24, qk_scale=3e-3, model=dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
        class_dropout_prob=0.1, use_qknorm=True, use_swiglu=False, use_rmsnorm=False, use_rope=True)),
}
CFG_SCALE = 4.0
INCEPTION_SEED, INCEPTION_INPUT_SEED = 31, 32

# -----------------------------------------------------------------------------
# seed recipes (the fixture script imports these, so both sides draw the same numbers)

def _uniform(g, shape, mean, std):
    """A uniform law of the given mean and std. Uniform draws are plain arithmetic on the generator's
    integers, the same bits on every CPU; randn goes through log and cos, whose vectorised paths may not."""
    return mean + (torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1) * (std * math.sqrt(3))


def is_fixed_table(name):
    return name.split('.')[-1] in ('pos_embed', 'decoder_pos_embed', 'freqs_cos', 'freqs_sin')


def transformer_weights(template, seed, qk_scale=1.0):
    """Weights for a VMAE or DiT state dict `template`, in sorted name order: matrices and conv kernels
    std 1/sqrt(fan_in); embedding tables and the mask token std 1; 1-d weights (norm gains) 1 +- 0.25 std;
    other 1-d tensors (biases) std 0.1. The q and k rows of every fused qkv are scaled by qk_scale.
    Position and RoPE tables are taken from the template."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(template):
        t = template[name]
        if is_fixed_table(name):
            out[name] = t.clone()
            continue
        if name.endswith(('mask_token', 'embedding_table.weight')):
            w = _uniform(g, t.shape, 0.0, 1.0)
        elif t.ndim >= 2:
            w = _uniform(g, t.shape, 0.0, 1.0 / math.sqrt(t[0].numel()))
        elif name.endswith('.weight'):
            w = _uniform(g, t.shape, 1.0, 0.25)
        else:
            w = _uniform(g, t.shape, 0.0, 0.1)
        if name.endswith(('attn.qkv.weight', 'attn.qkv.bias')):
            w[: 2 * t.shape[0] // 3] *= qk_scale
        out[name] = w
    return out


def inception_weights(template, seed):
    """He-scaled conv kernels, BatchNorm gains and running variances 1 +- 0.15 std, shifts and means
    0.05 std, fc std 1/sqrt(2048); num_batches_tracked from the template. Sorted name order."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(template):
        t = template[name]
        if name.endswith('num_batches_tracked'):
            out[name] = t.clone()
        elif name.endswith('conv.weight'):
            out[name] = _uniform(g, t.shape, 0.0, math.sqrt(2.0 / t[0].numel()))
        elif name.endswith(('bn.weight', 'running_var')):
            out[name] = _uniform(g, t.shape, 1.0, 0.15)
        elif name.endswith(('bn.bias', 'running_mean')):
            out[name] = _uniform(g, t.shape, 0.0, 0.05)
        else:  # fc
            out[name] = _uniform(g, t.shape, 0.0, 1.0 / math.sqrt(t.shape[-1]))
    return out


def inception_input():
    """Two 299x299 uint8 RGB images: smooth random fields plus noise, so pooling sees structure."""
    g = torch.Generator().manual_seed(INCEPTION_INPUT_SEED)
    coarse = torch.rand(2, 3, 12, 12, generator=g) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(299, 299), mode='bilinear', align_corners=True)
    noise = (torch.rand(2, 3, 299, 299, generator=g) - 0.5) * 60
    return (smooth + noise).round().clamp(0, 255).to(torch.uint8)


def weights_sum(state_dict):
    """The float64 sum of the drawn tensors (fixed tables left out): the fixture's check on the recipe."""
    return sum(float(v.double().sum()) for k, v in state_dict.items() if not is_fixed_table(k) and v.is_floating_point())


def norm_modules():
    """The norms the project builds, by the name the fixture stores the reference's output under.
    Reference: their RMSNorm(16) (block, final and QK-norm with RMSNorm), their block LayerNorm
    (affine-free, eps 1e-6), their QK-norm LayerNorm (nn.LayerNorm(16): affine, eps 1e-5), the VMAE's
    LayerNorm (affine, eps 1e-6)."""
    return {
        'dit_rmsnorm_block': dit_module.block_norm(16, True),
        'dit_rmsnorm_final': dit_module.FinalLayer(16, 1, 4, use_rmsnorm=True).norm_final,
        'dit_rmsnorm_qk': dit_module.Attention(64, 4, use_qknorm=True, use_rmsnorm=True).q_norm,
        'dit_rmsnorm_qk_k': dit_module.Attention(64, 4, use_qknorm=True, use_rmsnorm=True).k_norm,
        'dit_layernorm_block': dit_module.block_norm(16, False),
        'dit_layernorm_final': dit_module.FinalLayer(16, 1, 4, use_rmsnorm=False).norm_final,
        'dit_layernorm_qk': dit_module.Attention(64, 4, use_qknorm=True, use_rmsnorm=False).q_norm,
        'vmae_layernorm_block': vmae_module.Block(16, 1, 4.0).norm1,
        'vmae_layernorm_out': VMAE(**dict(VMAE_CONFIG, embed_dim=16, decoder_embed_dim=16, num_heads=1, decoder_num_heads=1)).decoder_norm,
    }

# -----------------------------------------------------------------------------
# fixture access

@pytest.fixture(scope='module')
def ref():
    if not os.path.isfile(FIXTURE):
        pytest.fail(f"missing {FIXTURE}: it is part of the repository (see this module's docstring)")
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k].tolist() if f[k].dtype.kind == 'U' else torch.from_numpy(f[k]) for k in f.files}


def close(actual, expected, what, atol=TOL, rtol=TOL):
    torch.testing.assert_close(actual.detach().float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} differs from the reference output:\n{m}")


def check_recipe(ref, key, state_dict):
    assert weights_sum(state_dict) == pytest.approx(float(ref[key]), rel=1e-9, abs=1e-6), \
        f"the seed recipe no longer draws the fixture's weights ({key}): torch's generator changed, not the model"

# -----------------------------------------------------------------------------
# VMAE

@pytest.fixture(scope='module')
def vmae_file(tmp_path_factory):
    """The seeded weights in the authors' stage-1 checkpoint layout ({'model': state dict with mask token})."""
    template = VMAE(**VMAE_CONFIG, mask_token=True).state_dict()
    path = tmp_path_factory.mktemp('vmae') / 'authors_stage1.pth'
    torch.save({'model': transformer_weights(template, VMAE_SEED)}, path)
    return str(path)


def test_vmae_encode_decode_match_the_authors(ref, vmae_file):
    args, state_dict = read_vmae(vmae_file)
    check_recipe(ref, 'vmae/weights_sum', state_dict)
    model = load_vmae(vmae_file)  # the authors' checkpoint path: shapes -> arguments, mask token dropped
    assert model.args == dict(VMAE_CONFIG, mask_token=False)
    with torch.no_grad():
        posterior = model.encode(ref['vmae/x'])
        close(posterior.mean, ref['vmae/mean'], 'VMAE posterior mean')
        close(posterior.logvar, ref['vmae/logvar'], 'VMAE posterior log-variance')
        close(posterior.std, ref['vmae/std'], 'VMAE posterior std')
        close(model.decode(ref['vmae/z']), ref['vmae/decoded_z'], 'VMAE decode of a given latent')
        close(model.decode(posterior.mode()), ref['vmae/decoded_mean'], 'VMAE reconstruction through the mean')


def test_vmae_masked_training_pass_matches_the_authors(ref, vmae_file):
    args, state_dict = read_vmae(vmae_file)
    model = VMAE(**dict(args, mask_token=True))
    model.load_weights(state_dict)
    model.eval()
    x = ref['vmae/x']
    torch.manual_seed(MASK_SEED)  # both draw the masking noise with torch.rand(B, N) first
    with torch.no_grad():
        recon, mask, posterior = model(x, mask_ratio=MASK_RATIO, sample_posterior=False)
        assert torch.equal(mask, ref['vmae/masked/mask']), "a different masking: torch.rand changed, or the masking did"
        close(posterior.mean, ref['vmae/masked/mean'], 'VMAE masked-pass posterior mean (visible tokens)')
        close(posterior.logvar, ref['vmae/masked/logvar'], 'VMAE masked-pass log-variance')
        close(recon, ref['vmae/masked/recon'], 'VMAE masked-pass reconstruction (mask tokens filled in)')
        loss, terms = vmae_loss(x, recon, mask, posterior, model.patch_size, LossWeights(perceptual=0.0))
    close(terms['mse_visible'], ref['vmae/masked/visible_loss'], 'visible-patch MSE')
    close(terms['mse_masked'], ref['vmae/masked/mask_loss'], 'masked-patch MSE')
    close(terms['kl'], ref['vmae/masked/kl'], 'KL per visible token')
    close(loss, ref['vmae/masked/loss'], 'stage-1 loss (0.5 masked + 0.5 visible + 1e-6 KL)')

# -----------------------------------------------------------------------------
# DiT

def dit_file(tmp_path, name):
    cfg = DIT_CONFIGS[name]
    template = DiT(**cfg['model']).state_dict()
    path = tmp_path / f'{name}.pt'
    torch.save({'ema': transformer_weights(template, cfg['seed'], cfg['qk_scale'])}, path)  # the authors' layout
    return str(path)


@pytest.mark.parametrize('name', list(DIT_CONFIGS))
def test_dit_matches_lightningdit(ref, tmp_path, name):
    model = load_dit(dit_file(tmp_path, name))  # architecture read off the keys, as for the authors' files
    assert model.args == dict(DIT_CONFIGS[name]['model'], mlp_ratio=4.0)
    check_recipe(ref, f'dit/{name}/weights_sum', model.state_dict())
    x, t, y = ref[f'dit/{name}/x'], ref[f'dit/{name}/t'], ref[f'dit/{name}/y']
    with torch.no_grad():
        close(model(x, t, y), ref[f'dit/{name}/out'], f'{name} DiT velocity')
        if model.null_label is not None:
            guided = model.forward_with_cfg(x, t, y, CFG_SCALE, cfg_interval_start=0.0, cfg_channels=3)
            close(guided, ref[f'dit/{name}/cfg'], f'{name} DiT guided velocity (3 channels)')


def test_dit_gradients_match_lightningdit(ref, tmp_path):
    name = 'lightningdit'
    model = load_dit(dit_file(tmp_path, name)).requires_grad_(True)
    x = ref[f'dit/{name}/x'].clone().requires_grad_(True)
    (model(x, ref[f'dit/{name}/t'], ref[f'dit/{name}/y']) * ref[f'dit/{name}/cotangent']).sum().backward()
    close(x.grad, ref[f'dit/{name}/grad_x'], 'gradient with respect to the DiT input')
    params = dict(model.named_parameters())
    names = sorted(params)
    assert names == ref[f'dit/{name}/grad_names'], "the trainable parameters differ from LightningDiT's"
    sums = torch.stack([params[n].grad.double().sum() for n in names])
    norms = torch.stack([params[n].grad.double().norm() for n in names])
    ref_norms = ref[f'dit/{name}/grad_norms']
    # a sum may cancel to near zero: measure its error against the gradient's norm
    close(sums / ref_norms, ref[f'dit/{name}/grad_sums'] / ref_norms, 'per-parameter gradient sums / norms', atol=1e-4, rtol=1e-4)
    close(norms, ref_norms, 'per-parameter gradient norms', atol=1e-4, rtol=1e-4)


def test_norms_match_the_reference_at_small_scale(ref):
    """Inputs of RMS 1e-3, where eps 1e-6 against 1e-5 (or a missing eps) changes the output."""
    x = ref['norms/x']
    for key, module in norm_modules().items():
        stored = sorted(k.split('/')[-1] for k in ref if k.startswith(f'norms/{key}/') and not k.endswith('/out'))
        assert sorted(dict(module.named_parameters())) == stored, f"norm {key}: parameters differ from the reference's"
        with torch.no_grad():
            for pname, p in module.named_parameters():
                p.copy_(ref[f'norms/{key}/{pname}'])
            close(module(x), ref[f'norms/{key}/out'], f'norm {key}')

# -----------------------------------------------------------------------------
# Inception

def test_fid_inception_matches_pytorch_fid(ref):
    model = FIDInceptionV3()
    state_dict = inception_weights(model.state_dict(), INCEPTION_SEED)
    check_recipe(ref, 'inception/weights_sum', state_dict)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    with torch.no_grad():
        pool, logits, spatial = model(inception_input())
    close(pool, ref['inception/pool'], 'Inception pool_3', atol=1e-4, rtol=1e-4)
    close(logits, ref['inception/logits'], 'Inception logits', atol=1e-4, rtol=1e-4)
    close(spatial, ref['inception/spatial'], 'Inception mixed_6/conv', atol=1e-4, rtol=1e-4)
