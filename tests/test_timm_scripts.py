"""timm's own command-line scripts with the CBSA models, through ``python -m timm_cbsa.run`` (docs/timm_scripts.md).

The runner's contract (argv, sys.path, exit status, signals) is checked against ``python SCRIPT.py`` on small scripts
written here. The commands of docs/timm_scripts.md run when ``CBSA_TIMM_SCRIPTS`` points at a pytorch-image-models
checkout (timm's scripts are not in its pip package or sdist); they use tiny models, a few hundred Fashion-MNIST images
(Debian's dataset-fashion-mnist) or generated images written as image folders here, on the CPU, with no download.
Numbers the scripts print are compared with the same models evaluated directly in this process.
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import timm_cbsa
from timm_cbsa.data import DatasetNotFoundError, FashionMNIST

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = os.environ.get('CBSA_TIMM_SCRIPTS', '')
needs_scripts = pytest.mark.skipif(
    not (SCRIPTS and os.path.isfile(os.path.join(SCRIPTS, 'validate.py'))),
    reason="set CBSA_TIMM_SCRIPTS to a pytorch-image-models checkout (timm's scripts are not in its sdist / wheel)")
_ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
        'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}


def _python(*args, cwd=None, timeout=600, **kw):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=_ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


def _run(script, *args, cwd=None):
    """``python -m timm_cbsa.run SCRIPT ARGS`` (timm's SCRIPT from the checkout when a bare name)."""
    path = script if os.path.isabs(str(script)) else os.path.join(SCRIPTS, script)
    return _python('-m', 'timm_cbsa.run', path, *args, cwd=cwd)


def _ok(proc):
    assert proc.returncode == 0, f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout


def _result(stdout):
    """The JSON the scripts print after their ``--result`` line."""
    return json.loads(stdout.split('--result\n', 1)[1])


# --------------------------------------------------------------------------------------------------------------------
# the runner behaves like `python SCRIPT.py`
# --------------------------------------------------------------------------------------------------------------------

_PROBE = '''
import json, sys
import timm
from timm.models.vision_transformer import ATTN_LAYERS
print(json.dumps({'argv': sys.argv, 'path0': sys.path[0], 'name': __name__,
                  'cbsa_model': timm.is_model('cbsa_vit_tiny_patch16_224'), 'cbsa_attn': 'cbsa' in ATTN_LAYERS}))
'''


def test_runner_passes_argv_path_and_registers_cbsa(tmp_path):
    script = tmp_path / 'sub dir' / 'probe.py'
    script.parent.mkdir()
    script.write_text(_PROBE)
    args = ['--model', 'cbsa_vit_tiny_patch16_224', '--model-kwargs', 'attn_layer=cbsa', 'a b', '--', '-x']
    via_runner = json.loads(_ok(_python('-m', 'timm_cbsa.run', script, *args, cwd=tmp_path)))
    plain = json.loads(_ok(_python(script, *args, cwd=tmp_path)))
    assert via_runner['argv'] == plain['argv'] == [str(script), *args]
    assert via_runner['path0'] == plain['path0'] == str(script.parent)
    assert via_runner['name'] == plain['name'] == '__main__'
    assert via_runner['cbsa_model'] and via_runner['cbsa_attn']
    assert not plain['cbsa_model'] and not plain['cbsa_attn']   # what the runner is for


@pytest.mark.parametrize('body', [
    'import sys; sys.exit(3)',
    'raise SystemExit("stopped: bad argument")',
    'raise KeyboardInterrupt',
    'import os, signal; os.kill(os.getpid(), signal.SIGTERM)',
])
def test_runner_exit_status_matches_plain_python(tmp_path, body):
    script = tmp_path / 'exit.py'
    script.write_text(body + '\n')
    via_runner, plain = _python('-m', 'timm_cbsa.run', script), _python(script)
    assert via_runner.returncode == plain.returncode != 0
    assert via_runner.stderr.strip().splitlines()[-1:] == plain.stderr.strip().splitlines()[-1:]


def test_runner_signal_reaches_the_script(tmp_path):
    """SIGINT sent to the runner's process is the script's KeyboardInterrupt (its handler runs), as with python."""
    script = tmp_path / 'wait.py'
    script.write_text('import sys, time\ntry:\n    print("ready", flush=True)\n    time.sleep(60)\n'
                      'except KeyboardInterrupt:\n    print("interrupted", flush=True)\n    sys.exit(5)\n')
    # a shell's background job inherits SIGINT ignored, and then Python installs no KeyboardInterrupt handler: start
    # the runner with SIGINT at its default, as from a terminal
    proc = subprocess.Popen([sys.executable, '-m', 'timm_cbsa.run', str(script)], env=_ENV, stdout=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == 'ready'
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 5
        assert proc.stdout.read().strip() == 'interrupted'
    finally:
        proc.kill()


def test_runner_missing_script_and_usage(tmp_path):
    missing = _python('-m', 'timm_cbsa.run', tmp_path / 'nope.py', '--model', 'x')
    assert missing.returncode == 2
    assert 'nope.py' in missing.stderr and 'does not exist' in missing.stderr and 'usage:' in missing.stderr
    folder = _python('-m', 'timm_cbsa.run', tmp_path)
    assert folder.returncode == 2 and 'is a folder, not a script' in folder.stderr
    bare = _python('-m', 'timm_cbsa.run')
    assert bare.returncode == 2 and bare.stderr.startswith('usage: python -m timm_cbsa.run SCRIPT.py')


def test_console_script_declared():
    tomllib = pytest.importorskip('tomllib')
    scripts = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['scripts']
    module, func = scripts['timm-cbsa-run'].split(':')
    assert (module, func) == ('timm_cbsa.run', 'main')


# --------------------------------------------------------------------------------------------------------------------
# data and models written by the tests
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def fmnist_folder(tmp_path_factory):
    """200 Fashion-MNIST training and 200 test images as an image folder: train/<label>/*.png, validation/<label>/."""
    root = tmp_path_factory.mktemp('fmnist')
    try:
        for split, folder in (('train', 'train'), ('test', 'validation')):
            ds = FashionMNIST(split=split)
            for i in range(200):
                img, label = ds[i]
                (root / folder / str(label)).mkdir(parents=True, exist_ok=True)
                img.save(root / folder / str(label) / f'{i:05d}.png')
    except DatasetNotFoundError as e:
        pytest.skip(str(e))
    return root


@pytest.fixture(scope='module')
def rgb_folder(tmp_path_factory):
    """Generated 64x64 RGB images, 3 classes x 6, as validation/<class>/*.png (class c: a bright c-th channel)."""
    root = tmp_path_factory.mktemp('rgb')
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / 'validation' / str(c)).mkdir(parents=True)
        for i in range(6):
            img = rng.integers(0, 120, (64, 64, 3), dtype=np.uint8)
            img[..., c] += 120
            Image.fromarray(img).save(root / 'validation' / str(c) / f'{i}.png')
    return root


def _direct(model, folder, **args):
    """(top-1 %, {relative path: softmax probabilities}) of ``model`` on an image folder, evaluated here with the
    data config timm's scripts resolve (the model's, updated by ``args`` such as img_size) — no script involved."""
    cfg = resolve_data_config(args, model=model)
    transform = create_transform(**cfg)
    mode = 'L' if cfg['input_size'][0] == 1 else 'RGB'
    probs, correct = {}, []
    model.eval()
    for path in sorted(folder.glob('*/*.png')):
        x = transform(Image.open(path).convert(mode)).unsqueeze(0)
        with torch.no_grad():
            p = model(x).softmax(-1)[0]
        probs[f'{path.parent.name}/{path.name}'] = p
        correct.append(int(p.argmax()) == int(path.parent.name))
    return 100.0 * sum(correct) / len(correct), probs


def _jittered(name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


TINY = {   # model name, --model-kwargs for the script, the same kwargs for create_model
    'cbsa_vit': ('cbsa_vit_tiny_patch16_224', ['depth=2', 'img_size=64', 'rep_grid=2'],
                 dict(depth=2, img_size=64, rep_grid=2)),
    'cbt': ('cbt_tiny', ['depth=2', 'img_size=64', 'rep_grid=2'], dict(depth=2, img_size=64, rep_grid=2)),
    # a vit_* entrypoint takes no rep_grid: the default 8x8 representatives need an 8x8 patch grid (64 px / 8 px)
    'vit_attn_layer': ('vit_tiny_patch16_224', ['depth=2', 'img_size=64', 'patch_size=8', 'attn_layer=cbsa'],
                       dict(depth=2, img_size=64, patch_size=8, attn_layer='cbsa')),
}


def _create(kind, **extra):
    name, _, kw = TINY[kind]
    return timm.create_model(name, **kw, **extra)


# --------------------------------------------------------------------------------------------------------------------
# timm's scripts
# --------------------------------------------------------------------------------------------------------------------

@needs_scripts
def test_plain_timm_script_does_not_know_cbsa():
    """Without the runner timm's scripts refuse CBSA models (the reason the runner exists)."""
    proc = _python(os.path.join(SCRIPTS, 'benchmark.py'), '--model', 'cbsa_vit_tiny_patch16_224', '--device', 'cpu',
                   '--bench', 'inference', '--num-bench-iter', '1', '-b', '1', '--no-retry')
    assert 'Unknown model (cbsa_vit_tiny_patch16_224)' in proc.stdout + proc.stderr


@needs_scripts
@pytest.mark.slow
@pytest.mark.parametrize('kind', list(TINY))
def test_benchmark(tmp_path, kind):
    name, kwargs, _ = TINY[kind]
    out = _ok(_run('benchmark.py', '--model', name, '--device', 'cpu', '--bench', 'both', '--num-warm-iter', '1',
                   '--num-bench-iter', '5', '-b', '2', '--img-size', '64', '--model-kwargs', *kwargs))
    res = _result(out)
    model = _create(kind)
    assert res['param_count'] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert res['infer_img_size'] == res['train_img_size'] == 64
    assert res['infer_samples_per_sec'] > 0 and res['train_samples_per_sec'] > 0


@needs_scripts
@pytest.mark.slow
def test_validate_shipped_fmnist_weights(fmnist_folder):
    """The 1-channel cbt_nano_patch8_32 with its shipped .fmnist weights: --pretrained --in-chans 1."""
    res = _result(_ok(_run('validate.py', '--model', 'cbt_nano_patch8_32.fmnist', '--pretrained', '--in-chans', '1',
                           '--data-dir', fmnist_folder, '--device', 'cpu', '-b', '50', '-j', '0')))
    top1, _ = _direct(timm.create_model('cbt_nano_patch8_32.fmnist', pretrained=True), fmnist_folder / 'validation')
    assert res['top1'] == pytest.approx(top1, abs=1e-3) and top1 > 80   # shipped weights: 89.5% on all 10k


@needs_scripts
@pytest.mark.slow
@pytest.mark.parametrize('kind', list(TINY))
def test_validate_checkpoint(tmp_path, rgb_folder, kind):
    name, kwargs, kw = TINY[kind]
    model = _jittered(name, num_classes=3, **kw)
    torch.save(model.state_dict(), tmp_path / 'model.pth')
    res = _result(_ok(_run('validate.py', '--model', name, '--checkpoint', tmp_path / 'model.pth', '--num-classes',
                           '3', '--data-dir', rgb_folder, '--img-size', '64', '--device', 'cpu', '-b', '6', '-j',
                           '0', '--model-kwargs', *kwargs)))
    top1, _ = _direct(model, rgb_folder / 'validation', img_size=64)
    assert res['top1'] == pytest.approx(top1, abs=1e-3)


@needs_scripts
@pytest.mark.slow
def test_inference_shipped_fmnist_weights(tmp_path, fmnist_folder):
    """inference.py reads images as RGB: without --in-chans, timm adapts the grey stem to 3 equal channels."""
    pytest.importorskip('pandas')   # inference.py needs it (the timm_scripts extra)
    _ok(_run('inference.py', '--model', 'cbt_nano_patch8_32.fmnist', '--pretrained', '--data-dir', fmnist_folder,
             '--device', 'cpu', '-b', '50', '-j', '0', '--topk', '1', '--fullname', '--results-dir', tmp_path,
             '--results-format', 'json'))
    got = json.loads((tmp_path / 'cbt_nano_patch8_32.fmnist-32.json').read_text())
    model = timm.create_model('cbt_nano_patch8_32.fmnist', pretrained=True)
    _, probs = _direct(model, fmnist_folder / 'validation')
    labels = model.pretrained_cfg['label_names']
    assert sorted(got) == sorted(probs)
    for path, p in probs.items():
        assert got[path]['label'] == labels[int(p.argmax())]
        assert got[path]['prob'] == pytest.approx(float(p.max()), abs=1e-4)


@needs_scripts
@pytest.mark.slow
def test_train_avg_clean_validate(tmp_path, fmnist_folder):
    """train.py (2 epochs) → avg_checkpoints.py → clean_checkpoint.py → validate.py --checkpoint."""
    _ok(_run('train.py', '--data-dir', fmnist_folder, '--model', 'cbt_nano_patch8_32', '--in-chans', '1',
             '--num-classes', '10', '--epochs', '2', '-b', '50', '--workers', '0', '--device', 'cpu',
             '--output', tmp_path, '--experiment', 'run', '--checkpoint-hist', '2', '--opt', 'adamw', '--lr', '1e-3',
             '--warmup-epochs', '0', '--no-prefetcher', '--seed', '0'))
    run = tmp_path / 'run'
    checkpoints = sorted(run.glob('checkpoint-*.pth.tar'))
    assert len(checkpoints) == 2
    _ok(_run('avg_checkpoints.py', '--input', run, '--filter', 'checkpoint-*.pth.tar', '--output',
             tmp_path / 'avg.pth', '-n', '2', '--no-use-ema'))
    states = [torch.load(c, map_location='cpu', weights_only=False)['state_dict'] for c in checkpoints]
    avg = torch.load(tmp_path / 'avg.pth', map_location='cpu', weights_only=True)
    assert set(avg) == set(states[0])
    for k, v in avg.items():
        torch.testing.assert_close(v, ((states[0][k].double() + states[1][k].double()) / 2).to(v.dtype))
    _ok(_run('clean_checkpoint.py', '--checkpoint', run / 'model_best.pth.tar', '--output', tmp_path / 'clean.pth',
             '--no-hash'))
    best = torch.load(run / 'model_best.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    clean = torch.load(tmp_path / 'clean.pth', map_location='cpu', weights_only=True)
    assert set(clean) == set(best) and all(torch.equal(clean[k], best[k]) for k in best)
    res = _result(_ok(_run('validate.py', '--model', 'cbt_nano_patch8_32', '--in-chans', '1', '--checkpoint',
                           tmp_path / 'avg.pth', '--data-dir', fmnist_folder, '--device', 'cpu', '-b', '50', '-j', '0')))
    model = timm.create_model('cbt_nano_patch8_32', in_chans=1)
    model.load_state_dict(avg)
    top1, _ = _direct(model, fmnist_folder / 'validation')
    assert res['top1'] == pytest.approx(top1, abs=1e-3)


@needs_scripts
@pytest.mark.slow
@pytest.mark.parametrize('kind', list(TINY))
def test_onnx_export_and_validate_local_dir(tmp_path, rgb_folder, kind):
    """onnx_export.py has no --model-kwargs: export a small model saved with timm_cbsa.save_to_folder as
    --model local-dir:FOLDER; onnx_validate.py (which knows no model: give it the model's data config) reports the
    PyTorch model's top-1."""
    pytest.importorskip('onnx')   # onnx, onnxscript, onnxruntime: the timm_scripts extra
    pytest.importorskip('onnxruntime')
    model = _jittered(TINY[kind][0], num_classes=3, **TINY[kind][2])
    timm_cbsa.save_to_folder(model, tmp_path / 'model')
    _ok(_run('onnx_export.py', tmp_path / 'model.onnx', '--model', f'local-dir:{tmp_path / "model"}',
             '--img-size', '64', '--check-forward'))
    cfg = resolve_data_config({'img_size': 64}, model=model)
    out = _ok(_run('onnx_validate.py', rgb_folder / 'validation', '--onnx-input', tmp_path / 'model.onnx',
                   '--img-size', '64', '--crop-pct', cfg['crop_pct'], '--interpolation', cfg['interpolation'],
                   '--mean', *cfg['mean'], '--std', *cfg['std'], '-b', '6', '-j', '0'))
    top1 = float(re.search(r'\* Prec@1 ([0-9.]+)', out).group(1))
    expected, _ = _direct(model, rgb_folder / 'validation', img_size=64)
    assert top1 == pytest.approx(expected, abs=1e-3)


@needs_scripts
@pytest.mark.slow
def test_onnx_export_cbsa_vit_224(tmp_path):
    """The docs' command for a 224-px model: --checkpoint (no pretrained weights exist); --check-forward compares
    onnxruntime's output with PyTorch's."""
    pytest.importorskip('onnxruntime')
    torch.save(_jittered('cbsa_vit_tiny_patch16_224').state_dict(), tmp_path / 'model.pth')
    _ok(_run('onnx_export.py', tmp_path / 'model.onnx', '--model', 'cbsa_vit_tiny_patch16_224', '--checkpoint',
             tmp_path / 'model.pth', '--check-forward'))
    assert (tmp_path / 'model.onnx').stat().st_size > 5e6 * 4 * 0.9   # ~5.7M float32 parameters
