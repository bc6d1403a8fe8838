"""train_dit.py: latent extraction, latent statistics, DiT training, resume and NaN stop.
Run: python -m pytest tests/test_train_dit.py"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import dit
import fileio
import train_dit
import vmae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_images_and_vmae(root, per_class, seed=0):
    """root/images: 3 classes of random 40x36 images (class c c + 1 times darker); root/vmae.pt: a random VMAE-tiny for 32 px."""
    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / 'images' / f'class{c}').mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(img).save(root / 'images' / f'class{c}' / f'{i}.png')
    torch.manual_seed(0)
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False)
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': model.args, 'model': model.state_dict()}, root / 'vmae.pt')
    return root


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    return make_images_and_vmae(tmp_path_factory.mktemp('dit'), per_class=16)


def config(setup, out, **overrides):
    base = dict(data=str(setup / 'images'), image_size=32, autoencoder=str(setup / 'vmae.pt'), out_dir=str(out),
                latents=str(setup / 'latents'), extract_batch_size=10, model='DiT-T/1', batch_size=8, micro_batch_size=8,
                lr=1e-3, max_steps=6, dtype='fp32', num_workers=0, device='cpu', log_every=2, ckpt_every=3,
                sample_every=1000, sample_steps=3)
    return dataclasses.replace(train_dit.Config(), **{**base, **overrides})


def test_extraction_stores_moments_of_image_and_mirror(setup, tmp_path):
    train_dit.main(config(setup, tmp_path / 'run', max_steps=1))
    meta = json.load(open(setup / 'latents' / 'meta.json'))
    assert meta['complete'] and meta['num_items'] == 48 and meta['num_classes'] == 3
    assert meta['shape'] == [2, 32, 4, 4] and meta['classes'] == ['class0', 'class1', 'class2']
    latents = np.load(setup / 'latents' / 'latents.npy')
    labels = np.load(setup / 'latents' / 'labels.npy')
    assert labels.tolist() == [c for c in range(3) for _ in range(16)]
    model = vmae.load_vmae(str(setup / 'vmae.pt'))
    dataset = data.ImageFolder(str(setup / 'images'), 32)
    x = torch.stack([dataset[i][0] for i in (0, 17, 47)])
    with torch.no_grad():
        for view, images in enumerate((x, x.flip(-1))):
            post = model.encode(images)
            expected = torch.cat([post.mean, post.logvar], dim=1).numpy()
            assert np.allclose(latents[[0, 17, 47], view], expected, atol=1e-5)


def test_latent_statistics_are_per_channel_over_posterior_samples():
    rng = np.random.default_rng(1)
    n, C = 3000, 4
    mean = rng.normal(size=(n, 1, C, 2, 2)) + np.arange(C).reshape(1, 1, C, 1, 1)
    logvar = np.full_like(mean, np.log(0.25))
    latents = np.concatenate([mean, logvar], axis=2).repeat(2, axis=1)      # (n, 2, 2C, 2, 2)
    stats = train_dit.latent_statistics(latents, seed=0)
    assert np.allclose(stats['mean'], np.arange(C), atol=0.05)
    assert np.allclose(stats['std'], np.sqrt(1 + 0.25), atol=0.03)            # data spread + posterior noise


def test_latents_of_another_vmae_are_refused(setup, tmp_path):
    train_dit.main(config(setup, tmp_path / 'a', max_steps=1))
    other = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False)
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': other.args, 'model': other.state_dict()}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='was made with autoencoder_sha256'):
        train_dit.main(config(setup, tmp_path / 'b', autoencoder=str(tmp_path / 'other.pt')))


def test_latent_dataset_picks_both_views():
    class Meta(dict):
        pass
    ds = train_dit.LatentDataset.__new__(train_dit.LatentDataset)
    ds.moments, ds.labels, ds.num_items = np.arange(2 * 2).reshape(2, 2, 1).astype(np.float32), np.array([5, 7]), 2
    views = [ds[(1, common.seed_for(0, e, 1))][0].item() for e in range(200)]
    assert set(views) == {2.0, 3.0} and 70 < views.count(3.0) < 130
    assert ds[(1, 0)][1] == 7


def record_items(monkeypatch):
    """The (index, augmentation seed) items the training loop asks the latent dataset for, in order."""
    items, real_getitem = [], train_dit.LatentDataset.__getitem__

    def recording(self, item):
        items.append(item)
        return real_getitem(self, item)
    monkeypatch.setattr(train_dit.LatentDataset, '__getitem__', recording)
    return items


def test_training_resumes_exactly_across_an_epoch_boundary(setup, tmp_path, monkeypatch):
    """48 latents at batch 8: 6 steps an epoch. 9 steps straight == 4, stop, resume, 5 more (into epoch 1): the
    same items in the same order, the same weights and EMA. Each epoch gives every item a new seed, and so a
    new choice between the image's latent and its mirror's."""
    items = record_items(monkeypatch)

    def trained_on(steps, **overrides):  # the items of the run's steps (the loop may fetch one batch more before it stops)
        items.clear()
        train_dit.main(config(setup, **overrides))
        assert len(items) >= steps * 8
        return items[:steps * 8]
    straight_items = trained_on(9, out=tmp_path / 'straight', max_steps=9)
    split_items = trained_on(4, out=tmp_path / 'split', max_steps=4) + trained_on(5, out=tmp_path / 'split', max_steps=9, resume=True)
    assert split_items == straight_items
    a = fileio.read_checkpoint(str(tmp_path / 'straight' / 'last.pt'))
    b = fileio.read_checkpoint(str(tmp_path / 'split' / 'last.pt'))
    for key in ('model', 'ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a['step'] == b['step'] == 9 and a['classes'] == ['class0', 'class1', 'class2']
    assert a['config']['autoencoder'] == os.path.abspath(setup / 'vmae.pt')
    epoch0, epoch1 = dict(straight_items[:48]), dict(straight_items[48:])
    assert sorted(epoch0) == list(range(48)) and len(epoch1) == 24
    assert all(epoch1[i] != epoch0[i] for i in epoch1)                                    # new seeds every epoch
    assert 4 <= sum((epoch1[i] & 1) != (epoch0[i] & 1) for i in epoch1) <= 20             # the view flips for about half
    meta = json.load(open(setup / 'latents' / 'meta.json'))
    assert a['latent_stats']['mean'].tolist() == pytest.approx(meta['mean']) and a['latent_stats']['std'].tolist() == pytest.approx(meta['std'])


def test_sample_grid_is_the_emas_samples_decoded_at_the_latent_scale(setup, tmp_path):
    """The grid written at the last step: 4 samples per class from fixed noise (seed 0), Euler with guidance 4,
    de-standardised by the latent statistics (written out here: x * std + mean), decoded by the VMAE."""
    train_dit.main(config(setup, tmp_path / 'run', max_steps=3, ema_decay=0.5))
    ckpt = fileio.read_checkpoint(str(tmp_path / 'run' / 'last.pt'))
    ema = dit.load_dit(str(tmp_path / 'run' / 'last.pt'))                                 # the EMA weights
    std, mean = (ckpt['latent_stats'][k].view(1, -1, 1, 1) for k in ('std', 'mean'))
    assert (std - 1).abs().max() > 0.05 or mean.abs().max() > 0.05                       # not the identity scale
    y = torch.arange(3).repeat_interleave(4)
    z = torch.randn(12, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = vmae.load_vmae(str(setup / 'vmae.pt')).decode(dit.euler_sample(ema, z, y, steps=3, cfg_scale=4.0) * std + mean)
    data.save_grid(images, str(tmp_path / 'expected.png'), ncol=4, row_labels=['class0', 'class1', 'class2'], upscale=4)
    written = np.asarray(Image.open(tmp_path / 'run' / 'samples_0000003.png')).astype(int)
    expected = np.asarray(Image.open(tmp_path / 'expected.png')).astype(int)
    assert written.shape == expected.shape and np.abs(written - expected).max() <= 1


def test_ema_follows_the_trained_weights_at_every_step(setup, tmp_path):
    """With decay 0.9, each kept checkpoint's EMA is 0.9 x the previous step's EMA + 0.1 x this step's weights."""
    train_dit.main(config(setup, tmp_path, max_steps=4, ckpt_every=1, keep_every=1, ema_decay=0.9))
    ckpts = [fileio.read_checkpoint(str(tmp_path / f'ckpt_{k:07d}.pt')) for k in range(1, 5)]
    assert [c['step'] for c in ckpts] == [1, 2, 3, 4]
    for before, now in zip(ckpts, ckpts[1:]):
        for k, w in now['model'].items():
            expected = 0.9 * before['ema'][k] + 0.1 * w
            torch.testing.assert_close(now['ema'][k], expected, rtol=1e-6, atol=1e-7, msg=k)
        moved = [k for k in now['model'] if not torch.equal(now['ema'][k], before['ema'][k])]
        changed = [k for k, w in now['model'].items() if not torch.equal(w, before['ema'][k])]
        assert 'x_embedder.proj.weight' in moved and moved == changed


