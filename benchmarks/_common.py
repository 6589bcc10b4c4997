"""Shared helpers for the benchmark scripts (interleaved timing, saved-for-backward bytes, tables, plots)."""
import csv
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved(fns: Dict[str, Callable[[], None]], rounds: int, device: torch.device, warmup: int = 1
                ) -> Dict[str, List[float]]:
    """Run every fn once per round, round-robin, in one process; return the per-round times in ms."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    res: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            res[k].append((time.perf_counter() - t0) * 1e3)
    return res


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of tensors autograd saves for backward during ``fn()``, deduplicated by storage (parameters excluded)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def fit_exponent(ns: Sequence[float], ts: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(N)."""
    xs = [math.log(n) for n in ns]
    ys = [math.log(t) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den if den else float('nan')


def machine_description(device: torch.device) -> str:
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=5).stdout
            for line in out.splitlines():
                if line.startswith('Model name'):
                    name = line.split(':', 1)[1].strip()
        except Exception:  # noqa: BLE001
            pass
        name += f', {torch.get_num_threads()} threads'
    load = ''
    if hasattr(os, 'getloadavg'):
        load = ', load avg %.1f' % os.getloadavg()[0]
    return f'{name}, torch {torch.__version__}{load}'


def write_csv(path: str, rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] * len(header)) + '|']
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(lines)


def loglog_plot(path: str, series: Dict[str, Dict[int, float]], title: str, ylabel: str = 'fwd+bwd ms (min)'
                ) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib missing: no plot (pip install matplotlib)')
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, pts in series.items():
        ns = sorted(pts)
        ax.plot(ns, [pts[n] for n in ns], marker='o', label=name)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('tokens N')
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def runs_triton(fn: Callable[[], object]) -> bool:
    """Whether ``fn()`` ran the CBSA Triton kernels (a 'triton' benchmark row must not be a silent fallback to
    'fused': the backend logs its reason and falls back, so the scripts check before timing)."""
    from timm_cbsa.ops.contract_broadcast.triton import function
    calls = []
    cls = function.TritonContractBroadcast
    apply = cls.apply
    cls.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        fn()
    finally:
        del cls.apply                       # back to torch.autograd.Function.apply
    return bool(calls)
