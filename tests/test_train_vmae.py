"""train_vmae.py: config parsing, a short run, exact resume, DDP equivalence, NaN stop, freezing.
Run: python -m pytest tests/test_train_vmae.py"""

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
import fileio
import train_vmae
import vmae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(out_dir, **overrides):
    """VMAE-tiny on 32-px built-in images; 625 steps per epoch at batch 16."""
    base = dict(data='builtin', image_size=32, model='VMAE-tiny', out_dir=str(out_dir), perceptual_weight=0.0,
                batch_size=16, micro_batch_size=16, blr=0.016, warmup_epochs=0.002, epochs=0.02, dtype='fp32',
                num_workers=0, log_every=2, ckpt_every=4, image_every=1000, device='cpu')
    return dataclasses.replace(train_vmae.Config(), **{**base, **overrides})


def weights(out_dir):
    return fileio.read_checkpoint(os.path.join(out_dir, 'last.pt'))['model']


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return [r['loss'] for r in rows if 'loss' in r]


def test_parse_config_files_and_flags(tmp_path):
    cfg_file = tmp_path / 'stage.py'
    cfg_file.write_text("# a comment\nimage_size = 256\nmask_ratio = 0\nmodel = 'VMAE-small'\ncompile = True\n")
    cfg = common.parse_config(train_vmae.Config, [str(cfg_file), '--mask_ratio=0.5', '--blr', '2e-4', '--compile=false', '--resume'])
    assert (cfg.image_size, cfg.mask_ratio, cfg.model, cfg.blr, cfg.compile, cfg.resume) == (256, 0.5, 'VMAE-small', 2e-4, False, True)
    assert isinstance(cfg.mask_ratio, float)
    for bad, message in [("lr_typo = 1\n", 'unknown setting'), ("image_size = 'big'\n", 'must be int'),
                         ("import os\n", 'only `name = value`'), ("image_size = 2 ** 8\n", 'must be a literal')]:
        cfg_file.write_text(bad)
        with pytest.raises(SystemExit):
            common.parse_config(train_vmae.Config, [str(cfg_file)])
    with pytest.raises(SystemExit):
        common.parse_config(train_vmae.Config, ['--image_size', 'big'])
    with pytest.raises(SystemExit):
        common.parse_config(train_vmae.Config, ['--no_such_flag', '1'])


def test_lr_schedule():
    assert common.cosine_lr(0, 1.0, 0.0, 10, 110) == 0.0
    assert common.cosine_lr(5, 1.0, 0.0, 10, 110) == pytest.approx(0.5)
    assert common.cosine_lr(10, 1.0, 0.0, 10, 110) == pytest.approx(1.0)
    assert common.cosine_lr(60, 1.0, 0.0, 10, 110) == pytest.approx(0.5)
    assert common.cosine_lr(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=True)
    opt = common.adamw(model, 1e-3, (0.9, 0.95), 0.05)
    decayed = {id(p) for p in opt.param_groups[0]['params']}
    assert id(model.mask_token) in decayed and id(model.blocks[0].attn.qkv.weight) in decayed
    assert id(model.blocks[0].attn.qkv.bias) not in decayed and id(model.norm.weight) not in decayed
    assert opt.param_groups[0]['weight_decay'] == 0.05 and opt.param_groups[1]['weight_decay'] == 0.0


def test_short_run_lowers_the_loss_and_writes_outputs(tmp_path):
    train_vmae.main(tiny_config(tmp_path, epochs=0.1, warmup_epochs=0.01, log_every=10, ckpt_every=1000))
    curve = losses(tmp_path)
    assert len(curve) == 7 and curve[-1] < 0.5 * curve[0], curve
    ckpt = fileio.read_checkpoint(str(tmp_path / 'last.pt'))
    assert ckpt['kind'] == 'vmae' and ckpt['step'] == 62 and ckpt['config']['model'] == 'VMAE-tiny'
    model = vmae.load_vmae(str(tmp_path / 'last.pt'))
    assert model.mask_token is None                                        # loads as an inference model
    # the last step's picture: 8 held-out images spread over the val split above their reconstructions from the
    # posterior means, and their PSNR in the log
    val = data.BuiltinShapes(32, split='val')
    originals = torch.stack([val[i][0] for i in torch.linspace(0, len(val) - 1, 8).long().tolist()])
    with torch.no_grad():
        recon = model.decode(model.encode(originals).mean)
    data.save_grid(torch.cat([originals, recon]), str(tmp_path / 'expected.png'), ncol=8, row_labels=['original', 'reconstruction'], upscale=4)
    written = np.asarray(Image.open(tmp_path / 'recon_0000062.png')).astype(int)
    assert np.abs(written - np.asarray(Image.open(tmp_path / 'expected.png')).astype(int)).max() <= 1
    psnr = [json.loads(line)['val_psnr'] for line in open(tmp_path / 'log.jsonl') if 'val_psnr' in line]
    u8 = lambda x: data.to_uint8(x).numpy().astype(np.float64)
    mse = ((u8(originals) - u8(recon)) ** 2).mean(axis=(1, 2, 3))
    assert psnr[-1] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)), rel=1e-6)


def test_resume_is_exact(tmp_path):
    """8 steps straight == 4 steps, stop, resume, 4 more (masking and posterior sampling on)."""
    train_vmae.main(tiny_config(tmp_path / 'straight', stop_epoch=8 / 625))
    train_vmae.main(tiny_config(tmp_path / 'split', stop_epoch=4 / 625))
    train_vmae.main(tiny_config(tmp_path / 'split', stop_epoch=8 / 625, resume=True))
    a, b = weights(tmp_path / 'straight'), weights(tmp_path / 'split')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / 'straight')[-1] == losses(tmp_path / 'split')[-1]


