"""The smoothness ablation (python -m paper.ablation) and what it added: noise in the decoder's training
(--latent_noise), the stage-3 variants' trainable parameters, isotropic noise in the smoothness test, and the
whole command on truncated trainings. CPU only. Run: python -m pytest tests/test_ablation.py"""

import functools
import json
import os

import numpy as np
import pytest
import torch

import common
import fileio
import train_vmae
import vmae
from paper import ablation, judges
import paper.__main__ as paper_commands
from test_train_vmae import tiny_config


def test_perturb_latents_adds_the_smoothness_tests_noise_one_eps_per_image():
    torch.manual_seed(0)
    z = (torch.randn(600, 64, 3) * torch.tensor([0.1, 1.0, 10.0]) + 5).requires_grad_(True)  # (B, N, C), unequal channels
    out = vmae.perturb_latents(z, 0.3)
    std = z.detach().flatten(0, 1).std(0)
    scaled = (out - z).detach() / std                                        # eps_b x N(0, 1), in each channel's std
    # eps ~ U(0, 0.3): E[eps^2] = 0.03 in every channel, whatever its scale or mean
    assert torch.allclose(scaled.pow(2).mean((0, 1)), torch.full((3,), 0.03), rtol=0.08)
    # one eps per image, spread over [0, 0.3]: an image's RMS over its 192 values is its eps (within about 5%)
    per_image = scaled.pow(2).mean((1, 2)).sqrt()
    assert per_image.max() < 0.3 * 1.2 and per_image.min() < 0.02
    assert 0.42 < (per_image < 0.15).float().mean() < 0.58
    assert scaled.mean().abs() < 0.01
    # the std is no target: the gradient goes straight through
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_the_training_pass_decodes_the_perturbed_mean():
    torch.manual_seed(0)
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    seen = []
    decode_tokens = model.decode_tokens
    model.decode_tokens = lambda z, ids_restore=None: seen.append(z) or decode_tokens(z, ids_restore)
    with torch.no_grad():
        mean = model.encode(x).mean.flatten(2).transpose(1, 2)              # (B, N, C)
        model(x, 0.0, False)
        torch.manual_seed(1)
        model(x, 0.0, False, latent_noise=0.3)
        torch.manual_seed(1)
        expected = vmae.perturb_latents(mean, 0.3)
    assert torch.equal(seen[0], mean)
    assert torch.equal(seen[1], expected) and not torch.equal(seen[1], mean)


def tiny(out_dir, **overrides):
    """Three steps of VMAE-tiny."""
    return tiny_config(out_dir, **{**dict(max_steps=3, warmup_steps=1, log_every=1, ckpt_every=3), **overrides})


def stage3(out_dir, start, **overrides):
    """configs/vmae_small_stage3.py's objective on the tiny model."""
    objective = dict(init_from=start, mask_ratio=0.0, sample_posterior=False, visible_weight=1.0, mask_weight=0.0, kl_weight=0.0,
                     train_encoder=False)
    return tiny(out_dir, **{**objective, **overrides})


def test_the_stage3_variants_train_what_they_name(tmp_path):
    train_vmae.main(tiny(tmp_path / 's1'))
    start = str(tmp_path / 's1' / 'last.pt')
    runs = {'decoder': {}, 'authors': {'train_encoder': True}, 'noisy': {'latent_noise': 0.3}}
    for name, overrides in runs.items():
        train_vmae.main(stage3(tmp_path / name, start, **overrides))
    before = fileio.read_checkpoint(start)['model']
    after = {name: fileio.read_checkpoint(tmp_path / name / 'last.pt') for name in runs}
    encoder = ('patch_embed', 'blocks', 'norm.', 'to_latent')
    fixed = ('pos_embed', 'decoder_pos_embed')  # sin-cos tables, never trained
    for name, ckpt in after.items():
        for k, v in ckpt['model'].items():
            trained = not k.startswith(fixed) and (name == 'authors' or not k.startswith(encoder))
            assert torch.equal(before[k], v) != trained, (name, k)
    assert after['noisy']['config']['latent_noise'] == 0.3 and after['decoder']['config']['latent_noise'] == 0.0
    # the noise reached the decoder's training: from the same start and seed, its decoder learnt otherwise
    differs = [k for k in after['decoder']['model'] if not torch.equal(after['decoder']['model'][k], after['noisy']['model'][k])]
    assert differs and all(not k.startswith(encoder) for k in differs)
    # the encoders of decoder and noisy are stage 1's: one DiT serves both; the authors' variant has its own
    models = {name: vmae.load_vmae(str(tmp_path / name / 'last.pt')) for name in ('s1', *runs)}
    assert ablation.same_encoder(models['s1'], models['decoder']) and ablation.same_encoder(models['s1'], models['noisy'])
    assert not ablation.same_encoder(models['s1'], models['authors'])


def test_latent_noise_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match='--latent_noise must be at least 0'):
        train_vmae.check_config(tiny(tmp_path, latent_noise=-0.1))


@pytest.fixture(scope='module')
def tiny_vmae(tmp_path_factory):
    root = tmp_path_factory.mktemp('vmae')
    torch.manual_seed(0)
    torch.save(vmae.vmae_checkpoint(vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False)), root / 'last.pt')
    return str(root / 'last.pt')


