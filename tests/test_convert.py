"""CBSA in existing timm ViTs: at creation (attn_layer=NAME) and by converting a loaded model (timm_cbsa.convert),
checked against direct computations from the pretrained weights; bad input and cross-variant checkpoints."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_cbsa
from timm_cbsa.layers.layout import current_patch_grid
from timm_cbsa import CheckpointMismatchError, UnsupportedModelError, configure_cbsa
from timm_cbsa.convert import VARIANTS, attention_kind, create_with_attention, load_converted, save_converted

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


def _sm(x):
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _pool(t, grid, rep):
    """Block means over the last gh*gw tokens (the patch grid); needs grid divisible by rep."""
    B, H, N, d = t.shape
    (gh, gw), (rh, rw) = grid, rep
    assert gh % rh == 0 and gw % rw == 0
    g = t[:, :, N - gh * gw:].reshape(B, H, rh, gh // rh, rw, gw // rw, d)
    return g.mean(dim=(3, 5)).reshape(B, H, rh * rw, d)


def _weights(attn):
    """Pretrained weights of a timm Attention (copies, so later in-place changes cannot leak in)."""
    return {k: v.detach().clone() for k, v in attn.state_dict().items()} | {'H': attn.num_heads}


def manual(kind, wts, x, grid, rep, steps=None):
    """Direct computation of attention ``kind`` on tokens x (B, N, C) from (pretrained) weights ``wts``."""
    B, N, C = x.shape
    H = wts['H']
    d = C // H
    s = d ** -0.5
    heads = lambda t: t.reshape(B, N, H, d).transpose(1, 2)  # noqa: E731
    Wqkv, bqkv = wts['qkv.weight'], wts['qkv.bias']
    if kind == 'cbsa':       # single projection U = W_v (value rows), eta / kappa given
        eta, kappa = steps
        w = heads(x @ Wqkv[2 * C:].T + bqkv[2 * C:])
        r0 = _pool(w, grid, rep)
        A = _sm((r0 @ w.transpose(-1, -2)) * s)
        r = r0 + eta * (A @ w)
        y = kappa * (A.transpose(-1, -2) @ (_sm((r @ r.transpose(-1, -2)) * s) @ r))
    else:
        q, k, v = (heads(t) for t in (x @ Wqkv.T + bqkv).split(C, dim=-1))
        if kind == 'cbsa_star':  # eta = kappa = 1 right after conversion
            eta, kappa = steps if steps is not None else (1.0, 1.0)
            r0 = _pool(q, grid, rep)
            r = r0 + eta * (_sm((r0 @ k.transpose(-1, -2)) * s) @ v)
            c = _sm((r @ r.transpose(-1, -2)) * s) @ r
            y = kappa * (_sm((q @ r.transpose(-1, -2)) * s) @ c)
        elif kind == 'agent':
            a = _pool(q, grid, rep)
            y = _sm((q @ a.transpose(-1, -2)) * s) @ (_sm((a @ k.transpose(-1, -2)) * s) @ v)
        elif kind == 'linear':
            kern = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
            y = (kern @ v) / (kern.sum(-1, keepdim=True) + 1e-6)
        else:
            raise ValueError(kind)
    return y.transpose(1, 2).reshape(B, N, C) @ wts['proj.weight'].T + wts['proj.bias']


class ManualAttn(nn.Module):
    """Stands in for a block's attention: the direct computation with the grid read from the model."""

    def __init__(self, kind, wts, model, rep, steps=None):
        super().__init__()
        self.kind, self.wts, self.rep, self.steps = kind, wts, rep, steps
        self.grid = [tuple(model.patch_embed.grid_size)]
        model.patch_embed.register_forward_hook(self._set_grid)

    def _set_grid(self, module, args, out):   # dynamic_img_size: NHWC output of the actual grid
        self.grid[0] = tuple(out.shape[1:3]) if out.ndim == 4 else tuple(module.grid_size)

    def forward(self, x, attn_mask=None, is_causal=False):
        return manual(self.kind, self.wts, x, self.grid[0], self.rep, self.steps)


