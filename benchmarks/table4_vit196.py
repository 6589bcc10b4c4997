#!/usr/bin/env python3
"""The paper's Table 4 (same model, only the attention differs) at ViT-like token counts, on Fashion-MNIST.

Fashion-MNIST upsampled to 56×56 with 4×4 patches: 196 patch tokens + a class token, as ViT-S/16 at 224 px. The same
small timm ViT (d=64, depth 4, 2 heads, MLP ×4, class-token head; ``benchmarks/_fmnist196.py``), the same recipe,
data order and budget for every row; only ``attn_layer`` differs:

    cbsa (m=16), cbsa (m=64), softmax (timm Attention, 3 projections), mssa, agent (m=64), linear, tssa

Reports test top-1 / top-5 (mean ± std over seeds), parameters and training img/s per row; writes a per-run CSV, a
summary CSV, a markdown table and a PNG bar chart. Needs Debian's ``dataset-fashion-mnist``. Not a test (the test
suite runs it for two steps on tiny data).

    python benchmarks/table4_vit196.py                                  # full run: 7 rows x 2 seeds
    python benchmarks/table4_vit196.py --rows cbsa16 softmax --seeds 0 --max-steps 2 --train-samples 256 \\
        --test-samples 256 --out /tmp/t4                                # smoke
    python benchmarks/table4_vit196.py --summarize benchmarks/results/table4_vit196_runs.csv   # redo table/PNG
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# row name -> (attn_layer, rep_grid, label)
ROWS = {
    'cbsa16': ('cbsa', 4, 'CBSA (m=16)'),
    'cbsa64': ('cbsa', 8, 'CBSA (m=64)'),
    'softmax': ('attn', None, 'softmax (timm Attention, q,k,v)'),
    'mssa': ('mssa', None, 'MSSA (softmax, q=k=v)'),
    'agent': ('agent', 8, 'Agent / CBSA∨ (m=64)'),
    'linear': ('linear', None, 'linear (elu+1, q,k,v)'),
    'tssa': ('tssa', None, 'TSSA (ToST)'),
}
# Table 4 of the paper (ImageNet-1K top-1, "T"-size models with the same backbone): no softmax-with-3-projections,
# m=16 or linear row there.
PAPER_T4 = {'cbsa64': 63.2, 'mssa': 64.7, 'agent': 63.8, 'tssa': 61.2}


def build_parser():
    from _fmnist196 import Recipe
    r = Recipe()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
    p.add_argument('--epochs', type=float, default=r.epochs)
    p.add_argument('--train-samples', type=int, default=r.train_samples)
    p.add_argument('--test-samples', type=int, default=r.test_samples)
    p.add_argument('--batch-size', type=int, default=r.batch_size)
    p.add_argument('--lr', type=float, default=r.lr)
    p.add_argument('--warmup-steps', type=int, default=r.warmup_steps)
    p.add_argument('--clip-grad', type=float, default=r.clip_grad, help='grad-norm clipping (0: off)')
    p.add_argument('--embed-dim', type=int, default=r.embed_dim)
    p.add_argument('--depth', type=int, default=r.depth)
    p.add_argument('--num-heads', type=int, default=r.num_heads)
    p.add_argument('--max-steps', type=int, default=None, help='cap the optimizer steps (smoke runs)')
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: leaves the other core free)')
    p.add_argument('--data-dir', default=None)
    p.add_argument('--out', default=os.path.join(HERE, 'results'), help='folder for the CSVs, markdown and PNG')
    p.add_argument('--name', default='table4_vit196', help='file stem of the outputs')
    p.add_argument('--summarize', nargs='+', default=None, metavar='RUNS_CSV',
                   help='no training: rebuild table + PNG from runs CSVs (e.g. one per seed, run in parallel)')
    p.add_argument('--runs-name', default=None, help='file stem of the per-run CSV (default NAME_runs)')
    return p


def _runs_from_csv(path):
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            for k in ('top1', 'top5', 'img_per_s', 'train_s'):
                r[k] = float(r[k])
            for k in ('seed', 'params'):
                r[k] = int(r[k])
            rows.append(r)
    return rows


def summarize(runs, out, name, header_lines):
    from _common import markdown_table, write_csv
    from _fmnist196 import bar_chart
    order = [row for row in ROWS if any(r['row'] == row for r in runs)]   # the table's fixed row order
    summary = []
    for row in order:
        rs = [r for r in runs if r['row'] == row]
        t1 = [r['top1'] for r in rs]
        summary.append(dict(
            row=row, attention=ROWS[row][2], attn_layer=ROWS[row][0], m=rs[0]['m'], params=rs[0]['params'],
            top1_mean=round(statistics.mean(t1), 2), top1_std=round(statistics.stdev(t1), 2) if len(t1) > 1 else 0.0,
            top5_mean=round(statistics.mean(r['top5'] for r in rs), 2), seeds=len(rs),
            per_seed=' '.join(f"{v:.2f}" for v in t1),
            train_img_per_s=round(statistics.mean(r['img_per_s'] for r in rs), 1),
            paper_in1k_top1=PAPER_T4.get(row, '')))
    write_csv(os.path.join(out, f'{name}.csv'), summary)
    table = markdown_table(
        ['attention', 'm', 'params', 'test top-1 (mean ± std)', 'per seed', 'top-5', 'train img/s', 'paper IN-1K'],
        [[s['attention'], str(s['m'] or '—'), f"{s['params']:,}", f"{s['top1_mean']:.2f} ± {s['top1_std']:.2f}",
          s['per_seed'], f"{s['top5_mean']:.2f}", f"{s['train_img_per_s']:.0f}",
          str(s['paper_in1k_top1'] or '—')] for s in summary])
    ranked = sorted(summary, key=lambda s: -s['top1_mean'])
    text = '\n'.join(header_lines) + '\n\n' + table + '\n\nRanking here: ' + ' > '.join(
        s['row'] for s in ranked) + '\nPaper Table 4 (IN-1K): mssa 64.7 > agent 63.8 > cbsa 63.2 > tssa 61.2\n'
    with open(os.path.join(out, f'{name}.md'), 'w') as f:
        f.write(text)
    bar_chart(os.path.join(out, f'{name}.png'), [s['attention'] for s in summary],
              [s['top1_mean'] for s in summary], [s['top1_std'] for s in summary],
              title=header_lines[0].lstrip('# ')[:180])
    print(text)
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    from _common import machine_description, write_csv
    from _fmnist196 import Recipe, build_vit, count_params, evaluate, load_split, train
    os.makedirs(args.out, exist_ok=True)
    recipe = Recipe(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads, batch_size=args.batch_size,
                    lr=args.lr, epochs=args.epochs, train_samples=args.train_samples, test_samples=args.test_samples,
                    warmup_steps=args.warmup_steps, clip_grad=args.clip_grad or None)
    header = [f'# Table 4 at 196 tokens: Fashion-MNIST 56×56, 4×4 patches (196 + class token), ViT d={recipe.embed_dim} '
              f'depth {recipe.depth} heads {recipe.num_heads}',
              f'Budget per run: {recipe.train_samples} train images × {recipe.epochs:g} epochs, batch '
              f'{recipe.batch_size}, head: {recipe.global_pool} pool, AdamW lr {recipe.lr:g} wd {recipe.weight_decay} (warm-up {recipe.warmup_steps} steps, '
              f'cosine), grad-norm clip {recipe.clip_grad}, h-flip; test on {recipe.test_samples} test images; seeds {args.seeds}.',
              'Command: `python ' + ' '.join(['benchmarks/table4_vit196.py'] + list(argv if argv is not None
                                                                                    else sys.argv[1:])) + '`']
    runs_csv = os.path.join(args.out, f'{args.runs_name or args.name + "_runs"}.csv')
    if args.summarize:
        runs = [r for path in args.summarize for r in _runs_from_csv(path)]
        header[1] += ' (table merged from ' + ', '.join(os.path.basename(p) for p in args.summarize) + ')'
        return summarize(runs, args.out, args.name, header)
    torch.set_num_threads(args.threads)
    header.append(f'Machine: {machine_description(torch.device("cpu"))} at start (shared, noisy: img/s are '
                  f'indicative only).')
    tr_x, tr_y = load_split('train', recipe.train_samples, args.data_dir)
    te_x, te_y = load_split('test', recipe.test_samples, args.data_dir)
    runs = []
    for seed in args.seeds:          # seed-major: a cut-short run still has every row for the first seed
        for row in args.rows:
            attn, rep_grid, label = ROWS[row]
            torch.manual_seed(seed)
            model = build_vit(attn, recipe, rep_grid)
            t0 = time.time()
            print(f'[{time.strftime("%H:%M:%S")}] {row} seed {seed}: {label}', flush=True)
            stats = train(model, tr_x, tr_y, recipe, seed, max_steps=args.max_steps, log=print)
            top1, top5 = evaluate(model, te_x, te_y)
            runs.append(dict(row=row, attn_layer=attn, m=(rep_grid * rep_grid if rep_grid else ''), seed=seed,
                             top1=round(top1, 2), top5=round(top5, 2), params=count_params(model),
                             img_per_s=round(stats['img_per_s'], 1), train_s=round(stats['train_s'], 1),
                             steps=stats['steps'], wall_s=round(time.time() - t0, 1)))
            print(f'  -> top-1 {top1:.2f}  top-5 {top5:.2f}  {stats["img_per_s"]:.0f} img/s  '
                  f'({time.time() - t0:.0f}s)', flush=True)
            write_csv(runs_csv, runs)   # rewritten after every run
    return summarize(runs, args.out, args.name, header)


if __name__ == '__main__':
    main()
