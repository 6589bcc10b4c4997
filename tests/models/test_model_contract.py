"""The timm model contract for every registered cbsa_vit_* / cbt_* model, where it checks more than timm's own
tests/test_models.py (run on our models by tests/timm_suite/run_timm_model_tests.py in CI): outputs of TorchScript and
FX graphs equal to eager, grad checkpointing not changing outputs, features_only equal to forward_intermediates.

Models run at 128 px (an 8x8 patch grid = the default 8x8 representative grid) to keep CPU time low.
"""
import pytest
import torch

import timm
from timm.layers import get_notrace_functions, get_notrace_modules, set_layer_config
from torchvision.models.feature_extraction import create_feature_extractor

ALL_MODELS = timm.list_models('cbsa*') + timm.list_models('cbt*')
# the *_patch16_224 names are aliases of the short names: full contract on the 8 architectures, identity for aliases
ALIASES = [m for m in ALL_MODELS if m.endswith('_patch16_224')]
# cbt_nano_patch8_32 (1-channel 32×32 Fashion-MNIST model): timm's test_models.py and test_pretrained_fmnist.py
MODELS = [m for m in ALL_MODELS if m not in ALIASES and m != 'cbt_nano_patch8_32']
IMG = 128


def _input(batch=2):
    return torch.randn(batch, 3, IMG, IMG)


def test_all_families_registered():
    assert set(ALL_MODELS) == {
        'cbsa_vit_tiny', 'cbsa_vit_small', 'cbsa_vit_base', 'cbsa_vit_large',
        'cbsa_vit_tiny_patch16_224', 'cbsa_vit_small_patch16_224', 'cbsa_vit_base_patch16_224',
        'cbsa_vit_large_patch16_224', 'cbt_tiny', 'cbt_small', 'cbt_base', 'cbt_large', 'cbt_nano_patch8_32'}


@pytest.mark.parametrize('alias', ALIASES)
def test_alias_is_the_same_architecture(alias):
    short = alias.replace('_patch16_224', '')
    with torch.device('meta'):
        a, b = timm.create_model(alias), timm.create_model(short)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.pretrained_cfg['input_size'] == b.pretrained_cfg['input_size'] == (3, 224, 224)
    assert a.blocks[0].attn.rep_grid == b.blocks[0].attn.rep_grid == (8, 8)


@pytest.mark.parametrize('name', MODELS)
def test_forward_and_grad_checkpointing(name):
    model = timm.create_model(name, img_size=IMG).eval()
    x = _input()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_torchscript(name):
    with set_layer_config(scriptable=True):
        model = timm.create_model(name, img_size=IMG).eval()
    scripted = torch.jit.script(model)
    x = _input(1)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', MODELS)
def test_fx_forward_and_backward(name):
    model = timm.create_model(name, img_size=IMG).eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    fx_model = create_feature_extractor(model, return_nodes=['head'], tracer_kwargs=tracer_kwargs)
    x = _input(1)
    with torch.no_grad():
        torch.testing.assert_close(fx_model(x)['head'], model(x), rtol=0, atol=0)
    model.train()
    fx_train = create_feature_extractor(model.train(), return_nodes=['head'], tracer_kwargs=tracer_kwargs)
    fx_train(x)['head'].mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('name', MODELS)
def test_features_only_and_intermediates(name):
    model = timm.create_model(name, img_size=IMG).eval()
    x = _input(1)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inters) == len(model.blocks) and inters[-1].shape == (1, model.embed_dim, IMG // 16, IMG // 16)
        feat_model = timm.create_model(name, img_size=IMG, features_only=True, out_indices=(-3, -2, -1)).eval()
        missing, _ = feat_model.model.load_state_dict(model.state_dict(), strict=False)  # its head is pruned
        assert not missing
        feats = feat_model(x)
    assert len(feats) == 3 and feat_model.feature_info.channels() == [model.embed_dim] * 3
    torch.testing.assert_close(feats[-1], inters[-1])


@pytest.mark.slow
@pytest.mark.parametrize('name', ['cbsa_vit_tiny', 'cbt_tiny'])
def test_torch_compile_fullgraph(name):
    model = timm.create_model(name, img_size=IMG, dynamic_img_size=True).eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for hw in [(IMG, IMG), (IMG, IMG + 64)]:
            x = torch.randn(1, 3, *hw)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_public_usage_from_the_issue():
    assert timm.create_model('cbsa_vit_base').blocks[0].attn.num_representatives == 64
    m = timm.create_model('cbsa_vit_small_patch16_224', num_classes=10, img_size=384)
    assert m.blocks[0].attn.grid_size == (24, 24) and m.head.out_features == 10
    assert timm.create_model('cbt_small').embed_dim == 384


def test_model_level_bad_input():
    with pytest.raises(ValueError, match=r'patch grid 4x4 .* smaller than the representative grid 8x8'):
        timm.create_model('cbsa_vit_tiny', img_size=64)
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('cbsa_vit_gigantic')
    with pytest.raises(ValueError, match='Unknown CBSA backend'):
        timm.create_model('cbsa_vit_tiny', backend='cuda-magic')
    model = timm.create_model('cbsa_vit_tiny').eval()
    with pytest.raises(AssertionError, match=r"Input height \(160\) doesn't match model \(224\)"):
        model(torch.randn(1, 3, 160, 224))
    model = timm.create_model('cbt_tiny', dynamic_img_size=True).eval()
    with pytest.raises(AssertionError, match='should be divisible by patch size'):
        model(torch.randn(1, 3, 200, 224))
