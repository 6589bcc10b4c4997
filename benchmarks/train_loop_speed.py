#!/usr/bin/env python3
"""Training-loop throughput: this checkout's ``train.train`` against another checkout's (e.g. main before the
rebuild), same flags, interleaved runs, on CPU (Fashion-MNIST quickstart model).

    git worktree add /tmp/oldtrain 1c59fc4
    python benchmarks/train_loop_speed.py --other /tmp/oldtrain --rounds 3

Prints the training-phase img/s of every run (the epoch line's figure: samples / time from the first batch to the
end of the epoch's training, evaluation excluded) and the median ratio new / other.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--config", "train/configs/fmnist_quickstart.yaml", "--epochs", "1", "--max-train-samples", "6000",
         "--max-val-samples", "500", "--log-interval", "10", "--threads", "1", "--workers", "0"]
RATE = re.compile(r"Epoch 1/1 .*?\| ([\d.]+) img/s")


def run(checkout: Path, out: str, extra) -> float:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "train.train"] + FLAGS + list(extra) + ["--output", out],
                       cwd=checkout, env=env, capture_output=True, text=True, timeout=1800)
    text = p.stdout + p.stderr
    m = RATE.search(text)
    if p.returncode != 0 or not m:
        raise SystemExit(f"run in {checkout} failed (rc {p.returncode}):\n{text[-3000:]}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", required=True, help="checkout of the trainer to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("extra", nargs="*", help="extra training flags for both")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, checkout in (("other", Path(a.other)), ("this", ROOT)):
                rate = run(checkout, os.path.join(tmp, f"{name}{r}"), a.extra)
                rows.append((r, name, rate))
                print(f"round {r}  {name:5s}  {rate:8.1f} img/s", flush=True)
    this = [x for _, n, x in rows if n == "this"]
    other = [x for _, n, x in rows if n == "other"]
    print(f"\n| trainer | median img/s | runs |\n|---|---|---|\n| other ({a.other}) | {statistics.median(other):.1f} | "
          f"{', '.join(f'{x:.0f}' for x in other)} |\n| this | {statistics.median(this):.1f} | "
          f"{', '.join(f'{x:.0f}' for x in this)} |")
    print(f"ratio this / other (median of per-round ratios): "
          f"{statistics.median(t / o for t, o in zip(this, other)):.3f}")


if __name__ == "__main__":
    main()
