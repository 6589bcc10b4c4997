"""configure_cbsa / convert validate before they change a model, and saved models record the CBSA configuration
(rep_grid, legacy_pool) that their weights need (cbsa_config / check_cbsa_config)."""
import json
import logging

import pytest
import timm
import torch
from timm.models import save_for_hf

import timm_cbsa
from timm_cbsa import CBSAConfigMismatchError, cbsa_config, check_cbsa_config, configure_cbsa


def _logits(model, size=64):
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', attn_layer='cbsa_r4', img_size=64, depth=2, num_classes=5,
                             **kw).eval()


@pytest.mark.parametrize('kwargs', [dict(rep_grid=99), dict(rep_grid=(2, 9)), dict(rep_grid=0), dict(rep_grid=2.5),
                                    dict(rep_grid=2, legacy_pool='yes'), dict(rep_grid=2, backend='nope'),
                                    dict(rep_grid=2, legacy_pool=True)])
def test_refused_configure_leaves_the_model_unchanged(kwargs):
    model = _vit(reg_tokens=2)   # 3 prefix tokens: legacy_pool=True is refused too
    configure_cbsa(model, rep_grid=4)
    before = _logits(model)
    state = [(b.attn.rep_grid, b.attn.legacy_pool, b.attn.backend) for b in model.blocks]
    with pytest.raises(ValueError):
        configure_cbsa(model, **kwargs)
    assert [(b.attn.rep_grid, b.attn.legacy_pool, b.attn.backend) for b in model.blocks] == state
    assert torch.equal(_logits(model), before)


@pytest.mark.parametrize('bad', [0, -1, True])
def test_convert_refuses_a_bad_rep_grid_before_touching_the_model(bad):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2, num_classes=5).eval()
    before = _logits(model)
    with pytest.raises(ValueError, match=r'rep_grid must be a positive int'):
        timm_cbsa.convert(model, 'cbsa', rep_grid=bad)
    assert type(model.blocks[0].attn).__name__ == 'Attention'
    assert torch.equal(_logits(model), before)


def test_cbsa_config_reads_the_layers_and_our_models_record_it_in_model_args():
    model = timm.create_model('cbsa_vit_tiny', img_size=64, depth=2, rep_grid=2)
    assert cbsa_config(model) == {'rep_grid': [2, 2], 'legacy_pool': False}
    configure_cbsa(model, rep_grid=(2, 4))
    assert model._model_args['rep_grid'] == [2, 4] and model._model_args['legacy_pool'] is False
    assert cbsa_config(timm.create_model('vit_tiny_patch16_224', img_size=64, depth=1)) == {}


def test_saved_config_round_trips_and_a_different_rep_grid_is_refused(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('cbsa_vit_tiny', img_size=128, depth=2, num_classes=5).eval()
    configure_cbsa(model, rep_grid=2)            # changed after construction: still saved
    with torch.no_grad():
        for b in model.blocks:
            b.attn.qkv.weight.normal_(0, 0.1)
    save_for_hf(model, tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['model_args']['rep_grid'] == [2, 2]
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert cbsa_config(loaded) == cbsa_config(model)
    assert torch.equal(_logits(loaded, 128), _logits(model, 128))
    with pytest.raises(CBSAConfigMismatchError, match=r'rep_grid: saved \[2, 2\], model \[4, 4\]'):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True, rep_grid=4)


def test_converted_checkpoints_record_the_config(tmp_path):
    model = timm_cbsa.convert(timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2), 'cbsa', rep_grid=2)
    timm_cbsa.save_converted(model, tmp_path / 'ck.pth')
    other = timm_cbsa.convert(timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2), 'cbsa', rep_grid=4)
    with pytest.raises(CBSAConfigMismatchError, match='rep_grid'):
        timm_cbsa.load_converted(other, tmp_path / 'ck.pth')
    same = timm_cbsa.convert(timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2), 'cbsa', rep_grid=2)
    timm_cbsa.load_converted(same, tmp_path / 'ck.pth')


def test_check_cbsa_config_warns_when_not_strict(caplog):
    model = _vit()
    configure_cbsa(model, rep_grid=2)
    check_cbsa_config(model, {'rep_grid': 2, 'legacy_pool': False})            # same: silent
    check_cbsa_config(model, {})                                                # nothing recorded: not checked
    with caplog.at_level(logging.WARNING):
        check_cbsa_config(model, {'rep_grid': [4, 4], 'legacy_pool': True}, strict=False)
    assert 'legacy_pool: saved True, model False' in caplog.text and 'rep_grid: saved [4, 4]' in caplog.text
