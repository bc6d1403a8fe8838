"""Bad or odd input that used to exit 0 with wrong results or end in a traceback (issue 19): each is now
a one-line error before the work, or the right result. Run: python -m pytest tests/test_bad_input.py"""

import contextlib
import json
import os
import subprocess
import sys

import matplotlib.figure
import paper.__main__ as paper_commands
import numpy as np
import pytest
import torch
from PIL import Image

import data
import dit
import fileio
import train_vmae
import vmae
from paper import ablation, convae, figures, study
from test_convae import SD3_STYLE_CONFIG, write_vae_folder
from test_evaluate import cli_error
from test_figures import two_autoencoders  # noqa: F401 (a fixture: a random VMAE-tiny and ConvAE-tiny at 32 px)
from test_train_vmae import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def aes(two_autoencoders):  # noqa: F811
    return str(two_autoencoders / 'vmae' / 'last.pt'), str(two_autoencoders / 'conv' / 'last.pt')


def written(folder):
    """The JSON and PNG files in a folder."""
    return sorted(f for f in os.listdir(folder) if f.endswith(('.json', '.png')))

# -----------------------------------------------------------------------------
# exits 0 with wrong results

def test_names_given_twice_are_refused(aes, tmp_path, capsys):
    base = ['--autoencoder', *aes, '--names', 'x', 'x', '--data', 'builtin', '--device', 'cpu', '--out', str(tmp_path / 'o.json')]
    for command, extra in (('recon', []), ('smoothness', []), ('compression', ['--masks', 'builtin']), ('kmeans', []),
                           ('projection', ['--masks', 'builtin'])):
        assert "--names gives 'x' more than once" in cli_error(capsys, command, *base, *extra), command
    assert written(tmp_path) == []


def masked_folder(root, labels):
    """Two 32-px images with a label PNG each (`labels`: (32, 32) uint8)."""
    for sub in ('images', 'masks'):
        os.makedirs(root / sub)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / 'images' / f'{i}.png')
        Image.fromarray(labels).save(root / 'masks' / f'{i}.png')
    return ['--data', str(root / 'images'), '--masks', str(root / 'masks')]


def test_masks_that_label_nothing_usable_are_refused(aes, tmp_path, capsys):
    nothing = masked_folder(tmp_path / 'nothing', np.zeros((32, 32), np.uint8))
    one_segment = masked_folder(tmp_path / 'one', np.ones((32, 32), np.uint8))
    flags = ['--autoencoder', aes[0], '--device', 'cpu']
    for masks, message in ((nothing, 'label no segment of two or more latent tokens'), (one_segment, 'has two labelled segments')):
        for command in ('compression', 'projection'):
            assert message in cli_error(capsys, command, *flags, *masks, '--out', str(tmp_path / 'out.json')), command
    assert written(tmp_path) == []


def test_kmeans_refuses_more_clusters_than_tokens(aes, tmp_path, capsys):
    error = cli_error(capsys, 'kmeans', '--autoencoder', aes[0], '--data', 'builtin', '--ks', '2', '40', '--device', 'cpu',
                      '--out', str(tmp_path / 'k.json'))
    assert '--ks 40: an image has only 16 latent tokens at 32 px' in error
    assert written(tmp_path) == []


def test_smoothness_refuses_the_statistics_of_another_autoencoder(aes, tmp_path, capsys):
    vmae_file, conv_file = aes
    model = dit.DiT_models['DiT-T/1'](input_size=4, in_channels=16, num_classes=3)
    stats = {'mean': torch.zeros(16), 'std': torch.ones(16)}
    for name, trained_on in (('conv_dit.pt', conv_file), ('vmae_dit.pt', vmae_file)):
        torch.save(dit.dit_checkpoint(model, model, stats, config={'autoencoder': trained_on,
                                                                   'autoencoder_sha256': fileio.file_sha256(trained_on)}), tmp_path / name)
    flags = ['smoothness', '--autoencoder', vmae_file, '--data', 'builtin', '--num_images', '2', '--eps', '0', '0.1',
             '--rfid', 'false', '--lpips', 'false', '--num_workers', '0', '--device', 'cpu']
    error = cli_error(capsys, *flags, '--latent_stats', str(tmp_path / 'conv_dit.pt'), '--out', str(tmp_path / 'wrong.json'))
    assert f"describes the latents of {conv_file}, not of --autoencoder {vmae_file}" in error
    paper_commands.main([*flags, '--latent_stats', str(tmp_path / 'vmae_dit.pt'), '--out', str(tmp_path / 'right.json')])
    assert json.loads((tmp_path / 'right.json').read_text())['autoencoders']['vmae']['latent_std'] == [1.0] * 16


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_radar_refuses_smoothness_without_eps_0(tmp_path, capsys):
    recon = write_json(tmp_path / 'recon.json', {'autoencoders': {'a': {'psnr': 30.0}, 'b': {'psnr': 25.0}}})
    smooth = write_json(tmp_path / 'smooth.json', {'autoencoders': {n: {'eps': {'0.1': {'psnr': 20.0}, '0.2': {'psnr': 15.0}}}
                                                                    for n in 'ab'}})
    error = cli_error(capsys, 'radar', '--recon', recon, '--smoothness', smooth)
    assert "the smoothness results of 'a' have no eps = 0 (only 0.1, 0.2)" in error
    assert not (tmp_path / 'radar.json').exists()