def test_isotropic_noise_has_the_channels_energy_in_one_std(tiny_vmae, tmp_path, capsys):
    flags = ['smoothness', '--autoencoder', tiny_vmae, '--names', 'last', '--data', 'builtin', '--num_images', '8', '--eps', '0', '0.2', '--rfid', 'false',
             '--lpips', 'false', '--num_workers', '0', '--device', 'cpu']
    for noise in ('channel', 'isotropic'):
        paper_commands.main([*flags, '--noise', noise, '--out', str(tmp_path / f'{noise}.json')])
    channel, isotropic = (json.load(open(tmp_path / f'{n}.json')) for n in ('channel', 'isotropic'))
    assert isotropic['noise'] == 'isotropic' and channel['noise'] == 'channel'
    per_channel, one = (np.array(r['autoencoders']['last']['latent_std']) for r in (channel, isotropic))
    assert per_channel.std() > 0.05 * per_channel.mean()  # the random model's channels differ, so the test can tell
    np.testing.assert_allclose(one, np.full_like(per_channel, np.sqrt(np.mean(per_channel ** 2))), rtol=1e-6)
    curve = lambda r: r['autoencoders']['last']['eps']
    assert curve(channel)['0'] == curve(isotropic)['0'] and curve(channel)['0.2'] != curve(isotropic)['0.2']
    with pytest.raises(SystemExit) as e:
        paper_commands.main([*flags, '--noise', 'flat'])
    assert e.value.code == 2 and "--noise must be channel or isotropic, got 'flat'" in capsys.readouterr().err


SHORT = {  # each training cut to a few steps of a tiny model
    'train_vmae': ['--model', 'VMAE-tiny', '--max_steps', '3', '--warmup_steps', '1', '--batch_size', '8', '--micro_batch_size', '8',
                   '--num_workers', '0'],
    'paper.train_convae': ['--max_steps', '3', '--warmup_steps', '1', '--batch_size', '8', '--micro_batch_size', '8', '--num_workers', '0'],
    'train_dit': ['--max_steps', '3', '--batch_size', '8', '--micro_batch_size', '8', '--num_workers', '0', '--extract_batch_size', '500'],
}


def test_the_ablation_measures_every_variant(tmp_path, monkeypatch, capsys):
    """paper.ablation end to end on truncated trainings: every variant has its row, each number is the one its
    analysis wrote, and the two DiTs' samples are judged through the right decoders."""
    run_stage = common.run_stage
    monkeypatch.setattr(common, 'run_stage', lambda title, script, flags: run_stage(title, script, flags + SHORT[script.__name__]))
    monkeypatch.setattr(ablation, 'OUT', str(tmp_path))
    for name in ('NUM_SMOOTHNESS', 'NUM_SEGMENTED', 'NUM_SAMPLES'):
        monkeypatch.setattr(ablation, name, 20)
    monkeypatch.setattr(ablation, 'NUM_HELD_OUT', 2)
    monkeypatch.setattr(ablation, 'train_classifier', functools.partial(judges.train_classifier, steps=5))
    ablation.main()
    report = capsys.readouterr().out.split('== where the smoothness comes from')[1]
    summary = json.load(open(tmp_path / 'ablation.json'))
    rows = summary['variants']
    assert list(rows) == ablation.ORDER
    smoothness, isotropic, compression, judge = (json.load(open(tmp_path / f'{n}.json')) for n in ('smoothness', 'isotropic', 'compression', 'judge'))
    for name, row in rows.items():
        curve = smoothness['autoencoders'][name]['eps']
        assert row['psnr'] == {e: m['psnr'] for e, m in curve.items()} and row['ssim'] == {e: m['ssim'] for e, m in curve.items()}
        assert row['psnr_change'] == pytest.approx(np.mean([curve[e]['psnr'] - curve['0']['psnr'] for e in curve if e != '0']))
        flat = isotropic['autoencoders'][name]['eps']
        assert row['psnr_change_isotropic'] == pytest.approx(np.mean([flat[e]['psnr'] - flat['0']['psnr'] for e in flat if e != '0']))
        assert row['psnr_change_at_max'] == pytest.approx(curve['0.3']['psnr'] - curve['0']['psnr'])
        assert (row['sigma2'], row['rho']) == (compression['autoencoders'][name]['sigma2'], compression['autoencoders'][name]['rho'])
        assert row['reconstructions_recognised'] == judge['reconstructions'][name]
        assert name in report
    # samples: the shared DiT through stage1's, decoder's and noisy's decoders, the other through the authors'
    assert sorted(judge['samples']) == ['authors', 'decoder', 'noisy', 'stage1']
    assert [rows[n]['samples_recognised'] is None for n in ablation.ORDER] == [n not in judge['samples'] for n in ablation.ORDER]
    # one encoder, one latent space: the frozen variants' compression statistics are stage 1's exactly
    assert rows['decoder']['sigma2'] == rows['noisy']['sigma2'] == rows['stage1']['sigma2'] != rows['authors']['sigma2']
    assert rows['ae']['posterior_eps'] is None and all(rows[n]['posterior_eps'] > 0 for n in ablation.ORDER[:-1])
    lines = ablation.one_line_per_encoder({n: smoothness['autoencoders'][n]['latent_std'] for n in ablation.ORDER})
    assert list(lines) == ['stage1 = decoder = noisy', 'authors', 'no_mask_stage1 = no_mask', 'no_kl_stage1 = no_kl', 'ae']
    for figure in ('fig6.png', 'channels.png', 'smoothness.png', 'isotropic.png', 'compression.png'):
        assert os.path.getsize(tmp_path / figure) > 1000, figure
