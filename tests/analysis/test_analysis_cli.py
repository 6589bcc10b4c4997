"""python -m timm_cbsa.viz: files written, CSV contents checked against independent computations, PNGs non-blank."""
import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip('matplotlib')
pytest.importorskip('skimage')
pytest.importorskip('imgviz')

from PIL import Image

from timm_cbsa import viz
from timm_cbsa.analysis import load_image, projected_tokens, to_model_input, trace_model

SMALL = ['--model-kwargs', 'img_size=64', 'rep_grid=4']


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_png(path, min_size=(200, 100), min_std=10.0):
    assert os.path.getsize(path) > 1000
    im = np.asarray(Image.open(path).convert('RGB')).astype(np.float64)
    assert im.shape[1] >= min_size[0] and im.shape[0] >= min_size[1]
    assert im.std() > min_std, f'{path} looks blank (std {im.std():.2f})'


def _naive_rate(z: np.ndarray, eps2=0.01) -> float:
    n, d = z.shape
    return 0.5 * float(np.sum(np.log(np.linalg.eigvalsh(np.eye(n) + d / (n * eps2) * z @ z.T))))


@pytest.fixture(scope='module')
def cbt_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('viz_cbt'))
    summary = viz.main(['all', '--model', 'cbt_tiny', *SMALL, '--rate-images', 'astronaut', 'chelsea',
                        '--image', 'coffee', '--out', out])
    return out, summary


def test_files_written(cbt_run):
    out, summary = cbt_run
    files = set(os.listdir(out))
    for f in ('attention_coffee.png', 'attention_maps.csv', 'coding_rate.csv', 'coding_rate.png', 'cbsa_step.csv',
              'cbsa_step.png', 'zeroshot_voc.csv', 'zeroshot_voc.png', 'zeroshot_coffee.png',
              'full_attention_coffee_layer0.png'):
        assert f in files, f
    for f in files:
        if f.endswith('.png'):
            _assert_png(os.path.join(out, f))


def test_coding_rate_csv_values(cbt_run):
    out, _ = cbt_run
    rows = _read(os.path.join(out, 'coding_rate.csv'))
    assert [int(r['layer']) for r in rows] == list(range(12))
    assert set(rows[0]) >= {'R_Z', 'Rc', 'Rc_unit', 'ista_zero_frac'}
    # recompute layer 0 and layer 11 independently: same seed/model, numpy eigenvalues on the N×N side
    model = viz.build_model('cbt_tiny', img_size=64, rep_grid=4)
    x = torch.cat([to_model_input(load_image(n), (64, 64)) for n in ('astronaut', 'chelsea')])
    tr = trace_model(model, x)
    for l in (0, 11):
        z = tr.layers[l].x.double().numpy()
        rz = np.mean([_naive_rate(z[b]) for b in range(2)])
        w = projected_tokens(tr.layers[l]).double().numpy()          # (B, H, N, p)
        rc = np.mean([sum(_naive_rate(w[b, h]) for h in range(w.shape[1])) for b in range(2)])
        assert float(rows[l]['R_Z']) == pytest.approx(rz, rel=1e-5)
        assert float(rows[l]['Rc']) == pytest.approx(rc, rel=1e-5)
        ista = tr.layers[l].ista_out.numpy()
        assert float(rows[l]['ista_zero_frac']) == pytest.approx(float((ista == 0).mean()), abs=1e-5)
    for r in rows:
        assert 0 < float(r['ista_zero_frac']) < 1            # ReLU shrinkage: a real fraction of exact zeros


def test_step_csv(cbt_run):
    out, summary = cbt_run
    rows = _read(os.path.join(out, 'cbsa_step.csv'))
    assert len(rows) == 12 * 3 * 2                            # layers × heads × (κ = 1, learned κ)
    for r in rows:
        for k in ('R_tokens_before', 'R_tokens_after', 'R_reps_before', 'R_reps_after'):
            assert math.isfinite(float(r[k])) and float(r[k]) >= 0
        assert float(r['dR_tokens']) == pytest.approx(float(r['R_tokens_after']) - float(r['R_tokens_before']),
                                                      abs=1e-4)
        # the exact step (eq. 7) with the model's own extraction matrix compresses the representatives
        assert float(r['dR_reps_exact_step']) < 0
    assert summary['exact_step_all_negative'] is True


