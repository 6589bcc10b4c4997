"""Robustness to parameter noise (paper Fig. 8 right, spec §6.6): add i.i.d. N(0, σ²) noise to every parameter of
the attention layers and measure the metric again.

    python -m timm_cbsa.analysis robustness --checkpoint runs/cbsa/model_best.pth.tar runs/mhsa/model_best.pth.tar \\
        --labels CBSA Segmenter --out docs/images/segmentation --name robustness_garments
    python -m timm_cbsa.analysis robustness --model cbt_nano_patch8_32.fmnist \\
        --checkpoint runs/vit_fmnist/model_best.pth.tar --labels CBT "softmax ViT" --name robustness_fmnist

Which parameters: those of every attention layer (timm's ``Attention``, CBSA and the CBSA family: the
``ATTN_LAYERS`` classes): for a Segmenter only its decoder's (the encoder stays clean, as in the paper); for a
classifier all of them. Weights, biases and step sizes alike; norms, MLPs, ISTA, embeddings and heads are untouched.

Protocol: for every σ of ``--sigmas`` and every seed of ``--seeds`` a copy of the model gets noise drawn from a CPU
generator seeded with the seed (the same direction for every σ of one seed: common random numbers, so the curves
are smooth in σ) and is evaluated on the whole evaluation set; σ = 0 (clean) is evaluated too.

* segmentation checkpoints (``python -m train.segment``): mIoU of single-scale sliding-window inference on the
  validation split of the checkpoint's ``--data-dir`` (or ``--data-dir``), as in training; the encoder runs once per
  window and every perturbed decoder reads the same features;
* classification (``--model NAME`` loaded pretrained, or a ``python -m train.train`` checkpoint): top-1 on the
  Fashion-MNIST test set through timm's evaluation transform at the model's input size.

Writes NAME.csv (every σ, seed), NAME_summary.csv (mean, std over seeds) and NAME.png (ours on the left, the paper's
digitised ADE20K curves on the right, and the paper's numbers in the caption).
"""
import argparse
import copy
import os
import statistics
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ['SIGMAS', 'PAPER_FIG8', 'attention_parameters', 'perturb_', 'segmentation_curve', 'classification_curve',
           'summarize', 'plot_robustness', 'add_arguments', 'run']

SIGMAS = (1e-3, 1e-2, 0.02, 0.03, 0.04, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0)

# Paper Fig. 8 right, ADE20K val mIoU vs σ, digitised (spec §6.6; ±0.1-0.3). '~x' is stored as x, '<1' as 0.5.
PAPER_FIG8: Dict[str, Dict[str, Tuple[float, ...]]] = {
    'tiny': {
        'CBT†': (39, 39, 38.8, 38.8, 38.7, 38.6, 38, 35.7, 34, 27.6, 17.7),
        'DEPICT': (39.3, 38.9, 36.3, 31, 20.4, 8.2, 0, 0, 0, 0, 0),
        'ToST': (38.5, 37.3, 33.2, 27.6, 21, 14.5, 2, 0.5, 0.5, 0.5, 0.5),
        'Segmenter': (35.4, 1.5, 1, 1, 1, 0.5, 0, 0, 0, 0, 0),
    },
    'small': {
        'CBT†': (46, 45.9, 45.6, 45.4, 45.1, 45, 44.1, 41.8, 21.2, 3, 0.5),
        'DEPICT': (46.7, 45.2, 35.8, 20.5, 4.8, 0.8, 0, 0, 0, 0, 0),
        'ToST': (45, 43.9, 37.8, 27.3, 17.4, 9.6, 1.8, 0.5, 0.5, 0.5, 0.5),
        'Segmenter': (35.2, 0.6, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0),
    },
}
PAPER_CAPTION = ('Paper (Fig. 8, ADE20K val mIoU, digitised): CBT†-T 39.0 at σ=1e-3, 38.0 at 0.1, 17.7 at 1.0; '
                 'Segmenter-T 35.4 at 1e-3, ~1.5 at 1e-2, 0 from 0.1; CBT†-S 46.0 / 44.1 / ~0.5; '
                 'Segmenter-S 35.2 / 0.6 / 0.')


# ---------------------------------------------------------------------------------------------------- noise

def _attention_classes() -> Tuple[type, ...]:
    from timm.layers import Attention
    from timm.models.vision_transformer import ATTN_LAYERS
    import timm_cbsa  # noqa: F401  (registers CBSA and the family in ATTN_LAYERS)
    classes = {Attention}
    classes.update(c for c in ATTN_LAYERS.values() if isinstance(c, type))
    return tuple(classes)