def test_recognition_refuses_a_held_out_set_that_is_the_training_set(tmp_path, capsys):
    os.makedirs(tmp_path / 'shapes' / 'disc')
    missing = str(tmp_path / 'no_dit.pt')  # refused before the DiT is read
    for data_flag, held_out in ((str(tmp_path / 'shapes'), str(tmp_path / 'shapes') + '/./'), ('builtin', 'builtin')):
        error = cli_error(capsys, 'recognition', '--dit', missing, '--data', data_flag, '--held_out', held_out, '--device', 'cpu')
        assert f"--held_out {held_out} is the --data the judge trains on" in error


def test_study_and_demo_take_no_arguments(tmp_path, capsys):
    import demo
    for parse in (study.parse_args, demo.parse_args, ablation.parse_args):
        with pytest.raises(SystemExit) as e:
            parse(['--bogus'])
        assert e.value.code == 2 and 'unrecognized arguments: --bogus' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        study.parse_args(['--help'])
    assert e.value.code == 0 and "The paper's comparison of autoencoders" in capsys.readouterr().out
    # and on the command line, elsewhere than the repository: a run that started anyway would stop at once (no configs/)
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'demo.py'), '--bogus'], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 2 and 'unrecognized arguments: --bogus' in result.stderr, result.stderr


# -----------------------------------------------------------------------------
# tracebacks left

def test_radar_names_the_json_of_another_command(tmp_path, capsys):
    recon = write_json(tmp_path / 'recon.json', {'autoencoders': {'a': {'psnr': 30.0}}})
    smooth = write_json(tmp_path / 'smooth.json', {'autoencoders': {'a': {'eps': {'0': {'psnr': 30.0}}}}})
    kmeans = write_json(tmp_path / 'kmeans.json', {'autoencoders': {'a': [[[0, 1]]]}})
    for flags, message in (
            (['--recon', smooth], f"'{smooth}' is not what evaluate.py recon writes ('a' has no 'psnr')"),
            (['--recon', recon, '--smoothness', recon], f"'{recon}' is not what python -m paper smoothness writes ('a' has no 'eps')"),
            (['--recon', recon, '--compression', kmeans], f"'{kmeans}' is not what python -m paper compression writes ('a' has no 'sigma2')")):
        assert message in cli_error(capsys, 'radar', *flags), flags


def test_train_vmae_refuses_weights_of_another_shape_before_the_data_scan(tmp_path, monkeypatch):
    run = tmp_path / 'tiny'
    train_vmae.main(tiny_config(run, stop_epoch=2 / 625))

    def scan(*args, **kwargs):
        raise AssertionError('the data were scanned before the weights were checked')
    monkeypatch.setattr(train_vmae.data, 'build_dataset', scan)
    with pytest.raises(ValueError, match=rf"--init_from {run / 'last.pt'} holds weights of another shape than --model VMAE-small"):
        train_vmae.main(tiny_config(tmp_path / 'small', model='VMAE-small', init_from=str(run / 'last.pt')))
    with pytest.raises(ValueError, match=rf"--resume: {run / 'last.pt'} holds weights of another shape than --model VMAE-small"):
        train_vmae.main(tiny_config(run, model='VMAE-small', resume=True))


