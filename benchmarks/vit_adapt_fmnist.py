#!/usr/bin/env python3
"""ViT adaptation (paper §3.4, Fig. 9) in miniature, on the 196-token Fashion-MNIST task of ``table4_vit196.py``.

1. pretrain a softmax ViT (timm ``Attention``; d=64, depth 4, 2 heads, 56×56 grey, 4×4 patches → 196 + class token);
2. ``timm_cbsa.convert`` it to each variant (cbsa_star, agent, cbsa, linear; pooled variants m = 64) and test it
   right after the conversion (no training);
3. fine-tune every converted model, and the softmax model itself, for the same short budget;
4. train the same architectures from scratch with that budget.

Fine-tuning and from-scratch runs repeat over seeds (data order and, from scratch, the initialisation); the
pretrained model is one run (seed 0). Writes a per-run CSV, a summary CSV, a markdown table and a PNG into --out.

    python benchmarks/vit_adapt_fmnist.py                              # full run
    python benchmarks/vit_adapt_fmnist.py --pretrain-epochs 0.02 --ft-epochs 0.02 --max-steps 2 \\
        --train-samples 256 --test-samples 256 --out /tmp/adapt        # smoke
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# conversion variant -> (attn_layer of the same architecture trained from scratch, label)
VARIANTS = {
    'cbsa_star': ('cbsa_star', 'CBSA* (3 proj., contraction)'),
    'agent': ('agent_qkv', 'CBSA∨ / agent (3 proj.)'),
    'cbsa': ('cbsa', 'CBSA (1 proj., from W_v)'),
    'linear': ('linear', 'linear (elu+1)'),
}
# paper Fig. 9, ViT-T at 224 (IN-21k → IN-1k, 50 epochs fine-tuning), digitised
PAPER_FIG9_T224 = {'softmax': 76.9, 'linear': 73.2, 'cbsa_star': 72.2, 'agent': 74.7}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
    p.add_argument('--rep-grid', type=int, default=8, help='representative grid of the pooled variants (8 → m=64)')
    p.add_argument('--train-samples', type=int, default=60000)
    p.add_argument('--test-samples', type=int, default=10000)
    p.add_argument('--pretrain-epochs', type=float, default=2.0)
    p.add_argument('--pretrain-lr', type=float, default=1e-3)
    p.add_argument('--ft-epochs', type=float, default=0.25, help='the short, equal budget (fine-tune and scratch)')
    p.add_argument('--ft-lr', type=float, default=2e-4)
    p.add_argument('--scratch-lr', type=float, default=1e-3)
    p.add_argument('--max-steps', type=int, default=None, help='cap every training phase (smoke runs)')
    p.add_argument('--pretrained', default=None, help='reuse a pretrained softmax state dict (skips step 1)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--data-dir', default=None)
    p.add_argument('--out', default=os.path.join(HERE, 'results'))
    p.add_argument('--name', default='vit_adapt_fmnist')
    p.add_argument('--summarize', nargs='+', default=None, metavar='RUNS_CSV',
                   help='no training: rebuild the table / PNG from runs CSVs (also of a run cut short; e.g. one per '
                        'seed, run in parallel with --pretrained)')
    p.add_argument('--runs-name', default=None, help='file stem of the per-run CSV (default NAME_runs)')
    return p


def _ms(vals):
    return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    import timm_cbsa
    from _common import machine_description, markdown_table, write_csv
    from _fmnist196 import Recipe, bar_chart, build_vit, count_params, evaluate, load_split, train
    os.makedirs(args.out, exist_ok=True)
    base = Recipe(train_samples=args.train_samples, test_samples=args.test_samples)
    pre = Recipe(**{**base.as_dict(), 'epochs': args.pretrain_epochs, 'lr': args.pretrain_lr})
    short = Recipe(**{**base.as_dict(), 'epochs': args.ft_epochs})
    argv_s = ' '.join(argv if argv is not None else sys.argv[1:])
    runs = []
    if args.summarize:
        import csv
        for path in args.summarize:
            with open(path) as f:
                runs += list(csv.DictReader(f))
    seeds = sorted({int(r['seed']) for r in runs if r['stage'] != 'converted'}) if runs else args.seeds
    header = [f'# ViT adaptation in miniature: Fashion-MNIST 56×56, 4×4 patches (196 + class token), ViT d={base.embed_dim} '
              f'depth {base.depth} heads {base.num_heads}',
              f'Pretraining: softmax ViT, {base.train_samples} train images × {pre.epochs:g} epochs, AdamW lr {pre.lr:g} '
              f'(seed 0). Short budget (fine-tune and scratch): {short.epochs:g} epoch(s) of the same images, batch '
              f'{base.batch_size}; fine-tune lr {args.ft_lr:g}, scratch lr {args.scratch_lr:g}; {base.warmup_steps} '
              f'warm-up steps (at most 1/5 of a run) + cosine, grad-norm clip {base.clip_grad}; seeds {seeds}. '
              f'Test: first {base.test_samples} test images. Pooled variants m = {args.rep_grid ** 2}.',
              'Command: `python benchmarks/vit_adapt_fmnist.py' + (' ' + argv_s if argv_s else '') + '`']
    if args.summarize:   # the recipe lines above describe the runs when they used the same flags
        header.append('(table merged from ' + ', '.join(os.path.basename(p) for p in args.summarize) + ')')
        return summarize(runs, args.out, args.name, header, args.ft_epochs, args.variants)
    torch.set_num_threads(args.threads)
    tr_x, tr_y = load_split('train', base.train_samples, args.data_dir)
    te_x, te_y = load_split('test', base.test_samples, args.data_dir)
    header.append(f'Machine: {machine_description(torch.device("cpu"))} at start (shared, noisy).')
    runs_csv = os.path.join(args.out, f'{args.runs_name or args.name + "_runs"}.csv')

    def record(**kw):
        runs.append(kw)
        print(f'  -> {kw["model"]} {kw["stage"]} seed {kw["seed"]}: top-1 {kw["top1"]:.2f}', flush=True)
        write_csv(runs_csv, runs)

    def stamp(msg):
        print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)

    torch.manual_seed(0)
    pretrained = build_vit('attn', base)
    if args.pretrained:
        pretrained.load_state_dict(torch.load(args.pretrained, map_location='cpu', weights_only=True))
        stamp(f'loaded pretrained softmax ViT from {args.pretrained}')
    else:
        stamp('pretraining the softmax ViT')
        train(pretrained, tr_x, tr_y, pre, 0, max_steps=args.max_steps, log=print)
        path = os.path.join(args.out, f'{args.name}_softmax_pretrained.pth')
        torch.save(pretrained.state_dict(), path + '.tmp')
        os.replace(path + '.tmp', path)                # never a half-written file
    t1, _ = evaluate(pretrained, te_x, te_y)
    record(model='softmax', stage='pretrained', seed=0, top1=round(t1, 2), params=count_params(pretrained))

    # converted, no training
    converted = {}
    for v in args.variants:
        m = timm_cbsa.convert(pretrained, variant=v, inplace=False, rep_grid=args.rep_grid)
        converted[v] = m
        t1, _ = evaluate(m, te_x, te_y)
        record(model=v, stage='converted', seed=0, top1=round(t1, 2), params=count_params(m))

    for seed in args.seeds:
        for v in ['softmax'] + list(args.variants):
            stamp(f'fine-tune {v} seed {seed}')
            m = copy.deepcopy(pretrained if v == 'softmax' else converted[v])
            torch.manual_seed(seed)
            st = train(m, tr_x, tr_y, short, seed, max_steps=args.max_steps, lr=args.ft_lr)
            t1, _ = evaluate(m, te_x, te_y)
            record(model=v, stage='fine-tuned', seed=seed, top1=round(t1, 2), params=count_params(m),
                   img_per_s=round(st['img_per_s'], 1))
        for v in ['softmax'] + list(args.variants):
            stamp(f'scratch {v} seed {seed}')
            attn = 'attn' if v == 'softmax' else VARIANTS[v][0]
            torch.manual_seed(seed)
            m = build_vit(attn, base, args.rep_grid if attn in ('cbsa_star', 'agent_qkv', 'cbsa') else None)
            st = train(m, tr_x, tr_y, short, seed, max_steps=args.max_steps, lr=args.scratch_lr)
            t1, _ = evaluate(m, te_x, te_y)
            record(model=v, stage='scratch', seed=seed, top1=round(t1, 2), params=count_params(m),
                   img_per_s=round(st['img_per_s'], 1))

    return summarize(runs, args.out, args.name, header, short.epochs, args.variants)


def summarize(runs, out, name, header, ft_epochs, variants=tuple(VARIANTS)):
    """Table, summary CSV and PNG from the per-run rows; stages that have not run show as '—'."""
    from _common import markdown_table, write_csv

    def get(model, stage):
        return [float(r['top1']) for r in runs if r['model'] == model and r['stage'] == stage]

    def fmt(mean, std):
        return '—' if mean is None else f'{mean:.2f} ± {std:.2f}'

    summary = []
    labels = {'softmax': 'softmax (original)', **{k: v[1] for k, v in VARIANTS.items()}}
    for v in ['softmax'] + list(variants):
        if not any(r['model'] == v for r in runs):
            continue
        conv = get(v, 'pretrained' if v == 'softmax' else 'converted')
        ft, sc = get(v, 'fine-tuned'), get(v, 'scratch')
        ftm, scm = (_ms(ft) if ft else (None, None)), (_ms(sc) if sc else (None, None))
        summary.append(dict(model=v, label=labels[v],
                            params=int(next(r['params'] for r in runs if r['model'] == v)),
                            converted_top1=conv[0] if conv else None,
                            finetuned_mean=None if ftm[0] is None else round(ftm[0], 2),
                            finetuned_std=None if ftm[1] is None else round(ftm[1], 2),
                            scratch_mean=None if scm[0] is None else round(scm[0], 2),
                            scratch_std=None if scm[1] is None else round(scm[1], 2),
                            finetuned_per_seed=' '.join(f'{x:.2f}' for x in ft),
                            scratch_per_seed=' '.join(f'{x:.2f}' for x in sc),
                            paper_fig9_vit_t_224=PAPER_FIG9_T224.get(v, '')))
    write_csv(os.path.join(out, f'{name}.csv'), summary)
    table = markdown_table(
        ['model', 'params', 'right after conversion', f'fine-tuned {ft_epochs:g} ep (mean ± std; seeds)',
         f'from scratch {ft_epochs:g} ep (mean ± std; seeds)', 'paper Fig. 9 ViT-T/224'],
        [[s['label'], f"{s['params']:,}",
          ('—' if s['converted_top1'] is None else f"{s['converted_top1']:.2f}") +
          (' (pretrained)' if s['model'] == 'softmax' else ''),
          fmt(s['finetuned_mean'], s['finetuned_std']) + (f" ({s['finetuned_per_seed']})" if s['finetuned_per_seed'] else ''),
          fmt(s['scratch_mean'], s['scratch_std']) + (f" ({s['scratch_per_seed']})" if s['scratch_per_seed'] else ''),
          str(s['paper_fig9_vit_t_224'] or '—')] for s in summary])
    ranked = sorted((s for s in summary if s['finetuned_mean'] is not None), key=lambda s: -s['finetuned_mean'])
    text = ('\n'.join(header) + '\n\n' + table + '\n\nFine-tuned ranking here: ' +
            (' > '.join(s['model'] for s in ranked) or '(no fine-tuning run finished)') +
            '\nPaper Fig. 9 (ViT-T/224, 50 epochs on IN-1k): softmax 76.9 > agent 74.7 > linear 73.2 > cbsa_star 72.2\n')
    with open(os.path.join(out, f'{name}.md'), 'w') as f:
        f.write(text)
    _plot(os.path.join(out, f'{name}.png'), summary, header[0].lstrip('# '), ft_epochs)
    print(text)
    return summary


def _plot(path, summary, title, ep):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    w = 0.26
    xs = list(range(len(summary)))
    z = lambda v: 0.0 if v is None else float(v)  # noqa: E731  (a stage that has not run: no bar)
    series = [('right after conversion', [z(s['converted_top1']) for s in summary], [0] * len(summary), '#bbbbbb'),
              (f'fine-tuned {ep:g} ep', [z(s['finetuned_mean']) for s in summary],
               [z(s['finetuned_std']) for s in summary], '#4c72b0'),
              (f'from scratch {ep:g} ep', [z(s['scratch_mean']) for s in summary],
               [z(s['scratch_std']) for s in summary], '#dd8452')]
    for i, (lab, ms, ss, c) in enumerate(series):
        pos = [x + (i - 1) * w for x in xs]
        ax.bar(pos, ms, w, yerr=ss, capsize=3, label=lab, color=c)
        for p_, m_, s_ in zip(pos, ms, ss):
            ax.text(p_, m_ + s_ + 0.5, f'{m_:.0f}', ha='center', va='bottom', fontsize=7)   # above the error bar
    ax.set_xticks(xs)
    ax.set_xticklabels([s['label'] for s in summary], rotation=20, ha='right', fontsize=8)
    ax.set_ylabel('test top-1 (%)')
    ax.set_ylim(0, 112)   # room for the legend above the bars
    ax.set_title(title[:110], fontsize=8)
    ax.legend(fontsize=7, loc='upper center', ncol=3)
    ax.grid(True, axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    main()
