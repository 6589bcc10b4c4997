"""What the interpretability commands share: their options, the model they run on, the inputs, the CSV writer.

Every interpretability command (``attention``, ``coding-rate``, ``zeroshot``, and ``all``) takes the same options
(``add_model_arguments``), so an invocation of one is valid for every other; ``run_on_model`` builds the model,
runs the command's measurement on it without gradients and lists the files written.
"""
import argparse
import csv
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..checkpoint import is_released_layout, load_weights
from .images import SKIMAGE_PHOTOS, load_image, to_model_input
from .maps import ModelTrace, trace_model

__all__ = ['Measure', 'add_model_arguments', 'build_model', 'fmnist_images', 'is_fmnist', 'load_model', 'load_photo',
           'model_label', 'parse_kwargs', 'pick_layers', 'run_on_model', 'trace_fmnist', 'trace_photos', 'write_csv']

# a measurement: (model, parsed options) -> summary; it writes its files into args.out and prints what it found
Measure = Callable[[torch.nn.Module, argparse.Namespace], Dict[str, object]]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the interpretability commands: the model, its weights, the images, the maps, the output."""
    p.add_argument('--model', default='cbt_tiny', help='timm model name (cbt_*, cbsa_vit_*, vit_*, ...)')
    p.add_argument('--checkpoint', default=None, help='weights: a released CBT checkpoint or a timm state dict')
    p.add_argument('--convert', default=None, metavar='VARIANT',
                   help="convert a softmax timm ViT after loading: cbsa_star, agent, cbsa or linear (timm_cbsa.convert)")
    p.add_argument('--rep-grid', type=int, default=None, help='representative grid for --convert (default 8)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V',
                   help='extra create_model kwargs, JSON values (e.g. rep_grid=4 img_size=128)')
    p.add_argument('--image', nargs='+', default=['astronaut'],
                   help=f'photos for attention / overlays: {", ".join(SKIMAGE_PHOTOS)}, voc, or files')
    p.add_argument('--rate-images', nargs='+', default=list(SKIMAGE_PHOTOS), help='photos batched for coding rate')
    p.add_argument('--layers', default=None, help="layers to draw: '0,5,11', 'all' (default: first, middle, last)")
    p.add_argument('--query', default='cls', choices=['cls', 'mean'], help='map row: class token or mean token')
    p.add_argument('--threshold', default='otsu', choices=['otsu', 'mean'])
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--pretrained', action='store_true',
                   help="load the model's pretrained weights through timm (e.g. cbt_nano_patch8_32.fmnist, shipped "
                        "in the package, offline)")
    p.add_argument('--dataset', default=None, choices=[None, 'fashion_mnist'],
                   help='fashion_mnist: Fashion-MNIST test images instead of photos; zero-shot foreground = garment')
    p.add_argument('--data-dir', default=None, help='Fashion-MNIST IDX folder (default: Debian\'s)')
    p.add_argument('--fmnist-index', nargs='+', type=int, default=[0, 1, 2, 3, 4, 5],
                   help='Fashion-MNIST test images drawn by `attention`')
    p.add_argument('--num-images', type=int, default=256,
                   help='Fashion-MNIST test images (the first N) for coding rate and zero-shot IoU')
    p.add_argument('--out', required=True, help='output folder (created)')


def write_csv(rows: List[Dict[str, object]], path: str, columns: Optional[Sequence[str]] = None) -> str:
    """Rows as CSV (floats with 6 significant digits); ``columns`` default to the first row's keys."""
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in r.items()})
    return path