def _jitter(model, seed=0):
    """timm zero-initialises biases; give every parameter random values so weight copies are really checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


def _vit(name='vit_tiny_patch16_224', **kw):
    kw = dict(dict(depth=2, img_size=128, num_classes=7), **kw)
    return _jitter(timm.create_model(name, **kw)).to(DT).eval()


def _reference_model(model, kind, rep, steps=None):
    ref = copy.deepcopy(model)
    for blk, orig in zip(ref.blocks, model.blocks):
        blk.attn = ManualAttn(kind, _weights(orig.attn), ref, rep, steps)
    return ref


# ---------------------------------------------------------------------------------------------------------------
# conversion keeps the pretrained weights: converted model == the variant's equations applied to the old weights
# ---------------------------------------------------------------------------------------------------------------

MODELS = {
    'vit': ('vit_tiny_patch16_224', {}),
    'deit_distilled': ('deit_tiny_distilled_patch16_224', {}),
    'reg4_gap': ('vit_base_patch16_reg4_gap_256', dict(embed_dim=192, num_heads=3)),
    'no_embed_class': ('vit_tiny_patch16_224', dict(no_embed_class=True)),
}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.parametrize('arch', sorted(MODELS))
def test_convert_matches_equations_on_pretrained_weights(variant, arch):
    name, kw = MODELS[arch]
    model = _vit(name, **kw)
    x = torch.randn(2, 3, 128, 128, dtype=DT)
    before = model(x)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = None
    if variant == 'cbsa':
        n_tok = model.num_prefix_tokens + 64
        steps = (1.0, n_tok / (2 * 16))
    kind = 'agent' if variant == 'agent' else variant
    ref = _reference_model(model, kind, (4, 4), steps)

    converted, report = timm_cbsa.convert(model, variant, inplace=False, rep_grid=4, return_report=True)
    assert converted is not model
    torch.testing.assert_close(converted(x), ref(x), **TOL)
    # the source model is untouched
    assert all(type(b.attn).__name__ == 'Attention' for b in model.blocks)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_before.items())
    # everything outside the attention is the pretrained state
    sd = converted.state_dict()
    for k, v in state_before.items():
        if '.attn.' not in k:
            assert torch.equal(sd[k], v), k
    # a pooled variant with a non-default grid records the registered name that rebuilds it ('agent_qkv_r4')
    named = VARIANTS[variant][1] + ('' if variant == 'linear' else '_r4')
    assert report.variant == variant and report.attn_layer == named
    assert report.replaced == ['blocks.0.attn', 'blocks.1.attn']
    assert converted._model_args['attn_layer'] == report.attn_layer
    assert attention_kind(converted) == report.attn_layer
    assert converted.cbsa_conversion is report


def test_convert_inplace_reuses_parameters_and_reports_counts():
    model = _vit()
    qkv0 = model.blocks[0].attn.qkv.weight
    n0 = sum(p.numel() for p in model.parameters())
    out, report = timm_cbsa.convert(model, 'agent', return_report=True)
    assert out is model and model.blocks[0].attn.qkv.weight is qkv0      # same Parameter: optimisers keep working
    assert report.params_before == report.params_after == n0

    m2 = _vit()
    _, r2 = timm_cbsa.convert(m2, 'cbsa_star', return_report=True)
    assert r2.params_after - r2.params_before == 2 * 3 * 2                # eta, kappa per head (3) per block (2)
    assert torch.equal(m2.blocks[1].attn.step_x, torch.ones(3, 1, 1, dtype=DT))

    m3 = _vit()
    wv = m3.blocks[0].attn.qkv.weight[2 * 192:].detach().clone()
    _, r3 = timm_cbsa.convert(m3, 'cbsa', return_report=True)
    attn = m3.blocks[0].attn
    assert isinstance(attn, timm_cbsa.CBSA) and torch.equal(attn.qkv.weight, wv)
    assert r3.params_before - r3.params_after == 2 * (2 * 192 * 192 + 2 * 192) - 2 * 2 * 3  # W_q, W_k (+bias) go
    torch.testing.assert_close(attn.step_x, torch.full((3, 1, 1), 65 / 128, dtype=DT))
    assert 'W_v' in str(r3)


def test_convert_cbsa_init_choices():
    model = _vit()
    C = 192
    w = model.blocks[0].attn.qkv.weight.detach().clone()
    timm_cbsa.convert(model, 'cbsa', cbsa_init='qk')
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, (w[:C] + w[C:2 * C]) / 2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cbsa_init 'x'"):
        timm_cbsa.convert(_vit(), 'cbsa', cbsa_init='x')


def test_converted_dynamic_img_size_non_square():
    model = _vit(dynamic_img_size=True)
    ref = _reference_model(model, 'agent', (2, 2))
    timm_cbsa.convert(model, 'agent', rep_grid=2)
    for hw in ((128, 96), (96, 160)):
        x = torch.randn(1, 3, *hw, dtype=DT)
        torch.testing.assert_close(model(x), ref(x), **TOL)
        # the call's grid, recorded for this thread by the patch embedding; the layer's static grid is untouched
        assert current_patch_grid() == (hw[0] // 16, hw[1] // 16) and model.blocks[0].attn.grid_size == (8, 8)


def test_converted_model_intermediates_and_features():
    model = _vit()
    timm_cbsa.convert(model, 'cbsa_star', rep_grid=4)
    x = torch.randn(2, 3, 128, 128, dtype=DT)
    final, inter = model.forward_intermediates(x, indices=2)
    assert [t.shape for t in inter] == [(2, 192, 8, 8)] * 2
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(final), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# creation time: create_model(..., attn_layer=NAME)
# ---------------------------------------------------------------------------------------------------------------

CREATE = {
    'vit': ('vit_tiny_patch16_224', {}, 1),
    'deit_distilled': ('deit_tiny_distilled_patch16_224', {}, 2),
    'reg4_gap': ('vit_base_patch16_reg4_gap_256', dict(embed_dim=192, num_heads=3), 4),
    'dinov2_reg4': ('vit_small_patch14_reg4_dinov2', dict(img_size=112), 5),
    'no_embed_class': ('vit_tiny_patch16_224', dict(no_embed_class=True), 1),
}


def _capture(module):
    seen = {}
    module.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    return seen


@pytest.mark.parametrize('attn_layer', ['cbsa', 'cbsa_star', 'agent_qkv'])
@pytest.mark.parametrize('arch', sorted(CREATE))
def test_create_model_with_attn_layer(arch, attn_layer):
    name, kw, n_prefix = CREATE[arch]
    model = timm.create_model(name, **dict(dict(depth=2, img_size=128, num_classes=5), **kw), attn_layer=attn_layer)
    model = configure_cbsa(_jitter(model).to(DT).eval(), rep_grid=4)
    assert model.num_prefix_tokens == n_prefix
    assert all(type(b.attn) is timm.models.vision_transformer.ATTN_LAYERS[attn_layer] for b in model.blocks)
    grid = tuple(model.patch_embed.grid_size)
    seen = _capture(model.blocks[1].attn)
    x = torch.randn(2, 3, *model.patch_embed.img_size, dtype=DT)
    logits = model(x)
    assert torch.isfinite(logits).all()
    assert seen['x'].shape[1] == n_prefix + grid[0] * grid[1]
    attn = model.blocks[1].attn
    wts = {k: v for k, v in attn.state_dict().items()} | {'H': attn.num_heads}
    if attn_layer == 'cbsa':   # CBSA's single projection: put it in the value rows the manual 'cbsa' reads
        C = attn.proj.in_features
        wts['qkv.weight'] = torch.cat([torch.zeros(2 * C, C, dtype=DT), wts['qkv.weight']])
        wts['qkv.bias'] = torch.cat([torch.zeros(2 * C, dtype=DT), wts['qkv.bias']])
        expected = manual('cbsa', wts, seen['x'], grid, (4, 4), (attn.step_rep, attn.step_x))
    elif attn_layer == 'cbsa_star':
        expected = manual('cbsa_star', wts, seen['x'], grid, (4, 4), (attn.step_rep, attn.step_x))
    else:
        expected = manual('agent', wts, seen['x'], grid, (4, 4))
    torch.testing.assert_close(seen['y'], expected, **TOL)


def test_create_dynamic_img_size_and_features_only():
    model = timm.create_model('vit_tiny_patch16_224', depth=3, img_size=128, attn_layer='agent',
                              dynamic_img_size=True).eval()
    configure_cbsa(model, rep_grid=2)
    y = model(torch.randn(1, 3, 160, 96))
    assert torch.isfinite(y).all() and current_patch_grid() == (10, 6)
    feats = timm.create_model('vit_tiny_patch16_224', depth=3, img_size=128, attn_layer='cbsa_star',
                              features_only=True, out_indices=(0, 1, 2))
    configure_cbsa(feats, rep_grid=4)
    outs = feats(torch.randn(1, 3, 128, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 8, 8)] * 3


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing half-converted
# ---------------------------------------------------------------------------------------------------------------

def test_refuses_non_vit_and_eva_family():
    resnet = timm.create_model('resnet18', num_classes=3)
    with pytest.raises(UnsupportedModelError, match=r'resnet18 \(ResNet\) is not a timm VisionTransformer.*vit_\*'):
        timm_cbsa.convert(resnet, 'agent')
    eva = timm.create_model('eva02_tiny_patch14_224', depth=1)
    with pytest.raises(UnsupportedModelError, match=r'eva02_tiny_patch14_224.*Eva-family.*rotary.*Supported'):
        timm_cbsa.convert(eva, 'cbsa')
    with pytest.raises(UnsupportedModelError, match='Eva-family.*attn_layer.*timm_cbsa.convert'):
        create_with_attention('vit_base_patch16_rope_224', 'cbsa', depth=1)
    with pytest.raises(UnsupportedModelError, match='timm.models.resnet'):
        create_with_attention('resnet18', 'cbsa')
    with pytest.raises(ValueError, match="Unknown attn_layer 'nope'"):
        create_with_attention('vit_tiny_patch16_224', 'nope')
    m = create_with_attention('vit_tiny_patch16_224', 'cbsa_star', depth=1)
    assert type(m.blocks[0].attn).__name__ == 'CBSAStar'
    with pytest.raises(UnsupportedModelError, match='nn.Module'):
        timm_cbsa.convert({'not': 'a model'}, 'agent')


def test_unknown_variant_and_bad_rep_grid_leave_model_untouched():
    model = _vit()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"variant 'cbsa_plus'.*\['agent', 'cbsa', 'cbsa_star', 'linear'\]"):
        timm_cbsa.convert(model, 'cbsa_plus')
    with pytest.raises(ValueError, match='patch grid 8x8 is smaller than the representative grid 16x16'):
        timm_cbsa.convert(model, 'cbsa_star', rep_grid=16)
    assert all(type(b.attn).__name__ == 'Attention' for b in model.blocks)
    assert not hasattr(model, 'cbsa_conversion') and 'attn_layer' not in getattr(model, '_model_args', {})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_partly_foreign_blocks_are_refused_before_any_change():
    model = _vit(depth=3)
    model.blocks[2].attn = timm_cbsa.CBSA(192, num_heads=3, qkv_bias=True)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.2\.attn is CBSA \(already converted: attn_layer='cbsa'\)"):
        timm_cbsa.convert(model, 'agent')
    assert [type(b.attn).__name__ for b in model.blocks] == ['Attention', 'Attention', 'CBSA']
    converted = timm_cbsa.convert(_vit(), 'linear')
    with pytest.raises(UnsupportedModelError, match="already converted: attn_layer='linear'"):
        timm_cbsa.convert(converted, 'agent')


def test_checkpoint_from_another_variant(tmp_path):
    star = timm_cbsa.convert(_vit(), 'cbsa_star')
    agent = timm_cbsa.convert(_vit(), 'agent')
    save_converted(star, tmp_path / 'star.pth')
    with pytest.raises(CheckpointMismatchError, match=r"'cbsa_star'.*model uses 'agent_qkv' \(convert variant 'agent'\)"):
        load_converted(agent, tmp_path / 'star.pth')
    # plain state dicts: told apart by their parameters
    cbsa = timm_cbsa.convert(_vit(), 'cbsa')
    with pytest.raises(CheckpointMismatchError, match=r"look like 'cbsa'.*model uses 'cbsa_star'"):
        load_converted(star, cbsa.state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"'attn'.*model uses 'cbsa_star'"):
        load_converted(star, _vit().state_dict())
    # same variant, other weights: loads and reproduces the outputs
    fresh = timm_cbsa.convert(_jitter(_vit(), seed=3), 'cbsa_star')
    load_converted(fresh, tmp_path / 'star.pth')
    x = torch.randn(1, 3, 128, 128, dtype=DT)
    torch.testing.assert_close(fresh(x), star(x), rtol=0, atol=0)
    # same variant but a different shape: named keys
    other = timm_cbsa.convert(_vit(num_classes=3), 'cbsa_star')
    with pytest.raises(CheckpointMismatchError, match='head.weight'):
        load_converted(other, tmp_path / 'star.pth')
