"""coding-rate: per layer, R(Z) of the attention input, the compression term Σ_k R(U_kᵀZ) and the ISTA output's
sparsity (``coding_rate.csv/png``, paper §6.8 / Fig. 5), and for CBSA layers the coding-rate change across one
CBSA step per head (``cbsa_step.csv/png``, eq. 8 / Fig. 6, with the exact eq. (7) step as a check). Inputs: the
photos of ``--rate-images`` batched, or the first ``--num-images`` Fashion-MNIST test images."""
import argparse
import os
from typing import Dict, List

import numpy as np
import torch

from .. import common
from ..images import load_image
from ..layerwise import LAYER_COLUMNS, STEP_COLUMNS, cbsa_step_rates, layer_coding_rates

__all__ = ['measure']


def measure(model: torch.nn.Module, args: argparse.Namespace) -> Dict[str, object]:
    from ..plots import plot_coding_rate, plot_step_rates
    if common.is_fmnist(args):
        images, _ = common.fmnist_images(args, args.num_images)
        trace = common.trace_fmnist(model, images)
        what = f'{len(images)} Fashion-MNIST test images'
    else:
        images = [load_image(n) for n in args.rate_images]
        trace = common.trace_photos(model, images)
        what = f'{len(images)} photos'
    label = common.model_label(args)
    rows = layer_coding_rates(trace)
    common.write_csv(rows, os.path.join(args.out, 'coding_rate.csv'), LAYER_COLUMNS)
    plot_coding_rate(rows, os.path.join(args.out, 'coding_rate.png'), title=f'{label}: coding rate per layer ({what})')
    summary = _print_layer_rates(rows)
    steps = cbsa_step_rates(trace)
    if steps:
        common.write_csv(steps, os.path.join(args.out, 'cbsa_step.csv'), STEP_COLUMNS)
        plot_step_rates(steps, os.path.join(args.out, 'cbsa_step.png'),
                        title=f'{label}: coding-rate change across one CBSA step (eq. 8, κ = 1)')
        summary.update(_print_step_rates(steps))
    return summary


def _print_layer_rates(rows: List[Dict[str, object]]) -> Dict[str, object]:
    print('layer  R(Z)      Rc        ISTA zero frac')
    for r in rows:
        print(f"{r['layer']:>5}  {r['R_Z']:8.2f}  {r['Rc']:8.2f}  {r['ista_zero_frac']:.3f}")
    rc = [r['Rc'] for r in rows]
    summary = {'Rc_first': rc[0], 'Rc_last': rc[-1], 'Rc_decreasing': all(b < a for a, b in zip(rc, rc[1:]))}
    print(f"Σ_k R(U_k^T Z) from layer 0 to {len(rc) - 1}: {rc[0]:.2f} → {rc[-1]:.2f} "
          f"({'decreases at every layer' if summary['Rc_decreasing'] else 'not monotone'}; "
          f"{'lower' if rc[-1] < rc[0] else 'not lower'} at the last layer)")
    return summary


def _print_step_rates(steps: List[Dict[str, object]]) -> Dict[str, object]:
    one = [s for s in steps if s['kappa_mode'] == 'one']
    ex = [s['dR_reps_exact_step'] for s in one]
    same = np.mean([np.sign(s['dR_tokens']) == np.sign(s['dR_reps']) for s in one])
    print(f'eq. 8 step (κ=1), {len(one)} layer-heads: mean ΔR tokens {np.mean([s["dR_tokens"] for s in one]):+.3f}, '
          f'mean ΔR reps {np.mean([s["dR_reps"] for s in one]):+.3f}, same sign in {same:.0%}')
    print(f'eq. 7 exact step (small κ): ΔΣR(reps) max {max(ex):+.3e} (all < 0: {all(e < 0 for e in ex)})')
    return {'step_same_sign': float(same), 'exact_step_all_negative': all(e < 0 for e in ex)}
