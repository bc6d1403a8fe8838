"""
Tests of evaluate.py and what it runs (inception.py, metrics.py, analyses.py), with no downloaded
weights: the Inception gets a random state dict with the real key names and shapes (written by the
tests), metrics are checked against closed forms and independent brute-force references.

    python -m pytest tests/test_evaluate.py -q
"""

import hashlib
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

import common
import evaluate
import metrics
import paper.__main__ as paper_commands
import vmae
from data import BuiltinShapes, center_crop_arr, to_uint8
from dit import read_latent_stats
from inception import FID_WEIGHTS_URL, FIDInceptionV3, inception_weights_path, load_inception, resize_tf1_bilinear
from vmae import VMAE_models, lpips_vgg
from paper import analyses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sha256 of the sorted "key (shape) dtype" lines of pytorch-fid's pt_inception-2015-12-05 state dict
# (566 entries, from the project's reference list of its keys and shapes)
FID_INCEPTION_KEYS_DIGEST = '98b450876113b0a4644fe98b4a476d8ad17e41f48effacc0b62f3dc6ed3338c0'


def random_inception_state_dict(seed=0):
    """He-initialised convolutions and near-identity BatchNorms: activations keep a sane scale through
    the 94 layers, so the features are informative enough for the metrics."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in FIDInceptionV3().state_dict().items():
        if k.endswith('num_batches_tracked'):
            sd[k] = torch.tensor(0)
        elif k.endswith('conv.weight'):
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())
        elif k.endswith(('bn.weight', 'running_var')):
            sd[k] = torch.empty(v.shape).uniform_(0.75, 1.25, generator=g)
        elif k.endswith(('bn.bias', 'running_mean')):
            sd[k] = torch.randn(v.shape, generator=g) * 0.05
        else:  # fc
            sd[k] = torch.randn(v.shape, generator=g) * 0.02
    return sd


@pytest.fixture(scope='session')
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('weights') / 'random_inception.pth'
    torch.save(random_inception_state_dict(), path)
    return str(path)


@pytest.fixture(scope='session')
def inception(inception_file):
    return load_inception(inception_file, 'cpu', allow_random=True)


@pytest.fixture(scope='session')
def vmae_file(tmp_path_factory):
    torch.manual_seed(0)
    model = VMAE_models['VMAE-tiny'](img_size=32)
    path = tmp_path_factory.mktemp('vmae') / 'vmae_tiny.pt'
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': model.args, 'model': model.state_dict()}, path)
    return str(path)


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class FakeInception(torch.nn.Module):
    """Cheap stand-in with the real output shapes: fixed random projections of 4x4 mean-pooled pixels."""
    sha256 = 'f' * 64

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.proj = torch.randn(48, 2048 + 1008 + 2023, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        self.calls += 1
        f = F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj  # (B, 5079)
        return f[:, :2048], f[:, 2048:3056], f[:, 3056:]


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def cli_error(capsys, *args):
    """Run main() in-process (the same path as the command line) and return its one-line error."""
    with pytest.raises(SystemExit) as e:
        (evaluate.main if args[0] in evaluate.COMMANDS else paper_commands.main)(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: '), err
    return err

# -----------------------------------------------------------------------------
# Inception

def test_inception_has_pytorch_fid_keys_and_shapes():
    sd = FIDInceptionV3().state_dict()
    assert len(sd) == 566
    lines = '\n'.join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in sorted(sd.items()))
    assert hashlib.sha256(lines.encode()).hexdigest() == FID_INCEPTION_KEYS_DIGEST
    assert sd['Mixed_6d.branch1x1.conv.weight'].shape == (192, 768, 1, 1)
    assert sd['Mixed_7c.branch_pool.conv.weight'].shape == (192, 2048, 1, 1)
    assert sd['fc.weight'].shape == (1008, 2048) and sd['fc.bias'].shape == (1008,)


def test_inception_features(inception):
    """Strict load; shapes as ADM's; deterministic; logits = pool @ W^T (no bias); the sFID vector is the
    NHWC flatten of Mixed_6d.branch1x1's first 7 channels; the graph input is (x - 128) / 128."""
    images = np.concatenate([random_images(1, 299), np.zeros((1, 299, 299, 3), np.uint8)])
    images[1, :, 150:] = 255
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    seen = {}
    hooks = [inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__('mixed_6_conv', o)),
             inception.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, i: seen.__setitem__('input', i[0]))]
    with torch.no_grad():
        pool, logits, spatial = inception(x)
        for h in hooks:
            h.remove()
        pool_again, _, _ = inception(x[:1])
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and spatial.shape == (2, 2023)
    torch.testing.assert_close(pool_again, pool[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, pool @ inception.fc.weight.T)
    conv = seen['mixed_6_conv']
    assert conv.shape == (2, 192, 17, 17) and conv.min() >= 0  # after BN and ReLU
    assert torch.equal(spatial, conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    h, w, c = 5, 11, 3
    assert spatial[0, (h * 17 + w) * 7 + c] == conv[0, c, h, w]
    assert set(seen['input'][1].unique().tolist()) == {-1.0, 0.9921875}  # 0 -> -1, 255 -> 127/128
    assert pool.std() > 0 and torch.isfinite(pool).all()


def test_inception_load_errors(tmp_path, inception_file):
    sd = random_inception_state_dict()
    with pytest.raises(ValueError, match='--allow_random_inception'):
        load_inception(inception_file)
    del sd['fc.bias']
    torch.save(sd, tmp_path / 'missing.pth')
    with pytest.raises(ValueError, match='1 missing keys'):
        load_inception(str(tmp_path / 'missing.pth'), allow_random=True)
    sd['fc.bias'] = torch.zeros(1000)
    torch.save(sd, tmp_path / 'shape.pth')
    with pytest.raises(ValueError, match='does not fit'):
        load_inception(str(tmp_path / 'shape.pth'), allow_random=True)


def test_weights_offline_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        inception_weights_path(None)
    assert FID_WEIGHTS_URL in str(e.value)
    assert os.path.join(str(tmp_path), 'checkpoints', 'pt_inception-2015-12-05-6726825d.pth') in str(e.value)
    with pytest.raises(FileNotFoundError, match='--inception'):
        inception_weights_path(str(tmp_path / 'nope.pth'))

# -----------------------------------------------------------------------------
# TF1 resize

def tf1_resize_reference(img, size):
    """Straight numpy transcription of TF1's legacy bilinear resize, one output pixel at a time along
    each axis (float32 coordinates, floor, clamped high tap, x then y)."""
    def axis(n_in):
        scale = np.float32(n_in) / np.float32(size)
        src = np.arange(size, dtype=np.float32) * scale
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)
    (ylo, yhi, dy), (xlo, xhi, dx) = axis(img.shape[0]), axis(img.shape[1])
    out = np.empty((size, size), np.float32)
    for i in range(size):
        top = img[ylo[i], xlo] + (img[ylo[i], xhi] - img[ylo[i], xlo]) * dx
        bottom = img[yhi[i], xlo] + (img[yhi[i], xhi] - img[yhi[i], xlo]) * dx
        out[i] = top + (bottom - top) * dy[i]
    return out


def test_tf1_resize_closed_forms():
    for row, size, expected in [([0, 100], 4, [0, 50, 100, 100]), ([0, 30, 90], 5, [0, 18, 42, 78, 90])]:
        x = torch.tensor(row, dtype=torch.float32).expand(len(row), -1)[None, None]  # constant columns
        out = resize_tf1_bilinear(x, size)
        torch.testing.assert_close(out[0, 0, 0], torch.tensor(expected, dtype=torch.float32))
        torch.testing.assert_close(out[0, 0, :, 0], out[0, 0, :, 0].new_zeros(size))
    torch_bilinear = F.interpolate(torch.tensor([[[[0.0, 100.0]] * 2]]), size=(4, 4), mode='bilinear', align_corners=False)
    assert not torch.allclose(torch_bilinear[0, 0, 0], torch.tensor([0.0, 50.0, 100.0, 100.0]))  # torch's is [0, 25, 75, 100]


@pytest.mark.parametrize('shape', [(256, 256), (17, 40), (333, 97), (299, 299)])
def test_tf1_resize_matches_reference(shape):
    img = np.random.default_rng(1).integers(0, 256, shape).astype(np.float32)
    out = resize_tf1_bilinear(torch.from_numpy(img)[None, None], 299)[0, 0].numpy()
    np.testing.assert_allclose(out, tf1_resize_reference(img, 299), rtol=0, atol=1e-4)
    if shape == (299, 299):
        assert np.array_equal(out, img)

# -----------------------------------------------------------------------------
# FID

def trace_sqrt_product(s1, s2):
    """tr sqrt(S1 S2) = sum sqrt(eig(A S2 A)), A = S1^(1/2): a symmetric route independent of sqrtm."""
    e, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(e, 0, None))) @ v.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)).sum()


