#!/usr/bin/env python3
"""Small replication of the paper's Table 4 (fair attention comparison) on Fashion-MNIST.

The same tiny ViT (timm VisionTransformer built by ``cbsa_vit_tiny`` with ``attn_layer=<name>``), the same
recipe and the same data; only the attention differs. Reports test top-1 / top-5, mean +- std over seeds,
prints a table and writes a CSV. Needs Debian's ``dataset-fashion-mnist`` (apt-get install -y
dataset-fashion-mnist). Not a test: it trains 4 x seeds small models on CPU.

    python benchmarks/table4_fmnist.py                       # cbsa mssa agent linear, seeds 0 1
    python benchmarks/table4_fmnist.py --attn cbsa mssa --seeds 0 1 2 --epochs 5 --max-train-samples 60000
    python benchmarks/table4_fmnist.py -- --opt lion --lr 5e-4  # extra train.train flags after --
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PAPER = "paper IN-1K Table 4 (T): CBSA 63.2, TSSA 61.2, MSSA 64.7, Agent 63.8"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attn", nargs="+", default=["cbsa", "mssa", "agent", "linear"],
                   help="attn_layer names registered in timm's ATTN_LAYERS (import timm_cbsa registers them)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train-samples", type=int, default=10000)
    p.add_argument("--max-val-samples", type=int, default=10000)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--patch-size", type=int, default=7, help="7 -> 4x4 tokens; 4 -> 7x7 tokens")
    p.add_argument("--rep-grid", type=int, default=2, help="representatives grid for cbsa/agent")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output", default="output/table4_fmnist")
    p.add_argument("--csv", default=None, help="CSV path (default OUTPUT/table4_fmnist.csv)")
    p.add_argument("--summarize", nargs="+", default=None, metavar="CSV",
                   help="no training: merge per-run CSVs written by earlier invocations (e.g. one per seed, "
                        "run in parallel) and print / write the table")
    p.add_argument("train_args", nargs="*", help="extra train.train flags (after --)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import timm_cbsa  # noqa: F401  (registers models and attention layers)
    from timm.models.vision_transformer import ATTN_LAYERS
    from train.train import main as train_main

    missing = [a for a in args.attn if a not in ATTN_LAYERS]
    if missing:
        raise SystemExit(f"attention(s) {missing} are not registered in timm's ATTN_LAYERS "
                         f"(available: {sorted(k for k in ATTN_LAYERS if k)})")
    os.makedirs(args.output, exist_ok=True)
    csv_path = args.csv or os.path.join(args.output, "table4_fmnist.csv")
    rows = []
    if args.summarize:
        for path in args.summarize:
            with open(path) as f:
                for r in csv.DictReader(f):
                    for k in ("top1", "top5", "train_s"):
                        r[k] = float(r[k])
                    for k in ("seed", "params", "epochs", "train_samples", "test_samples"):
                        r[k] = int(r[k])
                    rows.append(r)
        args.attn = list(dict.fromkeys(r["attn"] for r in rows))
        args.seeds = sorted({r["seed"] for r in rows})
        args.epochs, args.max_train_samples, args.max_val_samples = (
            rows[0]["epochs"], rows[0]["train_samples"], rows[0]["test_samples"])
        return _report(args, rows, csv_path)
    for attn in args.attn:
        for seed in args.seeds:
            kw = [f"attn_layer={attn}", f"patch_size={args.patch_size}", "global_pool=avg", f"embed_dim={args.embed_dim}",
                  f"depth={args.depth}", f"num_heads={args.num_heads}", f"rep_grid={args.rep_grid}"]
            argv_t = ["--dataset", "fashion_mnist", "--model", "cbsa_vit_tiny", "--model-kwargs", *kw,
                      "--img-size", "28", "--in-chans", "1", "--epochs", str(args.epochs),
                      "--batch-size", str(args.batch_size), "--opt", "adamw", "--lr", str(args.lr),
                      "--weight-decay", "0.05", "--sched", "cosine", "--sched-on-updates", "--warmup-epochs", "0",
                      "--min-lr", "1e-5", "--smoothing", "0", "--scale", "1", "1", "--ratio", "1", "1",
                      "--hflip", "0.5", "--color-jitter", "0", "--train-interpolation", "bilinear",
                      "--max-train-samples", str(args.max_train_samples),
                      "--max-val-samples", str(args.max_val_samples), "--seed", str(seed), "--workers", "0",
                      "--quiet", "--checkpoint-hist", "0", "--output", os.path.join(args.output, f"{attn}-s{seed}")]
            if args.data_dir:
                argv_t += ["--data-dir", args.data_dir]
            argv_t += list(args.train_args)
            t0 = time.time()
            res = train_main(argv_t)
            row = dict(attn=attn, seed=seed, top1=round(res["top1"], 2), top5=round(res["top5"], 2),
                       params=res["num_params"], train_s=round(time.time() - t0, 1), epochs=args.epochs,
                       train_samples=args.max_train_samples, test_samples=args.max_val_samples)
            rows.append(row)
            print(f"  {attn:8s} seed {seed}: top-1 {row['top1']:.2f}  ({row['train_s']:.0f}s)", flush=True)
            with open(csv_path, "w", newline="") as f:  # rewritten after every run
                w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                w.writeheader()
                w.writerows(rows)
    return _report(args, rows, csv_path)


def _report(args, rows, csv_path):

    summary = []
    for attn in args.attn:
        t1 = [r["top1"] for r in rows if r["attn"] == attn]
        t5 = [r["top5"] for r in rows if r["attn"] == attn]
        summary.append(dict(attn=attn, params=next(r["params"] for r in rows if r["attn"] == attn),
                            top1_mean=round(statistics.mean(t1), 2),
                            top1_std=round(statistics.stdev(t1), 2) if len(t1) > 1 else 0.0,
                            top5_mean=round(statistics.mean(t5), 2), seeds=len(t1),
                            per_seed=" ".join(f"{v:.2f}" for v in t1)))
    if not args.summarize or os.path.abspath(csv_path) not in map(os.path.abspath, args.summarize):
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    sum_path = os.path.splitext(csv_path)[0] + "_summary.csv"
    with open(sum_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0].keys()))
        w.writeheader()
        w.writerows(summary)

    print(f"\nFashion-MNIST, {args.max_train_samples} train / {args.max_val_samples} test images, {args.epochs} "
          f"epochs, ViT d={args.embed_dim} depth={args.depth} heads={args.num_heads} patch {args.patch_size} "
          f"({28 // args.patch_size}x{28 // args.patch_size} tokens, avg pool), "
          f"rep_grid {args.rep_grid}; seeds {args.seeds}")
    print("(details: " + ", ".join(f"{k}={v}" for k, v in [("lr", args.lr), ("batch", args.batch_size)]) +
          (", extra " + " ".join(args.train_args) if args.train_args else "") + ")")
    print("| attention | params | test top-1 (mean ± std) | per seed | top-5 |")
    print("|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['attn']} | {s['params'] / 1e3:.0f}K | {s['top1_mean']:.2f} ± {s['top1_std']:.2f} | "
              f"{s['per_seed']} | {s['top5_mean']:.2f} |")
    print(f"({PAPER})\nwrote {csv_path} and {sum_path}")
    return summary


if __name__ == "__main__":
    main()
