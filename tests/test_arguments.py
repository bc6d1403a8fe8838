"""Bad numbers, names and sizes are refused with one clear line before any work, by every script; the
defaults and the shipped configs pass. Nothing here trains or loads a model: seconds, most of them the
start-up of the five command-line runs.
Run: python -m pytest tests/test_arguments.py"""

import dataclasses
import glob
import os
import subprocess
import sys

import pytest
import torch

import bench
import common
import evaluate
import paper.__main__ as paper_commands
import sample
import train_dit
import train_vmae
from paper import train_convae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Reached(Exception):
    """Raised where the scripts' work begins: the checks let the settings through."""


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    def reached(*args, **kwargs):
        raise Reached
    monkeypatch.setattr(common, 'setup_distributed', reached)  # train_vmae, train_dit, sample, evaluate
    monkeypatch.setattr(bench, 'yardstick', reached)           # bench's first timing


def refused(run, message):
    with pytest.raises(ValueError) as e:
        run()
    assert str(e.value) == message

# -----------------------------------------------------------------------------
# the configurator

@dataclasses.dataclass
class Settings:
    steps: int = 250           # time-grid points
    eps: tuple[float, ...] = (0.0, 0.1)
    cfg_scale: float | None = None
    compile: bool = False
    name: str = 'x'


def test_one_flag_per_field_with_its_comment_as_help(tmp_path, capsys):
    (tmp_path / 'a.py').write_text("steps = 10\neps = [0.5]\ncfg_scale = 2\n")
    cfg = common.parse_config(Settings, [str(tmp_path / 'a.py'), '--steps', '20', '--compile', '--eps', '0', '0.2'])
    assert cfg == Settings(steps=20, eps=(0.0, 0.2), cfg_scale=2.0, compile=True)       # defaults <- file <- flags
    assert common.parse_config(Settings, ['--compile', 'false']).compile is False
    for wrong in (['--no_compile'], ['--cfg-scale', '2'], ['--compile', 'yes']):       # one spelling; true or false
        with pytest.raises(SystemExit):
            common.parse_config(Settings, wrong)
    with pytest.raises(SystemExit):
        common.parse_config(Settings, ['--help'])
    assert 'time-grid points (default: 250)' in capsys.readouterr().out


def test_config_files_are_parsed_never_run(tmp_path, capsys):
    for text, message in (("import os\n", 'only `name = value` lines'), ("steps = 'ten'\n", "'steps' must be int"),
                          ("stpes = 10\n", "unknown setting 'stpes'"), ("steps = len('ab')\n", 'must be a literal')):
        (tmp_path / 'c.py').write_text(text)
        with pytest.raises(SystemExit):
            common.parse_config(Settings, [str(tmp_path / 'c.py')])
        assert message in capsys.readouterr().err


def test_check_device():
    common.check_device('cpu')
    refused(lambda: common.check_device('gpu'), "--device must be auto, cpu, cuda or cuda:N, got 'gpu'")
    if not torch.cuda.is_available():
        refused(lambda: common.check_device('cuda:1'), "--device cuda:1: PyTorch sees no CUDA GPU here: use --device cpu (or auto)")

# -----------------------------------------------------------------------------
# each script: the command line as typed -> its one error line, before any work

RUN = {'sample.py': lambda args: sample.main(sample.parse_args(args)),
       'train_vmae.py': lambda args: train_vmae.main(common.parse_config(train_vmae.Config, args)),
       'train_dit.py': lambda args: train_dit.main(common.parse_config(train_dit.Config, args)),
       'evaluate.py': evaluate.main,
       'paper': paper_commands.main,
       'bench.py': bench.main}

