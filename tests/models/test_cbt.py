"""CBT: parameter counts, the released-checkpoint round trip, checkpoint errors, FLOPs.

``ReleasedCBT`` below is an independent re-implementation of the released CBT (written from the paper's description
of its code, with the released module names), used to build official-format checkpoints and reference logits.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm
from timm_cbsa import CBSAConfigMismatchError, CheckpointMismatchError, load_official_cbt
from timm_cbsa.models.cbt import cbt_checkpoint_filter_fn
from timm_cbsa.flops import report


# ---------------------------------------------------------------- the released architecture, independently
class ReleasedCBSA(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.step_x = nn.Parameter(torch.randn(heads, 1, 1))
        self.step_rep = nn.Parameter(torch.randn(heads, 1, 1))

    def forward(self, x):
        b, n, c = x.shape
        side = int(math.isqrt(n))
        w = self.proj(x)
        grid = w[:, :-1].reshape(b, side, side, c).permute(0, 3, 1, 2)      # class token pooled, last patch dropped
        rep = F.adaptive_avg_pool2d(grid, (8, 8)).reshape(b, c, 64).permute(0, 2, 1)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, -1).permute(0, 2, 1, 3)
        w, rep = split(w), split(rep)
        scale = w.shape[-1] ** -0.5
        attn = torch.softmax(rep @ w.transpose(-1, -2) * scale, dim=-1)
        rep = rep + self.step_rep * (attn @ w)
        delta = torch.softmax(rep @ rep.transpose(-1, -2) * scale, dim=-1) @ rep
        delta = self.step_x * (attn.transpose(-1, -2) @ delta)
        return self.to_out(delta.permute(0, 2, 1, 3).reshape(b, n, c))


class ReleasedISTA(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x):
        grad_1 = F.linear(F.linear(x, self.weight), self.weight.t())
        grad_2 = F.linear(x, self.weight.t())
        return F.relu(x + 0.1 * (grad_2 - grad_1) - 0.1 * 0.1)


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class ReleasedCBT(nn.Module):
    def __init__(self, dim, depth, heads, num_classes=1000):
        super().__init__()
        chans = [3, dim // 8, dim // 4, dim // 2, dim]
        stem = []
        for i in range(4):
            stem.append(nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, 2, 1, bias=False), nn.BatchNorm2d(chans[i + 1])))
            if i < 3:
                stem.append(nn.GELU())
        self.to_patch_embedding = nn.Module()
        self.to_patch_embedding.proj = nn.Sequential(*stem)
        self.pos_embedding = nn.Parameter(torch.randn(1, 197, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(dim, ReleasedCBSA(dim, heads)), PreNorm(dim, ReleasedISTA(dim))]) for _ in range(depth))
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.to_patch_embedding.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        for attn, ff in self.transformer.layers:
            x = ff(attn(x) + x)
        return self.mlp_head(x[:, 0])


def _released(dim=192, depth=12, heads=3, num_classes=1000):
    torch.manual_seed(1)
    model = ReleasedCBT(dim, depth, heads, num_classes)
    for m in model.modules():       # non-trivial BatchNorm statistics and LayerNorm affine parameters
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _official_file(model, path):
    # what the released training script saves: a dict holding a DDP state dict ("module." prefixes)
    torch.save({'epoch': 150, 'state_dict': {'module.' + k: v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize('name,expected', [
    ('cbt_tiny', 1_789_192), ('cbt_small', 6_667_048), ('cbt_base', 25_691_752), ('cbt_large', 83_051_368)])
def test_parameter_counts(name, expected):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_released_checkpoint_gives_released_logits(tmp_path):
    released = _released()
    path = _official_file(released, tmp_path / 'cbt_tiny_best.pth.tar')
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = released(x)
        via_function = load_official_cbt(str(path)).eval()
        via_timm = timm.create_model(
            'cbt_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
        assert via_timm.blocks[0].attn.legacy_pool and via_function.blocks[0].attn.legacy_pool
        torch.testing.assert_close(via_function(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(via_timm(x), expected, rtol=1e-4, atol=1e-4)
        # correct pooling is a different function of the same weights: the legacy switch matters
        fixed = load_official_cbt(str(path), legacy_pool=False).eval()
        assert (fixed(x) - expected).abs().max() > 1e-3


def test_released_checkpoint_with_other_head(tmp_path):
    released = _released(num_classes=10)
    path = _official_file(released, tmp_path / 'cbt_tiny_cifar.pth.tar')
    model = load_official_cbt(str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    assert model.num_classes == 10
    with torch.no_grad():
        torch.testing.assert_close(model(x), released(x), rtol=1e-4, atol=1e-4)


def test_checkpoint_errors_name_the_keys(tmp_path):
    state = {'module.' + k: v for k, v in _released().state_dict().items()}
    broken = dict(state)
    del broken['module.transformer.layers.3.0.fn.step_x']
    broken['module.transformer.layers.0.0.fn.extra'] = torch.zeros(1)
    broken['module.transformer.layers.5.1.fn.weight'] = torch.zeros(10, 10)
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_cbt({'state_dict': broken}, variant='cbt_tiny')
    msg = str(err.value)
    assert 'missing keys: blocks.3.attn.step_x' in msg
    assert 'unexpected keys: transformer.layers.0.0.fn.extra' in msg
    assert 'blocks.5.ista.weight: checkpoint (10, 10) vs model (192, 192)' in msg
    with pytest.raises(CheckpointMismatchError, match='Cannot tell the CBT variant'):
        load_official_cbt({'cls_token': torch.zeros(1, 1, 100)})
    with pytest.raises(CheckpointMismatchError, match=r'mis-shaped keys: .*checkpoint \(192,\) vs model \(384,\)'):
        timm.create_model('cbt_small', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(_official_file(_released(), tmp_path / 't.pth'))))


def test_filter_is_pure_and_records_the_released_settings():
    """The filter maps keys and adds each CBSA layer's record of the released code (3 heads, 8x8, legacy pooling);
    the model it is given keeps its settings."""
    model = timm.create_model('cbt_tiny', depth=2)
    state = {'module.' + k: v for k, v in _released(depth=2).state_dict().items()}
    out = cbt_checkpoint_filter_fn({'epoch': 1, 'state_dict': state}, model)
    assert [(b.attn.rep_grid, b.attn.legacy_pool) for b in model.blocks] == [((8, 8), False)] * 2
    assert [out[f'blocks.{i}.attn._extra_state'].tolist() for i in range(2)] == [[1, 3, 8, 8, 1]] * 2
    assert 'blocks.1.attn.step_x' in out and not any(k.startswith(('module.', 'transformer.')) for k in out)


def test_released_weights_refuse_other_settings(tmp_path):
    path = _official_file(_released(depth=2), tmp_path / 'cbt_tiny_best.pth.tar')
    overlay = dict(file=str(path))
    model = timm.create_model('cbt_tiny', depth=2, pretrained=True, pretrained_cfg_overlay=overlay)
    assert model.blocks[0].attn.legacy_pool            # built so, because the file is in the released layout
    with pytest.raises(CBSAConfigMismatchError,
                       match=r'blocks\.0\.attn \(CBSA\): .*legacy_pool: saved True, model False'):
        timm.create_model('cbt_tiny', depth=2, pretrained=True, pretrained_cfg_overlay=overlay, legacy_pool=False)
    with pytest.raises(CBSAConfigMismatchError, match=r'rep_grid: saved \[8, 8\], model \[4, 4\]'):
        timm.create_model('cbt_tiny', depth=2, pretrained=True, pretrained_cfg_overlay=overlay, rep_grid=4)
    # weights re-saved from such a model carry legacy_pool=True: a model built with the corrected pooling refuses them
    resaved = model.state_dict()
    timm.create_model('cbt_tiny', depth=2, legacy_pool=True).load_state_dict(resaved)
    with pytest.raises(CBSAConfigMismatchError, match='legacy_pool: saved True, model False'):
        timm.create_model('cbt_tiny', depth=2).load_state_dict(resaved)


def test_our_layout_without_records_loads_as_before(tmp_path):
    """A file of ours written before the records existed, through the pretrained path: no legacy pooling (it is not
    the released layout), same logits as the model that saved it."""
    torch.manual_seed(0)
    ours = timm.create_model('cbt_tiny', depth=2).eval()
    old = {k: v for k, v in ours.state_dict().items() if not k.endswith('_extra_state')}
    torch.save({'epoch': 1, 'state_dict': old}, tmp_path / 'ours.pth.tar')
    loaded = timm.create_model('cbt_tiny', depth=2, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / 'ours.pth.tar'))).eval()
    assert not loaded.blocks[0].attn.legacy_pool
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))


def test_flops_within_two_percent_of_the_paper():
    rows = {r['model']: r for r in report(['cbt_tiny', 'cbt_small', 'cbt_base', 'cbt_large'])}
    for name, paper in {'cbt_tiny': 1.1, 'cbt_small': 4.0, 'cbt_base': 15.1, 'cbt_large': 47.3}.items():
        assert abs(rows[name]['gflops_paper_convention'] - paper) / paper < 0.02, rows[name]
        # the torch counter sees ISTA's third d×d product: exactly L·2·N·d² more
        d, layers = {'cbt_tiny': (192, 12), 'cbt_small': (384, 12), 'cbt_base': (768, 12), 'cbt_large': (1024, 24)}[name]
        extra = rows[name]['gflops_torch'] - rows[name]['gflops_paper_convention']
        assert abs(extra - layers * 2 * 197 * d * d / 1e9) < 1e-9
