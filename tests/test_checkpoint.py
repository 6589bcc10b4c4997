"""Checkpoints carry the CBSA settings that change what the weights compute (``layers/settings.py``), every loader
checks them, state dicts without them load as before, and ``checkpoint.py`` is the one place that reads, unwraps and
reports keys. Also the 'cbsa_r4'-style attention names for ViTs built by string (``layers/named.py``).

timm's avg_checkpoints.py / clean_checkpoint.py / validate.py run when CBSA_TIMM_SCRIPTS points at a
pytorch-image-models checkout (they are not in timm's wheel or sdist)."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import clean_state_dict, load_checkpoint, load_state_dict, save_for_hf

import timm_cbsa
from timm_cbsa import CBSAConfigMismatchError, CheckpointMismatchError
from timm_cbsa.checkpoint import check_keys, is_released_layout, load_weights, read_state_dict, unwrap_state_dict
from timm_cbsa.data import DEFAULT_FASHION_MNIST_DIR, FashionMNIST
from timm_cbsa.layers import CBSA, MSSA, TSSA, AgentAttention, AgentAttentionQKV, CBSAStar, LinearAttention

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.checkpoint import CheckpointError  # noqa: E402
from train.train import main as train_main  # noqa: E402

SCRIPTS = os.environ.get('CBSA_TIMM_SCRIPTS', '')
needs_scripts = pytest.mark.skipif(
    not (SCRIPTS and os.path.isfile(os.path.join(SCRIPTS, 'avg_checkpoints.py'))),
    reason="set CBSA_TIMM_SCRIPTS to a pytorch-image-models checkout (timm's scripts are not in its sdist / wheel)")


def _nano(**kw):
    """cbt_nano_patch8_32 with random weights: 4x4 patch grid, 2x2 representatives by default."""
    torch.manual_seed(0)
    return timm.create_model('cbt_nano_patch8_32', **kw).eval()


def _vit(**kw):
    """A small cbsa_vit: 32 px, patch 8 (4x4 grid), one block."""
    torch.manual_seed(0)
    kw = dict(dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=3), **kw)
    model = timm.create_model(kw.pop('name', 'cbsa_vit_tiny'), **kw).eval()
    with torch.no_grad():   # timm's init makes A nearly uniform; larger weights make the pooling visible
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0, 0.3)
    return model


def _strip(state_dict):
    """What earlier versions of this package (and the released checkpoints) saved: no settings records."""
    return {k: v for k, v in state_dict.items() if k.rsplit('.', 1)[-1] != '_extra_state'}


def _out(model, in_chans=1, size=32):
    with torch.no_grad():
        return model(torch.randn(4, in_chans, size, size, generator=torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------------------------------------------------
# what is recorded
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('layer,record', [
    (lambda: CBSA(16, num_heads=2, rep_grid=(2, 3), legacy_pool=True), [1, 2, 2, 3, 1]),
    (lambda: CBSAStar(16, num_heads=2), [1, 2, 8, 8, 0, 0]),                       # default grid, softmax broadcast
    (lambda: AgentAttention(16, num_heads=4, rep_grid=3, broadcast='extraction'), [1, 4, 3, 3, 0, 1]),
    (lambda: AgentAttentionQKV(16, num_heads=4, rep_grid=5), [1, 4, 5, 5, 0, 0]),
    (lambda: MSSA(16, num_heads=4), [1, 4]),
    (lambda: TSSA(16, num_heads=2), [1, 2]),
    (lambda: LinearAttention(16, num_heads=8), [1, 8]),
])
def test_each_layer_records_its_settings(layer, record):
    """[format 1, num_heads, (rep_grid rows, cols, legacy_pool), (broadcast: 0 softmax / 1 extraction)]."""
    state = layer().state_dict()
    assert state['_extra_state'].dtype == torch.int64 and state['_extra_state'].tolist() == record


def test_a_model_records_every_cbsa_layer():
    sd = _nano(rep_grid=1).state_dict()
    assert [k for k in sd if k.endswith('_extra_state')] == [f'blocks.{i}.attn._extra_state' for i in range(4)]
    assert sd['blocks.3.attn._extra_state'].tolist() == [1, 2, 1, 1, 0]     # 2 heads, 1x1 grid, corrected pooling


# --------------------------------------------------------------------------------------------------------------------
# model.load_state_dict
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kw,diff,fix', [
    (dict(rep_grid=1), 'rep_grid: saved [2, 2], model [1, 1]', 'rep_grid=2'),
    (dict(rep_grid=(2, 4)), 'rep_grid: saved [2, 2], model [2, 4]', 'rep_grid=2'),
    (dict(legacy_pool=True), 'legacy_pool: saved False, model True', 'legacy_pool=False'),
])
@pytest.mark.parametrize('strict', [True, False])
def test_load_state_dict_refuses_other_settings(kw, diff, fix, strict):
    sd = _nano().state_dict()
    other = _nano(**kw)
    with pytest.raises(CBSAConfigMismatchError) as err:
        other.load_state_dict(sd, strict=strict)
    msg = str(err.value)
    assert msg.startswith('blocks.0.attn (CBSA): ') and diff in msg and fix in msg


@pytest.mark.parametrize('cls,saved,loaded', [
    (AgentAttention, dict(num_heads=2), dict(num_heads=4)),       # qkv / proj: the same shapes for 2 and 4 heads
    (MSSA, dict(num_heads=2), dict(num_heads=4)),
    (AgentAttention, dict(broadcast='extraction'), dict(broadcast='softmax')),
])
def test_settings_that_leave_every_shape_alone_are_checked(cls, saved, loaded):
    grid = dict(rep_grid=2) if cls is AgentAttention else {}
    a, b = cls(16, **dict(dict(num_heads=2, **grid), **saved)), cls(16, **dict(dict(num_heads=2, **grid), **loaded))
    setting, = saved
    with pytest.raises(CBSAConfigMismatchError, match=setting + ': saved'):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(_strip(a.state_dict()))            # without the record it loads (as before) ...
    x = torch.randn(2, 17, 16)
    call = dict(grid_size=(4, 4)) if grid else {}
    with torch.no_grad():                                 # ... and silently computes another function
        assert (a(x, **call) - b(x, **call)).abs().max() > 1e-3


def test_state_dicts_without_records_load_as_before():
    """Released checkpoints, earlier versions of this package, TorchScript state dicts: nothing to check."""
    model = _nano()
    old = _strip(model.state_dict())
    same = _nano(rep_grid=2)
    with torch.no_grad():
        for p in same.parameters():
            p.zero_()
    assert same.load_state_dict(old, strict=True).missing_keys == []
    assert torch.equal(_out(same), _out(model))
    other = _nano(rep_grid=1)
    other.load_state_dict(old, strict=True)              # not recorded: not refused, settings left alone
    assert other.blocks[0].attn.rep_grid == (1, 1)
    check_keys(old, other)                              # records are optional for the key report too


def test_a_float_record_loads_and_a_non_integer_one_is_refused():
    """timm's avg_checkpoints.py writes every entry as float32: the integers survive; an average of different
    settings does not pass for one."""
    sd = _nano().state_dict()
    as_float = {k: v.float() for k, v in sd.items()}
    _nano().load_state_dict(as_float)
    with pytest.raises(CBSAConfigMismatchError, match=r'rep_grid: saved \[2, 2\], model \[1, 1\]'):
        _nano(rep_grid=1).load_state_dict(as_float)
    averaged = dict(as_float, **{'blocks.0.attn._extra_state': torch.tensor([1., 2., 1.5, 1.5, 0.])})
    with pytest.raises(CBSAConfigMismatchError, match='averaged across checkpoints with different settings'):
        _nano().load_state_dict(averaged)


def test_torch_without_the_public_load_pre_hook(monkeypatch):
    """torch 2.4 (the declared floor) has no public load_state_dict pre-hook: set_extra_state checks the record
    (naming the layer's class) and a post-hook forgives absent ones."""
    monkeypatch.delattr(torch.nn.Module, 'register_load_state_dict_pre_hook')
    saved = _nano().state_dict()
    model = _nano()
    assert model.load_state_dict(_strip(saved), strict=True).missing_keys == []
    with pytest.raises(CBSAConfigMismatchError, match=r'^CBSA: .*rep_grid: saved \[2, 2\], model \[1, 1\]'):
        _nano(rep_grid=1).load_state_dict(saved)


# --------------------------------------------------------------------------------------------------------------------
# timm's loaders: load_checkpoint (validate.py --checkpoint), pretrained file, local-dir:
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fmt', ['pth', 'safetensors'])
def test_timm_load_checkpoint(tmp_path, fmt):
    model = _nano()
    path = tmp_path / f'w.{fmt}'
    if fmt == 'pth':   # a training checkpoint of a DDP model
        torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in model.state_dict().items()}}, path)
    else:
        save_file(model.state_dict(), str(path))
    fresh = _nano(rep_grid=2)
    with torch.no_grad():
        fresh.head.weight.zero_()
    load_checkpoint(fresh, str(path))
    assert torch.equal(_out(fresh), _out(model))
    for kw in (dict(rep_grid=1), dict(legacy_pool=True)):
        with pytest.raises(CBSAConfigMismatchError, match='blocks.0.attn'):
            load_checkpoint(_nano(**kw), str(path))


