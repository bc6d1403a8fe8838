"""The convolutional baselines (AE, DAE, VAE, SD-VAE) in paper/train_convae.py, and a convolutional autoencoder
through every later stage: latent extraction and DiT training, sample.py, evaluate.py recon.
Run: python -m pytest tests/test_train_baselines.py"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import autoencoders
import common
import data
import dit
import evaluate
import fileio
import metrics
import sample
import train_dit
import train_vmae
from paper import convae, train_convae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model', 'ConvAE-tiny', '--batch_size', '8', '--micro_batch_size', '4', '--num_workers', '0', '--device', 'cpu',
        '--log_every', '1', '--ckpt_every', '3', '--image_every', '1000', '--warmup_steps', '0']


def baseline(name, out_dir, *flags):
    """paper/configs/<name>_small.py on ConvAE-tiny, with a short schedule."""
    return common.parse_config(train_convae.Config, [os.path.join(ROOT, 'paper', 'configs', f'{name}_small.py'), *TINY,
                                                   '--out_dir', str(out_dir), *flags])


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl')) if '"loss"' in line]


def checkpoint(out_dir):
    return fileio.read_checkpoint(os.path.join(out_dir, 'last.pt'))


@pytest.mark.parametrize('name, terms', [('ae', {'rec'}), ('dae', {'rec'}), ('vae', {'rec', 'kl'}),
                                         ('sdvae', {'rec', 'kl', 'g_loss', 'd_weight', 'd_loss'})])
def test_each_baseline_config_trains_its_objective(tmp_path, name, terms):
    train_convae.main(baseline(name, tmp_path, '--max_steps', '4', '--disc_start', '2'))
    rows = log_rows(tmp_path)
    assert terms <= set(rows[-1]) and not {'mse_masked', 'mse_visible'} & set(rows[-1]), rows[-1]
    ckpt = checkpoint(tmp_path)
    assert ckpt['kind'] == 'convae' and ckpt['step'] == 4 and ('discriminator' in ckpt) == (name == 'sdvae')
    if name == 'sdvae':
        assert [r['d_loss'] > 0 for r in rows] == [False, False, True, True]   # the discriminator learns from step 2 on
    assert convae.load_convae(str(tmp_path / 'last.pt')).grid == 4


def test_a_tiny_ae_learns(tmp_path):
    train_convae.main(baseline('ae', tmp_path, '--max_steps', '60', '--ckpt_every', '60', '--blr', '0.05'))
    curve = [r['loss'] for r in log_rows(tmp_path)]
    assert len(curve) == 60 and sum(curve[-5:]) < 0.5 * sum(curve[:5]), curve


def test_sdvae_resumes_exactly_with_its_discriminator(tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more: autoencoder, discriminator (BatchNorm statistics
    included) and both optimizers, with the discriminator on from step 2."""
    train_convae.main(baseline('sdvae', tmp_path / 'straight', '--max_steps', '6', '--disc_start', '2'))
    train_convae.main(baseline('sdvae', tmp_path / 'split', '--max_steps', '6', '--disc_start', '2', '--stop_epoch', str(3 / 1250)))
    assert checkpoint(tmp_path / 'split')['step'] == 3
    train_convae.main(baseline('sdvae', tmp_path / 'split', '--max_steps', '6', '--disc_start', '2', '--resume'))
    a, b = checkpoint(tmp_path / 'straight'), checkpoint(tmp_path / 'split')
    for key in ('model', 'discriminator'):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert torch.equal(a['disc_optimizer']['state'][0]['exp_avg'], b['disc_optimizer']['state'][0]['exp_avg'])
    assert log_rows(tmp_path / 'straight')[-1]['loss'] == log_rows(tmp_path / 'split')[-1]['loss']