def test_fid_closed_forms():
    rng = np.random.default_rng(0)
    d = 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    x = rng.normal(size=(200, d))
    s = np.cov(x, rowvar=False)
    assert metrics.frechet_distance(mu1, s, mu2, s) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-10)
    assert metrics.frechet_distance(mu1, s, mu2, 0.7 ** 2 * s) == pytest.approx(((mu1 - mu2) ** 2).sum() + np.trace(s) * 0.3 ** 2, rel=1e-10)
    assert abs(metrics.frechet_distance(mu1, s, mu1, s)) < 1e-10 * np.trace(s)


def test_fid_realistic_and_rank_deficient():
    rng = np.random.default_rng(0)
    d = 64
    # full rank; N < d: singular covariances, sqrtm complex with tiny imaginary parts and less accurate
    for n, tolerance in ((2000, 1e-10), (20, 1e-7)):
        f1 = np.maximum(rng.normal(size=(n, d)), 0)
        f2 = np.maximum(rng.normal(0.2, 1.1, size=(n, d)), 0)
        (mu1, s1), (mu2, s2) = metrics.statistics(f1), metrics.statistics(f2)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
        assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=tolerance)


def test_fid_eps_retry_and_imaginary_check():
    # a nilpotent product has no square root: scipy returns inf, ADM retries with eps on both diagonals
    s1, s2, eps = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), 1e-6
    expected = 0 + 2 - 2 * 2 * math.sqrt(eps * (1 + eps))  # tr S1 + tr S2 - 2 tr sqrt((S1 + eps I)(S2 + eps I))
    assert metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match='imaginary'):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))

# -----------------------------------------------------------------------------
# Inception Score