def test_pretrained_file_overlay(tmp_path):
    model = _nano()
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    overlay = dict(file=str(tmp_path / 'w.safetensors'))
    loaded = timm.create_model('cbt_nano_patch8_32', pretrained=True, pretrained_cfg_overlay=overlay).eval()
    assert torch.equal(_out(loaded), _out(model))
    for kw, diff in ((dict(rep_grid=1), 'rep_grid'), (dict(legacy_pool=True), 'legacy_pool')):
        with pytest.raises(CBSAConfigMismatchError, match=diff + ': saved'):
            timm.create_model('cbt_nano_patch8_32', pretrained=True, pretrained_cfg_overlay=overlay, **kw)


def test_local_dir_export_of_our_model(tmp_path):
    model = _vit(rep_grid=2)
    save_for_hf(model, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert loaded.blocks[0].attn.rep_grid == (2, 2)
    assert torch.equal(_out(loaded, 3), _out(model, 3))
    with pytest.raises(CBSAConfigMismatchError, match=r'blocks\.0\.attn .*rep_grid: saved \[2, 2\], model \[1, 1\]'):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True, rep_grid=1)


def test_local_dir_export_of_a_vit_built_by_string(tmp_path):
    """attn_layer='cbsa_r2' goes to config.json and rebuilds the same layers; another name is refused on load."""
    model = _vit(name='vit_tiny_patch16_224', attn_layer='cbsa_r2')
    save_for_hf(model, tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['model_args']['attn_layer'] == 'cbsa_r2'
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(loaded.blocks[0].attn).__name__ == 'CBSAR2' and loaded.blocks[0].attn.rep_grid == (2, 2)
    assert torch.equal(_out(loaded, 3), _out(model, 3))
    with pytest.raises(CBSAConfigMismatchError,
                       match=r"rep_grid: saved \[2, 2\], model \[4, 4\].*attn_layer='cbsa_r2'"):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True, attn_layer='cbsa_r4')


