"""save_for_hf / timm_cbsa.save_to_folder → create_model('local-dir:…', pretrained=True) round trips give identical
logits (no network); the model card's content and snippet; push_to_hub's upload (HfApi answering locally)."""
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
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


# --------------------------------------------------------------------------------------------------------------------
# timm_cbsa.save_to_folder / push_to_hub: weights + config.json + model card
# --------------------------------------------------------------------------------------------------------------------

def _card_code(card: str, repo_id: str, folder) -> str:
    """The card's python snippet, loading from ``folder`` instead of the Hub."""
    code = re.search(r'```python\n(.*?)```', card, re.S).group(1)
    assert f"timm.create_model('hf-hub:{repo_id}', pretrained=True)" in code
    return code.replace(f'hf-hub:{repo_id}', f'local-dir:{folder}')


def _check_card(folder, model, repo_id, size, in_chans=3):
    """The card's header parses, says to install / import timm_cbsa first, cites the paper, and its snippet (run on
    the folder) rebuilds a model with the same logits."""
    card = (folder / 'README.md').read_text()
    header = yaml.safe_load(card.split('---\n')[1])
    assert header['library_name'] == 'timm' and 'timm_cbsa' in header['tags']
    assert (card.index('```bash\npip install timm_cbsa\n```') < card.index('\nimport timm_cbsa')
            < card.index('model = timm.create_model('))
    assert all(s in card for s in ('Wen, Qishuai and Huang, Zhiyuan and Li, Chun-Guang', 'arXiv', '2509.16875',
                                   'Towards Interpretable and Efficient Attention: Compressing All by Contracting'))
    scope = {}
    exec(_card_code(card, repo_id, folder), scope)
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        assert torch.equal(scope['model'](x), model(x))
    return card


def test_save_to_folder_cbsa_vit(tmp_path):
    model = _jitter(timm.create_model('cbsa_vit_tiny_patch16_224', depth=2, img_size=64, rep_grid=(2, 4),
                                      num_classes=5)).eval()
    folder = timm_cbsa.save_to_folder(model, tmp_path / 'out', repo_id='me/cbsa-vit-tiny')
    assert (folder / 'model.safetensors').is_file()
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['cbsa_config'] == {'rep_grid': [2, 4], 'legacy_pool': False}
    assert cfg['model_args']['rep_grid'] == [2, 4] and cfg['model_args']['legacy_pool'] is False
    card = _check_card(folder, model, 'me/cbsa-vit-tiny', 64)
    assert '- **rep_grid:** 2x4 (m = 8 representatives per head, 2 CBSA-family layers)' in card
    assert 'configure_cbsa' not in card             # rep_grid travels in config.json's model_args
    assert 'Not recorded' in card                   # no recipe given, none claimed