def test_ema_update():
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    before = ema.weight.detach().clone()
    dit.update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)


def test_nan_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    train_dit.main(config(setup, tmp_path, max_steps=3))
    good = fileio.read_checkpoint(str(tmp_path / 'last.pt'))['model']
    real_loss, calls = dit.flow_loss, []

    def loss_that_diverges(model, x1, y):  # finite for two steps, then NaN
        calls.append(1)
        loss = real_loss(model, x1, y)
        return loss if len(calls) <= 2 else loss * float('nan')
    monkeypatch.setattr(dit, 'flow_loss', loss_that_diverges)
    with pytest.raises(FloatingPointError, match='last good checkpoint'):
        train_dit.main(config(setup, tmp_path, max_steps=12, resume=True))
    after = fileio.read_checkpoint(str(tmp_path / 'last.pt'))['model']
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_flat_folder_trains_an_unconditional_dit(setup, tmp_path):
    flat = tmp_path / 'flat'
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), i * 20, np.uint8)).save(flat / f'{i}.png')
    train_dit.main(config(setup, tmp_path / 'run', data=str(flat), latents=str(tmp_path / 'lat'), max_steps=2))
    model = dit.load_dit(str(tmp_path / 'run' / 'last.pt'))
    assert model.num_classes == 1 and model.null_label is None