def test_configure_after_build_keeps_config_json_in_step(tmp_path):
    model = _vit(name='vit_tiny_patch16_224', attn_layer='agent', img_size=64)
    timm_cbsa.configure_cbsa(model, rep_grid=3)
    save_for_hf(model, tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['model_args']['attn_layer'] == 'agent_r3'
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert torch.equal(_out(loaded, 3, 64), _out(model, 3, 64))


# --------------------------------------------------------------------------------------------------------------------
# our trainer: --initial-checkpoint / --resume
# --------------------------------------------------------------------------------------------------------------------

TINY = ["--dataset", "synthetic", "--img-size", "16", "--num-classes", "4",
        "--model", "cbsa_vit_tiny", "--model-kwargs", "patch_size=4", "rep_grid=2", "embed_dim=32", "depth=1",
        "num_heads=2", "--batch-size", "16", "--max-train-samples", "32", "--max-val-samples", "16",
        "--opt", "adamw", "--lr", "3e-3", "--workers", "0", "--seed", "1", "--epochs", "1",
        "--color-jitter", "0", "--threads", "1", "--quiet"]


def test_trainer_refuses_a_checkpoint_saved_with_other_settings(tmp_path):
    """A checkpoint without the trainer's model_config (saved by another tool): the layers' records still refuse it."""
    train_main(TINY + ["--output", str(tmp_path / 'a')])
    ckpt = torch.load(tmp_path / 'a' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['state_dict']['blocks.0.attn._extra_state'].tolist() == [1, 2, 2, 2, 0]
    del ckpt['model_config']
    torch.save(ckpt, tmp_path / 'foreign.pth.tar')
    other = [a if a != 'rep_grid=2' else 'rep_grid=1' for a in TINY]
    for flag in ('--initial-checkpoint', '--resume'):
        with pytest.raises(CheckpointError, match=r"foreign\.pth\.tar' is incompatible .*rep_grid: saved \[2, 2\], "
                                                  r'model \[1, 1\]'):
            train_main(other + ["--output", str(tmp_path / flag.strip('-')), flag, str(tmp_path / 'foreign.pth.tar')])
    res = train_main(TINY + ["--output", str(tmp_path / 'ft'),
                             '--initial-checkpoint', str(tmp_path / 'foreign.pth.tar')])
    assert res['step'] == 2


# --------------------------------------------------------------------------------------------------------------------
# timm's checkpoint tools keep the records
# --------------------------------------------------------------------------------------------------------------------

def test_timm_state_dict_functions_keep_the_records(tmp_path):
    """What avg_checkpoints.py / clean_checkpoint.py call: timm.models.load_state_dict (+ clean_state_dict)."""
    model = _nano()
    torch.save({'state_dict': {'_orig_mod.module.' + k: v for k, v in model.state_dict().items()},
                'state_dict_ema': model.state_dict(), 'metric': 1.0}, tmp_path / 'c.pth.tar')
    for use_ema in (True, False):
        sd = clean_state_dict(load_state_dict(str(tmp_path / 'c.pth.tar'), use_ema=use_ema))
        assert sd['blocks.1.attn._extra_state'].tolist() == [1, 2, 2, 2, 0]
        load_weights(_nano(), sd)
        with pytest.raises(CBSAConfigMismatchError):
            load_weights(_nano(rep_grid=1), sd)


def _scripted(script, *args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@needs_scripts
@pytest.mark.parametrize('safetensors', [False, True])
def test_avg_checkpoints_script_output_loads_with_its_settings(tmp_path, safetensors):
    models = [_nano(), _nano()]
    with torch.no_grad():
        models[1].head.weight.add_(1.0)
    for i, m in enumerate(models):
        torch.save({'epoch': i, 'metric': float(i), 'state_dict': m.state_dict()}, tmp_path / f'checkpoint-{i}.pth.tar')
    out = tmp_path / ('avg.safetensors' if safetensors else 'avg.pth')
    _scripted('avg_checkpoints.py', '--input', tmp_path, '--filter', 'checkpoint-*.pth.tar', '--output', out,
              *(['--safetensors'] if safetensors else []), cwd=tmp_path)
    sd = read_state_dict(out)
    assert sd['blocks.0.attn._extra_state'].dtype == torch.float32                  # the script casts everything
    averaged = load_weights(_nano(), sd)
    torch.testing.assert_close(averaged.head.weight, (models[0].head.weight + models[1].head.weight) / 2)
    assert averaged.blocks[0].attn.rep_grid == (2, 2)
    for kw in (dict(rep_grid=1), dict(legacy_pool=True)):
        with pytest.raises(CBSAConfigMismatchError):
            load_checkpoint(_nano(**kw), str(out))


@needs_scripts
def test_clean_checkpoint_script_output_keeps_the_records(tmp_path):
    model = _nano()
    torch.save({'epoch': 1, 'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
                'optimizer': {}}, tmp_path / 'train.pth.tar')
    _scripted('clean_checkpoint.py', '--checkpoint', tmp_path / 'train.pth.tar', '--output',
              tmp_path / 'clean.pth', '--no-hash', cwd=tmp_path)
    sd = torch.load(tmp_path / 'clean.pth', weights_only=True)
    assert sd['blocks.2.attn._extra_state'].tolist() == [1, 2, 2, 2, 0]
    assert torch.equal(_out(load_weights(_nano(rep_grid=2), sd)), _out(model))
    with pytest.raises(CBSAConfigMismatchError):
        load_weights(_nano(rep_grid=1), sd)


@needs_scripts
def test_validate_script_checkpoint_flag(tmp_path):
    """timm's validate.py --checkpoint (after ``import timm_cbsa``) refuses a checkpoint saved with another rep_grid."""
    import numpy as np
    from PIL import Image
    for c in ('a', 'b'):
        (tmp_path / 'data' / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 60 * i + (100 if c == 'a' else 0), np.uint8)).save(
                tmp_path / 'data' / c / f'{i}.png')
    model = _vit(num_classes=2, rep_grid=2)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'ck.pth.tar')
    run = ('import runpy, sys, timm_cbsa; sys.argv = sys.argv[1:]; '
           'runpy.run_path(sys.argv[0], run_name="__main__")')

    def validate(rep_grid):
        return subprocess.run(
            [sys.executable, '-c', run, os.path.join(SCRIPTS, 'validate.py'), '--data-dir', tmp_path / 'data',
             '--model', 'cbsa_vit_tiny', '--checkpoint', tmp_path / 'ck.pth.tar', '--img-size', '32', '--device',
             'cpu', '--workers', '0', '--batch-size', '4', '--num-classes', '2', '--model-kwargs', 'img_size=32',
             'patch_size=8', 'depth=1', 'embed_dim=32', 'num_heads=2', f'rep_grid={rep_grid}'],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
                 'HF_HUB_OFFLINE': '1'})
    ok = validate(2)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = validate(1)
    assert bad.returncode != 0 and 'CBSAConfigMismatchError' in bad.stderr
    assert 'rep_grid: saved [2, 2], model [1, 1]' in bad.stderr