def test_output_paths_that_cannot_be_written_are_refused_before_the_work(aes, tmp_path, capsys, monkeypatch):
    (tmp_path / 'folder.json').mkdir()
    (tmp_path / 'plot.png').mkdir()
    (tmp_path / 'a_file').write_text('')
    flags = ['--autoencoder', *aes, '--data', 'builtin', '--num_images', '2', '--device', 'cpu']
    offline = ['--rfid', 'false', '--lpips', 'false', '--num_workers', '0']
    assert f"--out {tmp_path / 'folder.json'} is a folder" in cli_error(capsys, 'recon', *flags, *offline, '--out', str(tmp_path / 'folder.json'))
    assert f"the plot {tmp_path / 'plot.png'} (beside {tmp_path / 'plot.json'}) is a folder" in \
        cli_error(capsys, 'smoothness', *flags, *offline, '--out', str(tmp_path / 'plot.json'))
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in \
        cli_error(capsys, 'kmeans', *flags, '--out', str(tmp_path / 'a_file' / 'k.json'))
    monkeypatch.chdir(tmp_path)
    os.rename('a_file', 'analysis')  # the default output of several autoencoders is analysis/<command>.json
    assert 'analysis/compression.json cannot be written: ' in cli_error(capsys, 'compression', *flags, '--masks', 'builtin')
    with pytest.raises(ValueError, match='is a file, not a folder'):
        train_vmae.main(tiny_config(tmp_path / 'analysis'))
    with pytest.raises(ValueError, match='cannot be made'):
        train_vmae.main(tiny_config(tmp_path / 'analysis' / 'run'))


def test_kmeans_refuses_autoencoders_of_different_patch_sizes(aes, tmp_path, capsys):
    coarse = vmae.VMAE(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=64, decoder_depth=1,
                       decoder_num_heads=2, mask_token=False)
    torch.save(vmae.vmae_checkpoint(coarse), tmp_path / 'coarse.pt')
    error = cli_error(capsys, 'kmeans', '--autoencoder', aes[0], str(tmp_path / 'coarse.pt'), '--data', 'builtin', '--device', 'cpu',
                      '--out', str(tmp_path / 'k.json'))
    assert 'the autoencoders downsample by different factors [8, 16]' in error
    assert written(tmp_path) == []


def test_a_mistyped_command_names_the_commands(capsys):
    error = cli_error(capsys, 'kmean', '--autoencoder', 'x.pt', '--data', 'builtin')
    assert error == f"error: unknown command 'kmean': choose one of {', '.join(paper_commands.COMMANDS)}"


@pytest.mark.parametrize('field, value', [('block_out_channels', '128'), ('block_out_channels', [32, 'x']), ('norm_num_groups', '8'),
                                          ('layers_per_block', 1.5), ('down_block_types', 3)])
def test_malformed_vae_config_fields_are_named(tmp_path, field, value):
    write_vae_folder(tmp_path / 'vae', {**SD3_STYLE_CONFIG, field: value})
    with pytest.raises(ValueError) as e:
        convae.load_convae(str(tmp_path / 'vae'))
    assert f"config.json': {field} must be" in str(e.value) and '\n' not in str(e.value)


def interrupted_save(self, fp, *args, **kwargs):
    """A PNG writer that dies half way: a disk full or a killed process."""
    with open(fp, 'wb') if isinstance(fp, (str, os.PathLike)) else contextlib.nullcontext(fp) as f:
        f.write(b'half a PNG')
    raise OSError('disk full')


def test_png_grids_and_plots_are_written_atomically(tmp_path, monkeypatch):
    grid, plot = tmp_path / 'grid.png', tmp_path / 'plot.png'
    data.save_grid(torch.zeros(2, 3, 8, 8), str(grid), ncol=2)
    figures.plot_compression({'a': {'sigma2': 0.1, 'rho': 1.2}, 'pixel': {'sigma2': 0.3, 'rho': 1.1}}, str(plot))
    before = grid.read_bytes(), plot.read_bytes()
    assert all(b.startswith(b'\x89PNG') for b in before)
    monkeypatch.setattr(Image.Image, 'save', interrupted_save)
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', interrupted_save)
    with pytest.raises(OSError, match='disk full'):
        data.save_grid(torch.ones(2, 3, 8, 8), str(grid), ncol=2)
    with pytest.raises(OSError, match='disk full'):
        figures.plot_compression({'b': {'sigma2': 0.2, 'rho': 1.0}}, str(plot))
    assert (grid.read_bytes(), plot.read_bytes()) == before  # the last complete files, and no temporary files left
    assert sorted(os.listdir(tmp_path)) == ['grid.png', 'plot.png']
