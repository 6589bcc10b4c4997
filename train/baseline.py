"""The linear baseline (``--linear-baseline``): a multinomial logistic regression on the raw pixels of the same
training images, fitted after training and reported next to the model's test accuracy."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch
import torch.nn as nn


def _pixels(ds):
    base = getattr(ds, "ds", ds)  # train.data._Limit
    images, targets = getattr(base, "images", None), getattr(base, "targets", None)
    if images is None or targets is None:
        return None
    n = len(ds)
    x = torch.tensor(images[:n].reshape(n, -1), dtype=torch.float32) / 255.0
    return x, torch.tensor(targets[:n], dtype=torch.long)


def linear_baseline(train_ds, eval_ds, num_classes: int, iters: int = 30) -> Optional[float]:
    """Test top-1 of a multinomial logistic regression on the raw pixels of the training set (full-batch L-BFGS,
    features standardised with the training statistics, L2 1e-4). Needs an in-memory dataset (``.images``,
    ``.targets``); None otherwise."""
    train, test = _pixels(train_ds), _pixels(eval_ds)
    if train is None or test is None:
        return None
    (x, y), (xt, yt) = train, test
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
    x, xt = (x - mean) / std, (xt - mean) / std
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w + b, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return 100.0 * ((xt @ w + b).argmax(-1) == yt).float().mean().item()


def compare_with_linear_baseline(result: Dict[str, Any], train_ds, eval_ds, num_classes: int) -> str:
    """Fit :func:`linear_baseline`, store its top-1 in ``result['linear_baseline_top1']`` and return the sentence
    the trainer's final line ends with (``result['top1']`` is the model's)."""
    t0 = time.time()
    result["linear_baseline_top1"] = linear_baseline(train_ds, eval_ds, num_classes)
    return (f"; model {result['top1']:.2f}% vs linear baseline {result['linear_baseline_top1']:.2f}% on raw pixels "
            f"(logistic regression, {time.time() - t0:.1f} s)")
