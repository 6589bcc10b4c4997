"""``python -m timm_cbsa.info``: what this machine would run, and the on-demand parity check."""
import os
import subprocess
import sys

import pytest
import torch

from timm_cbsa import info
from timm_cbsa.ops.contract_broadcast import lse

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU listing')


def test_lists_every_implementation_with_reasons_on_cpu():
    out = subprocess.run([sys.executable, '-m', 'timm_cbsa.info'], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TRITON_INTERPRET='0'))
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith('  ')}
    assert set(lines) == {'eager', 'fused', 'sdpa', 'xformers', 'triton', 'auto'}
    assert 'unavailable' in lines['triton'] and 'CUDA' in lines['triton']
    assert lines['fused'].split()[1] == 'available' and lines['auto'].split()[-1] == 'fused'


def test_check_passes_here_and_catches_a_wrong_implementation(monkeypatch, capsys):
    assert info.main(['--check', '--dtype', 'float32', '--head-dim', '16', '--reps', '4']) == 0
    out = capsys.readouterr().out
    assert out.count(' ok') == 3, out                               # eager, fused, sdpa

    def off_by_a_bit(q, k, v, scale):
        o, s = lse._sdpa_cpu(q, k, v, scale)
        return o * 1.01, s
    monkeypatch.setitem(lse.LSE_FUNCTIONS, 'cpu_flash', off_by_a_bit)
    errs = info.check('sdpa', torch.float32, 'cpu', head_dim=16, num_reps=4)
    assert errs['out'] > 1e-3
    assert info.main(['--check', '--dtype', 'float32', '--head-dim', '16', '--reps', '4']) == 1
