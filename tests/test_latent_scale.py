"""The latent scale through every stage, with per-channel statistics far from the identity (means 0.7 to
3.7, stds 0.3 to 3.4, each channel its own): what extraction stores and measures, what the DiT is trained
on (standardised latents, posterior noise of std exp(logvar / 2)), what sampling decodes (de-standardised
latents), and the round trip image -> latent -> standardised -> back -> decoder. Statistics of mean 0 and
std 1 would hide a missing or inverted (de)standardisation; these do not.
Run: python -m pytest tests/test_latent_scale.py"""

import json
import math

import numpy as np
import pytest
import torch

import autoencoders
import common
import data
import dit
import fileio
import sample
import train_dit
import vmae
from test_train_dit import config, make_images_and_vmae

C = 16
MEAN = 0.7 + 0.2 * torch.arange(C, dtype=torch.float64)                                   # 0.7 ... 3.7
STD = torch.where(torch.arange(C) % 2 == 0, 2.0 + 0.1 * torch.arange(C), 0.3 + 0.01 * torch.arange(C)).double()  # ~2-3.4 or ~0.3
STATS = {'mean': MEAN.float(), 'std': STD.float()}


def by_hand_destandardise(x):
    """x * std + mean per channel, written out here (not dit.destandardise)."""
    return x * STD.float().view(1, C, 1, 1) + MEAN.float().view(1, C, 1, 1)


def known_moments_vmae(mask_token=False):
    """A random VMAE-tiny whose posterior is the same for every image and token: mean MEAN and log-variance
    log(STD^2) per channel (to_latent's weight zeroed, its bias set); the decoder stays random."""
    torch.manual_seed(0)
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=mask_token)
    with torch.no_grad():
        model.to_latent.weight.zero_()
        model.to_latent.bias.copy_(torch.cat([MEAN, STD.log() * 2]).float())
    return model


@pytest.fixture(scope='module')
def known(tmp_path_factory):
    """48 images in 3 classes and the known-moments VMAE, saved as train_vmae.py saves it."""
    root = make_images_and_vmae(tmp_path_factory.mktemp('scale'), per_class=16)
    torch.save(vmae.vmae_checkpoint(known_moments_vmae()), root / 'known.pt')
    return root


def test_extraction_statistics_and_the_dits_training_target(known, tmp_path, monkeypatch):
    """Extraction stores (MEAN, log STD^2) for every image and mirror; its statistics of posterior samples are
    MEAN and STD (not STD^2: the noise is exp(logvar / 2)); the DiT learns (sample - mean) / std, which is
    N(0, 1) in every channel. Un-standardised targets, or posterior noise of std exp(logvar), are not."""
    targets, real_loss = [], dit.flow_loss

    def recording_loss(model, x1, y):
        targets.append(x1.detach().clone())
        return real_loss(model, x1, y)
    monkeypatch.setattr(dit, 'flow_loss', recording_loss)
    train_dit.main(config(known, tmp_path / 'run', autoencoder=str(known / 'known.pt'), latents=str(tmp_path / 'latents'),
                          max_steps=6, batch_size=16, micro_batch_size=16, ckpt_every=6))
    latents = np.load(tmp_path / 'latents' / 'latents.npy')                     # (48, 2 views, 2C, 4, 4)
    assert latents.shape == (48, 2, 2 * C, 4, 4)
    np.testing.assert_allclose(latents[:, :, :C], np.broadcast_to(MEAN.numpy()[:, None, None], latents[:, :, :C].shape), rtol=1e-6)
    np.testing.assert_allclose(latents[:, :, C:], np.broadcast_to(2 * np.log(STD.numpy())[:, None, None], latents[:, :, C:].shape),
                               rtol=1e-5, atol=1e-6)
    # 48 images x 16 tokens = 768 posterior samples per channel: mean within 5 standard errors, std within 12%
    meta = json.load(open(tmp_path / 'latents' / 'meta.json'))
    mean, std = np.array(meta['mean']), np.array(meta['std'])
    assert np.all(np.abs(mean - MEAN.numpy()) < 5 * STD.numpy() / np.sqrt(768)), mean
    np.testing.assert_allclose(std, STD.numpy(), rtol=0.12)
    ckpt = fileio.read_checkpoint(str(tmp_path / 'run' / 'last.pt'))
    assert ckpt['latent_stats']['mean'].tolist() == pytest.approx(meta['mean']) and ckpt['latent_stats']['std'].tolist() == pytest.approx(meta['std'])
    # what the DiT was trained on: 6 steps x 16 latents x 16 tokens = 1536 values per channel, each ~N(0, 1)
    x1 = torch.cat(targets).double()                                             # (96, C, 4, 4)
    assert x1.shape == (96, C, 4, 4)
    per_channel = x1.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.25, per_channel.mean(1)
    assert ((per_channel.std(1) - 1).abs() < 0.15).all(), per_channel.std(1)
    # and it is the posterior sample standardised by the stored statistics: back on the latent scale, the
    # draws around MEAN are N(0, STD^2)
    z = x1 * torch.tensor(std).view(1, C, 1, 1) + torch.tensor(mean).view(1, C, 1, 1)
    noise = ((z - MEAN.view(1, C, 1, 1)) / STD.view(1, C, 1, 1)).transpose(0, 1).flatten(1)
    assert ((noise.std(1) - 1).abs() < 0.15).all(), noise.std(1)


