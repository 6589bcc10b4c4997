"""Two-step smokes of the 196-token Fashion-MNIST benchmarks (benchmarks/table4_vit196.py, vit_adapt_fmnist.py):
every row builds, trains two steps and is evaluated; the CSV / markdown / PNG outputs are written and consistent."""
import csv
import os
import sys

import pytest

from timm_cbsa.data import DEFAULT_FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR), reason='Debian dataset-fashion-mnist not installed'),
]
TINY = ['--max-steps', '2', '--train-samples', '64', '--test-samples', '32', '--seeds', '0', '1']


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_table4_vit196_two_steps(tmp_path):
    pytest.importorskip('matplotlib')
    import table4_vit196 as t4
    summary = t4.main(TINY + ['--batch-size', '16', '--out', str(tmp_path)])
    assert [s['row'] for s in summary] == list(t4.ROWS)
    runs = _read(tmp_path / 'table4_vit196_runs.csv')
    assert len(runs) == 2 * len(t4.ROWS) and {int(r['steps']) for r in runs} == {2}
    for name in ('table4_vit196.csv', 'table4_vit196.md', 'table4_vit196.png'):
        assert (tmp_path / name).stat().st_size > 100, name
    p = {s['row']: s['params'] for s in summary}
    d, depth, heads = 64, 4, 2
    # timm's Attention has q, k, v (3 d x d); CBSA one d x d plus two step sizes per head
    assert p['softmax'] - p['cbsa16'] == depth * (2 * d * d - 2 * heads)
    assert p['cbsa16'] == p['cbsa64']                      # the representative grid has no parameters
    assert p['linear'] == p['softmax']
    for s in summary:
        assert 0.0 <= s['top1_mean'] <= 100.0
        per = [float(v) for v in s['per_seed'].split()]
        assert s['top1_mean'] == pytest.approx(sum(per) / 2, abs=0.006)
    md = (tmp_path / 'table4_vit196.md').read_text()
    assert 'CBSA (m=16)' in md and 'Ranking here' in md
    # the summary can be rebuilt from per-seed CSVs (as when the seeds ran in parallel)
    again = t4.main(['--summarize', str(tmp_path / 'table4_vit196_runs.csv'), '--out', str(tmp_path / 'again')])
    assert [s['top1_mean'] for s in again] == [s['top1_mean'] for s in summary]


def test_vit_adapt_two_steps(tmp_path):
    pytest.importorskip('matplotlib')
    import vit_adapt_fmnist as va
    summary = va.main(TINY + ['--rep-grid', '4', '--out', str(tmp_path)])
    assert [s['model'] for s in summary] == ['softmax'] + list(va.VARIANTS)
    runs = _read(tmp_path / 'vit_adapt_fmnist_runs.csv')
    stages = {(r['model'], r['stage']) for r in runs}
    for v in va.VARIANTS:
        assert {(v, 'converted'), (v, 'fine-tuned'), (v, 'scratch')} <= stages
    p = {s['model']: s['params'] for s in summary}
    # conversion keeps every weight: agent and linear add no parameter, CBSA* adds η, κ per head and layer,
    # single-projection CBSA drops two of the three d x d projections
    assert p['agent'] == p['linear'] == p['softmax']
    assert p['cbsa_star'] == p['softmax'] + 4 * 2 * 2
    assert p['cbsa'] == p['softmax'] - 4 * (2 * 64 * 64 - 2 * 2)
    for name in ('vit_adapt_fmnist.csv', 'vit_adapt_fmnist.md', 'vit_adapt_fmnist.png',
                 'vit_adapt_fmnist_softmax_pretrained.pth'):
        assert (tmp_path / name).stat().st_size > 100, name
    # seeds run in parallel processes from the saved pretrained model, then merged: the same table
    pre = str(tmp_path / 'vit_adapt_fmnist_softmax_pretrained.pth')
    small = ['--max-steps', '2', '--train-samples', '64', '--test-samples', '32', '--rep-grid', '4',
             '--pretrained', pre, '--out', str(tmp_path / 'par')]
    for seed in ('0', '1'):
        va.main(small + ['--seeds', seed, '--runs-name', f'runs_seed{seed}'])
    merged = va.main(['--summarize', str(tmp_path / 'par' / 'runs_seed0.csv'), str(tmp_path / 'par' / 'runs_seed1.csv'),
                      '--out', str(tmp_path / 'merged')])
    key = lambda rows: [(s['model'], s['converted_top1'], s['finetuned_per_seed'], s['scratch_per_seed'])  # noqa: E731
                        for s in rows]
    assert key(merged) == key(summary)