VMAE = '--autoencoder v.pt --data builtin'
BAD = {
    'sample.py --steps 1': '--steps must be at least 2, got 1',
    'sample.py --n 0': '--n must be at least 1, got 0',
    'sample.py --batch_size 0': '--batch_size must be at least 1, got 0',
    'sample.py --num_fid_samples -1': '--num_fid_samples must be at least 0, got -1',
    'sample.py --cfg_channels -1': '--cfg_channels must be at least 0, got -1',
    'sample.py --cfg_interval_start 1.5': '--cfg_interval_start must be in [0, 1], got 1.5',
    'sample.py --shift -0.3': '--shift must be at least 0, got -0.3',
    'sample.py --seed -1': '--seed must be at least 0, got -1',
    'sample.py --solver rk4': "--solver must be one of euler, heun and --weights ema or model, got 'rk4', 'ema'",
    'sample.py --weights best': "--solver must be one of euler, heun and --weights ema or model, got 'euler', 'best'",
    'sample.py --device gpu': "--device must be auto, cpu, cuda or cuda:N, got 'gpu'",
    'train_vmae.py --image_size 30': '--image_size must be a positive multiple of 8, got 30',
    'train_vmae.py --image_size 0': '--image_size must be a positive multiple of 8, got 0',
    'train_vmae.py --mask_ratio 1.0': '--mask_ratio, --beta1 and --beta2 must be in [0, 1)',
    'train_vmae.py --beta2 1': '--mask_ratio, --beta1 and --beta2 must be in [0, 1)',
    'train_vmae.py --batch_size 0': '--batch_size must be at least 1, got 0',
    'train_vmae.py --micro_batch_size 0': '--micro_batch_size must be at least 1, got 0',
    'train_vmae.py --blr 0': '--blr, --epochs and --kl_target_std must be positive, got 0.0, 400.0, 0.001',
    'train_vmae.py --warmup_epochs -1': '--warmup_epochs must be at least 0, got -1.0',
    'train_vmae.py --num_workers -1': '--num_workers must be at least 0, got -1',
    'train_vmae.py --log_every 0': '--log_every must be at least 1, got 0',
    'train_vmae.py --image_every 0': '--image_every must be at least 1, got 0',
    'train_vmae.py --keep_every -1': '--keep_every must be at least 0, got -1',
    'train_vmae.py --dtype fp8': "--dtype must be one of bf16, fp16, fp32, got 'fp8'",
    'train_vmae.py --model ConvAE-tiny': "unknown model 'ConvAE-tiny': choose one of ['VMAE-f8d16', 'VMAE-small', 'VMAE-tiny']",
    'train_dit.py --posterior mean': "--posterior must be one of auto, sample, mode, got 'mean'",
    'train_dit.py --max_steps 0': '--max_steps must be at least 1, got 0',
    'train_dit.py --image_size 100': '--image_size must be a positive multiple of 8, got 100',
    'train_dit.py --lr 0': '--lr must be positive and --sample_steps at least 2, got 0.0 and 50',
    'train_dit.py --micro_batch_size -4': '--micro_batch_size must be at least 1, got -4',
    'train_dit.py --extract_batch_size 0': '--extract_batch_size must be at least 1, got 0',
    'train_dit.py --class_dropout_prob 1': '--class_dropout_prob, --beta1 and --beta2 must be in [0, 1), --ema_decay in [0, 1]',
    'train_dit.py --sample_every 0': '--sample_every must be at least 1, got 0',
    'train_dit.py --latent_dtype bfloat16': "--latent_dtype must be one of float32, float16, got 'bfloat16'",
    f'evaluate.py recon {VMAE} --batch_size 0': '--batch_size must be at least 1, --image_size 0 or a positive multiple of 8 (recon), '
                                                '--num_images and --num_workers at least 0',
    f'evaluate.py recon {VMAE} --image_size 30': '--batch_size must be at least 1, --image_size 0 or a positive multiple of 8 (recon), '
                                                 '--num_images and --num_workers at least 0',
    'evaluate.py fid ref.npz samples.npz --device tpu0': "--device must be auto, cpu, cuda or cuda:N, got 'tpu0'",
    'evaluate.py ref.npz samples.npz': "unknown command 'ref.npz': choose one of fid, recon",
    f'paper smoothness {VMAE} --eps 0 0.1 -0.1': '--eps needs one or more values, each at least 0',
    f'paper smoothness {VMAE} --seed -1': '--seed must be at least 0, got -1',
    f'paper compression {VMAE} --masks m --image_size 4': "--image_size must be 0 (the autoencoder's) or a positive multiple of 8, got 4",
    'paper solvers --dit d.pt --reference_steps 1': '--reference_steps must be at least 2, got 1',
    'paper kmeans --autoencoder v.pt': 'python -m paper kmeans needs --data (see python -m paper kmeans -h)',
    'bench.py --sample_steps 1': '--sample_steps must be 0 (the default) or at least 2, got 1',
    'bench.py --batch_size_sample -1': '--batch_size_sample must be 0 (the default) or at least 1, got -1',
    'bench.py --only dit_train decode': '--only takes vmae_train, dit_train, encode, sample, inception, autoencoders',
}


