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
import sample
import train_dit
import train_vmae

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
# the helper

@dataclasses.dataclass
class Settings:
    steps: int = 250
    size: int = 0          # 0: the default
    eps: tuple[float, ...] = (0.0, 0.1)
    names: tuple[str, ...] = ()
    device: str = 'auto'


def test_check_settings():
    check = lambda **changes: common.check_settings(dataclasses.replace(Settings(), **changes), at_least={'steps': 2, 'size': 8, 'eps': 0},
                                                    multiple_of={'size': 8}, choices={'names': ('a', 'b')}, zero_ok=('size',))
    check()
    check(size=16, names=('a', 'b'), device='cpu')
    for changes, message in [(dict(steps=1), '--steps must be at least 2, got 1'),
                             (dict(size=-8), '--size must be at least 8 (or 0 for the default), got -8'),
                             (dict(size=12), '--size must be a multiple of 8 (or 0 for the default), got 12: try 16'),
                             (dict(size=9), '--size must be a multiple of 8 (or 0 for the default), got 9: try 8'),
                             (dict(eps=()), '--eps needs at least one value'),
                             (dict(eps=(0.0, -1.0)), '--eps must be at least 0, got -1.0'),
                             (dict(names=('a', 'c')), "--names must be one of a, b, got 'c'"),
                             (dict(device='gpu'), "--device must be auto, cpu, cuda or cuda:N, got 'gpu'")]:
        refused(lambda: check(**changes), message)
    if not torch.cuda.is_available():
        refused(lambda: check(device='cuda:1'), "--device cuda:1: PyTorch sees no CUDA GPU here: use --device cpu (or auto)")

# -----------------------------------------------------------------------------
# each script: the command line as typed -> its one error line, before any work

RUN = {'sample.py': lambda args: sample.main(sample.parse_args(args)),
       'train_vmae.py': lambda args: train_vmae.main(common.parse_config(train_vmae.Config, args)),
       'train_dit.py': lambda args: train_dit.main(common.parse_config(train_dit.Config, args)),
       'evaluate.py': evaluate.main,
       'bench.py': bench.main}

VMAE = '--vmae v.pt --data builtin'
BAD = {
    'sample.py --steps 0': '--steps must be at least 2, got 0',
    'sample.py --steps 1': '--steps must be at least 2, got 1',
    'sample.py --n 0': '--n must be at least 1, got 0',
    'sample.py --batch_size 0': '--batch_size must be at least 1, got 0',
    'sample.py --num_fid_samples -1': '--num_fid_samples must be at least 0, got -1',
    'sample.py --cfg_channels -1': '--cfg_channels must be at least 0, got -1',
    'sample.py --cfg_interval_start 1.5': '--cfg_interval_start must be at most 1, got 1.5',
    'sample.py --shift -0.3': '--shift must be at least 0, got -0.3',
    'sample.py --seed -1': '--seed must be at least 0, got -1',
    'sample.py --solver rk4': "--solver must be one of euler, heun, got 'rk4'",
    'sample.py --weights best': "--weights must be one of ema, model, got 'best'",
    'sample.py --device gpu': "--device must be auto, cpu, cuda or cuda:N, got 'gpu'",
    'train_vmae.py --image_size 30': '--image_size must be a multiple of 8, got 30: try 32',
    'train_vmae.py --image_size 0': '--image_size must be at least 8, got 0',
    'train_vmae.py --mask_ratio 1.0': '--mask_ratio must be less than 1, got 1.0',
    'train_vmae.py --mask_ratio -0.25': '--mask_ratio must be at least 0, got -0.25',
    'train_vmae.py --batch_size 0': '--batch_size must be at least 1, got 0',
    'train_vmae.py --micro_batch_size 0': '--micro_batch_size must be at least 1, got 0',
    'train_vmae.py --blr 0': '--blr must be greater than 0, got 0.0',
    'train_vmae.py --epochs 0': '--epochs must be greater than 0, got 0.0',
    'train_vmae.py --warmup_epochs -1': '--warmup_epochs must be at least 0, got -1.0',
    'train_vmae.py --kl_target_std 0': '--kl_target_std must be greater than 0, got 0.0',
    'train_vmae.py --beta2 1': '--beta2 must be less than 1, got 1.0',
    'train_vmae.py --num_workers -1': '--num_workers must be at least 0, got -1',
    'train_vmae.py --log_every 0': '--log_every must be at least 1, got 0',
    'train_vmae.py --ckpt_every 0': '--ckpt_every must be at least 1, got 0',
    'train_vmae.py --image_every 0': '--image_every must be at least 1, got 0',
    'train_vmae.py --keep_every -1': '--keep_every must be at least 0, got -1',
    'train_vmae.py --dtype fp8': "--dtype must be one of bf16, fp16, fp32, got 'fp8'",
    'train_vmae.py --model VMAE-huge': "unknown model 'VMAE-huge': choose one of ['VMAE-f8d16', 'VMAE-small', 'VMAE-tiny', 'SD3-VAE', 'ConvAE-small', 'ConvAE-tiny']",
    'train_vmae.py --model ConvAE-tiny --mask_ratio 0.5': 'ConvAE-tiny is convolutional and cannot drop patches: set --mask_ratio 0',
    'train_vmae.py --pixel_loss l1': 'VMAE-f8d16 is a VMAE: --pixel_loss l1 and --disc_weight are for the convolutional baselines',
    'train_vmae.py --model ConvAE-tiny --mask_ratio 0 --pixel_loss l2': "--pixel_loss must be one of mse, l1, got 'l2'",
    'train_vmae.py --model ConvAE-tiny --mask_ratio 0 --disc_start -1': '--disc_start must be at least 0, got -1',
    'train_dit.py --posterior mean': "--posterior must be one of auto, sample, mode, got 'mean'",
    'train_dit.py --max_steps 0': '--max_steps must be at least 1, got 0',
    'train_dit.py --image_size 100': '--image_size must be a multiple of 8, got 100: try 96',
    'train_dit.py --lr 0': '--lr must be greater than 0, got 0.0',
    'train_dit.py --batch_size 0': '--batch_size must be at least 1, got 0',
    'train_dit.py --micro_batch_size -4': '--micro_batch_size must be at least 1, got -4',
    'train_dit.py --extract_batch_size 0': '--extract_batch_size must be at least 1, got 0',
    'train_dit.py --class_dropout_prob 1': '--class_dropout_prob must be less than 1, got 1.0',
    'train_dit.py --ema_decay 1.5': '--ema_decay must be at most 1, got 1.5',
    'train_dit.py --sample_steps 1': '--sample_steps must be at least 2, got 1',
    'train_dit.py --sample_every 0': '--sample_every must be at least 1, got 0',
    'train_dit.py --latent_dtype bfloat16': "--latent_dtype must be one of float32, float16, got 'bfloat16'",
    'train_dit.py --dtype fp64': "--dtype must be one of bf16, fp16, fp32, got 'fp64'",
    f'evaluate.py smoothness {VMAE} --eps -0.1': '--eps must be at least 0, got -0.1',
    f'evaluate.py smoothness {VMAE} --eps 0 0.1 -0.1': '--eps must be at least 0, got -0.1',
    f'evaluate.py smoothness {VMAE} --eps ,': '--eps needs at least one value',
    f'evaluate.py smoothness {VMAE} --seed -1': '--seed must be at least 0, got -1',
    f'evaluate.py recon {VMAE} --batch_size 0': '--batch_size must be at least 1, got 0',
    f'evaluate.py recon {VMAE} --image_size 30': '--image_size must be a multiple of 8 (or 0 for the default), got 30: try 32',
    f'evaluate.py recon {VMAE} --num_images -1': '--num_images must be at least 0, got -1',
    f'evaluate.py recon {VMAE} --num_workers -1': '--num_workers must be at least 0, got -1',
    f'evaluate.py compression {VMAE} --masks m --image_size 4': '--image_size must be at least 8 (or 0 for the default), got 4',
    'evaluate.py fid ref.npz samples.npz --batch_size 0': '--batch_size must be at least 1, got 0',
    'evaluate.py ref.npz samples.npz --image_size -1': '--image_size must be at least 1 (or 0 for the default), got -1',
    'evaluate.py fid ref.npz samples.npz --device tpu0': "--device must be auto, cpu, cuda or cuda:N, got 'tpu0'",
    'bench.py --sample_steps 1': '--sample_steps must be at least 2 (or 0 for the default), got 1',
    'bench.py --batch_size_sample -1': '--batch_size_sample must be at least 1 (or 0 for the default), got -1',
    'bench.py --only dit_train,decode': "--only must be one of vmae_train, dit_train, encode, sample, inception, autoencoders, got 'decode'",
    'bench.py --infer_dtype fp16': "--infer_dtype must be one of bf16, tf32, got 'fp16'",
}