def test_two_process_ddp_with_the_discriminator_matches_one_process(tmp_path):
    """2 ranks x 2 micro-batches == 1 rank x 4 micro-batches, one image each, for SD-VAE with its discriminator
    on from step 1: the adaptive weight's gradients under DDP, D's own DDP wrapper and its frozen generator-side
    calls. One image per micro-batch, because D's BatchNorm normalises over the micro-batch, which the split
    into ranks would otherwise change. Posterior means decoded, so nothing random; squared error, whose gradient
    is smooth (L1's sign flips with rounding, and Adam turns that into whole steps). The attention key biases are
    not compared: their gradient is zero (softmax ignores a shift of every score), so Adam amplifies rounding."""
    def train(out_dir, *launcher):
        flags = [os.path.join(ROOT, 'paper', 'configs', 'sdvae_small.py'), *TINY, '--batch_size', '4', '--micro_batch_size', '1', '--max_steps', '3',
                 '--disc_start', '1', '--sample_posterior', 'false', '--pixel_loss', 'mse', '--out_dir', str(out_dir)]
        result = subprocess.run([sys.executable, *launcher, '-m', 'paper.train_convae', *flags], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert result.returncode == 0, result.stderr
        return checkpoint(out_dir)
    one = train(tmp_path / 'one')
    two = train(tmp_path / 'two', '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
    worst = max((one['model'][k] - two['model'][k]).abs().max().item() for k in one['model'] if not k.endswith('to_k.bias'))
    assert worst < 1e-5, worst
    # D's weights: Adam moves every element by about lr on its first steps whatever the size of its gradient, so
    # rounding decides the direction where a gradient is ~0; the losses that D's weights produce are compared
    # (relative to their size, or to 1e-5 for g_loss, which sits near 0)
    for a, b in zip(log_rows(tmp_path / 'one'), log_rows(tmp_path / 'two'), strict=True):
        assert [a[k] for k in ('loss', 'g_loss', 'd_weight', 'd_loss')] == pytest.approx([b[k] for k in ('loss', 'g_loss', 'd_weight', 'd_loss')], rel=1e-4, abs=1e-5)
    assert log_rows(tmp_path / 'one')[-1]['d_loss'] > 0


def test_the_discriminator_waits_for_disc_start(tmp_path):
    train_convae.main(baseline('sdvae', tmp_path, '--max_steps', '5', '--disc_start', '3', '--ckpt_every', '3', '--stop_epoch', str(3 / 1250)))
    before = checkpoint(tmp_path)
    assert before['disc_optimizer']['state'] == {}                                          # never stepped
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in before['discriminator'].items() if k.endswith('running_mean'))
    train_convae.main(baseline('sdvae', tmp_path, '--max_steps', '5', '--disc_start', '3', '--resume'))
    after = checkpoint(tmp_path)
    assert after['disc_optimizer']['state'][0]['step'].item() == 2                          # steps 3 and 4
    assert not torch.equal(after['discriminator']['main.0.weight'], before['discriminator']['main.0.weight'])


def test_resume_refuses_a_run_of_the_other_family(tmp_path):
    train_convae.main(baseline('ae', tmp_path, '--max_steps', '1'))
    with pytest.raises(ValueError, match="is not a train_vmae.py run's checkpoint"):
        train_vmae.main(common.parse_config(train_vmae.Config, ['--model', 'VMAE-tiny', '--out_dir', str(tmp_path), '--resume']))


def test_a_convolutional_autoencoder_through_every_stage(tmp_path, capsys):
    """train_convae (a VAE) -> train_dit (latents from the posterior mean) -> sample.py grid -> evaluate.py recon."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / 'images' / f'class{c}').mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) // (c + 1)).save(tmp_path / 'images' / f'class{c}' / f'{i}.png')
    train_convae.main(baseline('vae', tmp_path / 'ae', '--max_steps', '2', '--data', str(tmp_path / 'images')))
    ae = str(tmp_path / 'ae' / 'last.pt')
    train_dit.main(common.parse_config(train_dit.Config, [
        '--data', str(tmp_path / 'images'), '--image_size', '32', '--autoencoder', ae, '--out_dir', str(tmp_path / 'dit'),
        '--model', 'DiT-T/1', '--batch_size', '8', '--micro_batch_size', '8', '--max_steps', '2', '--dtype', 'fp32',
        '--num_workers', '0', '--device', 'cpu', '--sample_steps', '3', '--extract_batch_size', '8']))
    meta = json.load(open(tmp_path / 'dit' / 'latents' / 'meta.json'))
    assert meta['posterior'] == 'mode' and meta['shape'] == [2, 32, 4, 4]  # the authors' choice for convolutional models
    dit_ckpt = checkpoint(tmp_path / 'dit')
    assert dit_ckpt['config']['autoencoder'] == os.path.abspath(ae) and dit_ckpt['config']['posterior'] == 'mode'
    grid = tmp_path / 'grid.png'
    sample.main(sample.parse_args(['--dit', str(tmp_path / 'dit' / 'last.pt'), '--class', '0', '1', '--n', '2', '--steps', '3',
                                   '--out', str(grid), '--device', 'cpu']))
    # the grid: 2 samples of each class from the DiT (guidance 4), de-standardised, decoded by the convolutional decoder
    model, stats, vae = autoencoders.load_generator(str(tmp_path / 'dit' / 'last.pt'))
    assert isinstance(vae, convae.ConvAE)
    with torch.no_grad():
        latents = dit.flow_sample(model, common.seeded_noise(0, range(4), (16, 4, 4)), torch.tensor([0, 0, 1, 1]), steps=3, cfg_scale=4.0)
        images = vae.decode(latents * stats['std'].view(1, -1, 1, 1) + stats['mean'].view(1, -1, 1, 1))
    data.save_grid(images, str(tmp_path / 'expected.png'), ncol=2, row_labels=['class0', 'class1'], upscale=4)
    written, expected = (np.asarray(Image.open(p)).astype(int) for p in (grid, tmp_path / 'expected.png'))
    assert written.shape == expected.shape and np.abs(written - expected).max() <= 1
    evaluate.main(['recon', '--autoencoder', ae, '--data', str(tmp_path / 'images'), '--rfid', 'false', '--lpips', 'false', '--num_workers', '0',
                   '--device', 'cpu'])
    assert 'ConvAE' in capsys.readouterr().out
    results = json.load(open(ae + '.recon.json'))
    assert results['n_images'] == 16 and list(results['autoencoders']) == ['ae']
    assert results['autoencoders']['ae']['latent_numbers'] == 256
    # PSNR and SSIM of the 16 centre-cropped images against their reconstructions from the posterior means
    folder = data.ImageFolder(str(tmp_path / 'images'), 32)
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).mean)
    originals, reconstructions = data.to_uint8(x).numpy(), data.to_uint8(recon).numpy()
    assert results['autoencoders']['ae']['psnr'] == pytest.approx(metrics.psnr_per_image(reconstructions, originals).mean(), rel=1e-6)
    assert results['autoencoders']['ae']['ssim'] == pytest.approx(metrics.ssim_per_image(reconstructions, originals).mean(), rel=1e-6)
