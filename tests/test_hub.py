"""save_for_hf → create_model('local-dir:…', pretrained=True) round trips give identical logits (no network)."""
import json

import pytest
import timm
import torch
from timm.models import save_for_hf

import timm_cbsa
from timm_cbsa.convert import VARIANTS


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')


def _jitter(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _round_trip(model, path, **load_kw):
    save_for_hf(model, path)
    cfg = json.loads((path / 'config.json').read_text())
    return timm.create_model(f'local-dir:{path}', pretrained=True, **load_kw).eval(), cfg


def _assert_same(a, b, size=128):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_cbsa_vit_round_trip(tmp_path):
    model = _jitter(timm.create_model('cbsa_vit_tiny_patch16_224', depth=2, img_size=128, rep_grid=4,
                                      num_classes=10)).eval()
    loaded, cfg = _round_trip(model, tmp_path / 'cbsa_vit')
    assert cfg['architecture'] == 'cbsa_vit_tiny_patch16_224' and cfg['model_args']['rep_grid'] == 4
    assert loaded.blocks[0].attn.rep_grid == (4, 4)
    _assert_same(model, loaded)


def test_cbt_round_trip(tmp_path):
    model = _jitter(timm.create_model('cbt_tiny', depth=2, img_size=128, num_classes=10)).eval()
    loaded, cfg = _round_trip(model, tmp_path / 'cbt')
    assert cfg['architecture'] == 'cbt_tiny'
    _assert_same(model, loaded)


@pytest.mark.parametrize('variant', ['cbsa_star', 'agent', 'cbsa', 'linear'])
def test_converted_vit_round_trip(tmp_path, variant):
    model = _jitter(timm.create_model('vit_tiny_patch16_224', depth=2, img_size=128, num_classes=10)).eval()
    timm_cbsa.convert(model, variant)                               # default rep_grid 8 on the 8x8 grid
    loaded, cfg = _round_trip(model, tmp_path / variant)
    assert cfg['architecture'] == 'vit_tiny_patch16_224'
    assert cfg['model_args']['attn_layer'] == VARIANTS[variant][1]
    assert timm_cbsa.attention_kind(loaded) == timm_cbsa.attention_kind(model)
    _assert_same(model, loaded)


def test_converted_reg_token_vit_non_default_rep_grid(tmp_path):
    """A non-default rep_grid of a converted vit_* travels as the registered name ('agent_qkv_r4')."""
    model = _jitter(timm.create_model('vit_base_patch16_reg4_gap_256', depth=2, img_size=128, embed_dim=192,
                                      num_heads=3, num_classes=10)).eval()
    timm_cbsa.convert(model, 'agent', rep_grid=4)
    loaded, cfg = _round_trip(model, tmp_path / 'reg')
    assert cfg['model_args']['attn_layer'] == 'agent_qkv_r4' and loaded.blocks[0].attn.rep_grid == (4, 4)
    _assert_same(model, loaded)


def test_creation_time_attn_layer_round_trip(tmp_path):
    model = _jitter(timm.create_model('deit_tiny_distilled_patch16_224', depth=2, img_size=128, num_classes=10,
                                      attn_layer='cbsa_star')).eval()
    loaded, cfg = _round_trip(model, tmp_path / 'deit')
    assert cfg['model_args']['attn_layer'] == 'cbsa_star'
    _assert_same(model, loaded)