def test_posterior_samples_have_std_exp_half_logvar():
    """DiagonalGaussian: std = exp(logvar / 2) per channel, and the samples have it (in (B, 2C, h, w) and in a
    VMAE's training pass, tokens (B, N, 2C))."""
    moments = torch.cat([MEAN, 2 * STD.log()]).float().view(1, 2 * C, 1, 1).expand(2000, 2 * C, 2, 2)
    posterior = vmae.DiagonalGaussian(moments, dim=1)
    torch.testing.assert_close(posterior.std[0, :, 0, 0], STD.float())
    torch.manual_seed(0)
    z = posterior.sample().transpose(0, 1).flatten(1).double()                   # (C, 8000)
    torch.testing.assert_close(z.mean(1), MEAN, atol=5 * STD.max().item() / 8000 ** 0.5, rtol=0)
    torch.testing.assert_close(z.std(1), STD, rtol=0.05, atol=0)
    # the VMAE's training forward decodes such a sample (the posterior of the known-moments model)
    model = known_moments_vmae(mask_token=True)
    decoded = []
    real_decode = model.decode_tokens
    model.decode_tokens = lambda tokens, ids_restore=None: decoded.append(tokens.detach()) or real_decode(tokens, ids_restore)
    with torch.no_grad():
        model(torch.rand(64, 3, 32, 32) * 2 - 1, mask_ratio=0.25, sample_posterior=True)
        model(torch.rand(2, 3, 32, 32) * 2 - 1, mask_ratio=0.0, sample_posterior=False)
    tokens = decoded[0].reshape(-1, C).double()                                  # 64 x 12 visible tokens
    torch.testing.assert_close(tokens.std(0), STD, rtol=0.1, atol=0)
    assert (tokens.mean(0) - MEAN).abs().max() < 0.2
    torch.testing.assert_close(decoded[1], MEAN.float().expand_as(decoded[1]))   # the mode is the mean, no noise


def test_latent_statistics_measure_posterior_samples():
    """train_dit.latent_statistics on stored moments whose means vary (std 0.5 around MEAN) and whose posterior
    std is STD: the samples' std is sqrt(0.25 + STD^2); of the means alone (sample=False), 0.5."""
    rng = np.random.default_rng(3)
    n = 4000
    means = MEAN.numpy()[None, :, None, None] + 0.5 * rng.standard_normal((n, C, 2, 2))
    logvar = np.broadcast_to(2 * np.log(STD.numpy())[None, :, None, None], means.shape)
    moments = np.concatenate([means, logvar], axis=1)[:, None].repeat(2, axis=1)   # (n, 2 views, 2C, 2, 2)
    stats = train_dit.latent_statistics(moments, seed=0)
    np.testing.assert_allclose(stats['std'], np.sqrt(0.25 + STD.numpy() ** 2), rtol=0.04)
    assert np.all(np.abs(np.array(stats['mean']) - MEAN.numpy()) < 5 * np.sqrt(0.25 + STD.numpy() ** 2) / np.sqrt(4 * n))
    of_means = train_dit.latent_statistics(moments, seed=0, sample=False)
    np.testing.assert_allclose(of_means['std'], 0.5, rtol=0.04)


def test_standardise_and_destandardise_by_hand():
    z = torch.randn(3, C, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 + 1
    expected = (z - MEAN.float().view(1, C, 1, 1)) / STD.float().view(1, C, 1, 1)
    torch.testing.assert_close(dit.standardise(z, STATS), expected)
    torch.testing.assert_close(dit.destandardise(expected, STATS), by_hand_destandardise(expected))
    torch.testing.assert_close(dit.destandardise(dit.standardise(z, STATS), STATS), z)


def test_round_trip_through_the_standardised_scale_decodes_as_the_direct_reconstruction():
    """image -> posterior mean -> standardised -> de-standardised -> decoder == image -> posterior mean -> decoder."""
    torch.manual_seed(0)
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False).eval()
    x = torch.stack([data.BuiltinShapes(32, split='val')[i][0] for i in range(4)])
    with torch.no_grad():
        z = model.encode(x).mean
        standardised = dit.standardise(z, STATS)
        assert (standardised - z).abs().mean() > 0.3                        # the scale is not the identity
        direct = model.decode(z)
        through = model.decode(dit.destandardise(standardised, STATS))
    torch.testing.assert_close(through, direct, rtol=1e-4, atol=1e-5)


