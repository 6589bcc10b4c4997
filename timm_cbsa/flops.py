"""FLOPs / parameter report: ``python -m timm_cbsa.flops`` (or ``timm-cbsa-flops``).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add over convs, linears and
matmuls; norms, softmax and pooling are not counted) on the meta device, so even CBT-L counts in a second.

The paper's Table 3 convention differs in one place: it counts CRATE's ISTA block as 2·N·d² multiply-adds per layer,
while the block computes three d×d products (z D, z Dᵀ, (z Dᵀ) D), i.e. 3·N·d². The "paper convention" column
subtracts that third product; it reproduces the paper's 1.1 / 4.0 / 15.1 / 47.3 GFLOPs within 2%.
"""
import argparse
import csv
import sys
from typing import Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

import timm

from .layers.config import use_backend
from .layers.ista import ISTA

__all__ = ['count_flops', 'report', 'main']

PAPER_GFLOPS = {'cbt_tiny': 1.1, 'cbt_small': 4.0, 'cbt_base': 15.1, 'cbt_large': 47.3}
DEFAULT_MODELS = list(PAPER_GFLOPS) + [f'cbsa_vit_{s}' for s in ('tiny', 'small', 'base', 'large')]


def count_flops(model: torch.nn.Module, img_size: int = 224, in_chans: int = 3) -> int:
    """Forward FLOPs of ``model`` for one image, counted by torch's FlopCounterMode (eager CBSA math)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False)
    with use_backend(model, 'eager'), counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def _ista_extra_flops(model: torch.nn.Module, num_tokens: int) -> int:
    """FLOPs of the third d×d product in every ISTA block (the paper counts two of the three)."""
    return sum(2 * num_tokens * m.weight.shape[0] ** 2 for m in model.modules() if isinstance(m, ISTA))


def report(models: List[str], img_size: int = 224) -> List[Dict[str, object]]:
    rows = []
    for name in models:
        with torch.device('meta'):
            model = timm.create_model(name, img_size=img_size).eval()
        params = sum(p.numel() for p in model.parameters())
        flops = count_flops(model, img_size)
        num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        paper_conv = flops - _ista_extra_flops(model, num_tokens)
        paper = PAPER_GFLOPS.get(name) if img_size == 224 else None
        rows.append(dict(
            model=name, params=params, gflops_torch=flops / 1e9, gflops_paper_convention=paper_conv / 1e9,
            gflops_paper=paper, delta_pct=None if paper is None else 100 * (paper_conv / 1e9 - paper) / paper))
    return rows


def _fmt(v: Optional[float], spec: str) -> str:
    return '—' if v is None else format(v, spec)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS, help='registered model names')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--csv', default=None, help='also write the table to this CSV file')
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if not timm.is_model(m)]
    if unknown:
        parser.error(f'unknown model(s) {unknown}; CBSA models: {timm.list_models("cbsa*") + timm.list_models("cbt*")}')
    rows = report(args.models, args.img_size)
    print(f'FLOPs at {args.img_size}x{args.img_size}, batch 1 (torch.utils.flop_counter, 2 FLOPs per multiply-add).')
    print('The paper counts ISTA as 2·N·d² multiply-adds (the code does 3): "paper conv." drops the third product.\n')
    print('| model | params | GFLOPs (torch counter) | GFLOPs (paper conv.) | paper GFLOPs | Δ vs paper |')
    print('|---|---:|---:|---:|---:|---:|')
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['gflops_torch']:.3f} | {r['gflops_paper_convention']:.3f} | "
              f"{_fmt(r['gflops_paper'], '.1f')} | {_fmt(r['delta_pct'], '+.2f')}{'' if r['delta_pct'] is None else '%'} |")
    if args.csv:
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == '__main__':
    main()
    sys.exit(0)
