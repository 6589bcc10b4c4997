"""Checkpoint files are read with weights_only=True: crafted pickles cannot run code, bad files name themselves."""
import math
import os

import pytest
import torch

import timm
from timm_cbsa import CheckpointLoadError, UnsafeCheckpointError, load_official_cbt, read_state_dict
from timm_cbsa import viz



class _Payload:
    """What an attacker pickles: unpickling calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _small_cbt():
    torch.manual_seed(0)
    return timm.create_model('cbt_tiny', img_size=64, num_classes=10, rep_grid=4).eval()


def _released_layout(model):
    """The released CBT key names (inverse of cbt_checkpoint_filter_fn's rules, enough for a tiny model)."""
    return {'module.' + k: v for k, v in model.state_dict().items()}


def _released_file(path, state_dict):
    """Everything the released training script (CBSA_image_classification/main.py) saves: epoch, arch, the DDP state
    dict, best_acc1 (a tensor), the optimizer's and the LambdaLR scheduler's state dicts."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW(params, lr=2e-4)
    params[0].grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min((e + 1) / 20, 0.5 * (1 + math.cos(math.pi * e / 150))))
    torch.save({'epoch': 150, 'arch': 'Ours_tiny', 'state_dict': state_dict, 'best_acc1': torch.tensor(63.2),
                'optimizer': opt.state_dict(), 'scheduler': sched.state_dict()}, path)
    return path


def _evil_file(path, marker):
    torch.save({'state_dict': {'cls_token': torch.zeros(1, 1, 192)}, 'payload': _Payload(marker)}, path)
    return path


def test_crafted_pickle_is_refused_by_load_official_cbt(tmp_path):
    marker = tmp_path / 'pwned'
    path = _evil_file(tmp_path / 'cbt_tiny_best.pth.tar', marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_official_cbt(str(path))
    assert not marker.exists(), 'the crafted pickle ran code'
    msg = str(err.value)
    assert str(path) in msg and 'system' in msg      # names the file and the refused type (posix.system)


def test_crafted_pickle_is_refused_by_viz(tmp_path):
    marker = tmp_path / 'pwned'
    path = _evil_file(tmp_path / 'ckpt.pth.tar', marker)
    with pytest.raises(UnsafeCheckpointError, match='system'):
        viz.build_model('cbt_tiny', checkpoint=str(path), img_size=64)
    assert not marker.exists()
    # the command line reports the same error (and runs nothing)
    with pytest.raises(UnsafeCheckpointError):
        viz.main(['attention', '--model', 'cbt_tiny', '--checkpoint', str(path), '--out', str(tmp_path / 'o')])
    assert not marker.exists()


def test_released_checkpoint_contents_load_with_weights_only(tmp_path):
    model = _small_cbt()
    path = _released_file(tmp_path / 'cbt_tiny_best.pth.tar', _released_layout(model))
    loaded = load_official_cbt(str(path), variant='cbt_tiny', img_size=64, rep_grid=4, legacy_pool=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # viz loads our own checkpoints the same way (a state dict under 'state_dict', DDP prefix stripped)
    torch.save({'epoch': 1, 'state_dict': _released_layout(model)}, tmp_path / 'ours.pth.tar')
    again = viz.build_model('cbt_tiny', checkpoint=str(tmp_path / 'ours.pth.tar'), img_size=64, rep_grid=4)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize('kind', ['empty', 'truncated', 'random', 'missing', 'no_tensors'])
def test_bad_files_raise_errors_naming_the_file(tmp_path, kind):
    path = tmp_path / f'{kind}.pth.tar'
    if kind == 'empty':
        path.write_bytes(b'')
    elif kind in ('truncated', 'random'):
        good = _released_file(tmp_path / 'good.pth.tar', _released_layout(_small_cbt()))
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 3] if kind == 'truncated' else os.urandom(4096))
    elif kind == 'no_tensors':
        torch.save(['not', 'a', 'state', 'dict'], path)
    with pytest.raises(CheckpointLoadError) as err:
        load_official_cbt(str(path))
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointLoadError, match=str(path).replace('.', r'\.')):
        read_state_dict(path)


def test_safetensors_files_load(tmp_path):
    from safetensors.torch import save_file
    model = _small_cbt()
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    sd = read_state_dict(tmp_path / 'w.safetensors')
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    (tmp_path / 'bad.safetensors').write_bytes(os.urandom(256))
    with pytest.raises(CheckpointLoadError, match='bad.safetensors'):
        read_state_dict(tmp_path / 'bad.safetensors')


def test_load_converted_refuses_crafted_pickles_and_names_bad_files(tmp_path):
    """timm_cbsa.load_converted reads paths through the same weights-only reader: nothing runs, errors name the file,
    and a file written by save_converted still round-trips (its attn_layer record included)."""
    import timm
    from timm_cbsa import convert
    from timm_cbsa.convert import load_converted, save_converted
    marker = tmp_path / 'pwned'
    model = convert(timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, num_classes=3),
                    variant='cbsa_star', rep_grid=2)
    evil = _evil_file(tmp_path / 'evil.pth', marker)
    with pytest.raises(UnsafeCheckpointError, match='system') as err:
        load_converted(model, str(evil))
    assert not marker.exists() and str(evil) in str(err.value)
    with pytest.raises(CheckpointLoadError, match='does not exist'):
        load_converted(model, str(tmp_path / 'missing.pth'))
    trunc = tmp_path / 'trunc.pth'
    save_converted(model, tmp_path / 'good.pth')
    trunc.write_bytes((tmp_path / 'good.pth').read_bytes()[:200])
    with pytest.raises(CheckpointLoadError, match='trunc.pth'):
        load_converted(model, str(trunc))
    fresh = convert(timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, num_classes=3),
                    variant='cbsa_star', rep_grid=2)
    load_converted(fresh, str(tmp_path / 'good.pth'))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
