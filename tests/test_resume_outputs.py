"""Resumable outputs never mix or corrupt: latent extraction, 50k-sample runs and DiT runs are killed
(SIGKILL, in a real process) part-way, then resumed. A resume whose settings could change the contents
is refused in one line naming the setting and both values; one whose settings cannot (the batch size)
gives exactly what an uninterrupted run gives.
Run: python -m pytest tests/test_resume_outputs.py"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import fileio
import sample
import train_dit
import vmae
from test_sample import same_up_to_rounding
from test_train_dit import config, make_images_and_vmae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

# Runs a script whose ShardedArrays dies by SIGKILL when it is about to write its `after`-th batch:
# the batches before it are on disk, that one was computed and lost, as when a job is killed mid-run.
KILLER = """
import os, runpy, signal, sys
import common
import fileio
write, calls = common.ShardedArrays.write, []
def write_or_die(self, rows, **values):
    calls.append(rows)
    if len(calls) == {after}:
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, rows, **values)
common.ShardedArrays.write = write_or_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def killed(after, script, *flags):
    """Run `script flags` and kill it at its `after`-th batch; -> the rows it had marked done."""
    proc = subprocess.run([sys.executable, '-c', KILLER.format(after=after), script, *flags], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def as_flags(**settings):
    return [f'--{k}={v}' for k, v in settings.items()]


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """Images, a VMAE-tiny, its complete latents, and a DiT-T/1 trained 4 steps on them."""
    root = make_images_and_vmae(tmp_path_factory.mktemp('resume'), per_class=10)
    train_dit.main(config(root, root / 'dit', max_steps=4, ema_decay=0.5))
    return root


def extraction_flags(root, latents, **overrides):
    cfg = config(root, root / 'unused', latents=str(latents))
    keep = ('data', 'image_size', 'autoencoder', 'latents', 'extract_batch_size', 'model', 'batch_size', 'micro_batch_size',
            'dtype', 'num_workers', 'device')
    return as_flags(**{**{k: getattr(cfg, k) for k in keep}, **overrides})


def test_killed_extraction_resumes_with_another_batch_size_to_the_uninterrupted_latents(root, tmp_path):
    killed(3, 'train_dit.py', *extraction_flags(root, tmp_path / 'lat', extract_batch_size=4), '--out_dir', str(tmp_path / 'a'))
    done = np.load(tmp_path / 'lat' / 'done.npy')
    assert done.sum() == 8 and not (tmp_path / 'lat' / 'meta.json').exists()   # 2 batches of 4 on disk, no meta yet
    with pytest.raises(ValueError, match="made with dtype 'float32', but this run has dtype 'float16'"):
        train_dit.main(config(root, tmp_path / 'b', latents=str(tmp_path / 'lat'), latent_dtype='float16', max_steps=1))
    other = tmp_path / 'other.pt'
    torch.manual_seed(1)
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False)
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': model.args, 'model': model.state_dict()}, other)
    with pytest.raises(ValueError, match='made with autoencoder_sha256'):
        train_dit.main(config(root, tmp_path / 'b', latents=str(tmp_path / 'lat'), autoencoder=str(other), max_steps=1))
    train_dit.main(config(root, tmp_path / 'b', latents=str(tmp_path / 'lat'), extract_batch_size=7, max_steps=1))
    resumed, straight = np.load(tmp_path / 'lat' / 'latents.npy'), np.load(root / 'latents' / 'latents.npy')
    assert (np.abs(resumed).reshape(len(resumed), -1).max(axis=1) > 0).all()           # no row left as zeros
    np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-6)   # batch size moves fp32 rounding at most
    meta, meta_straight = (json.load(open(p / 'meta.json')) for p in (tmp_path / 'lat', root / 'latents'))
    np.testing.assert_allclose(meta['mean'], meta_straight['mean'], atol=1e-6)
    assert sorted(os.listdir(tmp_path / 'lat')) == ['labels.npy', 'latents.npy', 'meta.json']


def fid_flags(root, out, **overrides):
    settings = dict(dit=root / 'dit' / 'last.pt', num_fid_samples=12, batch_size=2, steps=6, seed=0, out=out, device='cpu')
    return as_flags(**{**settings, **overrides})


def test_killed_sampling_refuses_other_settings_and_resumes_with_another_batch_size(root, tmp_path):
    out = tmp_path / 'x.npz'
    sample.main(sample.parse_args(fid_flags(root, tmp_path / 'straight.npz')))
    killed(3, 'sample.py', *fid_flags(root, out))
    assert np.load(str(out) + '.parts/done.npy').tolist() == [True] * 4 + [False] * 8
    for flag, value, setting in (('seed', 7, 'seed 0'), ('steps', 3, 'steps 6'), ('cfg_scale', 1.0, 'cfg_scale 4.0'),
                                 ('solver', 'heun', "solver 'euler'"), ('weights', 'model', "weights 'ema'"),
                                 ('num_fid_samples', 10, 'num_items 12')):
        with pytest.raises(ValueError, match=f"was made with {setting}, but this run has {flag if flag != 'num_fid_samples' else 'num_items'}"):
            sample.main(sample.parse_args(fid_flags(root, out, **{flag: value})))
    sample.main(sample.parse_args(fid_flags(root, out, batch_size=5)))
    resumed, straight = np.load(out), np.load(tmp_path / 'straight.npz')
    assert np.array_equal(resumed['arr_1'], straight['arr_1'])
    assert same_up_to_rounding(resumed['arr_0'], straight['arr_0'])
    assert resumed['arr_0'].reshape(12, -1).max(axis=1).min() > 0                     # no black image among them
    assert not os.path.exists(str(out) + '.parts')