class DriveTo(torch.nn.Module):
    """A velocity model whose Euler path ends exactly at target[y] on any time grid: v = (target - x) / (1 - t)
    (the last step, from t to 1, lands on the target). Stands in for a DiT with known outputs."""

    def __init__(self, target):
        super().__init__()
        self.target, self.in_channels, self.null_label = target, target.shape[1], None
        self.args = {'input_size': target.shape[-1]}

    def forward(self, x, t, y):
        return (self.target[y] - x) / (1 - t).view(-1, 1, 1, 1)


def test_generate_decodes_destandardised_samples():
    """sample.generate decodes the sampler's standardised latents times std plus mean."""
    target = torch.randn(3, C, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    vae = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False).eval()
    seen = []

    class Recording(torch.nn.Module):
        def decode(self, z):
            seen.append(z)
            return vae.decode(z)
    labels = [2, 0, 2]
    images = sample.generate(DriveTo(target), Recording(), STATS, labels, [0, 1, 2], 0, dict(steps=5))
    expected_latents = by_hand_destandardise(target[labels])
    torch.testing.assert_close(seen[0], expected_latents, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(images, vae.decode(expected_latents), rtol=1e-4, atol=1e-5)


def test_sample_py_decodes_through_the_checkpoints_scale(known, tmp_path):
    """sample.py end to end on a fresh DiT (whose output is exactly zero, so the sampler returns its noise,
    sample i's from (seed, i)) carrying latent statistics MEAN/STD: the .npz holds decode(noise * STD + MEAN)."""
    torch.manual_seed(0)
    model = dit.DiT_models['DiT-T/1'](input_size=4, in_channels=C, num_classes=3)
    vae_path = str(known / 'vmae.pt')
    torch.save(dit.dit_checkpoint(model, model, {k: v.clone() for k, v in STATS.items()}, classes=['a', 'b', 'c'],
                                  config={'autoencoder': vae_path, 'autoencoder_sha256': fileio.file_sha256(vae_path), 'image_size': 32}),
               tmp_path / 'dit.pt')
    loaded, stats, _ = autoencoders.load_generator(str(tmp_path / 'dit.pt'))
    torch.testing.assert_close(stats['mean'], STATS['mean'], rtol=0, atol=0)
    torch.testing.assert_close(stats['std'], STATS['std'], rtol=0, atol=0)
    out = tmp_path / 'samples.npz'
    sample.main(sample.parse_args(['--dit', str(tmp_path / 'dit.pt'), '--num_fid_samples', '4', '--batch_size', '3',
                                   '--steps', '3', '--seed', '5', '--device', 'cpu', '--out', str(out)]))
    noise = common.seeded_noise(5, range(4), (C, 4, 4))
    with torch.no_grad():
        assert loaded(noise, torch.rand(4), torch.tensor([0, 1, 2, 0])).abs().max() == 0   # the premise: v = 0
        expected = data.to_uint8(vmae.load_vmae(vae_path).decode(by_hand_destandardise(noise))).numpy()
    written = np.load(out)['arr_0']
    assert written.shape == expected.shape and np.abs(written.astype(int) - expected).max() <= 1
    assert (written != expected).mean() < 0.01


def test_latent_stats_std_is_unbiased():
    """LatentStats: per-channel mean and the n - 1 std, fed in two batches. Channel 0 holds 1, 2, 3, 4 (mean 2.5,
    squared deviations 5, std sqrt(5 / 3)); channel 1 holds 0, 0, 0, 10 (mean 2.5, squared deviations 75, std 5)."""
    values = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 10.0]]).view(4, 2, 1, 1)   # (N, C, 1, 1)
    stats = dit.LatentStats(2)
    stats.add(values[:1])
    stats.add(values[1:])
    result = stats.result()
    torch.testing.assert_close(result['mean'], torch.tensor([2.5, 2.5], dtype=torch.float64))
    torch.testing.assert_close(result['std'], torch.tensor([math.sqrt(5 / 3), 5.0], dtype=torch.float64))


def test_latent_statistics_are_measured_on_the_unflipped_view():
    """train_dit.latent_statistics reads view 0 (the image, as the authors did), never view 1 (the mirror)."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(500, 1, 4, 2, 2))
    mirror = 100 + 7 * rng.normal(size=(500, 1, 4, 2, 2))
    latents = np.concatenate([image, mirror], axis=1)              # (500, 2 views, 2C = 4: mean || logvar, 2, 2)
    stats = train_dit.latent_statistics(latents, seed=0, sample=False)
    means = image[:, 0, :2]                                        # the posterior means of view 0, (500, C = 2, 2, 2)
    np.testing.assert_allclose(stats['mean'], means.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(stats['std'], means.transpose(1, 0, 2, 3).reshape(2, -1).std(axis=1, ddof=1), rtol=1e-10)