def test_inception_score_exact_construction():
    """1008 logits: 12 at the label, -8 elsewhere; each 5000-row split holds every one of 1000 classes 5
    times, so every split has the same, exactly computable score (the fact sheet's 50k-row case)."""
    labels = np.tile(np.arange(1000), 10)  # 2 splits (50k rows would make 10 identical ones)
    logits = np.full((10000, 1008), -8.0, np.float32)
    logits[np.arange(10000), labels] = 12.0
    z = math.exp(12) + 1007 * math.exp(-8)
    p_hi, p_lo = math.exp(12) / z, math.exp(-8) / z
    q_used = (p_hi + 999 * p_lo) / 1000  # marginal of the 1000 used classes; the 8 others keep p_lo
    kl = p_hi * math.log(p_hi / q_used) + 999 * p_lo * math.log(p_lo / q_used) + 8 * p_lo * math.log(p_lo / p_lo)
    assert metrics.inception_score(logits) == pytest.approx(math.exp(kl), rel=1e-12)
    assert metrics.inception_score(logits) == pytest.approx(999.956646, abs=1e-6)
    assert metrics.inception_score(np.tile(np.random.default_rng(0).normal(size=1008), (6000, 1))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_matches_adm_float32():
    logits = np.random.default_rng(0).normal(scale=3, size=(12000, 1008)).astype(np.float32)
    scores = []
    for i in range(0, len(logits), 5000):  # ADM: float32 softmax, consecutive 5000-row splits, the last one partial
        p = np.exp(logits[i:i + 5000] - logits[i:i + 5000].max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kl = p * (np.log(p) - np.log(p.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert metrics.inception_score(logits) == pytest.approx(float(np.mean(scores)), rel=1e-5)

# -----------------------------------------------------------------------------
# precision / recall

def brute_force_pr(ref, smp, k=3):
    """The definition, float64, whole matrices: radius = (k+1)-th smallest squared distance within the
    set (the point itself first); a point is covered if within some member's radius (<=)."""
    def sq(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
    r_ref, r_smp = np.sort(sq(ref, ref), 1)[:, k], np.sort(sq(smp, smp), 1)[:, k]
    d = sq(ref, smp)
    return (d <= r_ref[:, None]).any(0).mean(), (d <= r_smp[None, :]).any(1).mean()


def test_precision_recall_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    smp = np.concatenate([rng.normal(size=(35, 8)), rng.normal(2.5, 1, size=(20, 8))]).astype(np.float32)
    expected = brute_force_pr(ref, smp)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for batch_size in (7, 10000):  # block boundaries must not matter
        assert metrics.precision_recall(ref, smp, batch_size=batch_size, fp16=False) == pytest.approx(expected, abs=1e-12)
    assert metrics.precision_recall(ref, smp, batch_size=7) == pytest.approx(expected, abs=1e-12)  # fp16: no ties here
    # every point 4 times: all radii 0, only exact copies are covered (small integers: exact distances;
    # with general floats the radius is rounding noise, in ADM too)
    dup = np.repeat(rng.integers(-4, 5, size=(10, 8)), 4, axis=0).astype(np.float32)
    assert metrics.manifold_radii(torch.from_numpy(dup), 3, 7, False).abs().max() == 0
    smp = np.concatenate([dup[:8], dup[:8] + 1])
    for fp16 in (False, True):
        assert metrics.precision_recall(dup, smp, fp16=fp16) == brute_force_pr(dup, smp) == (0.5, 0.2)


def test_precision_recall_hand_computed():
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]], np.float32)  # squared 3-NN radii 9, 4, 4, 4, 9
    torch.testing.assert_close(metrics.manifold_radii(torch.from_numpy(ref), 3, 2, False), torch.tensor([9.0, 4, 4, 4, 9]))
    smp = np.array([[-3.0], [7.0], [7.1], [10.0], [30.0]], np.float32)  # radii 169, 100, 102.01, 169, 529: every ref inside
    assert metrics.precision_recall(ref, smp, fp16=False) == (0.4, 1.0)  # -3 (by 0) and 7 (by 4) are inside


def test_precision_recall_limits():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 16)).astype(np.float32)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 100) == (0.0, 0.0)
    big = x * 1000  # squared norms overflow float16: ADM falls back to float32
    assert metrics.precision_recall(big, big + 10, fp16=True) == metrics.precision_recall(big, big + 10, fp16=False)
    with pytest.raises(ValueError, match='more than 3'):
        metrics.precision_recall(x[:3], x)

# -----------------------------------------------------------------------------
# reconstruction metrics

