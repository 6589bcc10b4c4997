"""The public API: __all__ names what timm_cbsa exports; every error timm_cbsa raises on purpose is a CBSAError and
keeps its built-in base (so existing ``except ValueError`` / ``RuntimeError`` / ``TypeError`` code still catches it)."""
import pytest
import torch

import timm_cbsa
from timm_cbsa.data import DatasetNotFoundError, FashionMNIST


def test_all_names_exist_and_internals_are_not_exported():
    assert all(hasattr(timm_cbsa, name) for name in timm_cbsa.__all__)
    assert len(set(timm_cbsa.__all__)) == len(timm_cbsa.__all__)
    for internal in ('PatchGridHook', 'current_patch_grid', 'find_grid_aware_layers', 'pool_representatives',
                     'FAMILY_ATTN_LAYERS', 'contract_and_broadcast_general', 'default_backend'):
        assert internal not in timm_cbsa.__all__ and not hasattr(timm_cbsa, internal), internal


@pytest.mark.parametrize('name,builtin', [
    ('CBSAConfigMismatchError', ValueError), ('CheckpointLoadError', RuntimeError),
    ('UnsafeCheckpointError', RuntimeError), ('CheckpointMismatchError', RuntimeError),
    ('UnsupportedModelError', TypeError),
])
def test_errors_are_cbsa_errors_with_their_builtin_base(name, builtin):
    cls = getattr(timm_cbsa, name)
    assert issubclass(cls, timm_cbsa.CBSAError) and issubclass(cls, builtin)


def test_raised_errors_are_caught_by_both_bases(tmp_path):
    with pytest.raises(timm_cbsa.CBSAError, match='nn.Module'):
        timm_cbsa.convert(object())
    with pytest.raises(TypeError, match='nn.Module'):
        timm_cbsa.convert(object())
    missing = tmp_path / 'missing.pth'
    with pytest.raises(timm_cbsa.CBSAError, match='missing.pth'):
        timm_cbsa.read_state_dict(str(missing))
    with pytest.raises(RuntimeError, match='missing.pth'):
        timm_cbsa.read_state_dict(str(missing))
    with pytest.raises(timm_cbsa.CBSAError):
        FashionMNIST(root=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        FashionMNIST(root=str(tmp_path))
    with pytest.raises(timm_cbsa.CBSAError, match='rep_grid'):
        timm_cbsa.check_cbsa_config(torch.nn.Sequential(timm_cbsa.CBSA(8, 2, rep_grid=2)), {'rep_grid': [4, 4]})
    assert issubclass(DatasetNotFoundError, timm_cbsa.CBSAError)
