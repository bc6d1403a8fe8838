"""train_vmae.py: config parsing, a short run, exact resume, DDP equivalence, NaN stop, freezing.
Run: python -m pytest tests/test_train_vmae.py"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import common
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
    cfg = common.parse_config(train_vmae.Config, [str(cfg_file), '--mask-ratio=0.5', '--blr', '2e-4', '--compile=false', '--resume'])
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
    assert train_vmae.lr_at(0, 1.0, 0.0, 10, 110) == 0.0
    assert train_vmae.lr_at(5, 1.0, 0.0, 10, 110) == pytest.approx(0.5)
    assert train_vmae.lr_at(10, 1.0, 0.0, 10, 110) == pytest.approx(1.0)
    assert train_vmae.lr_at(60, 1.0, 0.0, 10, 110) == pytest.approx(0.5)
    assert train_vmae.lr_at(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=True)
    opt = train_vmae.make_optimizer(model, 1e-3, train_vmae.Config())
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
    assert (tmp_path / 'recon_0000062.png').exists()
    assert vmae.load_vmae(str(tmp_path / 'last.pt')).mask_token is None     # loads as an inference model


def test_resume_is_exact(tmp_path):
    """8 steps straight == 4 steps, stop, resume, 4 more (masking and posterior sampling on)."""
    train_vmae.main(tiny_config(tmp_path / 'straight', stop_epoch=8 / 625))
    train_vmae.main(tiny_config(tmp_path / 'split', stop_epoch=4 / 625))
    train_vmae.main(tiny_config(tmp_path / 'split', stop_epoch=8 / 625, resume=True))
    a, b = weights(tmp_path / 'straight'), weights(tmp_path / 'split')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / 'straight')[-1] == losses(tmp_path / 'split')[-1]


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