def attention_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of every attention layer of ``model`` (a Segmenter: of its decoder only), in a fixed order.
    Raises ValueError when there is none (e.g. a linear decoder)."""
    from ..segmentation import Segmenter
    scope = model.decoder if isinstance(model, Segmenter) else model
    classes = _attention_classes()
    out = []
    for name, mod in scope.named_modules():
        if isinstance(mod, classes):
            out += [(f'{name}.{n}', p) for n, p in mod.named_parameters()]
    if not out:
        raise ValueError(f'{type(scope).__name__} has no attention layers ({", ".join(c.__name__ for c in classes)}) '
                         'to perturb.')
    return out


@torch.no_grad()
def perturb_(params: Iterable[torch.Tensor], sigma: float, seed: int) -> None:
    """Add i.i.d. N(0, σ²) noise in place, drawn from a CPU generator seeded with ``seed`` (device independent)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(sigma * torch.randn(p.shape, generator=g, dtype=torch.float32).to(device=p.device, dtype=p.dtype))


def _noisy_copies(module: nn.Module, sigmas: Sequence[float], seeds: Sequence[int]
                  ) -> List[Tuple[float, int, nn.Module]]:
    """[(σ, seed, copy of ``module`` with its attention parameters perturbed)], the clean module (σ = 0) first."""
    out = [(0.0, -1, module)]
    for sigma in sigmas:
        for seed in seeds:
            m = copy.deepcopy(module)
            perturb_([p for _, p in attention_parameters(m)], sigma, seed)
            out.append((float(sigma), int(seed), m))
    return out


# ---------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def segmentation_curve(model: nn.Module, dataset, sigmas: Sequence[float], seeds: Sequence[int], window: int,
                       stride: int, device: torch.device, max_batch: int = 8) -> List[Dict[str, object]]:
    """mIoU / pixel accuracy of a Segmenter with noisy decoder attention, for every (σ, seed) and σ = 0.
    ``dataset`` yields (normalised image (3, h, w), label (H, W)) like ``ADE20KSegmentation`` + ``eval_transform``."""
    from ..segmentation import (
        crop_windows, equal_size_batches, logits_confusion, merge_windows, segmentation_metrics, window_boxes,
    )
    model = model.to(device).eval()
    variants = _noisy_copies(model.decoder, sigmas, seeds)
    K = model.num_classes
    confs = [torch.zeros(K, K, dtype=torch.int64, device=device) for _ in variants]
    for images, labels in equal_size_batches(dataset, max_batch):
        images = images.to(device)
        boxes = window_boxes((images.shape[2], images.shape[3]), window, stride)
        crops = crop_windows(images, boxes)
        feats = [model.forward_features(model.pad(c)) for c in crops.split(max_batch)]   # the encoder runs once
        size = (crops.shape[2], crops.shape[3])
        for conf, (_, _, decoder) in zip(confs, variants):
            logits = torch.cat([model.forward_head(f, size, decoder=decoder) for f in feats])
            conf += logits_confusion(merge_windows(logits, boxes, (images.shape[2], images.shape[3])), labels, K)
    rows = []
    for conf, (sigma, seed, _) in zip(confs, variants):
        m = segmentation_metrics(conf)
        rows.append(dict(sigma=sigma, seed=seed, metric='mIoU', value=m['mIoU'], pixel_acc=m['pixel_acc']))
    return rows


@torch.no_grad()
def classification_curve(model: nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                         sigmas: Sequence[float], seeds: Sequence[int], device: torch.device
                         ) -> List[Dict[str, object]]:
    """Top-1 (%) of a classifier with noisy attention parameters over ``batches`` [(images, labels)]."""
    model = model.to(device).eval()
    rows = []
    for sigma, seed, m in _noisy_copies(model, sigmas, seeds):
        correct = total = 0
        for x, y in batches:
            correct += int((m(x.to(device)).argmax(-1) == y.to(device)).sum())
            total += int(y.numel())
        rows.append(dict(sigma=sigma, seed=seed, metric='top1', value=100.0 * correct / max(total, 1)))
    return rows