def test_sampling_refuses_a_folder_of_another_dit(root, tmp_path):
    out = tmp_path / 'x.npz'
    killed(2, 'sample.py', *fid_flags(root, out))
    other = tmp_path / 'other.pt'
    ckpt = torch.load(root / 'dit' / 'last.pt', weights_only=True)
    ckpt['ema'] = {k: v + 0.01 for k, v in ckpt['ema'].items()}
    torch.save(ckpt, other)
    with pytest.raises(ValueError, match='was made with dit_sha256'):
        sample.main(sample.parse_args(fid_flags(root, out, dit=other)))


def test_an_older_unfinished_folder_without_settings_is_refused(tmp_path):
    folder = tmp_path / 'x.npz.parts'
    folder.mkdir()
    np.save(folder / 'done.npy', np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match='no record of its settings'):
        common.ShardedArrays(str(folder), 10, {'a': ((), np.int64)}, {}, common.Dist())


def test_a_dit_run_resumes_only_on_its_own_latent_space(root, tmp_path, capsys):
    train_dit.main(config(root, tmp_path / 'run', max_steps=2))
    capsys.readouterr()
    other = tmp_path / 'other.pt'
    torch.manual_seed(2)
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False)
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': model.args, 'model': model.state_dict()}, other)
    with pytest.raises(ValueError, match=f"the DiT run in {tmp_path / 'run'} was made with autoencoder_sha256"):
        train_dit.main(config(root, tmp_path / 'run', autoencoder=str(other), latents=str(tmp_path / 'other_latents'),
                              max_steps=4, resume=True))
    with pytest.raises(ValueError, match="was made with posterior 'sample', but this run has posterior 'mode'"):
        train_dit.main(config(root, tmp_path / 'run', posterior='mode', latents=str(tmp_path / 'mode_latents'), max_steps=4,
                              resume=True))
    train_dit.main(config(root, tmp_path / 'run', max_steps=4, resume=True))   # unchanged: no note of a change
    out = capsys.readouterr().out
    assert 'resumed from' in out and 'changed settings' not in out


def test_a_diffusers_folder_is_hashed_by_its_files(tmp_path):
    """Latents and DiTs record their autoencoder's hash; a diffusers vae/ folder is hashed as its files."""
    folder = tmp_path / 'vae'
    folder.mkdir()
    (folder / 'config.json').write_text('{}')
    (folder / 'diffusion_pytorch_model.safetensors').write_bytes(b'weights')
    first = fileio.file_sha256(str(folder))
    (folder / 'diffusion_pytorch_model.safetensors').write_bytes(b'other weights')
    assert fileio.file_sha256(str(folder)) != first and len(first) == 64


def test_rows_whose_write_fails_are_not_marked_done(tmp_path):
    """A row is marked done only after its values are stored: a write that fails leaves it to do, also when the
    folder is reopened."""
    specs = {'x': ((3,), np.float32)}
    store = common.ShardedArrays(str(tmp_path / 'out'), 4, specs, {'seed': 0}, common.Dist())
    store.write([0, 1], x=np.ones((2, 3), np.float32))
    with pytest.raises(ValueError):
        store.write([2, 3], x=np.ones((2, 5), np.float32))        # values that do not fit the rows
    assert store.done.tolist() == [True, True, False, False]
    reopened = common.ShardedArrays(str(tmp_path / 'out'), 4, specs, {'seed': 0}, common.Dist())
    assert reopened.todo(10) == [[2, 3]]


def test_a_folder_without_a_record_of_a_setting_is_refused(tmp_path):
    """Settings the unfinished output has no record of (an older version wrote it) could have been anything: the
    folder is refused, naming the setting, as for a recorded setting that differs."""
    specs = {'x': ((), np.int64)}
    common.ShardedArrays(str(tmp_path / 'out'), 4, specs, {'seed': 0}, common.Dist())
    settings = json.load(open(tmp_path / 'out' / 'settings.json'))
    assert settings['seed'] == 0
    with pytest.raises(ValueError, match="was made with steps None, but this run has steps 6"):
        common.ShardedArrays(str(tmp_path / 'out'), 4, specs, {'seed': 0, 'steps': 6}, common.Dist())
    with pytest.raises(ValueError, match="was made with posterior None, but this run has posterior 'sample'"):
        common.check_same_settings({'autoencoder_sha256': 'ab'}, {'autoencoder_sha256': 'ab', 'posterior': 'sample'}, 'x', 'y')