# --------------------------------------------------------------------------------------------------------------------
# the shipped Fashion-MNIST weights (the measurement)
# --------------------------------------------------------------------------------------------------------------------

def _fmnist_top1(model, n=200):
    from timm.data import create_transform, resolve_data_config
    tf = create_transform(**resolve_data_config({}, model=model))
    ds = FashionMNIST(split='test', transform=tf)
    x = torch.stack([ds[i][0] for i in range(n)])
    y = torch.tensor([ds[i][1] for i in range(n)])
    with torch.no_grad():
        return 100.0 * float((model.eval()(x).argmax(-1) == y).float().mean())


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR), reason='Debian dataset-fashion-mnist not installed')
def test_shipped_weights_refuse_the_settings_that_made_them_silently_wrong():
    """First 200 test images: the shipped weights score 92.5 %; loaded without records (as every loader did before)
    into rep_grid=1 / rep_grid=4 / legacy_pool=True models, 'all keys matched' and they scored 36.5 / 30.5 / 82.5 %
    (this machine). Now those loads raise."""
    name = 'cbt_nano_patch8_32.fmnist'
    right = timm.create_model(name, pretrained=True)
    top1 = _fmnist_top1(right)
    assert top1 >= 85.0
    shipped = _strip(right.state_dict())
    for kw in (dict(rep_grid=1), dict(rep_grid=4), dict(legacy_pool=True)):
        with pytest.raises(CBSAConfigMismatchError, match='blocks.0.attn'):
            timm.create_model(name, pretrained=True, **kw)
        wrong = timm.create_model('cbt_nano_patch8_32', **kw)
        wrong.load_state_dict(shipped)                     # what every loader did before the records
        assert _fmnist_top1(wrong) <= top1 - 5.0, kw


