"""What this machine would run for CBSA, and why not: ``python -m timm_cbsa.info [--check]``.

Prints the versions, then for every implementation of the contract-and-broadcast operator whether it is available for
the given head width and number of representatives on the device, with the reasons when it is not (the same static
checks the layers use when they are built), and what ``'auto'`` picks. ``--check`` also runs each available
implementation forward and backward on the device and compares outputs and every gradient with the float64 reference
(``naive.py``), like ``python -m xformers.info``; the exit status is 1 when a check fails.
"""
import argparse
import os
import sys
from typing import Dict, List, Optional

import torch

from .ops.contract_broadcast import (
    IMPLS, PoolSpec, contract_and_broadcast, naive_contract_and_broadcast, not_supported_reasons, select,
)

__all__ = ['availability', 'check', 'main']

_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float64': torch.float64}
_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def availability(head_dim: int, num_reps: int, device) -> Dict[str, List[str]]:
    """impl -> reasons it cannot run here ([] = available), for any of float32 / float16 / bfloat16."""
    return {impl: not_supported_reasons(impl, head_dim, num_reps, None, device) for impl in IMPLS}


def _versions() -> str:
    parts = []
    for name in ('timm_cbsa', 'torch', 'timm', 'triton', 'xformers'):
        try:
            mod = __import__(name)
            parts.append(f'{name} {getattr(mod, "__version__", "?")}')
        except Exception:  # noqa: BLE001  (absent or broken: say so)
            parts.append(f'{name} -')
    return ' | '.join(parts)


def check(impl: str, dtype: torch.dtype, device, head_dim: int = 64, num_reps: int = 64, seed: int = 0
          ) -> Dict[str, float]:
    """Forward + backward of ``impl`` in ``dtype`` on ``device`` against the float64 reference on CPU: the largest
    relative error (max |Δ| / max |ref|) of the output and of the gradients of W, η and κ (Q_ini pooled inside).
    Runs with TIMM_CBSA_STRICT_BACKEND=1, so a silent fallback raises instead of passing."""
    r = int(round(num_reps ** 0.5))
    rep = (r, r) if r * r == num_reps else (1, num_reps)
    grid = (rep[0] * 3 + 1, rep[1] * 3 + 2)                        # unequal windows, a partial last token block
    spec = PoolSpec(grid, rep, 0)
    B, H, N = 2, 2, 1 + grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(B, N, H, head_dim, generator=g, dtype=torch.float64).transpose(1, 2)
    eta, kap = torch.randn(H, 1, 1, generator=g, dtype=torch.float64), torch.randn(H, 1, 1, generator=g,
                                                                                   dtype=torch.float64)
    grad = torch.randn(B, H, N, head_dim, generator=g, dtype=torch.float64)
    results = []
    old = os.environ.get('TIMM_CBSA_STRICT_BACKEND')
    os.environ['TIMM_CBSA_STRICT_BACKEND'] = '1'
    try:
        for fn, dt, dev in ((lambda *a, **k: contract_and_broadcast(*a, impl=impl, **k), dtype, torch.device(device)),
                            (naive_contract_and_broadcast, torch.float64, torch.device('cpu'))):
            args = [t.to(device=dev, dtype=dt).clone().requires_grad_() for t in (w, eta, kap)]
            out = fn(args[0], args[1], args[2], head_dim ** -0.5, pool=spec)
            (out * grad.to(device=dev, dtype=dt)).sum().backward()
            results.append([out.detach()] + [a.grad for a in args])
    finally:
        if old is None:
            os.environ.pop('TIMM_CBSA_STRICT_BACKEND')
        else:
            os.environ['TIMM_CBSA_STRICT_BACKEND'] = old
    return {name: ((a.double().cpu() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for name, a, b in zip(('out', 'dw', 'deta', 'dkappa'), *results)}


def _check_dtypes(device: torch.device) -> List[torch.dtype]:
    if device.type == 'cuda':
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float64, torch.float32, torch.bfloat16]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m timm_cbsa.info', description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default=None, help="default: 'cuda' when available, else 'cpu'")
    p.add_argument('--head-dim', type=int, default=64, help='head width d (cbsa_vit_* / cbt_*: 64)')
    p.add_argument('--reps', type=int, default=64, help='number of representatives m (default 64 = 8x8)')
    p.add_argument('--check', action='store_true', help='run forward+backward parity against float64 on the device')
    p.add_argument('--dtype', choices=sorted(_DTYPES), action='append', help='dtypes for --check (repeatable)')
    a = p.parse_args(argv)
    device = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    print(_versions())
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type
    print(f'device: {name} | head width d={a.head_dim}, representatives m={a.reps}')
    avail = availability(a.head_dim, a.reps, device)
    for impl, reasons in avail.items():
        print(f'  {impl:<9} ' + ('available' if not reasons else 'unavailable: ' + '; '.join(reasons)))
    print(f"  {'auto':<9} -> {select('auto', a.head_dim, a.reps, device)[0]}")
    if not a.check:
        return 0
    dtypes = [_DTYPES[d] for d in a.dtype] if a.dtype else _check_dtypes(device)
    failed = 0
    print('parity against the float64 reference (max relative error of out, dW, dη, dκ):')
    for impl in (i for i, r in avail.items() if not r):
        for dt in dtypes:
            label = f'  {impl:<9} {str(dt).replace("torch.", ""):<9}'
            if not_supported_reasons(impl, a.head_dim, a.reps, dt, device):
                print(label + ' skipped: ' + '; '.join(not_supported_reasons(impl, a.head_dim, a.reps, dt, device)))
                continue
            try:
                errs = check(impl, dt, device, a.head_dim, a.reps)
            except Exception as e:  # noqa: BLE001  (report and go on)
                failed += 1
                print(label + f' FAIL: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ""}')
                continue
            ok = max(errs.values()) <= _TOL[dt]
            failed += not ok
            print(label + ' ' + ' '.join(f'{k} {v:.1e}' for k, v in errs.items()) + (' ok' if ok else ' FAIL'))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
