"""Shared core of the 196-token Fashion-MNIST benchmarks (``table4_vit196.py``, ``vit_adapt_fmnist.py``).

Fashion-MNIST (Debian's IDX files) upsampled to 56×56, a small timm ``VisionTransformer`` with 4×4 patches: a 14×14
grid = 196 patch tokens + one class token, the token count of ViT-S/16 at 224 px. Everything runs from tensors held in
memory (no PIL, no DataLoader) so that the CPU time goes to the model; the optimizer, scheduler and accuracy are
timm's (``create_optimizer_v2``, ``CosineLRScheduler``, ``timm.utils.accuracy``).
"""
from __future__ import annotations

import math
import textwrap
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import timm
import timm_cbsa  # noqa: F401  (registers the attention names)
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import accuracy, dispatch_clip_grad

from timm_cbsa.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST

IMG_SIZE = 56
PATCH = 4


@dataclass
class Recipe:
    """One recipe for every row of a table (only the attention differs)."""
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 2
    mlp_ratio: float = 4.0
    global_pool: str = 'avg'
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    clip_grad: Optional[float] = 1.0      # global grad-norm clipping (timm's --clip-grad); None: off
    epochs: float = 1.0
    train_samples: int = 60000
    test_samples: int = 10000

    def as_dict(self):
        return asdict(self)


def load_split(split: str, n: Optional[int], data_dir: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """First ``n`` images of a split as a uint8 (n, 1, 28, 28) tensor and int64 labels (Debian's IDX files)."""
    kw = {} if data_dir is None else dict(root=data_dir)
    ds = FashionMNIST(split=split, **kw)
    n = len(ds) if not n else min(n, len(ds))
    imgs = torch.from_numpy(ds.images[:n].copy()).unsqueeze(1)
    labels = torch.from_numpy(ds.targets[:n].astype('int64'))
    return imgs, labels


def to_input(imgs_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, 28, 28) → normalised float (B, 1, 56, 56), bilinear upsampling."""
    x = imgs_u8.float().div_(255.)
    x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode='bilinear', align_corners=False)
    return (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]


def build_vit(attn: str, recipe: Recipe, rep_grid: Optional[int] = None) -> torch.nn.Module:
    """The table's ViT: 56×56 grey, 4×4 patches, class token, learned pos. embedding, ``attn_layer=attn``.

    The head reads ``recipe.global_pool`` ('avg': mean of the patch tokens, which learns faster in a short budget
    than the class token; the class token is still there and attends like in ViT-S).

    ``attn='attn'`` is timm's own softmax ``Attention`` (three projections). ``rep_grid`` sets the representative
    grid of the pooled layers (cbsa, agent, cbsa_star): 4 → m = 16, 8 → m = 64.
    """
    model = timm.create_model(
        'vit_tiny_patch16_224', pretrained=False, img_size=IMG_SIZE, patch_size=PATCH, in_chans=1, num_classes=10,
        embed_dim=recipe.embed_dim, depth=recipe.depth, num_heads=recipe.num_heads, mlp_ratio=recipe.mlp_ratio,
        qkv_bias=False, attn_layer=attn, global_pool=recipe.global_pool)
    if rep_grid is not None:
        timm_cbsa.configure_cbsa(model, rep_grid=rep_grid)
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, imgs: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
             ) -> Tuple[float, float]:
    model.eval()
    n, c1, c5 = 0, 0.0, 0.0
    for i in range(0, len(imgs), batch_size):
        x, y = to_input(imgs[i:i + batch_size]), labels[i:i + batch_size]
        t1, t5 = accuracy(model(x), y, topk=(1, 5))
        c1 += t1.item() * len(y)
        c5 += t5.item() * len(y)
        n += len(y)
    return c1 / n, c5 / n


def train(model: torch.nn.Module, imgs: torch.Tensor, labels: torch.Tensor, recipe: Recipe, seed: int,
          max_steps: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
          lr: Optional[float] = None) -> Dict[str, float]:
    """Train ``model`` with the recipe (AdamW + warm-up + cosine per step, grad-norm clipping, random h-flip);
    returns timing stats.

    The data order and augmentation depend only on ``seed``, so every row of a table sees the same batches.
    """
    lr = recipe.lr if lr is None else lr
    g = torch.Generator().manual_seed(seed)
    n = len(imgs)
    steps_per_epoch = n // recipe.batch_size
    total = max(1, int(round(recipe.epochs * steps_per_epoch)))
    if max_steps is not None:
        total = min(total, max_steps)
    opt = create_optimizer_v2(model, opt='adamw', lr=lr, weight_decay=recipe.weight_decay)
    warm = min(recipe.warmup_steps, max(0, total // 5))
    sched = CosineLRScheduler(opt, t_initial=total, lr_min=lr * 1e-2, warmup_t=warm, warmup_lr_init=lr * 1e-2,
                              warmup_prefix=True, t_in_epochs=False)
    model.train()
    step, t_model, t0, perm = 0, 0.0, time.perf_counter(), None
    loss_v = float('nan')
    while step < total:
        if perm is None or (step % steps_per_epoch) == 0:
            perm = torch.randperm(n, generator=g)
        b = step % steps_per_epoch
        idx = perm[b * recipe.batch_size:(b + 1) * recipe.batch_size]
        x, y = to_input(imgs[idx]), labels[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        ts = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip_grad:
            dispatch_clip_grad(model.parameters(), recipe.clip_grad, mode='norm')
        opt.step()
        t_model += time.perf_counter() - ts
        step += 1
        sched.step_update(step)
        loss_v = loss.item()
        if not math.isfinite(loss_v):
            raise FloatingPointError(f'non-finite loss {loss_v} at step {step}')
        if log is not None and (step % 25 == 0 or step == total):
            el = time.perf_counter() - t0
            log(f'    step {step}/{total}  loss {loss_v:.3f}  {el:.0f}s elapsed, ETA {el / step * (total - step):.0f}s')
    return dict(steps=total, train_s=time.perf_counter() - t0, img_per_s=total * recipe.batch_size / t_model,
                final_loss=loss_v)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bar_chart(path: str, labels, means, stds, title: str, ylabel: str = 'test top-1 (%)', colors=None,
              ylim: Optional[Tuple[float, float]] = None) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels)), 4.2))
    xs = range(len(labels))
    ax.bar(xs, means, yerr=stds, capsize=4, color=colors or '#4c72b0')
    for x, m, s in zip(xs, means, stds):
        ax.text(x, m + (s or 0) + 0.2, f'{m:.1f}', ha='center', va='bottom', fontsize=8)   # above the error bar
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha='right', fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is None:
        lo = min(m - (s or 0) for m, s in zip(means, stds))
        ylim = (max(0.0, lo - 5), min(100.0, max(means) + 4))
    ax.set_ylim(*ylim)
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.grid(True, axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
