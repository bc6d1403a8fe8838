"""What a user meets when things go wrong: a killed run, odd image files, wrong checkpoints.
Each is a clear one-line message (exit code 2), and nothing already on disk is lost.
Run: python -m pytest tests/test_failures.py"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

import dit
import fileio
import train_vmae
import vmae
from test_train_vmae import tiny_config, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def script(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def scripts_at_once(*commands, timeout=300):
    """script() for several command lines, run side by side (each pays its own Python and torch start-up)."""
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()  # a no-op for those that finished


def flags(cfg):
    return [f'--{k}={v}' for k, v in vars(cfg).items() if k != 'resume']


def test_kill_9_during_training_then_resume_gives_the_uninterrupted_result(tmp_path):
    """SIGKILL while the run is training (checked: the process dies of the signal, and its last checkpoint is
    before the final step; a run that ended first is tried again, twice as long), then --resume: the weights
    of the uninterrupted run."""
    steps = 40
    for attempt in range(3):
        cfg = tiny_config(tmp_path / f'killed{attempt}', epochs=steps / 625, ckpt_every=2, log_every=2)  # `steps` steps
        proc = subprocess.Popen([sys.executable, 'train_vmae.py', *flags(cfg)], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = tmp_path / f'killed{attempt}' / 'last.pt'
        deadline = time.time() + 120
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)                                    # somewhere in the middle of training (and maybe of a save)
        proc.send_signal(signal.SIGKILL)                   # nothing, if the run has ended
        proc.wait()
        killed_at = fileio.read_checkpoint(str(last))['step'] if last.exists() else None
        if proc.returncode == -signal.SIGKILL and killed_at is not None and killed_at < steps:
            break
        steps *= 2
    assert proc.returncode == -signal.SIGKILL, 'the run ended before the kill'
    assert 2 <= killed_at < steps and killed_at % 2 == 0
    resumed = script('train_vmae.py', *flags(cfg), '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert f'resumed from {last} at step {killed_at}' in resumed.stdout
    assert fileio.read_checkpoint(str(last))['step'] == steps
    train_vmae.main(tiny_config(tmp_path / 'straight', epochs=steps / 625, ckpt_every=2, log_every=2))
    a, b = weights(tmp_path / 'straight'), weights(last.parent)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_on_a_folder_of_odd_images(tmp_path, capsys):
    """A corrupt JPEG is skipped with a count; CMYK, grayscale and 16x16 images train like any other."""
    rng = np.random.default_rng(0)
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(14):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).convert('CMYK').save(folder / 'cmyk.jpg')
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / 'tiny_gray.png')
    (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0' + bytes(100))
    train_vmae.main(tiny_config(tmp_path / 'run', data=str(folder), stop_epoch=0, epochs=2, warmup_epochs=0.5))
    out = capsys.readouterr().out
    assert 'skipped 1 unreadable file(s) of 17' in out and '16 images' in out
    assert fileio.read_checkpoint(str(tmp_path / 'run' / 'last.pt'))['step'] == 2


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    return lines[0]


def test_a_wrong_checkpoint_given_to_each_script(tmp_path):
    torch.save({'kind': 'dit', 'model': {}, 'ema': {}}, tmp_path / 'dit.pt')
    model = vmae.VMAE_models['VMAE-tiny'](img_size=32, mask_token=False)
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': model.args, 'model': model.state_dict()}, tmp_path / 'vmae.pt')
    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    out = str(tmp_path / 'out')
    cases = {
        'train_vmae --init_from': (['train_vmae.py', '--init_from', str(tmp_path / 'dit.pt'), '--model', 'VMAE-tiny',
                                     '--image_size', '32', '--out_dir', out], 'is not a VMAE checkpoint'),
        'train_convae --init_from': (['-m', 'paper.train_convae', '--init_from', str(tmp_path / 'vmae.pt'), '--model', 'ConvAE-tiny',
                                      '--image_size', '32', '--out_dir', out],
                                     "is not a convolutional autoencoder checkpoint: expected one with kind 'convae'"),
        'train_dit --autoencoder': (['train_dit.py', '--autoencoder', str(tmp_path / 'dit.pt'), '--out_dir', out],
                                    "is not an autoencoder checkpoint: expected one of the kinds vmae, convae"),
        'sample --dit': (['sample.py', '--dit', str(tmp_path / 'vmae.pt'), '--class', '0'], "found a checkpoint of kind 'vmae'"),
        'sample --dit (text)': (['sample.py', '--dit', str(tmp_path / 'notes.txt'), '--class', '0'], 'cannot read'),
        'evaluate recon --autoencoder': (['evaluate.py', 'recon', '--autoencoder', str(tmp_path / 'notes.txt'), '--data', 'builtin'],
                                         'not a PyTorch checkpoint'),
        'paper smoothness --autoencoder': (['-m', 'paper', 'smoothness', '--autoencoder', str(tmp_path / 'dit.pt'), '--data', 'builtin'],
                                              "is not an autoencoder checkpoint"),
    }
    results = scripts_at_once(*(args for args, _ in cases.values()))
    for (name, (_, message)), result in zip(cases.items(), results):
        assert message in one_line_error(result), name


def test_resume_refuses_a_checkpoint_of_the_other_stage(tmp_path):
    """A DiT run directory given to train_vmae --resume (or the reverse) is refused, and left as it was."""
    os.makedirs(tmp_path / 'run')
    dit_model = dit.DiT_models['DiT-T/1'](input_size=4, num_classes=3)
    torch.save(dit.dit_checkpoint(dit_model, dit_model), tmp_path / 'run' / 'last.pt')
    before = (tmp_path / 'run' / 'last.pt').read_bytes()
    error = one_line_error(script('train_vmae.py', '--resume', '--model', 'VMAE-tiny', '--image_size', '32',
                                  '--out_dir', str(tmp_path / 'run')))
    assert "is not a train_vmae.py run's checkpoint: choose the --out_dir of such a run" in error
    assert (tmp_path / 'run' / 'last.pt').read_bytes() == before
