"""
The paper's analysis framework for several autoencoders at once (Table 1, Figs. 2, 4, 6, 7, 8): the
built-in shapes' exact masks, k-means, the 2-D projection, the radar's scores, and every command end to
end on a VMAE and a convolutional autoencoder. CPU only, small. Run: python -m pytest tests/test_figures.py
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import metrics
import paper.__main__ as paper_commands
import vmae
from paper import analyses, convae, study


def test_builtin_masks_are_the_drawn_shapes():
    dataset = data.BuiltinShapes(32, split='val')
    for index in (0, 3, 8):  # a disc, a ring, the full-image checker texture
        image, labels = dataset.image_and_mask(index)
        assert torch.equal(data.to_tensor(image), dataset[index][0]) and labels.shape == (32, 32)
        assert set(np.unique(labels)) == {1, 2}
        pixels = np.asarray(image, dtype=float)
        # the shape's colour sits where the mask says shape: far from the background's mean colour
        distance = np.linalg.norm(pixels - pixels[labels == 1].mean(0), axis=-1)
        assert np.median(distance[labels == 2]) > 3 * np.median(distance[labels == 1])
    pairs = list(analyses.builtin_masked_images(32, num_images=5))
    assert len(pairs) == 5 and pairs[0][1].mode == 'P'


def test_kmeans_finds_separated_blobs_and_numbers_them_by_size():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10, size=(3, 4))
    sizes = [5, 20, 11]
    x = np.concatenate([c + rng.normal(size=(n, 4)) for c, n in zip(centres, sizes)])
    clusters = analyses.kmeans(x, 3, seed=1).numpy()
    truth = np.repeat([2, 0, 1], sizes)  # the largest blob is cluster 0, the smallest 2
    assert np.array_equal(clusters, truth)
    assert np.array_equal(analyses.kmeans(x, 3, seed=1).numpy(), clusters)  # seeded
    assert set(analyses.kmeans(x, 1).tolist()) == {0}


def test_projection_keeps_the_two_widest_directions():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(200, 2)) * [5.0, 2.0]
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0][:2]
    xy = analyses.project_2d(plane @ basis + 0.01 * rng.normal(size=(200, 6)) + 3).numpy()
    assert xy.shape == (200, 2) and abs(xy.mean(0)).max() < 1e-9
    assert xy[:, 0].std() == pytest.approx(plane[:, 0].std(), rel=0.05)
    assert xy[:, 1].std() == pytest.approx(plane[:, 1].std(), rel=0.05)


def test_radar_scores_by_hand():
    recon = {'autoencoders': {'a': {'psnr': 30.0, 'lpips': 0.1}, 'b': {'psnr': 25.0, 'lpips': 0.3}}}
    smooth = {'autoencoders': {'a': {'eps': {'0': {'psnr': 30.0}, '0.1': {'psnr': 20.0}, '0.2': {'psnr': 10.0}}},
                               'b': {'eps': {'0': {'psnr': 25.0}, '0.1': {'psnr': 24.0}, '0.2': {'psnr': 23.0}}}}}
    compression = {'autoencoders': {'a': {'sigma2': 0.2, 'rho': 1.5}, 'b': {'sigma2': 0.1, 'rho': 1.0}}}
    scores = analyses.radar_scores(recon, smooth, compression, {'a': {'FID': 5.0}, 'b': {'FID': 9.0}})
    assert scores == {'smoothness': {'a': -15.0, 'b': -1.5}, 'compression': {'a': pytest.approx(1.3), 'b': pytest.approx(0.9)},
                      'PSNR': {'a': 30.0, 'b': 25.0}, 'LPIPS': {'a': -0.1, 'b': -0.3}, 'gFID': {'a': -5.0, 'b': -9.0}}
    scaled = analyses.rescale({**scores, 'flat': {'a': 1.0, 'b': 1.0}})
    assert scaled['smoothness'] == {'a': 0.2, 'b': 1.0} and scaled['PSNR'] == {'a': 1.0, 'b': 0.2} and scaled['flat'] == {'a': 1.0, 'b': 1.0}
    with pytest.raises(ValueError, match=r"the compression results have no \['b'\]"):
        analyses.radar_scores(recon, compression={'autoencoders': {'a': {'sigma2': 0.2, 'rho': 1.5}}})


@pytest.fixture(scope='module')
def two_autoencoders(tmp_path_factory):
    """A random VMAE-tiny and ConvAE-tiny for 32 px, saved as their trainers save them."""
    root = tmp_path_factory.mktemp('aes')
    torch.manual_seed(0)
    for name, model, save in (('vmae', vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False), vmae.vmae_checkpoint),
                              ('conv', convae.ConvAE_models['ConvAE-tiny'](img_size=32), convae.convae_checkpoint)):
        (root / name).mkdir()
        torch.save(save(model), root / name / 'last.pt')
    return root


def test_every_figure_for_two_autoencoders(two_autoencoders, tmp_path, capsys):
    aes = [str(two_autoencoders / 'vmae' / 'last.pt'), str(two_autoencoders / 'conv' / 'last.pt')]
    common = ['--autoencoder', *aes, '--data', 'builtin', '--num_images', '8', '--device', 'cpu']
    offline = ['--rfid', 'false', '--lpips', 'false', '--num_workers', '0']
    out = lambda name: str(tmp_path / f'{name}.json')
    evaluate.main(['recon', *common, *offline, '--out', out('recon')])
    table = capsys.readouterr().out
    assert 'vmae' in table and 'conv' in table and '9x9 thumbnail' in table
    recon = json.load(open(out('recon')))['autoencoders']
    assert list(recon) == ['vmae', 'conv']
    models = {'vmae': vmae.load_vmae(aes[0]), 'conv': convae.load_convae(aes[1])}
    val = data.BuiltinShapes(32, split='val')
    x = torch.stack([val[i][0] for i in range(8)])
    with torch.no_grad():
        for name, model in models.items():  # each from its posterior means, on the first 8 held-out images
            reconstructed = data.to_uint8(model.decode(model.encode(x).mean)).numpy()
            assert recon[name]['psnr'] == pytest.approx(metrics.psnr_per_image(reconstructed, data.to_uint8(x).numpy()).mean(), rel=1e-6), name
    paper_commands.main(['smoothness', *common, *offline, '--eps', '0', '0.5', '--out', out('smoothness')])
    smooth = json.load(open(out('smoothness')))['autoencoders']
    assert 'posterior samples' in smooth['vmae']['latent_std_source'] and 'posterior means' in smooth['conv']['latent_std_source']
    paper_commands.main(['compression', *common, '--masks', 'builtin', '--out', out('compression')])
    compression = json.load(open(out('compression')))
    assert compression['n_images'] == 8 and set(compression['autoencoders']) == {'vmae', 'conv'}
    # sigma^2 and rho of the tokens (posterior means, row-major) and of the raw 8x8 pixel patches, each token labelled
    # by the majority of the exact mask under it (1 background, 2 the shape)
    labels = [analyses.patch_labels(val.image_and_mask(i)[1], 8) for i in range(8)]
    with torch.no_grad():
        tokens = {name: [t.T.numpy() for t in model.encode(x).mean.flatten(2)] for name, model in models.items()}
    tokens['pixel'] = list(vmae.patchify((x + 1) / 2, 8).numpy())
    for name, features in tokens.items():
        expected = analyses.compression_statistics(features, labels)
        row = compression['pixel'] if name == 'pixel' else compression['autoencoders'][name]
        assert [row[k] for k in ('sigma2', 'rho', 'n_rho')] == pytest.approx([expected[k] for k in ('sigma2', 'rho', 'n_rho')], rel=1e-4), name
    assert compression['pixel']['rho'] > 1  # raw pixels tell a shape from its background
    paper_commands.main(['kmeans', *common, '--images', '0', '5', '--ks', '2', '4', '--out', out('kmeans')])
    maps = json.load(open(out('kmeans')))['autoencoders']
    assert [len(maps['conv']), len(maps['conv'][0]), len(maps['conv'][0][1])] == [2, 2, 16] and max(maps['vmae'][1][1]) <= 3
    paper_commands.main(['projection', *common, '--masks', 'builtin', '--image', '2', '--out', out('projection')])
    panel = json.load(open(out('projection')))['autoencoders']['conv']
    assert len(panel['xy']) == len(panel['labels']) == 16 and panel['sigma2'] == pytest.approx(compression['autoencoders']['conv']['sigma2'])
    paper_commands.main(['radar', '--recon', out('recon'), '--smoothness', out('smoothness'), '--compression', out('compression')])
    radar = json.load(open(tmp_path / 'radar.json'))
    assert list(radar['scores']) == ['smoothness', 'compression', 'PSNR']  # no perceptual axis: rFID and LPIPS were skipped
    assert sorted(radar['rescaled']['PSNR'].values()) == [0.2, 1.0]
    for name in ('smoothness', 'compression', 'kmeans', 'projection', 'radar'):
        assert Image.open(tmp_path / f'{name}.png').size[0] > 100, name


def test_figure_inputs_fail_in_one_line(two_autoencoders, tmp_path, capsys):
    vmae_file = str(two_autoencoders / 'vmae' / 'last.pt')
    (tmp_path / 'fid.json').write_text(json.dumps({'FID': 3.0}))
    (tmp_path / 'notes.json').write_text('not json')
    for argv, message in [
        (['kmeans', '--autoencoder', vmae_file, '--data', 'builtin', '--images', '100000'], 'indices go up to 9999'),
        (['compression', '--autoencoder', vmae_file, '--data', str(tmp_path), '--masks', 'builtin'], '--data builtin --masks builtin together'),
        (['recon', '--autoencoder', vmae_file, vmae_file, '--names', 'a', '--data', 'builtin'], '--names gives 1 names for 2'),
        (['smoothness', '--autoencoder', vmae_file, vmae_file, '--data', 'builtin', '--latent_stats', 'x.pt'], 'belongs to one autoencoder'),
        (['kmeans', '--autoencoder', vmae_file, '--data', 'builtin', '--ks', '0'], '--ks needs one or more values, each at least 1'),
        (['radar', '--recon', str(tmp_path / 'none.json')], 'none.json'),
        (['radar'], 'python -m paper radar needs --recon'),
        (['radar', '--recon', str(tmp_path / 'fid.json')], "is not what evaluate.py recon writes (no 'autoencoders')"),
        (['radar', '--recon', str(tmp_path / 'notes.json')], 'is not a JSON file'),
    ]:
        with pytest.raises(SystemExit) as e:
            run = evaluate.main if argv[0] == 'recon' else paper_commands.main
            run([*argv, '--device', 'cpu'] if argv[0] != 'radar' else argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)


def test_the_study_wires_every_figure_and_states_the_orderings(two_autoencoders, tmp_path, monkeypatch, capsys):
    """study.py with its five trainings replaced by random tiny models and few images: every figure is
    written and each of the paper's orderings is reported as holding or not."""
    ckpts = {'vmae': str(two_autoencoders / 'vmae' / 'last.pt'), **{n: str(two_autoencoders / 'conv' / 'last.pt') for n in study.BASELINES}}
    monkeypatch.setattr(study, 'train_all', lambda: ckpts)
    monkeypatch.setattr(study, 'OUT', str(tmp_path))
    for name in ('NUM_HELD_OUT', 'NUM_SMOOTHNESS', 'NUM_SEGMENTED'):
        monkeypatch.setattr(study, name, 10)
    study.main()
    report = capsys.readouterr().out.split('== the five autoencoders')[1]
    assert all(f'\n{name} ' in report for name in ckpts)
    verdicts = [line for line in report.splitlines() if line.strip().startswith(('holds:', 'does not hold:'))]
    assert len(verdicts) == 9
    # each analysis ran on the five: its JSON (and the figure beside it) holds them, and the report's table and
    # verdicts are those of the JSONs
    results = {name: json.load(open(tmp_path / f'{name}.json')) for name in ('recon', 'smoothness', 'compression', 'projection', 'kmeans', 'radar')}
    for name in ('recon', 'smoothness', 'compression', 'projection', 'kmeans'):
        assert list(results[name]['autoencoders']) == list(ckpts), name
    assert list(results['radar']['scores']['PSNR']) == list(ckpts)
    for name in ('smoothness', 'compression', 'projection', 'kmeans', 'radar'):
        assert Image.open(tmp_path / f'{name}.png').size[0] > 100, name
    rows = results['recon']['autoencoders']
    for name, r in rows.items():
        c = results['compression']['autoencoders'][name]
        assert f"{name:8}{r['psnr']:8.2f}{r['ssim']:8.3f}{results['radar']['scores']['smoothness'][name]:9.2f}{c['sigma2']:9.3f}{c['rho']:7.3f}" in report
    expected = study.paper_orderings(rows, results['smoothness'], results['compression'], results['radar'])
    assert [line.split(':', 1)[0].strip() for line in verdicts] == ['holds' if holds else 'does not hold' for _, holds in expected]