def flow_loss_with_fixed_draws(model, x1, y):
    """dit.flow_loss with its noise and times a fixed function of each latent instead of random draws: the same
    per item on any number of ranks (the random draws follow (seed, rank, step), so 2 ranks draw other noise
    than 1 rank with 2 micro-batches)."""
    x0 = torch.sin(3 * x1 + 1)
    t = torch.sigmoid(x1.flatten(1).mean(1))
    t_ = t.view(-1, 1, 1, 1)
    return (model(t_ * x1 + (1 - t_) * x0, t, y).float() - (x1 - x0)).pow(2).flatten(1).mean(1)


def test_two_process_extraction_training_and_resume_equal_one_process(setup, tmp_path, monkeypatch):
    """Under torchrun the ranks share the extraction batches (the latents equal a one-process run's), and
    training on 2 ranks x 4 latents equals 1 rank x 4 x 2 accumulation in its weights and EMA: 4 steps, stop,
    resume on 2 ranks, 5 more, across the epoch boundary at step 6, against 9 steps straight on one. The
    latent is the posterior mean and labels are never dropped; the flow loss's draws are fixed per item
    (flow_loss_with_fixed_draws, patched in by this file's __main__), so nothing differs but the split."""
    monkeypatch.setattr(dit, 'flow_loss', flow_loss_with_fixed_draws)
    settings = dict(micro_batch_size=4, posterior='mode', class_dropout_prob=0.0, ema_decay=0.5, max_steps=9)
    train_dit.main(config(setup, tmp_path / 'one', latents=str(tmp_path / 'lat1'), **settings))

    def two_ranks(**overrides):
        cfg = config(setup, tmp_path / 'two', latents=str(tmp_path / 'lat2'), **{**settings, **overrides})
        flags = [f'--{k}={v}' for k, v in vars(cfg).items() if k != 'resume'] + (['--resume'] if cfg.resume else [])
        result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                 os.path.join('tests', 'test_train_dit.py'), *flags], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT})
        assert result.returncode == 0, result.stderr
        return result.stdout
    assert '2 rank(s) x 4 x 1 accumulation' in two_ranks(max_steps=4)
    assert 'resumed from' in two_ranks(resume=True)
    assert np.allclose(np.load(tmp_path / 'lat1' / 'latents.npy'), np.load(tmp_path / 'lat2' / 'latents.npy'), atol=1e-6)
    assert json.load(open(tmp_path / 'lat2' / 'meta.json'))['complete']
    one, two = (fileio.read_checkpoint(str(tmp_path / run / 'last.pt')) for run in ('one', 'two'))
    assert one['step'] == two['step'] == 9
    for key in ('model', 'ema'):
        worst = max((one[key][k] - two[key][k]).abs().max().item() for k in one[key])
        assert worst < 1e-5, (key, worst)
    torch.manual_seed(0)
    initial = dit.DiT_models['DiT-T/1'](input_size=4, in_channels=16, num_classes=3, use_qknorm=True, class_dropout_prob=0.0).state_dict()
    assert min((one['model'][k] - initial[k]).abs().max().item() for k in ('x_embedder.proj.weight', 'final_layer.linear.weight')) > 3e-3


if __name__ == '__main__':  # train_dit.py with flow_loss_with_fixed_draws, for the two-process test above
    dit.flow_loss = flow_loss_with_fixed_draws
    with common.clear_errors():
        train_dit.main(common.parse_config(train_dit.Config))