def summarize(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Mean and standard deviation over seeds per (model, σ)."""
    groups: Dict[Tuple[str, float], List[float]] = {}
    for r in rows:
        groups.setdefault((r['model'], r['sigma']), []).append(float(r['value']))
    return [dict(model=k[0], sigma=k[1], metric=next(r['metric'] for r in rows if r['model'] == k[0]),
                 mean=statistics.fmean(v), std=statistics.pstdev(v) if len(v) > 1 else 0.0, n=len(v))
            for k, v in groups.items()]


# ---------------------------------------------------------------------------------------------------- plot

def plot_robustness(summary: List[Dict[str, object]], path: str, title: str, caption: str = PAPER_CAPTION,
                    dpi: int = 100) -> str:
    """Left: this run's metric vs σ (mean ± std over seeds; dotted: σ = 0). Right: the paper's digitised curves."""
    from .plots import _plt, _save
    plt = _plt()
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, model in enumerate(dict.fromkeys(r['model'] for r in summary)):
        rs = sorted((r for r in summary if r['model'] == model and r['sigma'] > 0), key=lambda r: r['sigma'])
        clean = next(r['mean'] for r in summary if r['model'] == model and r['sigma'] == 0)
        x, y, s = [r['sigma'] for r in rs], [r['mean'] for r in rs], [r['std'] for r in rs]
        line, = ax.plot(x, y, 'o-', color=f'C{i}', label=f'{model} (clean {clean:.1f})')
        ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], color=line.get_color(),
                        alpha=0.2)
        ax.axhline(clean, color=line.get_color(), ls=':', lw=1)
    metric = summary[0]['metric']
    ax.set(xscale='log', xlabel='σ (noise std on the attention parameters)', ylabel=metric, title=title)
    ax.legend(fontsize=8)
    for size, ls in (('tiny', '-'), ('small', '--')):
        for j, (name, ys) in enumerate(PAPER_FIG8[size].items()):
            axp.plot(SIGMAS, ys, ls, color=f'C{j + 4}', marker='.', label=f'{name}-{size[0].upper()}')
    axp.set(xscale='log', xlabel='σ', ylabel='ADE20K mIoU', title='paper Fig. 8 (digitised)')
    axp.legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--checkpoint', nargs='*', default=[],
                   help='train.segment checkpoints (segmentation) or train.train checkpoints (classification)')
    p.add_argument('--model', nargs='*', default=[], help='pretrained timm classifiers, e.g. cbt_nano_patch8_32.fmnist')
    p.add_argument('--labels', nargs='*', default=None, help='legend names: checkpoints first, then models')
    p.add_argument('--sigmas', type=float, nargs='+', default=list(SIGMAS))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--data-dir', default=None,
                   help="segmentation: ADE20K-layout folder (default: the checkpoint's); classification: the "
                        "Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument('--max-samples', type=int, default=None, help='evaluate on the first N images only')
    p.add_argument('--eval-stride', type=int, default=None, help="sliding-window stride (default: the checkpoint's)")
    p.add_argument('--batch-size', type=int, default=256, help='classification batch size')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--out', default='robustness', help='output folder')
    p.add_argument('--name', default='robustness', help='file stem of the CSVs and the PNG')


def _segmenter(ckpt: Dict):
    from ..segmentation import segmenter_from_config
    model = segmenter_from_config(ckpt['segmenter_config'])
    model.load_state_dict(ckpt['state_dict'], strict=True)
    return model, ckpt['args']


def _classifier(ckpt: Dict):
    """The model of a ``train.train`` checkpoint, built as its ``model_config`` records."""
    import timm
    from ..convert import convert
    cfg = ckpt['model_config']
    size = {'img_size': cfg['img_size']} if cfg.get('img_size') else {}
    model = timm.create_model(cfg['model'], num_classes=cfg['num_classes'], in_chans=cfg['in_chans'], **size,
                              **cfg['model_kwargs'])
    if cfg.get('convert'):
        model = convert(model, variant=cfg['convert'], rep_grid=cfg.get('convert_rep_grid'))
    model.load_state_dict(ckpt['state_dict'], strict=True)
    return model, ckpt.get('args', {})


def read_checkpoint(path: str) -> Dict:
    """A ``train.segment`` / ``train.train`` checkpoint (weights-only load); a clear error for anything else."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - missing, truncated, unsafe
        raise ValueError(f"robustness: cannot read checkpoint '{path}' ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or not ({'segmenter_config', 'model_config'} & set(ckpt)):
        raise ValueError(f"robustness: '{path}' is not a train.segment / train.train checkpoint (needs state_dict and "
                         "segmenter_config or model_config).")
    return ckpt


def _fmnist_batches(model: nn.Module, args: argparse.Namespace, train_args: Dict) -> List[Tuple[torch.Tensor, ...]]:
    from timm.data import create_transform, resolve_data_config
    from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
    overrides = {}
    if train_args:   # a train.train run: its input size and Fashion-MNIST statistics
        c = int(train_args.get('in_chans') or 1)
        overrides = dict(input_size=(c, train_args['img_size'], train_args['img_size']), crop_pct=1.0,
                         mean=FASHION_MNIST_MEAN * c, std=FASHION_MNIST_STD * c,
                         interpolation=train_args.get('interpolation') or None)
    cfg = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    tf = create_transform(**cfg, is_training=False)
    ds = FashionMNIST(args.data_dir, 'test', transform=tf, max_samples=args.max_samples,
                      img_mode='L' if cfg['input_size'][0] == 1 else 'RGB')
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size)
    return list(loader)


def _segmentation_rows(ckpt: Dict, args: argparse.Namespace, device: torch.device) -> List[Dict[str, object]]:
    from ..data.ade20k import ADE20KSegmentation, eval_transform
    model, targs = _segmenter(ckpt)
    cfg = model.encoder.pretrained_cfg or {}
    tf = eval_transform(targs.get('base_size') or targs['crop_size'], targs.get('mean') or cfg.get('mean'),
                        targs.get('std') or cfg.get('std'))
    ds = ADE20KSegmentation(args.data_dir or targs['data_dir'], 'validation', tf, args.max_samples)
    stride = args.eval_stride or targs.get('eval_stride') or targs['crop_size']
    return segmentation_curve(model, ds, args.sigmas, args.seeds, targs['crop_size'], stride, device,
                              targs.get('eval_batch', 8))


def _classification_rows(model: nn.Module, train_args: Dict, args, device) -> List[Dict[str, object]]:
    return classification_curve(model, _fmnist_batches(model, args, train_args), args.sigmas, args.seeds, device)


def _collect(args: argparse.Namespace, device: torch.device) -> Tuple[str, List[Dict[str, object]]]:
    """Rows of every checkpoint / model, labelled; the task ('segmentation' or 'classification')."""
    import timm
    sources = [('checkpoint', c) for c in args.checkpoint] + [('model', m) for m in args.model]
    if not sources:
        raise ValueError('robustness: give at least one --checkpoint or --model.')
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(s))) if k == 'checkpoint' else s
                             for k, s in sources]
    if len(labels) != len(sources):
        raise ValueError(f'--labels: {len(labels)} names for {len(sources)} checkpoints / models.')
    tasks, rows = set(), []
    for (kind, src), label in zip(sources, labels):
        ckpt = read_checkpoint(src) if kind == 'checkpoint' else None
        if ckpt is not None and 'segmenter_config' in ckpt:
            tasks.add('segmentation')
            new = _segmentation_rows(ckpt, args, device)
        else:
            tasks.add('classification')
            model, targs = _classifier(ckpt) if ckpt is not None else (timm.create_model(src, pretrained=True), {})
            new = _classification_rows(model, targs, args, device)
        rows += [dict(r, model=label) for r in new]
        print(f'{label}: ' + ', '.join(f"σ={r['sigma']:g}/{r['seed']}: {r['value']:.2f}" for r in new), flush=True)
    if len(tasks) > 1:
        raise ValueError('robustness: mix of segmentation and classification models; run them separately.')
    return tasks.pop(), rows


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    """The ``robustness`` subcommand; returns the summary rows."""
    from .common import write_csv
    if args.threads:
        torch.set_num_threads(args.threads)
    task, rows = _collect(args, torch.device(args.device))
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, f'{args.name}.csv'), ['model', 'sigma', 'seed', 'metric', 'value'])
    summary = summarize(rows)
    write_csv(summary, os.path.join(args.out, f'{args.name}_summary.csv'))
    title = f'{task}: noise on the attention parameters' + (' of the decoder' if task == 'segmentation' else '')
    plot_robustness(summary, os.path.join(args.out, f'{args.name}.png'), title)
    print(f"{'model':<24}" + ''.join(f'{s:>8g}' for s in [0.0] + list(args.sigmas)))
    for model in dict.fromkeys(r['model'] for r in summary):
        vals = {r['sigma']: r['mean'] for r in summary if r['model'] == model}
        print(f'{model:<24}' + ''.join(f'{vals[s]:8.2f}' for s in [0.0] + list(args.sigmas)))
    return summary
