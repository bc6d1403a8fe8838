"""
Tests for bench.py: the FLOPs it counts at run time (positive, linear in the batch, guided sampler
steps counted twice) and a --quick run. CPU only, tiny models. Run with: python -m pytest tests/test_bench.py -q
"""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import bench
import dit
import vmae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU = torch.device('cpu')
SIZES = dict(bench.SIZES['quick'], steps=4)  # 3 evaluations: one unguided (t = 0), two guided
BUILDS = {  # name: (build, the SIZES key of its batch)
    'vmae_train': (lambda s: bench.vmae_train(s, CPU, 'fp32', compiled=False), 'vmae_train'),
    'dit_train': (lambda s: bench.dit_train(s, CPU, 'fp32', compiled=False), 'dit_train'),
    'encode': (lambda s: bench.extraction(s, CPU, 'fp32'), 'encode'),
    'sample': (lambda s: bench.sampling(s, CPU, 'fp32', compiled=False), 'sample'),
    'inception': (lambda s: bench.inception_forward(s, CPU, 'fp32'), 'inception'),
    'sdvae_train': (lambda s: bench.sdvae_train(s, CPU, 'fp32'), 'ae_train'),
    'sdvae_encode': (lambda s: bench.ae_inference(s, CPU, 'fp32', s['sdvae'], 'encode'), 'ae_infer'),
    'sdvae_decode': (lambda s: bench.ae_inference(s, CPU, 'fp32', s['sdvae'], 'decode'), 'ae_infer'),
}


def counted_flops(name, batch):
    build, key = BUILDS[name]
    step, images, _ = build(dict(SIZES, **{key: batch}))
    assert images == batch
    return bench.count_flops(step)


@pytest.mark.parametrize('name', list(BUILDS))
def test_counted_flops_are_linear_in_the_batch(name):
    one = counted_flops(name, 1)
    assert one > 0 and counted_flops(name, 2) == 2 * one


def test_sampler_counts_guided_steps_twice():
    # 249 evaluations; with shift 0.3, 68 fall below t = 0.1 (dit.timestep_grid's docstring) and run unguided
    assert bench.sampler_forwards(250) == 68 + 2 * 181
    model = dit.DiT_models[SIZES['dit']](input_size=SIZES['latent']).eval()
    x = torch.randn(2, model.in_channels, SIZES['latent'], SIZES['latent'])
    with torch.no_grad():
        forward = bench.count_flops(lambda: model(x, torch.rand(2), torch.zeros(2, dtype=torch.long)))  # batch 2
    assert bench.sampler_forwards(SIZES['steps']) == 1 + 2 * 2
    vae = vmae.VMAE_models[SIZES['vmae']](img_size=8 * SIZES['latent']).eval()  # sample.generate's decode of the 2 latents
    with torch.no_grad():
        decode = bench.count_flops(lambda: vae.decode(torch.randn(2, 16, SIZES['latent'], SIZES['latent'])))
    assert counted_flops('sample', 2) == bench.sampler_forwards(SIZES['steps']) * forward + decode


def test_quick_run_writes_a_row_per_benchmark(tmp_path):
    out = tmp_path / 'bench.json'
    rows = bench.main(['--quick', '--only', 'dit_train', 'encode', 'sample', '--json', str(out)])
    assert [(r['bench'], r['dtype']) for r in rows] == [('dit_train', 'fp32'), ('encode', 'bf16'), ('encode', 'fp32'),
                                                        ('sample', 'bf16'), ('sample', 'fp32')]  # --quick: eager only
    for r in rows:
        assert 'error' not in r and r['img_per_s'] > 0 and 0 < r['fraction'] < 10
    assert rows[-1]['s_per_img_250'] > 0
    assert json.loads(out.read_text())['rows'] == rows


def test_autoencoder_comparison_rows_and_ratios(capsys):
    rows = bench.main(['--quick', '--only', 'autoencoders'])
    assert [r['mode'] for r in rows] == ['vmae train', 'sdvae train', 'vmae encode', 'sdvae encode', 'vmae decode', 'sdvae decode']
    assert all('error' not in r and r['img_per_s'] > 0 for r in rows)
    out = capsys.readouterr().out
    vmae_params = sum(p.numel() for p in bench.autoencoder('VMAE-tiny', 64, 'cpu').parameters())
    conv_params = sum(p.numel() for p in bench.autoencoder('ConvAE-tiny', 64, 'cpu').parameters())
    assert f"{100 * vmae_params / conv_params:.1f}%" in out.split('parameters (M)')[1].splitlines()[0]
    flops = {r['mode']: r['gflop_per_img'] for r in rows}
    ratio = (flops['vmae encode'] + flops['vmae decode']) / (flops['sdvae encode'] + flops['sdvae decode'])
    assert f"{100 * ratio:.1f}%" in out.split('encode + decode at 64 px')[1].splitlines()[0]


def test_a_failing_row_is_reported_not_raised():
    def build(sizes):
        raise RuntimeError('compile failed\nlong traceback')
    row = bench.run_row('dit_train', 'compiled', 'fp32', build, SIZES, CPU, {'fp32': 1.0})
    assert row['error'] == 'RuntimeError: compile failed'


FREED_PROGRAM = """
import os, sys, torch, common
if sys.argv[1] == 'keep':
    common.keep_freed_memory()
def resident_mib():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
tensors = [torch.ones(4 * 2**20) for _ in range(4)]  # 16 MiB each, as a step's activations
held = resident_mib()
del tensors
print(held - resident_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_freed_memory_is_kept_for_reuse():
    # by default glibc maps blocks this large apart and unmaps them when freed: the next step faults them in again
    def mib_given_back(mode):
        run = subprocess.run([sys.executable, '-c', FREED_PROGRAM, mode], capture_output=True, text=True, check=True, cwd=ROOT)
        return float(run.stdout.split()[-1])
    default, kept = mib_given_back('default'), mib_given_back('keep')
    assert default > 48 and kept < 8, (default, kept)