@pytest.mark.parametrize('command', BAD)
def test_refused_in_process(command, capsys):
    script, *args = command.split()
    if script in ('evaluate.py', 'paper'):  # their main prints the error itself, as on the command line
        with pytest.raises(SystemExit) as e:
            RUN[script](args)
        assert e.value.code == 2 and capsys.readouterr().err == f'error: {BAD[command]}\n'
    else:
        refused(lambda: RUN[script](args), BAD[command])

# -----------------------------------------------------------------------------
# the valid settings pass

GOOD = ['sample.py', 'sample.py --steps 2 --num_fid_samples 10 --cfg_interval_start 1 --shift 0 --device cpu',
        'train_vmae.py', 'train_vmae.py --mask_ratio 0 --keep_every 0 --stop_epoch 0 --image_size 8', 'train_dit.py',
        'evaluate.py fid ref samples --image_size 299',
        f'evaluate.py recon {VMAE} --image_size 0 --num_images 0', f'paper smoothness {VMAE} --image_size 256 --eps 0',
        f'paper compression {VMAE} --masks m', 'bench.py',
        'bench.py --quick --only sample encode --sample_steps 2 --batch_size_encode 0']


@pytest.mark.parametrize('command', GOOD)
def test_valid_settings_pass(command):
    script, *args = command.split()
    with pytest.raises(Reached):
        RUN[script](args)


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))), ids=os.path.basename)
def test_shipped_configs_pass(path):
    script = 'train_dit.py' if os.path.basename(path).startswith('dit_') else 'train_vmae.py'
    with pytest.raises(Reached):
        RUN[script]([path])


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'paper', 'configs', '*.py'))), ids=os.path.basename)
def test_shipped_baseline_configs_pass(path):
    with pytest.raises(Reached):
        train_convae.main(common.parse_config(train_convae.Config, [path]))

# -----------------------------------------------------------------------------
# the command line: exit status 2 and one line, for one bad setting of each script

CLI = ['sample.py --steps 1', 'train_vmae.py --image_size 30', 'train_dit.py --max_steps 0',
       f'paper smoothness {VMAE} --eps 0 0.1 -0.1', 'bench.py --sample_steps 1']


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
    """All cases at once (each pays a Python and torch start-up); in an empty folder, so that nothing lands in the repository."""
    cwd = tmp_path_factory.mktemp('cli')
    command = lambda case: ['-m', 'paper'] if case.startswith('paper ') else [os.path.join(ROOT, case.split()[0])]
    env = {**os.environ, 'PYTHONPATH': ROOT}  # python -m paper from another folder
    procs = {case: subprocess.Popen([sys.executable, *command(case), *case.split()[1:]], cwd=cwd, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for case in CLI}
    try:
        return {case: (p.communicate(timeout=120), p.returncode) for case, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()  # a no-op for those that finished; ends any that the checks failed to stop


@pytest.mark.parametrize('case', CLI)
def test_command_line_error(case, cli_runs):
    (out, err), code = cli_runs[case]
    assert (code, out, err) == (2, '', f'error: {BAD[case]}\n')
