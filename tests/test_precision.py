"""bf16 and --compile on the paths users run, on the CPU: sampling (sample.py) and latent extraction
(train_dit.py). bf16 autocast covers the DiT's and the encoder's forwards; the noise, the time grid, the
guidance and the ODE state stay fp32, and the decoder runs fp32. The tolerances are measured, not hoped for.
Run: python -m pytest tests/test_precision.py"""

import numpy as np
import pytest
import torch

import common
import data
import dit
import metrics
import sample
import train_dit
import vmae
from test_sample import trained  # noqa: F401 (a fixture: a VMAE-tiny and a DiT-T/1 trained 4 steps on 3 classes)


def load(trained):
    args = sample.parse_args(['--dit', str(trained / 'dit' / 'last.pt'), '--device', 'cpu'])
    model, stats, vae, _ = sample.load_models(args, torch.device('cpu'))
    return model, stats, vae


def test_bf16_sampling_stays_within_40_db_of_fp32(trained):
    """The same noise, 50 guided Euler steps: uint8 images from bf16 autocast against fp32 ones. On the demo's
    DiT the README measures the same comparison at 500 samples."""
    model, stats, vae = load(trained)
    labels, settings = [0, 1, 2, 0, 1, 2], dict(steps=50, cfg_scale=4.0)
    fp32 = sample.generate(model, vae, stats, labels, range(6), 0, settings, 'fp32')
    bf16 = sample.generate(model, vae, stats, labels, range(6), 0, settings, 'bf16')
    assert fp32.dtype == bf16.dtype == torch.float32
    psnr = metrics.psnr_per_image(data.to_uint8(fp32).numpy(), data.to_uint8(bf16).numpy())
    assert not np.array_equal(fp32.numpy(), bf16.numpy())    # bf16 ran: the images moved a little
    assert psnr.min() > 40, psnr


def test_the_sampler_keeps_its_state_in_fp32_under_autocast():
    """The model's bf16 velocity is taken in fp32 before the guidance and the step: the state is fp32 throughout."""
    seen = []

    class Bf16Velocity(torch.nn.Module):
        null_label = 3

        def forward(self, x, t, y):
            seen.append(x.dtype)
            return (0.5 * x).to(torch.bfloat16)
    z = torch.randn(2, 4, 2, 2)
    out = dit.flow_sample(Bf16Velocity(), z, torch.tensor([0, 1]), steps=5, cfg_scale=3.0, cfg_interval_start=0.0)
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}
    # dx/dt = x / 2 + 3 * 0 guidance (v_c = v_u here): Euler from t = 0 to 1 on the shifted grid
    t = dit.timestep_grid(5, 0.3)
    expected = z * torch.prod(1 + 0.5 * (t[1:] - t[:-1]))
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)      # bf16 velocities: about 3 digits


def test_compiled_sampler_matches_eager():
    """torch.compile (inductor on the CPU) gives the eager latents within 1e-5 (measured: about 1e-7)."""
    torch.manual_seed(0)
    model = dit.DiT(input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3).eval()
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))  # off the zero init, so that the velocity is not 0
    z, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        eager = dit.flow_sample(model, z, y, steps=10, cfg_scale=1.0)
        compiled = dit.flow_sample(torch.compile(model), z, y, steps=10, cfg_scale=1.0)
    assert eager.abs().max() > 0.1
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_bf16_extraction_moves_the_moments_little_in_standardised_units():
    """encode_moments under bf16 autocast against fp32, in units of the latents' per-channel std (what the DiT
    sees after standardising): the means move by about 1% of a std in RMS (measured: 0.9% on this random VMAE-tiny,
    4.8% at most). The README gives the demo VMAE's figures."""
    torch.manual_seed(0)
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False).eval()
    x = torch.stack([data.BuiltinShapes(32, split='val')[i][0] for i in range(16)])
    fp32 = train_dit.encode_moments(model, x, 'fp32')
    bf16 = train_dit.encode_moments(model, x, 'bf16')
    assert fp32.shape == bf16.shape == (16, 2, 32, 4, 4) and bf16.dtype == torch.float32
    mean32, mean16 = fp32[:, :, :16], bf16[:, :, :16]
    std = mean32.transpose(0, 2).flatten(1).std(dim=1).view(1, 1, 16, 1, 1)     # per channel
    moved = (mean16 - mean32) / std
    assert 0 < moved.pow(2).mean().sqrt() < 0.02 and moved.abs().max() < 0.1, moved.abs().max()


def test_dtype_choices_on_a_cpu():
    assert common.resolve_dtype('', torch.device('cpu')) == 'fp32'
    assert common.resolve_dtype('', torch.device('cuda')) == 'bf16'
    assert common.resolve_dtype('bf16', torch.device('cpu')) == 'bf16'
    with pytest.raises(ValueError, match='--dtype fp16 needs a CUDA GPU: use bf16 or fp32 on a CPU'):
        common.resolve_dtype('fp16', torch.device('cpu'))
    with pytest.raises(ValueError, match="--dtype must be bf16 or fp32"):
        sample.check_args(sample.parse_args(['--dtype', 'fp16']))