def ssim_reference(a, b):
    """Wang et al.'s SSIM via scipy.ndimage's Gaussian filter (sigma 1.5, truncate 3.5 -> 11 taps),
    per channel, mean over the interior 5 pixels away from the borders, averaged over RGB."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(3):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = lambda t: scipy.ndimage.gaussian_filter(t, 1.5, truncate=3.5)
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return np.mean(values)


def test_psnr():
    a = random_images(3)
    assert np.isinf(metrics.psnr_per_image(a, a)).all()
    base = np.clip(a, 20, 200)
    for d in (1, 5, 17):
        np.testing.assert_allclose(metrics.psnr_per_image(base, base + d), 20 * np.log10(255 / d), rtol=1e-12)
    b = random_images(3, seed=1)
    mse = ((a.astype(float) - b) ** 2).mean((1, 2, 3))
    np.testing.assert_allclose(metrics.psnr_per_image(a, b), 10 * np.log10(255 ** 2 / mse), rtol=1e-12)
    with pytest.raises(ValueError, match='uint8'):
        metrics.psnr_per_image(a.astype(np.float32), b)


def test_ssim():
    rng = np.random.default_rng(0)
    a = np.stack([np.uint8(np.clip(scipy.ndimage.gaussian_filter(rng.normal(128, 60, (40, 52, 3)), (2, 2, 0)), 0, 255))
                  for _ in range(3)])
    b = np.uint8(np.clip(a + rng.normal(0, 12, a.shape), 0, 255))
    np.testing.assert_allclose(metrics.ssim_per_image(a, a), 1.0, rtol=1e-12)
    expected = [ssim_reference(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(metrics.ssim_per_image(a, b, chunk=2), expected, rtol=1e-10)
    assert 0.3 < min(expected) < max(expected) < 0.99


def test_lpips_matches_the_network():
    pytest.importorskip('lpips')
    torch.manual_seed(0)
    net = lpips_vgg(pretrained=False)
    a, b = random_images(2, 32), random_images(2, 32, seed=1)
    values = metrics.lpips_per_image(net, a, b)
    to_pm1 = lambda t: torch.from_numpy(t).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        np.testing.assert_allclose(values, net(to_pm1(a), to_pm1(b)).flatten().numpy(), rtol=1e-6)
    np.testing.assert_allclose(metrics.lpips_per_image(net, a, a), 0, atol=1e-7)

# -----------------------------------------------------------------------------
# inputs and the statistics cache

def test_npz_streaming_and_checks(tmp_path):
    images = random_images(11, 8)
    np.savez(tmp_path / 'a.npz', images, np.arange(11))
    src = evaluate.open_images(str(tmp_path / 'a.npz'))
    assert len(src) == 11 and src.stored_statistics() is None
    assert np.array_equal(np.concatenate(list(src.batches(3, 11, 4))), images[3:])
    np.savez(tmp_path / 'float.npz', images.astype(np.float32))
    np.savez(tmp_path / 'chw.npz', images.transpose(0, 3, 1, 2).copy())
    with pytest.raises(ValueError, match='uint8'):
        evaluate.open_images(str(tmp_path / 'float.npz'))
    with pytest.raises(ValueError, match='channels first'):
        evaluate.open_images(str(tmp_path / 'chw.npz'))


def test_folder_input(tmp_path):
    images = random_images(5, 24)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f'{i:03d}.png')
    src = evaluate.open_images(str(tmp_path))
    assert np.array_equal(np.concatenate(list(src.batches(0, 5, 2))), images)
    Image.fromarray(random_images(1, 30)[0]).save(tmp_path / '999.png')
    with pytest.raises(ValueError, match='--image_size'):
        list(evaluate.open_images(str(tmp_path)).batches(0, 6, 6))
    cropped = np.concatenate(list(evaluate.open_images(str(tmp_path), image_size=16).batches(0, 6, 6)))
    assert cropped.shape == (6, 16, 16, 3)


def test_statistics_only_reference(tmp_path, monkeypatch):
    """A reference npz with mu/sigma (and mu_s/sigma_s) but no images: FID and sFID from the stored
    statistics, no precision/recall."""
    stats = dict(mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    np.savez(tmp_path / 'ref.npz', **stats)
    np.savez(tmp_path / 'samples.npz', random_images(5, 16))
    calls = []
    monkeypatch.setattr(evaluate, 'frechet_distance', lambda *s: calls.append(s) or 1.0)
    results, info = evaluate.evaluate_generation(evaluate.open_images(str(tmp_path / 'ref.npz')), evaluate.open_images(str(tmp_path / 'samples.npz')),
                                                 FakeInception(), common.setup_distributed('cpu'), use_cache=False)
    assert results['precision'] is None and results['recall'] is None and results['IS'] > 0
    assert np.array_equal(calls[0][3], stats['sigma']) and np.array_equal(calls[1][3], stats['sigma_s'])
    assert info['ref_statistics'] == 'stored in the npz' and info['n_ref'] == 0


def test_statistics_cache(tmp_path):
    images = random_images(6, 16)
    path = tmp_path / 'samples.npz'
    np.savez(path, images)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    fake, d = FakeInception(), common.setup_distributed('cpu')
    first = evaluate.inception_statistics(fake, evaluate.open_images(str(path)), d, batch_size=4)
    assert fake.calls == 2 and os.path.isfile(str(path) + '.inception_stats.npz')
    second = evaluate.inception_statistics(fake, evaluate.open_images(str(path)), d, batch_size=4)
    assert fake.calls == 2  # read from the sidecar
    for k in ('pool', 'logits', 'mu', 'sigma', 'mu_s', 'sigma_s'):
        np.testing.assert_array_equal(first[k], second[k])
    assert first['sigma'].dtype == np.float64 and first['sigma_s'].shape == (2023, 2023)
    np.testing.assert_allclose(first['mu'], first['pool'].astype(np.float64).mean(0))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the user's file is never rewritten
    fake.sha256 = 'e' * 64  # other weights: recompute
    evaluate.inception_statistics(fake, evaluate.open_images(str(path)), d, batch_size=4)
    assert fake.calls == 4
    np.savez(path, images[:5])  # other images: recompute
    evaluate.inception_statistics(fake, evaluate.open_images(str(path)), d, batch_size=4)
    assert fake.calls == 6
    evaluate.inception_statistics(fake, evaluate.open_images(str(path)), d, batch_size=4, use_cache=False)
    assert fake.calls == 8

# -----------------------------------------------------------------------------
# the command line

def test_cli_end_to_end(tmp_path, inception_file, capsys):
    """npz files with stored statistics: ADM uses them for FID/sFID (diagonal covariances: closed forms,
    well-conditioned whatever the SciPy version), while arr_0's features give IS and precision/recall.
    Refused without the random-weights flag; the user's files are never rewritten."""
    rng = np.random.default_rng(0)
    stats = {name: dict(mu=np.full(2048, m), sigma=np.diag(rng.uniform(0.5, 2, 2048)), mu_s=np.full(2023, m / 2),
                        sigma_s=np.diag(rng.uniform(0.5, 2, 2023))) for name, m in (('ref', 0.1), ('samples', 0.3))}
    np.savez(tmp_path / 'ref.npz', random_images(4, 32, seed=2), **stats['ref'])
    np.savez(tmp_path / 'samples.npz', random_images(5, 32, seed=3), **stats['samples'])
    before = hashlib.sha256((tmp_path / 'ref.npz').read_bytes()).hexdigest()
    out = tmp_path / 'metrics.json'
    refused = cli_error(capsys, 'fid', str(tmp_path / 'ref.npz'), str(tmp_path / 'samples.npz'), '--inception', inception_file, '--device', 'cpu')
    assert '--allow_random_inception' in refused and not os.path.exists(str(tmp_path / 'ref.npz') + '.inception_stats.npz')
    done = run_cli('fid', str(tmp_path / 'ref.npz'), str(tmp_path / 'samples.npz'), '--inception', inception_file,
                   '--allow_random_inception', '--device', 'cpu', '--out', str(out))
    assert done.returncode == 0, done.stderr
    for name in ('FID', 'sFID', 'IS', 'precision', 'recall'):
        assert name in done.stdout
    results = json.loads(out.read_text())
    for metric, (mu, sigma) in (('FID', ('mu', 'sigma')), ('sFID', ('mu_s', 'sigma_s'))):
        a, b = np.diag(stats['samples'][sigma]), np.diag(stats['ref'][sigma])
        expected = ((stats['samples'][mu] - stats['ref'][mu]) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
        assert results[metric] == pytest.approx(expected, rel=1e-9)
    smp = dict(np.load(str(tmp_path / 'samples.npz') + '.inception_stats.npz'))
    ref = dict(np.load(str(tmp_path / 'ref.npz') + '.inception_stats.npz'))
    assert ref['pool'].shape == (4, 2048) and smp['pool'].shape == (5, 2048) and smp['logits'].shape == (5, 1008)
    assert results['IS'] == pytest.approx(metrics.inception_score(smp['logits']), rel=1e-12)
    assert (results['precision'], results['recall']) == metrics.precision_recall(ref['pool'], smp['pool'])
    assert results['ref_statistics'] == results['sample_statistics'] == 'stored in the npz' and results['fid_weights'] is False
    assert hashlib.sha256((tmp_path / 'ref.npz').read_bytes()).hexdigest() == before


def test_cli_errors(tmp_path, capsys, inception_file, vmae_file):
    np.savez(tmp_path / 'stats_only.npz', x=np.zeros(3))
    np.savez(tmp_path / 'good.npz', random_images(4))
    np.savez(tmp_path / 'float.npz', random_images(4).astype(np.float32))
    torch.save({'foo': torch.zeros(1)}, tmp_path / 'not_vmae.pt')
    good, flags = str(tmp_path / 'good.npz'), ['--inception', inception_file, '--allow_random_inception', '--device', 'cpu']
    assert 'not found' in cli_error(capsys, 'fid', str(tmp_path / 'missing.npz'), good, *flags)
    assert 'neither arr_0' in cli_error(capsys, 'fid', str(tmp_path / 'stats_only.npz'), good, *flags)
    assert 'uint8' in cli_error(capsys, 'fid', str(tmp_path / 'float.npz'), good, *flags)
    assert 'not found' in cli_error(capsys, 'fid', good, good, '--inception', str(tmp_path / 'nope.pth'))
    assert 'not a FID Inception state dict' in cli_error(capsys, 'fid', good, good, '--inception', vmae_file, '--allow_random_inception')
    assert 'is not an autoencoder checkpoint' in cli_error(capsys, 'recon', '--autoencoder', str(tmp_path / 'not_vmae.pt'), '--data', 'builtin')
    assert 'does not exist' in cli_error(capsys, 'recon', '--autoencoder', vmae_file, '--data', str(tmp_path / 'nowhere'))
    assert 'no latent statistics' in cli_error(capsys, 'smoothness', '--autoencoder', vmae_file, '--data', 'builtin',
                                               '--latent_stats', str(tmp_path / 'not_vmae.pt'), '--rfid', 'false', '--lpips', 'false')
    result = run_cli('recon', '--autoencoder', str(tmp_path / 'not_vmae.pt'), '--data', 'builtin')  # a real process: one line, exit 2
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()]

