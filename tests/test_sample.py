"""sample.py end to end on a tiny trained DiT: grids, ADM .npz, determinism, resume, errors.
Run: python -m pytest tests/test_sample.py"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import autoencoders
import data
import fileio
import paper.__main__ as paper_commands
import sample
import train_dit
import vmae
from paper import judges
from test_failures import scripts_at_once
from test_train_dit import config, make_images_and_vmae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A VMAE-tiny and a DiT-T/1 trained for 4 steps on 3 classes of 32-px images."""
    root = make_images_and_vmae(tmp_path_factory.mktemp('sample'), per_class=8)
    train_dit.main(config(root, root / 'dit', max_steps=4, ema_decay=0.5))
    return root


def run_sample(*flags):
    sample.main(sample.parse_args(list(flags)))


def grid(path):
    return np.asarray(Image.open(path))


def test_grid_is_deterministic_per_seed(trained, tmp_path, capsys):
    ckpt = str(trained / 'dit' / 'last.pt')
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        run_sample('--dit', ckpt, '--class', '0', '2', '--n', '3', '--steps', '4', '--seed', str(seed), '--out', str(tmp_path / f'{name}.png'))
    assert 'wrote' in capsys.readouterr().out
    assert np.array_equal(grid(tmp_path / 'a.png'), grid(tmp_path / 'b.png'))
    assert not np.array_equal(grid(tmp_path / 'a.png'), grid(tmp_path / 'c.png'))


def same_up_to_rounding(a, b):
    """uint8 images equal but where fp32 rounding tipped a pixel over a level: the CPU's matrix kernels
    sum in another order for another batch size (about 1e-5 on [-1, 1] images), so a rare pixel moves by one."""
    return np.abs(a.astype(int) - b.astype(int)).max() <= 1 and (a != b).mean() < 0.01


def test_fid_npz_is_exact_balanced_and_independent_of_batching(trained, tmp_path):
    ckpt = str(trained / 'dit' / 'last.pt')
    run_sample('--dit', ckpt, '--num_fid_samples', '10', '--batch_size', '4', '--steps', '3', '--out', str(tmp_path / 'a.npz'))
    run_sample('--dit', ckpt, '--num_fid_samples', '10', '--batch_size', '3', '--steps', '3', '--out', str(tmp_path / 'b.npz'))
    a, b = np.load(tmp_path / 'a.npz'), np.load(tmp_path / 'b.npz')
    assert a['arr_0'].shape == (10, 32, 32, 3) and a['arr_0'].dtype == np.uint8
    assert a['arr_1'].tolist() == [i % 3 for i in range(10)]
    assert same_up_to_rounding(a['arr_0'], b['arr_0'])
    assert not os.path.exists(tmp_path / 'a.npz.parts')
    # sample i's noise depends on (seed, i) only: generating sample 3 alone gives the npz's image 3
    args = sample.parse_args(['--dit', ckpt, '--steps', '3'])
    model, stats, vae, _ = sample.load_models(args, torch.device('cpu'))
    settings = sample.sampler_settings(args)
    alone = sample.generate(model, vae, stats, [0], [3], args.seed, settings)
    batch = sample.generate(model, vae, stats, [0, 1, 2, 0], [0, 1, 2, 3], args.seed, settings)
    torch.testing.assert_close(alone[0], batch[3], rtol=0, atol=1e-4)
    assert same_up_to_rounding(data.to_uint8(alone)[0].numpy(), a['arr_0'][3])