# --------------------------------------------------------------------------------------------------------------------
# the checkpoint module
# --------------------------------------------------------------------------------------------------------------------

def test_unwrap_finds_the_state_dict_and_removes_wrapper_prefixes():
    w = torch.zeros(1)
    for ckpt in ({'state_dict': {'module.a': w}}, {'model': {'_orig_mod.a': w}}, {'model_state_dict': {'a': w}},
                 {'module': {'_orig_mod.module.a': w}}, {'model_ema': {'a': w}, 'epoch': 1}, {'a': w}):
        assert list(unwrap_state_dict(ckpt)) == ['a'], ckpt
    both = {'state_dict': {'a': w}, 'state_dict_ema': {'a': torch.ones(1)}}
    assert unwrap_state_dict(both)['a'].item() == 0 and unwrap_state_dict(both, use_ema=True)['a'].item() == 1
    with pytest.raises(CheckpointMismatchError, match="got dict with 'a': str"):
        unwrap_state_dict({'a': 'text'})


def test_key_report_names_every_kind_of_mismatch():
    model = _nano()
    sd = model.state_dict()
    sd.pop('blocks.1.attn.step_x')
    sd['blocks.0.extra'] = torch.zeros(1)
    sd['head.weight'] = torch.zeros(3, 64)
    with pytest.raises(CheckpointMismatchError) as err:
        check_keys(sd, model)
    msg = str(err.value)
    assert 'missing keys: blocks.1.attn.step_x' in msg and 'unexpected keys: blocks.0.extra' in msg
    assert 'head.weight: checkpoint (3, 64) vs model (10, 64)' in msg


