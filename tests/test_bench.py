"""
Tests for bench.py: its analytic FLOP counts against torch's FlopCounterMode, and a --quick run.
CPU only, tiny models. Run with: python -m pytest tests/test_bench.py -q
"""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench

CPU = torch.device('cpu')
SIZES = dict(bench.SIZES['quick'], steps=4)
BUILDS = {
    'vmae_train': lambda: bench.vmae_train(SIZES, CPU, 'fp32', compiled=False),
    'dit_train': lambda: bench.dit_train(SIZES, CPU, 'fp32', compiled=False),
    'encode': lambda: bench.vmae_encode(SIZES, CPU, 'fp32'),
    'sample': lambda: bench.dit_sample(SIZES, CPU, 'fp32'),
    'inception': lambda: bench.inception(SIZES, CPU, 'fp32'),
}


@pytest.mark.parametrize('name', list(BUILDS))
def test_analytic_flops_match_the_flop_counter(name):
    step, _, analytic, _ = BUILDS[name]()
    # the math attention backend is made of bmm's, which the counter sees (the fused CPU kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    measured = counter.get_total_flops()
    # training counts 3 x forward, but nothing computes the gradient of the input images: a hair more than measured
    assert measured <= analytic <= measured * 1.002 if name.endswith('_train') else analytic == measured


def test_sampler_forwards_count_guided_steps_twice():
    # 249 evaluations; with shift 0.3, 68 fall below t = 0.1 (dit.timestep_grid's docstring) and run unguided
    assert bench.sampler_forwards(250) == 68 + 2 * 181


def test_quick_run_writes_a_row_per_benchmark(tmp_path):
    out = tmp_path / 'bench.json'
    rows = bench.main(['--quick', '--only', 'dit_train,encode,sample', '--json', str(out)])
    assert [r['bench'] for r in rows] == ['dit_train', 'encode', 'sample']
    for r in rows:
        assert 'error' not in r and r['img_per_s'] > 0 and 0 < r['fraction'] < 10
    assert rows[-1]['s_per_img_250'] > 0
    assert json.loads(out.read_text())['rows'] == rows


def test_a_failing_row_is_reported_not_raised():
    def build():
        raise RuntimeError('compile failed\nlong traceback')
    row = bench.run_row('dit_train', 'compiled', 'fp32', build, SIZES, CPU, {'fp32': 1.0})
    assert row['error'] == 'RuntimeError: compile failed'
