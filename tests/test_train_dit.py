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


def make_images_and_vmae(root, per_class):
    """root/images: 3 classes of random 40x36 images; root/vmae.pt: a random VMAE-tiny for 32 px."""
    rng = np.random.default_rng(0)
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


def test_extraction_resumes_after_a_kill(setup, tmp_path):
    """Lose all batches after the second (as a kill would): the rerun redoes exactly those."""
    latent_dir = tmp_path / 'latents'
    train_dit.main(config(setup, tmp_path / 'a', latents=str(latent_dir), max_steps=1))
    full = np.load(latent_dir / 'latents.npy').copy()
    done = np.load(latent_dir / 'done.npy', mmap_mode='r+')
    done[2:] = False
    done.flush()
    arr = np.load(latent_dir / 'latents.npy', mmap_mode='r+')
    arr[20:] = 0
    arr.flush()
    meta = json.load(open(latent_dir / 'meta.json'))
    meta['complete'] = False
    json.dump(meta, open(latent_dir / 'meta.json', 'w'))
    train_dit.main(config(setup, tmp_path / 'b', latents=str(latent_dir), max_steps=1))
    assert np.array_equal(np.load(latent_dir / 'latents.npy'), full)
    assert json.load(open(latent_dir / 'meta.json'))['complete']


def test_latents_of_another_vmae_are_refused(setup, tmp_path):
    train_dit.main(config(setup, tmp_path / 'a', max_steps=1))
    other = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False)
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': other.args, 'model': other.state_dict()}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='made with another autoencoder_sha256'):
        train_dit.main(config(setup, tmp_path / 'b', autoencoder=str(tmp_path / 'other.pt')))


def test_latent_dataset_picks_both_views():
    class Meta(dict):
        pass
    ds = train_dit.LatentDataset.__new__(train_dit.LatentDataset)
    ds.moments, ds.labels, ds.num_items = np.arange(2 * 2).reshape(2, 2, 1).astype(np.float32), np.array([5, 7]), 2
    views = [ds[(1, common.seed_for(0, e, 1))][0].item() for e in range(200)]
    assert set(views) == {2.0, 3.0} and 70 < views.count(3.0) < 130
    assert ds[(1, 0)][1] == 7


def test_training_checkpoint_resume_and_ema(setup, tmp_path):
    train_dit.main(config(setup, tmp_path / 'straight'))
    train_dit.main(config(setup, tmp_path / 'split', max_steps=3))
    train_dit.main(config(setup, tmp_path / 'split', resume=True))
    a = fileio.read_checkpoint(str(tmp_path / 'straight' / 'last.pt'))
    b = fileio.read_checkpoint(str(tmp_path / 'split' / 'last.pt'))
    for key in ('model', 'ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a['step'] == 6 and a['classes'] == ['class0', 'class1', 'class2']
    assert a['config']['autoencoder'] == os.path.abspath(setup / 'vmae.pt')
    meta = json.load(open(setup / 'latents' / 'meta.json'))
    assert torch.allclose(a['latent_stats']['mean'], torch.tensor(meta['mean']))
    # the EMA has moved from the initial weights toward the trained ones, but only a little (decay 0.9999)
    model = dit.load_dit(str(tmp_path / 'straight' / 'last.pt'))
    assert model.meta['step'] == 6 and not model.training
    w_raw, w_ema = a['model']['blocks.0.attn.qkv.weight'], a['ema']['blocks.0.attn.qkv.weight']
    assert not torch.equal(w_raw, w_ema)
    assert (tmp_path / 'straight' / 'samples_0000006.png').exists()


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


def test_two_process_extraction_and_training(setup, tmp_path):
    """Under torchrun the ranks share the extraction batches; the latents equal a one-process run's."""
    train_dit.main(config(setup, tmp_path / 'one', latents=str(tmp_path / 'lat1'), max_steps=1))
    cfg = config(setup, tmp_path / 'two', latents=str(tmp_path / 'lat2'), max_steps=2, micro_batch_size=4)
    flags = [f'--{k}={v}' for k, v in vars(cfg).items() if k != 'resume']
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'train_dit.py', *flags], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr
    assert np.allclose(np.load(tmp_path / 'lat1' / 'latents.npy'), np.load(tmp_path / 'lat2' / 'latents.npy'), atol=1e-6)
    assert json.load(open(tmp_path / 'lat2' / 'meta.json'))['complete']
    assert fileio.read_checkpoint(str(tmp_path / 'two' / 'last.pt'))['step'] == 2