def test_save_to_folder_converted_vit_restores_rep_grid(tmp_path):
    """A converted vit_*'s entrypoint takes no rep_grid: a square grid travels as a named layer ('cbsa_r4') in
    config.json; a grid no name carries (2x4) is re-applied by the card's snippet (else logits differ)."""
    x = torch.randn(2, 3, 128, 128)
    for grid, name in ((4, 'cbsa_r4'), ((2, 4), 'cbsa')):
        model = _jitter(timm.create_model('vit_tiny_patch16_224', depth=2, img_size=128, num_classes=5)).eval()
        timm_cbsa.convert(model, 'cbsa', rep_grid=grid)
        folder = timm_cbsa.save_to_folder(model, tmp_path / name, repo_id='me/vit-cbsa')
        card = _check_card(folder, model, 'me/vit-cbsa', 128)
        assert f'`{name}` (a timm ViT with `attn_layer` set: recorded in config.json)' in card
        snippet = 'with timm_cbsa.pooling_defaults(rep_grid=(2, 4), legacy_pool=False):'
        assert (snippet in card) == (name == 'cbsa'), card
        if name == 'cbsa_r4':   # the plain call rebuilds the grid from config.json
            plain = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
            with torch.no_grad():
                assert torch.equal(plain(x), model(x))
        else:                   # without the snippet's settings the weights are refused, not silently misused
            with pytest.raises(timm_cbsa.CBSAConfigMismatchError, match=r'rep_grid: saved \[2, 4\], model \[8, 8\]'):
                timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_save_to_folder_shipped_fmnist_weights_card_has_their_provenance(tmp_path):
    from timm_cbsa.models.cbt_fmnist import WEIGHTS_DIR
    provenance = json.loads((Path(WEIGHTS_DIR) / 'cbt_nano_patch8_32.fmnist.json').read_text())
    model = timm.create_model('cbt_nano_patch8_32.fmnist', pretrained=True).eval()
    card = _check_card(timm_cbsa.save_to_folder(model, tmp_path / 'fm', repo_id='me/fm'), model, 'me/fm', 32, 1)
    assert f"- **test_top1:** {provenance['test_top1']}" in card
    assert f"- **recipe:** {provenance['recipe']}" in card and f"- **seed:** {provenance['seed']}" in card
    tuned = _jitter(timm.create_model('cbt_nano_patch8_32.fmnist', pretrained=True)).eval()   # no longer those weights
    card = _check_card(timm_cbsa.save_to_folder(tuned, tmp_path / 'ft', repo_id='me/ft'), tuned, 'me/ft', 32, 1)
    assert 'test_top1' not in card and 'Not recorded' in card


def test_save_to_folder_with_args_yaml(tmp_path):
    args = {'model': 'cbt_tiny', 'dataset': 'fashion_mnist', 'epochs': 7, 'lr': 0.0025, 'opt': 'adamw',
            'batch_size': 96, 'mixup': 0.0, 'workers': 3}
    (tmp_path / 'args.yaml').write_text(yaml.safe_dump(args))
    model = _jitter(timm.create_model('cbt_tiny', depth=2, img_size=64, rep_grid=2, num_classes=10)).eval()
    folder = timm_cbsa.save_to_folder(model, tmp_path / 'cbt', repo_id='me/cbt', args_yaml=tmp_path / 'args.yaml')
    card = _check_card(folder, model, 'me/cbt', 64)
    assert yaml.safe_load((folder / 'args.yaml').read_text()) == args
    for line in ('- **epochs:** 7', '- **lr:** 0.0025', '- **opt:** adamw', '- **batch_size:** 96', '(args.yaml)'):
        assert line in card
    (tmp_path / 'bad.yaml').write_text('- just\n- a list\n')
    with pytest.raises(ValueError, match='bad.yaml is not a trainer args.yaml'):
        timm_cbsa.save_to_folder(model, tmp_path / 'bad', args_yaml=tmp_path / 'bad.yaml')


def test_save_to_folder_refuses_a_plain_vit(tmp_path):
    with pytest.raises(ValueError, match='no CBSA-family attention'):
        timm_cbsa.save_to_folder(timm.create_model('vit_tiny_patch16_224', depth=1), tmp_path / 'plain')
    assert not (tmp_path / 'plain').exists()


def test_push_to_hub_uploads_the_folder_in_one_commit(tmp_path, monkeypatch):
    """push_to_hub with huggingface_hub's HfApi answering locally: one upload holding weights, config, card."""
    from huggingface_hub import HfApi
    calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
        calls.append(('create_repo', repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, create_pr=False, **kw):
        calls.append(('upload_folder', repo_id, commit_message))
        shutil.copytree(folder_path, tmp_path / 'uploaded')
        return 'commit-info'

    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    model = _jitter(timm.create_model('cbsa_vit_tiny_patch16_224', depth=2, img_size=64, rep_grid=2,
                                      num_classes=3)).eval()
    assert timm_cbsa.push_to_hub(model, 'me/pushed', private=True, commit_message='v1') == 'commit-info'
    assert calls == [('create_repo', 'me/pushed', True, True), ('upload_folder', 'me/pushed', 'v1')]
    _check_card(tmp_path / 'uploaded', model, 'me/pushed', 64)