def test_released_layout_detection():
    assert is_released_layout(['module.transformer.layers.0.0.fn.proj.weight'])
    assert is_released_layout(['to_patch_embedding.proj.0.0.weight'])
    assert not is_released_layout(_nano().state_dict())


# --------------------------------------------------------------------------------------------------------------------
# rep_grid for ViTs built by string ('cbsa_r4', ...)
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['cbsa', 'cbsa_star', 'agent', 'agent_qkv'])
def test_named_grids_build_small_vits(name):
    """32 px at patch 8 is a 4x4 patch grid: the default 8x8 representatives are refused when the model is built,
    naming the names that fit; 'NAME_r4' and smaller build and run."""
    kw = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=rf"patch grid 4x4 .* smaller than the representative grid 8x8 .*"
                                         rf"attn_layer='{name}_r4'"):
        timm.create_model('vit_tiny_patch16_224', attn_layer=name, **kw)
    for r in (1, 3, 4):
        model = timm.create_model('vit_tiny_patch16_224', attn_layer=f'{name}_r{r}', **kw).eval()
        assert all(b.attn.rep_grid == (r, r) and b.attn.num_representatives == r * r for b in model.blocks)
        assert torch.isfinite(_out(model, 3)).all()


def test_named_grid_in_deit_through_model_kwargs_and_pickle():
    """What --model-kwargs attn_layer=cbsa_r2 passes to create_model; the classes pickle by name."""
    from timm.utils import ParseKwargs
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    kwargs = parser.parse_args(['--model-kwargs', 'attn_layer=cbsa_r2', 'img_size=32', 'depth=1']).model_kwargs
    model = timm.create_model('deit_tiny_distilled_patch16_224', **kwargs).eval()
    assert model.blocks[0].attn.rep_grid == (2, 2) and model.num_prefix_tokens == 2   # class + distillation
    again = pickle.loads(pickle.dumps(model))
    assert type(again.blocks[0].attn) is type(model.blocks[0].attn)
    assert torch.equal(_out(again, 3), _out(model, 3))


def test_a_named_grid_and_another_rep_grid_conflict():
    with pytest.raises(ValueError, match=r"CBSAR4 \(attn_layer='cbsa_r4'\) has the representative grid 4x4, but "
                                         r"the model's rep_grid=\(2, 2\) was given"):
        timm.create_model('cbsa_vit_tiny', img_size=64, depth=1, attn_layer='cbsa_r4', rep_grid=2)
    assert timm.create_model('cbsa_vit_tiny', img_size=64, depth=1, attn_layer='cbsa_r4').blocks[0].attn.rep_grid \
        == (4, 4)
