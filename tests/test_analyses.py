"""
Tests for the analyses that judge the demo and the samplers: the thumbnail baseline, the colour-blind
shape check and the solver study. CPU only, small. Run with: python -m pytest tests/test_analyses.py -q
"""

import numpy as np
import pytest
import torch

import common
import data
import evaluate
import metrics
import vmae
from dit import flow_sample
from paper import judges


def test_thumbnail_is_the_bicubic_round_trip():
    rng = np.random.default_rng(0)
    smooth = np.full((2, 32, 32, 3), 90, np.uint8)
    assert np.array_equal(evaluate.thumbnail_reconstruction(smooth, 4), smooth)  # flat images survive any size
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    small, large = evaluate.thumbnail_reconstruction(images, 8), evaluate.thumbnail_reconstruction(images, 16)
    assert small.shape == images.shape and small.dtype == np.uint8
    assert metrics.psnr_per_image(images, large).mean() > metrics.psnr_per_image(images, small).mean()


class Images(torch.utils.data.Dataset):
    """A few (image in [-1, 1], label) pairs with class names, like the project's datasets."""
    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.num_classes = int(max(labels)) + 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_thumbnail_baseline_scores_the_largest_thumbnail_of_the_latents_size():
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32).eval()
    images = torch.rand(5, 3, 32, 32) * 2 - 1

    def thumbnail_scores(x):
        return evaluate.evaluate_reconstruction(model, Images(x, [0] * len(x)), common.Dist(), batch_size=2, num_workers=0,
                                                thumbnail_side=evaluate.thumbnail_side(256))['thumbnail']
    scores = thumbnail_scores(images)
    assert scores['side'] == 9  # 3 x 9 x 9 = 243 <= 256 < 3 x 10 x 10
    originals = data.to_uint8(images).numpy()
    thumbnails = evaluate.thumbnail_reconstruction(originals, 9)
    assert scores['psnr'] == pytest.approx(metrics.psnr_per_image(originals, thumbnails).mean())
    assert scores['ssim'] == pytest.approx(metrics.ssim_per_image(originals, thumbnails).mean())
    assert scores['exact'] == 0
    flat = torch.cat([images, torch.zeros(1, 3, 32, 32)])  # a flat image survives the round trip exactly
    scores = thumbnail_scores(flat)
    assert scores['exact'] == 1 and scores['psnr'] == float('inf')


def test_classifier_learns_a_set_smaller_than_its_batch():
    # class 0 dark, class 1 bright, four images in all: the colour judge tells them apart, the
    # colour-blind one too (brightness survives any mix of the channels)
    images = torch.cat([torch.full((2, 3, 16, 16), -0.8), torch.full((2, 3, 16, 16), 0.8)]) + 0.05 * torch.randn(4, 3, 16, 16)
    labels = [0, 0, 1, 1]
    for colour_blind in (False, True):
        judge = judges.train_classifier(Images(images, labels), colour_blind, steps=60)
        assert not judge.training
        assert judges.class_rates(judge, images, torch.tensor(labels), 2) == [1.0, 1.0]


def test_degraded_moves_edges_a_little_and_leaves_flat_images_flat():
    step = torch.zeros(8, 3, 32, 32)
    step[..., 16:] = 1.0                                   # a vertical edge
    out = judges.degraded(step, torch.Generator().manual_seed(0))
    assert out.shape == step.shape
    torch.testing.assert_close(out, judges.degraded(step, torch.Generator().manual_seed(0)))  # seeded
    change = (out - step).abs()
    assert change[..., :12].mean() < 0.1 and change[..., 20:].mean() < 0.1   # far from the edge: noise only
    assert change[..., 14:18].mean() > 0.05                                    # at the edge: warped and blurred
    flat = judges.degraded(torch.full((8, 3, 32, 32), 0.5), torch.Generator().manual_seed(1))
    assert (flat - 0.5).mean().abs() < 0.01 and (flat - 0.5).std() < 0.1       # warp and blur keep it flat


def test_colourless_hides_the_hue():
    red, blue = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    torch.testing.assert_close(judges.colourless(red), judges.colourless(blue))  # the mean: one grey for every hue
    gen = torch.Generator().manual_seed(0)
    mixes = judges.colourless(torch.cat([red] * 200), gen)[:, 0, 0, 0]
    assert mixes.min() < 0.05 and mixes.max() > 0.8  # red is dark under some mixes and bright under others
    assert abs(mixes.mean().item() - 1 / 3) < 0.05   # the weights sum to 1: a flat Dirichlet, mean 1/3 each


def test_recognition_rate_counts_hits():
    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long().clamp(0, 9), 10).float()
    images = torch.zeros(6, 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # the oracle sees labels 0 and 1 only
    assert judges.recognition_rate(Oracle(), images, torch.tensor([0, 1, 0, 0, 1, 1])) == 4 / 6


def test_dit_forwards_are_what_the_sampler_spends():
    assert judges.dit_forwards(250, 'euler', 0.3, 0.1, guided=True) == 68 + 2 * 181
    assert judges.dit_forwards(250, 'euler', 0.3, 0.1, guided=False) == 249
    for solver, steps, shift, start, scale in (('euler', 11, 0.0, 0.25, 3.0), ('heun', 11, 0.0, 0.25, 3.0), ('heun', 20, 0.3, 0.1, 3.0),
                                               ('heun', 20, 0.3, 0.1, 1.0)):
        images = []  # images the model saw, per sample: a guided call sees each twice
        flow_sample(lambda x, t, y: images.append(len(x)) or torch.zeros_like(x), torch.zeros(3, 2, 1, 1), torch.zeros(3, dtype=torch.long),
                    steps, solver, shift=shift, cfg_scale=scale, cfg_interval_start=start, null_label=1)
        assert judges.dit_forwards(steps, solver, shift, start, guided=scale != 1) == sum(images) // 3


class Gaussian:
    """The exact velocity of data N(m, s^2) per latent value (see test_dit), as a model."""
    null_label = None

    def __init__(self, m=0.3, s=0.4):
        self.m, self.s = m, s

    def __call__(self, x, t, y):
        t = t.view(-1, 1, 1, 1)
        return self.m + (t * self.s ** 2 - (1 - t)) / (t ** 2 * self.s ** 2 + (1 - t) ** 2) * (x - t * self.m)


class Identity:
    """An 'autoencoder' whose latents are the image (3 channels)."""
    def decode(self, z):
        return z


def test_solver_study_on_a_closed_form_flow():
    noise = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = {'mean': torch.zeros(3, dtype=torch.float64), 'std': torch.ones(3, dtype=torch.float64)}
    grid = {'euler': (25, 250), 'heun': (5, 25)}
    rows = judges.solver_study(Gaussian(), Identity(), stats, [0] * 8, noise, grid=grid, reference_steps=400, shift=0.3)
    error = {(r['solver'], r['steps']): r['latent_rmse'] for r in rows}
    assert error['euler', 250] < error['euler', 25] and error['heun', 25] < error['heun', 5]
    assert error['heun', 25] < error['euler', 250]  # 48 forwards beat 249
    assert [r['forwards'] for r in rows] == [24, 249, 8, 48]
    assert judges.heun_match(rows)['steps'] == 25
    assert all(r['recognised'] is None and r['psnr'] > 20 for r in rows)