def test_resume_across_epochs_with_new_crops_and_flips_each_epoch(tmp_path, monkeypatch):
    """A folder of 24 images at batch 8: 3 steps an epoch, random-resized crops and flips on. 7 steps straight ==
    4, stop, resume, 3 more (epochs 0, 1 and 2; masking and posterior noise on): the same items in the same
    order and the same weights. Each epoch hands every image a new augmentation seed, and so a new crop."""
    rng = np.random.default_rng(0)
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f'{i:02d}.png')
    items, real_getitem = [], data.ImageFolder.__getitem__

    def recording(self, item):
        if isinstance(item, tuple):  # the training items (index, seed); the fixed validation images are plain indices
            items.append(item)
        return real_getitem(self, item)
    monkeypatch.setattr(data.ImageFolder, '__getitem__', recording)

    def trained_on(steps, out_dir, **overrides):  # the items of the run's steps (the loop may fetch one batch more)
        items.clear()
        train_vmae.main(tiny_config(out_dir, data=str(folder), batch_size=8, micro_batch_size=8, max_steps=7, warmup_steps=1,
                                    ckpt_every=100, **overrides))
        assert len(items) >= steps * 8
        return items[:steps * 8]
    straight = trained_on(7, tmp_path / 'straight')
    split = trained_on(4, tmp_path / 'split', stop_epoch=4 / 3) + trained_on(3, tmp_path / 'split', resume=True)
    assert split == straight
    a, b = weights(tmp_path / 'straight'), weights(tmp_path / 'split')
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [dict(straight[:24]), dict(straight[24:48])]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert all(epochs[0][i] != epochs[1][i] for i in range(24))
    augmented = data.ImageFolder(str(folder), 32, train=True)
    assert all(not torch.equal(augmented[(i, epochs[0][i])][0], augmented[(i, epochs[1][i])][0]) for i in range(24))


def test_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        train_vmae.main(tiny_config(tmp_path, resume=True))
    train_vmae.main(tiny_config(tmp_path, stop_epoch=2 / 625))
    with pytest.raises(ValueError, match='--resume'):
        train_vmae.main(tiny_config(tmp_path))


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train_vmae.main(tiny_config(tmp_path, stop_epoch=4 / 625))
    good = weights(tmp_path)
    with pytest.raises(FloatingPointError, match='last good checkpoint'):
        train_vmae.main(tiny_config(tmp_path, blr=1e30, stop_epoch=12 / 625, resume=True))
    after = weights(tmp_path)
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_decoder_only_stage3_freezes_the_encoder(tmp_path):
    train_vmae.main(tiny_config(tmp_path / 's1', stop_epoch=2 / 625))
    start = weights(tmp_path / 's1')
    train_vmae.main(tiny_config(tmp_path / 's3', init_from=str(tmp_path / 's1' / 'last.pt'), mask_ratio=0.0,
                                sample_posterior=False, kl_weight=0.0, visible_weight=1.0, train_encoder=False,
                                stop_epoch=3 / 625))
    end = weights(tmp_path / 's3')
    assert 'mask_token' not in end
    for k in end:
        frozen = k.startswith(('patch_embed', 'blocks', 'norm.', 'to_latent', 'pos_embed', 'decoder_pos_embed'))  # tables are fixed
        assert torch.equal(start[k], end[k]) == frozen, k


def run(args, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **env})


def cli_flags(out_dir, **overrides):
    cfg = {**dict(data='builtin', image_size=32, model='VMAE-tiny', perceptual_weight=0.0, batch_size=16, blr=0.016,
                  warmup_epochs=0.002, epochs=0.01, dtype='fp32', num_workers=0, device='cpu', out_dir=str(out_dir),
                  mask_ratio=0.0, sample_posterior=False, kl_weight=0.0, stop_epoch=3 / 625), **overrides}
    return [f'--{k}={v}' for k, v in cfg.items()]


def test_two_process_ddp_matches_one_process(tmp_path):
    """2 ranks x 8 images == 1 rank x 8 x 2 accumulation: same data, same averaged gradient.
    (The stage-3 objective, which has no random draws: masks and posterior noise are per rank.)"""
    one = run(['train_vmae.py', *cli_flags(tmp_path / 'one', micro_batch_size=8)])
    assert one.returncode == 0, one.stderr
    two = run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_vmae.py',
               *cli_flags(tmp_path / 'two', micro_batch_size=8)])
    assert two.returncode == 0, two.stderr
    a, b = weights(tmp_path / 'one'), weights(tmp_path / 'two')
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert losses(tmp_path / 'one')[-1] == pytest.approx(losses(tmp_path / 'two')[-1], rel=1e-5)


def test_cli_errors_are_one_line(tmp_path):
    result = run(['train_vmae.py', '--data', str(tmp_path / 'missing'), '--perceptual_weight', '0', '--out_dir', str(tmp_path / 'o')])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: data folder '{tmp_path / 'missing'}' does not exist: pass a folder of images (class subfolders or flat) or 'builtin'"]
    result = run(['train_vmae.py', '--model', 'VMAE-huge', '--out_dir', str(tmp_path / 'o')])
    assert result.returncode == 2 and "unknown model 'VMAE-huge'" in result.stderr