def test_two_gpus_worth_of_ranks_write_the_same_npz(trained, tmp_path):
    ckpt = str(trained / 'dit' / 'last.pt')
    flags = ['--dit', ckpt, '--num_fid_samples', '7', '--batch_size', '2', '--steps', '3', '--device', 'cpu']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    for name, launcher in (('one', []), ('two', ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'])):
        result = subprocess.run([sys.executable, *launcher, 'sample.py', *flags, '--out', str(tmp_path / f'{name}.npz')],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / 'one.npz')['arr_0'], np.load(tmp_path / 'two.npz')['arr_0'])


def test_authors_dit_with_their_latent_stats(trained, tmp_path):
    ours = fileio.read_checkpoint(str(trained / 'dit' / 'last.pt'))
    torch.save({'ema': ours['ema'], 'model': ours['model'], 'config': {'model': {'model_type': 'LightningDiT-T/1'}}}, tmp_path / 'theirs.pt')
    stats = ours['latent_stats']
    torch.save({'mean': stats['mean'].view(1, -1, 1, 1), 'std': stats['std'].view(1, -1, 1, 1)}, tmp_path / 'latents_stats.pt')
    with pytest.raises(ValueError, match='no latent statistics'):
        sample.load_models(sample.parse_args(['--dit', str(tmp_path / 'theirs.pt')]), 'cpu')
    with pytest.raises(ValueError, match='no autoencoder to decode with'):
        sample.load_models(sample.parse_args(['--dit', str(tmp_path / 'theirs.pt'), '--latent_stats', str(tmp_path / 'latents_stats.pt')]), 'cpu')
    run_sample('--dit', str(tmp_path / 'theirs.pt'), '--latent_stats', str(tmp_path / 'latents_stats.pt'), '--autoencoder', str(trained / 'vmae.pt'),
               '--class', '1', '--n', '2', '--steps', '3', '--out', str(tmp_path / 'theirs.png'))
    run_sample('--dit', str(trained / 'dit' / 'last.pt'), '--class', '1', '--n', '2', '--steps', '3', '--out', str(tmp_path / 'ours.png'))
    assert np.array_equal(grid(tmp_path / 'theirs.png')[:, -70:], grid(tmp_path / 'ours.png')[:, -70:])


def cli(*flags):
    return subprocess.run([sys.executable, 'sample.py', *flags], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_bad_input_is_one_clear_line(trained, tmp_path):
    ckpt = str(trained / 'dit' / 'last.pt')
    other = vmae.VMAE(img_size=32, embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=64, decoder_depth=1,
                      decoder_num_heads=2, latent_dim=8, mask_token=False)
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': other.args, 'model': other.state_dict()}, tmp_path / 'vmae8.pt')
    cases = [(['--dit', ckpt, '--class', '3'], 'class 3 is out of range: this DiT has 3 classes (0..2)'),
             (['--dit', ckpt], 'this DiT is class-conditional: pass --class'),
             (['--dit', str(tmp_path / 'missing.pt'), '--class', '0'], 'missing.pt not found: pass --dit'),
             (['--dit', str(trained / 'vmae.pt'), '--class', '0'], "found a checkpoint of kind 'vmae'"),
             (['--dit', ckpt, '--class', '0', '--autoencoder', str(tmp_path / 'vmae8.pt')], 'makes latents of shape (8, 4, 4)'),
             (['--dit', ckpt, '--class', '0', '--cfg_channels', '99'], "--cfg_channels 99 is more than the DiT's 16 latent channels"),
             (['--dit', ckpt, '--num_fid_samples', '4', '--out', str(tmp_path / 'x.png')], 'x.png must end in .npz'),
             (['--dit', ckpt, '--class', '0', '--out', str(tmp_path / 'grid')], 'grid must end in .png or .jpg or .jpeg'),
             (['--dit', ckpt, '--class', '0', '--out', str(tmp_path)], 'is a folder: give a file name inside it'),
             (['--dit', ckpt, '--class', '0', '--out', str(tmp_path / 'vmae8.pt' / 'x.png')], 'vmae8.pt is a file, not a folder')]
    results = scripts_at_once(*(['sample.py', *flags, '--steps', '2', *([] if '--out' in flags else ['--out', str(tmp_path / 'x.png')])]
                                for flags, _ in cases))
    for (flags, message), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_unconditional_dit_samples_without_guidance_by_default(trained, tmp_path):
    flat = tmp_path / 'flat'
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), i * 20, np.uint8)).save(flat / f'{i}.png')
    train_dit.main(config(trained, tmp_path / 'run', data=str(flat), latents=str(tmp_path / 'lat'), max_steps=2))
    ckpt = str(tmp_path / 'run' / 'last.pt')
    run_sample('--dit', ckpt, '--n', '2', '--steps', '3', '--out', str(tmp_path / 'u.png'))
    # two samples of the one class, unguided (scale 1), in one unlabelled row
    model, stats, vae = autoencoders.load_generator(ckpt)
    images = sample.generate(model, vae, stats, [0, 0], [0, 1], 0, dict(steps=3, cfg_scale=1.0))
    data.save_grid(images, str(tmp_path / 'expected.png'), ncol=2, upscale=4)
    assert np.abs(grid(tmp_path / 'u.png').astype(int) - grid(tmp_path / 'expected.png').astype(int)).max() <= 1
    result = cli('--dit', ckpt, '--cfg_scale', '4', '--steps', '2', '--out', str(tmp_path / 'x.png'))
    assert result.returncode == 2 and 'cannot be guided: use --cfg_scale 1' in result.stderr


