#!/usr/bin/env python3
"""Decoder GFLOPs of the segmentation decoders at the paper's settings (Fig. 8 left), counted by torch's
FlopCounterMode on the meta device (``timm_cbsa.segmentation.decoder_flops``), next to the paper's numbers.

    python benchmarks/seg_decoder_flops.py            # writes benchmarks/results/seg_decoder_flops.{csv,md}

Columns: 'blocks' = the decoder layers alone (the paper's and Segmenter's "decoder GFLOPs"), 'total' = with the input
projection and the mask head. 'closed form' is the CBSA blocks' count written out for the released CBT decoder, whose
layers keep the encoder's width d_enc for the tokens and project to 3 heads x 100 = 300 inside the attention (Uᵀ:
d_enc -> 300, output: 300 -> d_enc; here ``attn_head_dim=100``): 3 x 2 x [2·N·d_enc·300 + 3·N·m·300 + 2·m²·300],
N = patches + 150 classes, m = 100. The paper's B / L decoders (7.8 / 22.3 G) are wider; their configuration is not
released, so the B / L rows use the T / S configuration.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import timm_cbsa  # noqa: E402,F401
from timm_cbsa.segmentation import create_segmenter, decoder_flops  # noqa: E402

from _common import markdown_table, write_csv  # noqa: E402

# size -> (timm encoder, d_enc, image side); the paper's L uses Segmenter's 640 crop
ENCODERS = {'T': ('vit_tiny_patch16_384', 192, 512), 'S': ('vit_small_patch16_384', 384, 512),
            'B': ('vit_base_patch16_384', 768, 512), 'L': ('vit_large_patch16_384', 1024, 640)}
PAPER = {'cbsa': {'T': 1.5, 'S': 2.3, 'B': 7.8, 'L': 22.3}, 'mhsa': {'T': 4.2, 'S': 12.6, 'B': 41.7, 'L': 113.1}}
PAPER_MIOU = {'cbsa': {'T': 39.1, 'S': 45.8, 'B': 49.3, 'L': 53.3}, 'mhsa': {'T': 38.1, 'S': 45.3, 'B': 48.5, 'L': 51.8}}


def closed_form_gflops(d_enc: int, side: int, classes: int = 150, inner: int = 300, m: int = 100,
                       depth: int = 3) -> float:
    n = (side // 16) ** 2 + classes
    return depth * 2 * (2 * n * d_enc * inner + 3 * n * m * inner + 2 * m * m * inner) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join(HERE, 'results'))
    a = p.parse_args(argv)
    rows = []
    for size, (name, d_enc, side) in ENCODERS.items():
        for dec in ('cbsa', 'mhsa', 'linear'):
            with torch.device('meta'):
                model = create_segmenter(name, 150, decoder=dec, img_size=side)
            f = decoder_flops(model, side)
            rows.append(dict(encoder=f'ViT-{size} ({name})', img=side, decoder=dec,
                             gflops_blocks=round(f['blocks'] / 1e9, 3), gflops_total=round(f['total'] / 1e9, 3),
                             closed_form=round(closed_form_gflops(d_enc, side), 3) if dec == 'cbsa' else '',
                             paper_gflops=PAPER.get(dec, {}).get(size, ''),
                             paper_miou=PAPER_MIOU.get(dec, {}).get(size, ''),
                             params_m=round(sum(q.numel() for q in model.decoder.parameters()) / 1e6, 3)))
    os.makedirs(a.out, exist_ok=True)
    write_csv(os.path.join(a.out, 'seg_decoder_flops.csv'), rows)
    header = ['encoder', 'img', 'decoder', 'GFLOPs blocks', 'GFLOPs total', 'closed form', 'paper GFLOPs',
              'paper mIoU', 'params (M)']
    table = markdown_table(header, [[str(v) for v in r.values()] for r in rows])
    with open(os.path.join(a.out, 'seg_decoder_flops.md'), 'w') as f:
        f.write(table + '\n')
    print(table)


if __name__ == '__main__':
    main()