class NarrowInception(FakeInception):
    """FakeInception with narrow outputs (pool 6, logits 5, spatial 4): the metrics of a few dozen images are
    then well defined, and cheap, where 2048-d covariances of 9 images take a minute of sqrtm."""
    widths = {'pool': 6, 'logits': 5, 'spatial': 4}

    def __init__(self):
        super().__init__()
        self.proj = self.proj[:, :sum(self.widths.values())]

    def forward(self, x):
        self.calls += 1
        return (F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj).split(list(self.widths.values()), dim=1)


def test_cli_fid_command(tmp_path, inception_file, capsys, monkeypatch):
    """`evaluate.py fid REF SAMPLES` with its documented flags, end to end through the command line's path
    (the Inception given by --inception, narrow features): its JSON holds FID, sFID, IS, precision and recall
    as computed here independently from the features; --cache false writes no sidecar; a command without a
    required flag says which."""
    monkeypatch.setattr(evaluate, 'FEATURE_DIMS', NarrowInception.widths)
    loaded = []

    def load_narrow(path, device='cpu', allow_random=False):
        loaded.append((path, allow_random))
        return NarrowInception()
    monkeypatch.setattr(evaluate, 'load_inception', load_narrow)
    ref_images, sample_images = random_images(20, 16, seed=2), random_images(24, 16, seed=3)
    np.savez(tmp_path / 'ref.npz', ref_images)
    np.savez(tmp_path / 'samples.npz', sample_images)
    ref, samples = str(tmp_path / 'ref.npz'), str(tmp_path / 'samples.npz')
    evaluate.main(['fid', ref, samples, '--inception', inception_file, '--allow_random_inception', '--device', 'cpu',
                   '--batch_size', '7', '--cache', 'false', '--pr_fp32', '--out', str(tmp_path / 'metrics.json')])
    assert loaded == [(inception_file, True)]
    assert not os.path.exists(samples + '.inception_stats.npz') and not os.path.exists(ref + '.inception_stats.npz')
    results = json.loads((tmp_path / 'metrics.json').read_text())
    with torch.no_grad():
        (ref_pool, _, ref_spatial), (pool, logits, spatial) = (
            [f.double().numpy() for f in NarrowInception()(torch.from_numpy(images).permute(0, 3, 1, 2))] for images in (ref_images, sample_images))

    def fid(a, b):  # closed form on the features' statistics, the trace term by eigenvalues (not sqrtm)
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    inception_score = np.exp((p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean())
    assert results['FID'] == pytest.approx(fid(pool, ref_pool), rel=1e-6)
    assert results['sFID'] == pytest.approx(fid(spatial, ref_spatial), rel=1e-6)
    assert results['IS'] == pytest.approx(inception_score, rel=1e-5)
    assert (results['precision'], results['recall']) == pytest.approx(brute_force_pr(ref_pool, pool), abs=1e-12)
    assert 0 < results['precision'] < 1 and 0 < results['recall'] < 1 and results['FID'] > 0.01   # no degenerate case
    assert (results['n_ref'], results['n_samples']) == (20, 24) and results['pr_distances'] == 'fp32'  # fp16 distances round near-ties
    assert results['config']['cache'] is False and results['config']['batch_size'] == 7
    capsys.readouterr()  # the run's progress bars
    assert '--autoencoder' in cli_error(capsys, 'recon', '--data', 'builtin')
    assert '--masks' in cli_error(capsys, 'compression', '--autoencoder', str(tmp_path / 'vmae.pt'), '--data', str(tmp_path))


# -----------------------------------------------------------------------------
# reconstruction, smoothness, compression

def test_recon_cli_builtin(tmp_path, vmae_file, capsys):
    out = tmp_path / 'recon.json'
    evaluate.main(['recon', '--autoencoder', vmae_file, '--data', 'builtin', '--num_images', '6', '--batch_size', '4',
                   '--num_workers', '0', '--rfid', 'false', '--lpips', 'false', '--device', 'cpu', '--out', str(out)])
    assert 'PSNR' in capsys.readouterr().out
    results = json.loads(out.read_text())['autoencoders']['vmae_tiny']
    model = vmae.load_vmae(vmae_file)
    x = torch.stack([BuiltinShapes(32, split='val')[i][0] for i in range(6)])
    with torch.no_grad():
        recon, original = to_uint8(model.decode(model.encode(x).mean)).numpy(), to_uint8(x).numpy()
    assert results['psnr'] == pytest.approx(metrics.psnr_per_image(recon, original).mean(), rel=1e-9)
    assert results['ssim'] == pytest.approx(metrics.ssim_per_image(recon, original).mean(), rel=1e-9)
    assert results['mse'] == pytest.approx(((recon / 255.0 - original / 255.0) ** 2).mean(), rel=1e-9)
    assert json.loads(out.read_text())['n_images'] == 6 and 'rfid' not in results and 'lpips' not in results
    # beside it, the bicubic thumbnail with no more numbers than the 16 x 4 x 4 latent: 9 x 9 x 3 = 243
    thumbnails = evaluate.thumbnail_reconstruction(original, 9)
    assert results['latent_numbers'] == 256 and results['thumbnail']['side'] == 9
    assert results['thumbnail']['psnr'] == pytest.approx(metrics.psnr_per_image(original, thumbnails).mean())


def test_smoothness(tmp_path, vmae_file, monkeypatch):
    model = vmae.load_vmae(vmae_file)
    dataset = torch.utils.data.Subset(BuiltinShapes(32, split='val'), range(5))
    d, std = common.setup_distributed('cpu'), torch.linspace(0.5, 2.0, 16)
    fid_calls = []
    monkeypatch.setattr(evaluate, 'frechet_distance', lambda *stats: fid_calls.append(stats) or 1.0)
    runs = [evaluate.evaluate_reconstruction(model, dataset, d, (0.0, 0.3), std, batch_size=b, num_workers=0,
                                             inception=FakeInception(), seed=3) for b in (2, 5)]
    for eps in (0.0, 0.3):  # per-image noise: the batch size does not matter
        assert runs[0][eps] == pytest.approx(runs[1][eps], rel=1e-5)
    assert runs[0][0.3]['psnr'] < runs[0][0.0]['psnr'] and runs[0][0.0]['rfid'] == 1.0
    mu_orig = FakeInception()(to_uint8(torch.stack([dataset[i][0] for i in range(5)])).permute(0, 3, 1, 2))[0].double().mean(0)
    np.testing.assert_allclose(fid_calls[0][2], mu_orig.numpy(), atol=1e-6)  # rFID against the originals' statistics
    torch.save({'latent_stats': {'mean': torch.zeros(16), 'std': std}}, tmp_path / 'dit.pt')
    torch.save({'mean': torch.zeros(1, 16, 1, 1), 'std': std.view(1, 16, 1, 1)}, tmp_path / 'latents_stats.pt')
    (tmp_path / 'meta.json').write_text(json.dumps({'mean': [0.0] * 16, 'std': std.tolist()}))
    for name in ('dit.pt', 'latents_stats.pt', 'meta.json'):
        torch.testing.assert_close(read_latent_stats(str(tmp_path / name))['std'], std)
    measured = analyses.measure_latent_std(model, dataset, d, batch_size=2, num_workers=0, seed=4)
    with torch.no_grad():
        post = model.encode(torch.stack([dataset[i][0] for i in range(5)]))
    z = post.mean + post.std * common.seeded_noise(5, range(5), post.mean.shape[1:])  # the same draws (seed + 1)
    torch.testing.assert_close(measured, z.transpose(0, 1).flatten(1).std(1), rtol=1e-5, atol=1e-6)


def test_smoothness_cli(tmp_path, vmae_file, capsys):
    out = tmp_path / 'smooth.json'
    paper_commands.main(['smoothness', '--autoencoder', vmae_file, '--data', 'builtin', '--num_images', '4', '--eps', '0', '0.1',
                   '--num_workers', '0', '--rfid', 'false', '--lpips', 'false', '--device', 'cpu', '--out', str(out)])
    assert 'measured on the posterior samples' in capsys.readouterr().out
    results = json.loads(out.read_text())['autoencoders']['vmae_tiny']
    assert set(results['eps']) == {'0', '0.1'} and len(results['latent_std']) == 16
    assert (tmp_path / 'smooth.png').stat().st_size > 0


def segmented_images(num_images=30, tokens=64, seed=0):
    """Token labels of images with three segments each (a few tokens unlabelled, 0)."""
    rng = np.random.default_rng(seed)
    return [rng.choice([0, 1, 2, 3], size=tokens, p=[0.1, 0.3, 0.3, 0.3]) for _ in range(num_images)], rng


def test_compression_statistics_on_encoders_of_known_kind():
    labels, rng = segmented_images()
    # pure noise: every segment holds the set's whole variance, and segments are not told apart
    noise = analyses.compression_statistics([rng.normal(size=(64, 8)) for _ in labels], labels)
    assert noise['sigma2'] == pytest.approx(1, abs=0.1) and noise['rho'] == pytest.approx(1, abs=0.05)
    # an ideal semantic encoder: one vector per segment, a different one in every segment and image
    ideal = analyses.compression_statistics([rng.normal(size=(4, 8))[l] for l in labels], labels)
    assert ideal['sigma2'] == pytest.approx(0, abs=1e-12) and ideal['rho'] > 1.3 and ideal['n_rho'] == len(labels)
    # an entangled encoder (the paper's SD-VAE pattern): all tokens of an image alike, images different.
    # Little variance is left inside segments and yet segments are not told apart: low sigma^2 and rho
    entangled = analyses.compression_statistics([rng.normal(size=8) + 0.01 * rng.normal(size=(64, 8)) for _ in labels], labels)
    assert entangled['sigma2'] < 1e-3 and entangled['rho'] == pytest.approx(1, abs=0.01)
    # one scale for the whole set: rescaling or shifting a channel changes nothing
    features = [rng.normal(size=(4, 8))[l] + 0.3 * rng.normal(size=(64, 8)) for l in labels]
    moved = [f * np.arange(1, 9) + 5 for f in features]
    a, b = analyses.compression_statistics(features, labels), analyses.compression_statistics(moved, labels)
    assert a == pytest.approx(b) and 0 < a['sigma2'] < 0.2 and a['rho'] > 1.1


def test_segment_statistics_where_undefined():
    mean, std = np.zeros(3), np.ones(3)
    one_segment = analyses.segment_statistics(np.random.default_rng(0).normal(size=(10, 3)), np.ones(10), mean, std)
    assert one_segment[0] > 0 and math.isnan(one_segment[1])  # no second segment: no rho
    assert all(math.isnan(v) for v in analyses.segment_statistics(np.ones((3, 3)), np.array([1, 2, 0]), mean, std))


def test_masks_and_crop_alignment(tmp_path):
    labels = np.zeros((60, 90), np.int64)
    labels[:, 30:60], labels[20:, 60:] = 7, 150
    image = np.uint8(np.stack([labels] * 3, -1))  # the image shows its own labels
    for name, lab in (('ADE_1', labels), ('ADE_2', labels[::2, ::2])):  # a mask at another resolution is resized
        Image.fromarray(np.uint8(lab)).save(tmp_path / f'{name}.png')
    os.makedirs(tmp_path / 'celeba' / '0')
    for part, region in (('skin', labels == 7), ('hair', labels == 150), ('nose', labels > 0)):
        Image.fromarray(np.uint8(region) * 255).save(tmp_path / 'celeba' / '0' / f'00003_{part}.png')
    masks, celeba = analyses.SegmentationMasks(str(tmp_path)), analyses.SegmentationMasks(str(tmp_path / 'celeba'))
    assert np.array_equal(masks('x/ADE_1.jpg', (90, 60)), labels)
    assert np.array_equal(masks('x/ADE_2.jpg', (90, 60))[::2, ::2], labels[::2, ::2])
    assert masks('x/other.jpg', (90, 60)) is None
    # parts painted in order: nose (10) over skin (1), hair (17) over nose
    assert set(np.unique(celeba('imgs/3.jpg', (90, 60)))) == {0, 10, 17}
    crop = np.asarray(center_crop_arr(Image.fromarray(image), 24))[..., 0]
    label_image, table = analyses.as_label_image(labels)
    assert table.tolist() == [0, 7, 150]
    crop_labels = table[np.asarray(center_crop_arr(label_image, 24))]
    flat = scipy.ndimage.maximum_filter(crop, 3) == scipy.ndimage.minimum_filter(crop, 3)  # bicubic blends at borders only
    interior = flat & np.isin(crop, [0, 7, 150])
    assert interior.sum() > 200 and np.array_equal(crop[interior], crop_labels[interior])
    assert np.array_equal(analyses.patch_labels(np.array([[1, 1, 2, 2], [1, 2, 2, 2]]), 2), [1, 2])


def test_compression_end_to_end(tmp_path, vmae_file):
    os.makedirs(tmp_path / 'images')
    os.makedirs(tmp_path / 'masks')
    rng = np.random.default_rng(0)
    for i in range(3):  # flat-coloured segments: pixel patches inside a segment are identical
        labels = np.zeros((32, 32), np.uint8)
        labels[:, 16:], labels[:16, :16] = 1, 2
        labels[16:, :16] = 3
        colours = rng.integers(0, 256, (4, 3))
        Image.fromarray(np.uint8(colours[labels])).save(tmp_path / 'images' / f'img{i}.png')
        Image.fromarray(labels).save(tmp_path / 'masks' / f'img{i}.png')
    models = {'vmae': vmae.load_vmae(vmae_file)}
    pairs = lambda masks: analyses.masked_images(str(tmp_path / 'images'), analyses.SegmentationMasks(str(tmp_path / masks)), 32)
    results = analyses.evaluate_compression(models, pairs('masks'), 'cpu')
    assert results['n_images'] == 3 and results['pixel']['sigma2'] == pytest.approx(0, abs=1e-9)
    # the VMAE's tokens (posterior means, row-major) against each 8x8 patch's label: quadrants 2 | 1 over 3 | 1 (row-major)
    with torch.no_grad():
        tokens = [models['vmae'].encode(torch.from_numpy(np.array(Image.open(tmp_path / 'images' / f'img{i}.png'))).permute(2, 0, 1)[None]
                                        .float() / 127.5 - 1).mean[0].flatten(1).T.numpy() for i in range(3)]
    patch_labels = [np.array([2, 2, 1, 1, 2, 2, 1, 1, 3, 3, 1, 1, 3, 3, 1, 1])] * 3
    expected = analyses.compression_statistics(tokens, patch_labels)
    assert [results['vmae'][k] for k in ('sigma2', 'rho')] == pytest.approx([expected['sigma2'], expected['rho']], rel=1e-5)
    assert results['vmae']['n_rho'] == 3 and results['pixel']['rho'] > 1
    os.rename(tmp_path / 'masks' / 'img0.png', tmp_path / 'masks' / 'other.png')
    assert analyses.evaluate_compression(models, pairs('masks'), 'cpu')['n_images'] == 2  # images without a mask are left out
    os.makedirs(tmp_path / 'unrelated')
    Image.fromarray(labels).save(tmp_path / 'unrelated' / 'zzz.png')
    with pytest.raises(ValueError, match='none of the images'):
        analyses.evaluate_compression(models, pairs('unrelated'), 'cpu')

# -----------------------------------------------------------------------------
# DDP sharding

def shard_worker(rank, world_size, port, npz_path, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (as DataLoader workers)
    d = common.setup_distributed('cpu')
    feats = evaluate.extract_features(FakeInception(), evaluate.open_images(npz_path), d, batch_size=2)  # shards (0, 2), (2, 5)
    np.save(os.path.join(out_dir, f'pool{rank}.npy'), feats['pool'])
    common.cleanup_distributed()


@pytest.mark.filterwarnings('ignore:This process .* is multi-threaded:DeprecationWarning')  # Python >= 3.12 on fork
def test_ddp_features_in_input_order(tmp_path):
    np.savez(tmp_path / 'x.npz', random_images(5, 16))
    with socket.socket() as s:  # a free port for the gloo group
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(shard_worker, args=(2, port, str(tmp_path / 'x.npz'), str(tmp_path)), nprocs=2,
                                          start_method='fork')  # fork: no re-import of torch in the workers
    single = evaluate.extract_features(FakeInception(), evaluate.open_images(str(tmp_path / 'x.npz')),
                                       common.setup_distributed('cpu'), batch_size=2)
    for rank in range(2):  # every rank holds all features, in input order
        np.testing.assert_allclose(np.load(tmp_path / f'pool{rank}.npy'), single['pool'], atol=1e-5)
    assert [common.shard_bounds(7, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 7)]