@pytest.mark.parametrize('command', BAD)
def test_refused_in_process(command, capsys):
    script, *args = command.split()
    if script == 'evaluate.py':  # its main prints the error itself, as on the command line
        with pytest.raises(SystemExit) as e:
            evaluate.main(args)
        assert e.value.code == 2 and capsys.readouterr().err == f'error: {BAD[command]}\n'
    else:
        refused(lambda: RUN[script](args), BAD[command])

# -----------------------------------------------------------------------------
# the valid settings pass

GOOD = ['sample.py', 'sample.py --steps 2 --num_fid_samples 10 --cfg_interval_start 1 --shift 0 --device cpu',
        'train_vmae.py', 'train_vmae.py --mask_ratio 0 --keep_every 0 --stop_epoch 0 --image_size 8', 'train_dit.py',
        'evaluate.py ref.npz samples.npz', 'evaluate.py fid ref samples --image_size 299',
        f'evaluate.py recon {VMAE} --image_size 0 --num_images 0', f'evaluate.py smoothness {VMAE} --image_size 256 --eps 0',
        f'evaluate.py compression {VMAE} --masks m', 'bench.py',
        'bench.py --quick --only sample encode --sample_steps 2 --batch_size_encode 0']


@pytest.mark.parametrize('command', GOOD)
def test_valid_settings_pass(command):
    script, *args = command.split()
    with pytest.raises(Reached):
        RUN[script](args)


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))), ids=os.path.basename)
def test_shipped_configs_pass(path):
    script = 'train_dit.py' if os.path.basename(path).startswith('dit_') else 'train_vmae.py'  # every autoencoder trains there
    with pytest.raises(Reached):
        RUN[script]([path])

# -----------------------------------------------------------------------------
# the command line: exit status 2 and one line, for one bad setting of each script

CLI = ['sample.py --steps 0', 'train_vmae.py --image_size 30', 'train_dit.py --max_steps 0',
       f'evaluate.py smoothness {VMAE} --eps -0.1', 'bench.py --sample_steps 1']


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
    """All cases at once (each pays a Python and torch start-up); in an empty folder, so that nothing lands in the repository."""
    cwd = tmp_path_factory.mktemp('cli')
    procs = {case: subprocess.Popen([sys.executable, os.path.join(ROOT, case.split()[0]), *case.split()[1:]], cwd=cwd,
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