def test_solver_study_cli(trained, tmp_path):
    out = tmp_path / 'solvers.json'
    paper_commands.main(['solvers', '--dit', str(trained / 'dit' / 'last.pt'), '--num_samples', '3', '--reference_steps', '30',
                   '--out', str(out)])
    result = json.loads(out.read_text())
    assert [(r['solver'], r['steps']) for r in result['rows']] == [('euler', n) for n in (10, 25, 50, 100, 250)] + \
        [('heun', n) for n in (5, 10, 25, 50, 60, 75, 100)]
    assert all(r['recognised'] is None for r in result['rows'])  # not the built-in classes: no shape check
    assert (tmp_path / 'solvers.png').stat().st_size > 0


def test_recognition_cli_judges_samples_against_held_out_real_images(trained, tmp_path, capsys, monkeypatch):
    kept, judged, train_judge = [], [], judges.train_classifier

    def kept_judge(*args, **kwargs):  # the judge kept for the checks below, with what it is shown; 200 steps (not 1000) learn brightness
        kept.append(train_judge(*args, **{**kwargs, 'steps': 200}))
        kept[-1].register_forward_pre_hook(lambda module, inputs: judged.append(inputs[0].detach().clone()))
        return kept[-1]
    monkeypatch.setattr(judges, 'train_classifier', kept_judge)
    held_out_folder = make_images_and_vmae(tmp_path / 'held_out', per_class=4, seed=1) / 'images'   # other images, same classes
    out = tmp_path / 'recognition.json'
    paper_commands.main(['recognition', '--dit', str(trained / 'dit' / 'last.pt'), '--data', str(trained / 'images'),
                   '--held_out', str(held_out_folder), '--num_samples', '6', '--steps', '3', '--out', str(out)])
    result = json.loads(out.read_text())
    assert result['classes'] == ['class0', 'class1', 'class2'] and len(result['samples']) == 3
    # the classes differ in brightness (c + 1 times darker), which a colour judge learns: it knows real images
    assert result['real_mean'] > 0.9
    # every rate is what the trained judge (kept here) says of the images made by hand: the held-out images'
    # reconstructions from their posterior means, and samples i = 0..5 of class i % 3 (noise seed 1, 3 steps)
    judge = kept[0]
    model, stats, vae = autoencoders.load_generator(str(trained / 'dit' / 'last.pt'))
    held_out = data.ImageFolder(str(held_out_folder), 32)
    x, y = torch.stack([held_out[i][0] for i in range(len(held_out))]), torch.tensor([held_out[i][1] for i in range(len(held_out))])
    labels = torch.arange(6) % 3
    with torch.no_grad():
        kinds = {'real': (x, y), 'reconstructions': (vae.decode(vae.encode(x).mean), y),
                 'samples': (sample.generate(model, vae, stats, labels, range(6), 1, dict(steps=3, cfg_scale=4.0)), labels)}
        shown = list(judged)
        for kind, (images, truth) in kinds.items():
            assert any(s.shape == images.shape and torch.allclose(s, images.clamp(-1, 1), atol=1e-5) for s in shown), kind
            hits = judge(images.clamp(-1, 1)).argmax(1) == truth
            assert result[kind] == pytest.approx([hits[truth == c].float().mean().item() for c in range(3)]), kind
            assert result[f'{kind}_mean'] == pytest.approx(sum(result[kind]) / 3), kind
    assert 'recognised as their class: samples' in capsys.readouterr().out


def test_recognition_cli_refuses_what_it_cannot_judge(trained, tmp_path, capsys):
    ckpt = str(trained / 'dit' / 'last.pt')
    other = tmp_path / 'other'
    for name in ('cats', 'dogs', 'owls'):
        (other / name).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(other / name / '0.png')
    for flags, message in ((['--data', str(trained / 'images')], 'needs --held_out'),
                           (['--data', str(trained / 'images'), '--held_out', str(other)], 'not those the DiT was trained on')):
        with pytest.raises(SystemExit):
            paper_commands.main(['recognition', '--dit', ckpt, *flags])
        assert message in capsys.readouterr().err