def parse_kwargs(items: Sequence[str]) -> Dict[str, object]:
    """['k=v', ...] -> {k: JSON value of v, or v as a string}."""
    out = {}
    for item in items or ():
        k, _, v = item.partition('=')
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_model(name: str, checkpoint: Optional[str] = None, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm model by name (random init, seeded), optionally loaded from a checkpoint file."""
    import timm
    import timm_cbsa
    if not checkpoint:
        with torch.random.fork_rng(devices=[]):     # seeded init without touching the caller's global RNG
            torch.manual_seed(seed)
            return timm.create_model(name, **kwargs).eval()
    sd = timm_cbsa.read_state_dict(checkpoint)      # weights only (never unpickles code); errors name the file
    if is_released_layout(sd):
        variant = name if name.startswith('cbt_') else None
        return timm_cbsa.load_official_cbt(sd, variant=variant, **kwargs).eval()
    if 'head.weight' in sd and 'num_classes' not in kwargs:
        kwargs['num_classes'] = int(sd['head.weight'].shape[0])
    return load_weights(timm.create_model(name, **kwargs), sd).eval()


def _random_init(args: argparse.Namespace) -> bool:
    return not (args.checkpoint or args.pretrained)


def model_label(args: argparse.Namespace, mark_random: bool = True) -> str:
    """Model name for figure titles and messages, with the conversion, marked when the weights are random."""
    name = args.model + (f'->{args.convert}' if args.convert else '')
    return name + (' (random init)' if mark_random and _random_init(args) else '')


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model the options describe: timm's pretrained weights, a checkpoint, or a seeded random init; then
    converted when ``--convert`` asks for it."""
    if args.pretrained and args.checkpoint:
        raise SystemExit('--pretrained and --checkpoint both give weights; pass one of them.')
    import timm
    import timm_cbsa
    kwargs = parse_kwargs(args.model_kwargs)
    if args.pretrained:
        model = timm.create_model(args.model, pretrained=True, **kwargs).eval()
    else:
        model = build_model(args.model, args.checkpoint, args.seed, **kwargs)
    if args.convert:
        model = timm_cbsa.convert(model, variant=args.convert, rep_grid=args.rep_grid).eval()
    if _random_init(args):
        print(f'note: {model_label(args, mark_random=False)} is randomly initialised (seed {args.seed}); pass '
              '--checkpoint for trained weights', file=sys.stderr)
    return model


def run_on_model(args: argparse.Namespace, measure: Measure) -> Dict[str, object]:
    """Build the model, run ``measure`` on it without gradients (a context, not a global switch: the CLI may run
    inside another program), print the files in ``args.out``; returns the measurement's summary."""
    os.makedirs(args.out, exist_ok=True)
    with torch.no_grad():
        summary = measure(load_model(args), args)
    files = sorted(f for f in os.listdir(args.out) if f.endswith(('.png', '.csv')))
    print(f'wrote {len(files)} files to {args.out}: ' + ', '.join(files))
    return summary


def _input_size(model) -> Tuple[int, int]:
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is not None:
        return int(img_size[0]), int(img_size[1])
    size = model.pretrained_cfg.get('input_size', (3, 224, 224))
    return int(size[1]), int(size[2])


def _norm_stats(model):
    cfg = model.pretrained_cfg
    return cfg.get('mean', (0.485, 0.456, 0.406)), cfg.get('std', (0.229, 0.224, 0.225))


def trace_photos(model, images: List[np.ndarray]) -> ModelTrace:
    """``trace_model`` on RGB photos resized to the model's input size and normalised with its statistics."""
    mean, std = _norm_stats(model)
    size = _input_size(model)
    return trace_model(model, torch.cat([to_model_input(im, size, mean, std) for im in images]))


def is_fmnist(args: argparse.Namespace) -> bool:
    return args.dataset in ('fashion_mnist', 'fmnist', 'fashion-mnist')


def trace_fmnist(model, images) -> ModelTrace:
    """``trace_model`` on Fashion-MNIST images at the model's input size and channel count."""
    from .fmnist import fmnist_input
    mean, std = _norm_stats(model)
    in_chans = int(model.patch_embed.proj.weight.shape[1]) if hasattr(model.patch_embed.proj, 'weight') else \
        int(model.pretrained_cfg.get('input_size', (1,))[0])
    return trace_model(model, fmnist_input(images, _input_size(model), mean, std, in_chans))


def fmnist_images(args: argparse.Namespace, n: Optional[int] = None):
    """(images, labels): the test images of ``--fmnist-index``, or the first ``n``."""
    from .fmnist import load_fmnist
    idx = list(args.fmnist_index) if n is None else list(range(n))
    return load_fmnist(idx, 'test', args.data_dir)


def pick_layers(spec: Optional[str], depth: int) -> List[int]:
    """'0,5,-1' -> those layers (negative from the end); 'all'; None -> first, middle, last."""
    if not spec:
        return sorted({0, depth // 2, depth - 1})
    if spec == 'all':
        return list(range(depth))
    return [int(s) % depth for s in spec.split(',')]


def load_photo(name: str) -> Tuple[np.ndarray, str]:
    """(RGB photo, tag for file names) of a photo name or path."""
    return load_image(name), os.path.splitext(os.path.basename(name))[0]