def test_zeroshot_csv(cbt_run):
    out, summary = cbt_run
    rows = _read(os.path.join(out, 'zeroshot_voc.csv'))
    assert len(rows) == 12 * (3 + 1)                          # layers × (heads + head mean)
    for r in rows:
        assert 0 <= float(r['iou_fg']) <= 1 and 0 <= float(r['iou_bg']) <= 1
        assert float(r['gt_frac']) == pytest.approx(0.668, abs=0.01)
    assert summary['voc_best_iou'] == pytest.approx(max(float(r['iou_fg']) for r in rows), abs=1e-5)


def test_softmax_vit_and_module_entry(tmp_path):
    """The comparison model (a plain timm ViT) through the real ``python -m`` entry point."""
    out = str(tmp_path / 'vit')
    res = subprocess.run(
        [sys.executable, '-m', 'timm_cbsa.viz', 'attention', '--model', 'vit_tiny_patch16_224',
         '--model-kwargs', 'img_size=64', '--image', 'rocket', '--layers', '0,-1', '--out', out],
        capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert 'wrote' in res.stdout
    _assert_png(os.path.join(out, 'attention_rocket.png'))
    rows = _read(os.path.join(out, 'attention_maps.csv'))
    assert {r['kind'] for r in rows} == {'softmax'} and len(rows) == 12 * 3
    for r in rows:
        assert 0 < float(r['map_entropy']) <= float(r['map_entropy_max']) + 1e-9


def test_checkpoint_roundtrip(tmp_path):
    model = viz.build_model('cbt_tiny', seed=3, img_size=64, rep_grid=4, num_classes=5)
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'state_dict': model.state_dict()}, path)
    loaded = viz.build_model('cbt_tiny', checkpoint=path, seed=0, img_size=64, rep_grid=4)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize('variant', ['cbsa_star', 'agent', 'cbsa', 'linear'])
def test_converted_vit(tmp_path, variant):
    import timm_cbsa
    if not hasattr(timm_cbsa, 'convert'):
        pytest.skip('timm_cbsa.convert not available in this checkout')
    out = str(tmp_path / variant)
    viz.main(['attention', '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=64', '--convert', variant,
              '--rep-grid', '2', '--image', 'chelsea', '--layers', '0', '--out', out])
    _assert_png(os.path.join(out, 'attention_chelsea.png'))
    rows = _read(os.path.join(out, 'attention_maps.csv'))
    assert len(rows) == 12 * 3
    expected = {'cbsa_star': 'representative', 'agent': 'representative', 'cbsa': 'representative',
                'linear': 'linear'}[variant]
    assert {r['kind'] for r in rows} == {expected}


def test_analysis_command_line_and_viz_alias(tmp_path, capsys):
    """python -m timm_cbsa.analysis: every interpretability subcommand takes the shared options, viz is the same
    command line, and bad input ends with the message and exit status 2."""
    from timm_cbsa.analysis import cli
    from timm_cbsa.analysis.__main__ import main as command_line
    parser = cli.build_parser()
    for name in ('attention', 'coding-rate', 'zeroshot', 'all'):
        args = parser.parse_args([name, '--image', 'coffee', '--rate-images', 'astronaut', '--layers', '0',
                                  '--out', str(tmp_path)])
        assert (args.command, args.image, args.rate_images, args.layers) == (name, ['coffee'], ['astronaut'], '0')
    assert viz.main is cli.main
    missing = tmp_path / 'missing.pth'
    assert command_line(['attention', '--checkpoint', str(missing), '--out', str(tmp_path / 'o')]) == 2
    assert str(missing) in capsys.readouterr().err
