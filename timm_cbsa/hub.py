"""Publish CBSA models to the Hugging Face Hub with a model card that says how to load them.

``save_to_folder(model, folder, repo_id=...)`` writes what a Hub repository holds: the weights and ``config.json``
(timm's ``save_for_hf``: ``architecture``, ``model_args`` — rep_grid / legacy_pool for ``cbsa_vit_*`` / ``cbt_*``,
attn_layer for converted ViTs), the CBSA configuration (``config.json['cbsa_config']``), the trainer's ``args.yaml``
when given, and a model card ``README.md``. ``push_to_hub(model, repo_id, ...)`` writes the same folder and uploads it
as one commit (``huggingface_hub.HfApi``), replacing the card of an existing repository.

The card tells a reader to ``pip install timm_cbsa`` and ``import timm_cbsa`` before
``timm.create_model('hf-hub:REPO', pretrained=True)`` (the architectures and attention layers are registered by that
import), lists the CBSA settings, the training recipe when known (the provenance JSON shipped next to the package's
own weights, or the trainer's ``args.yaml``), and the paper's citation.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from .convert import attention_kind
from .layers.layout import find_grid_aware_layers
from .models import cbsa_config

__all__ = ['push_to_hub', 'save_to_folder', 'model_card', 'CITATION']

CITATION = """@inproceedings{wen2025cbsa,
  title     = {Towards Interpretable and Efficient Attention: Compressing All by Contracting a Few},
  author    = {Wen, Qishuai and Huang, Zhiyuan and Li, Chun-Guang},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2025},
  eprint    = {2509.16875},
  archivePrefix = {arXiv},
}"""

# trainer arguments shown on the card (all of args.yaml is uploaded next to it)
_RECIPE_KEYS = ('model', 'dataset', 'data_dir', 'img_size', 'input_size', 'in_chans', 'epochs', 'batch_size', 'opt',
                'lr', 'weight_decay', 'sched', 'warmup_epochs', 'min_lr', 'smoothing', 'mixup', 'cutmix', 'aa',
                'drop_path', 'model_ema', 'amp', 'seed', 'rep_grid', 'legacy_pool', 'attn_layer', 'initial_checkpoint')


def _shipped_provenance(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The provenance JSON next to the weights file the model was loaded from (the package's shipped weights), when
    the model still holds exactly those weights; None otherwise (fine-tuned, another source, no JSON)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    weights = cfg.get('file') if isinstance(cfg, dict) else None
    if not weights or not str(weights).endswith('.safetensors'):
        return None
    meta = os.path.splitext(weights)[0] + '.json'
    if not (os.path.isfile(weights) and os.path.isfile(meta)):
        return None
    from safetensors.torch import load_file
    saved, current = load_file(weights), model.state_dict()
    if set(saved) != set(current) or any(not torch.equal(saved[k], current[k].cpu()) for k in saved):
        return None
    with open(meta) as f:
        return json.load(f)


def _read_args_yaml(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    import yaml
    with open(path) as f:
        args = yaml.safe_load(f)
    if not isinstance(args, dict):
        raise ValueError(f'{os.fspath(path)} is not a trainer args.yaml (a mapping of argument names to values).')
    return args


def _settings(model: nn.Module, model_args: Dict[str, Any]) -> List[str]:
    """Card lines describing the CBSA configuration. ``model_args``: the reconstruction arguments in config.json."""
    arch = model.pretrained_cfg.get('architecture', type(model).__name__)
    lines = [f'- **Architecture:** `{arch}` ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)',
             f'- **Attention layer:** `{attention_kind(model)}`'
             + (' (a timm ViT with `attn_layer` set: recorded in config.json)' if 'attn_layer' in model_args else '')]
    cfg = cbsa_config(model)
    if cfg:
        (rh, rw), n = cfg['rep_grid'], len(find_grid_aware_layers(model))
        lines += [f'- **rep_grid:** {rh}x{rw} (m = {rh * rw} representatives per head, {n} CBSA-family layers)',
                  f"- **legacy_pool:** {cfg['legacy_pool']}"]
    return lines


def _rebuilt_config(model: nn.Module, model_args: Dict[str, Any]) -> Dict[str, Any]:
    """The CBSA configuration of the model ``create_model`` rebuilds from config.json (built on the meta device)."""
    import timm
    with torch.device('meta'):
        rebuilt = timm.create_model(model.pretrained_cfg.get('architecture'), **model_args)
    return cbsa_config(rebuilt)


def _usage(model: nn.Module, repo_id: str, model_args: Dict[str, Any]) -> str:
    cfg = cbsa_config(model)
    lines = ['```bash', 'pip install timm_cbsa', '```', '', '```python', 'import timm',
             'import timm_cbsa  # registers the CBSA models and attn_layer strings: import it before create_model', '']
    create = f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()"
    if cfg and _rebuilt_config(model, model_args) != cfg:   # settings config.json cannot carry (e.g. a 2x4 grid)
        lines += [f"with timm_cbsa.pooling_defaults(rep_grid={tuple(cfg['rep_grid'])}, "
                  f"legacy_pool={cfg['legacy_pool']}):  # the CBSA settings these weights need",
                  '    ' + create]
    else:
        lines.append(create)
    lines += ['```']
    return '\n'.join(lines)


def _training(provenance: Optional[Dict[str, Any]], args: Optional[Dict[str, Any]]) -> List[str]:
    lines = []
    if provenance:
        lines += [f"- **{k}:** {provenance[k]}" for k in ('dataset', 'recipe', 'command', 'seed', 'test_top1',
                                                         'test_images', 'train_wall_s', 'torch', 'timm', 'date')
                  if provenance.get(k) is not None]
    if args:
        lines += [f'- **{k}:** {args[k]}' for k in _RECIPE_KEYS if args.get(k) not in (None, '', [], False)]
        lines.append('- the trainer\'s full arguments: [args.yaml](args.yaml)')
    return lines or ['Not recorded: pass `args_yaml=` (the trainer\'s args.yaml) to `push_to_hub` to publish it.']


def model_card(model: nn.Module, repo_id: str, model_args: Optional[Dict[str, Any]] = None,
               description: Optional[str] = None, provenance: Optional[Dict[str, Any]] = None,
               args: Optional[Dict[str, Any]] = None) -> str:
    """The model card (README.md of the Hub repository, with its YAML header) for ``model`` published as ``repo_id``.

    ``model_args``: the reconstruction arguments saved in config.json (settings missing there are applied in the
    card's snippet); ``provenance``: where the weights came from (the JSON written next to shipped weights);
    ``args``: the trainer's arguments (a parsed args.yaml). The card says when the recipe is not recorded.
    """
    cfg, model_args = model.pretrained_cfg, model_args or {}
    name = repo_id.split('/')[-1]
    default = (f"`{cfg.get('architecture', type(model).__name__)}` with Contract-and-Broadcast Self-Attention (CBSA, "
               'Wen, Huang & Li, NeurIPS 2025), built on [timm](https://github.com/huggingface/pytorch-image-models) '
               'by [timm_cbsa](https://pypi.org/project/timm_cbsa/).')
    parts = ['---', 'tags:', '- image-classification', '- timm', '- timm_cbsa', '- cbsa', 'library_name: timm',
             f"license: {cfg.get('license') or 'apache-2.0'}", 'pipeline_tag: image-classification', '---',
             f'# {name}', '', description or default, '',
             '## Use', '', 'The architecture is registered by `timm_cbsa`, so `import timm_cbsa` comes before '
             '`timm.create_model`:', '', _usage(model, repo_id, model_args), '',
             '## CBSA settings', '', *_settings(model, model_args), '',
             '## Training', '', *_training(provenance, args), '',
             '## Citation', '', '```bibtex', CITATION, '```', '']
    return '\n'.join(parts)


def save_to_folder(model: nn.Module, folder: Union[str, os.PathLike], repo_id: Optional[str] = None,
                   args_yaml: Optional[Union[str, os.PathLike]] = None, description: Optional[str] = None,
                   provenance: Optional[Dict[str, Any]] = None, safe_serialization: Union[bool, str] = True,
                   **save_kwargs) -> Path:
    """Write what ``push_to_hub`` uploads into ``folder``: weights + ``config.json`` (timm's ``save_for_hf``, with the
    CBSA configuration as ``cbsa_config``), ``README.md`` (the model card) and, when given, the trainer's
    ``args.yaml``. Loads back with ``timm.create_model('local-dir:FOLDER', pretrained=True)`` after ``import
    timm_cbsa``. ``repo_id`` is the name the card's snippet loads (default: the folder name).

    ``provenance`` defaults to the JSON shipped next to the weights the model was loaded from, when it still holds
    exactly those weights. ``save_kwargs`` go to ``save_for_hf`` (``model_config``, ``model_args``, ``data_config``).
    """
    from timm.models import save_for_hf
    folder = Path(folder)
    if not find_grid_aware_layers(model) and attention_kind(model) in ('attn', 'none'):
        raise ValueError(f'{type(model).__name__} has no CBSA-family attention; use timm.models.push_to_hf_hub for '
                         'plain timm models.')
    args = _read_args_yaml(args_yaml) if args_yaml is not None else None
    provenance = provenance if provenance is not None else _shipped_provenance(model)
    model_config = dict(save_kwargs.pop('model_config', None) or {})
    model_config.setdefault('cbsa_config', cbsa_config(model))
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:   # all files written first: nothing half-written in folder
        tmp = Path(tmp)
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=safe_serialization, **save_kwargs)
        saved = json.loads((tmp / 'config.json').read_text())
        card = model_card(model, repo_id or folder.name, model_args=saved.get('model_args'), description=description,
                          provenance=provenance, args=args)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        if args_yaml is not None:
            shutil.copyfile(args_yaml, tmp / 'args.yaml')
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    return folder


def push_to_hub(model: nn.Module, repo_id: str, args_yaml: Optional[Union[str, os.PathLike]] = None,
                description: Optional[str] = None, provenance: Optional[Dict[str, Any]] = None,
                commit_message: str = 'Add CBSA model', token: Optional[str] = None, revision: Optional[str] = None,
                private: bool = False, create_pr: bool = False, **save_kwargs):
    """Publish ``model`` to the Hugging Face Hub as ``repo_id``: create the repository if needed and upload, as one
    commit, the folder ``save_to_folder`` writes (weights, config.json, model card, args.yaml). Returns the
    ``huggingface_hub`` commit info. Needs a token (``huggingface-cli login`` / ``HF_TOKEN``) and network access."""
    from huggingface_hub import HfApi
    api = HfApi(token=token, library_name='timm_cbsa')
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        save_to_folder(model, tmp, repo_id=repo_id, args_yaml=args_yaml, description=description,
                       provenance=provenance, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)
