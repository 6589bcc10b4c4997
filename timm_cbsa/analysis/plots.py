"""PNG figures for the analysis tools (matplotlib, Agg backend; imported lazily by the CLI)."""
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .maps import head_mean_map
from .zeroshot import upsample_map

__all__ = ['plot_class_token_maps', 'plot_full_attention', 'plot_coding_rate', 'plot_step_rates', 'plot_zeroshot',
           'plot_image_grid_maps']


def _plt():
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str, dpi: int) -> str:
    """Save as a 256-colour (adaptive palette) PNG: photos with heat maps shrink about 3x, plots lose nothing."""
    import io
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format='png')
    buf.seek(0)
    Image.open(buf).convert('RGB').quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    _plt().close(fig)
    return path


def _norm(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _img01(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    return img / 255.0 if img.dtype == np.uint8 else np.clip(img, 0, 1)


def plot_class_token_maps(img: np.ndarray, maps: torch.Tensor, layers: Sequence[int], path: str,
                          title: str = '', dpi: int = 80, max_heads: int = 6) -> str:
    """Rows: layers; columns: the photo, then each head's class-token map over the photo, then the head mean.

    maps: (L, H, gh, gw) for one image.
    """
    plt = _plt()
    H = min(maps.shape[1], max_heads)
    cols = H + 2
    fig, axes = plt.subplots(len(layers), cols, figsize=(1.6 * cols, 1.6 * len(layers) + 0.4), squeeze=False)
    size = img.shape[:2]
    base = _img01(img)
    for r, l in enumerate(layers):
        per = maps[l]
        panels = [('image', None)] + [(f'head {h}', per[h]) for h in range(H)] + [('mean', head_mean_map(per))]
        for c, (name, m) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(base)
            if m is not None:
                ax.imshow(_norm(upsample_map(m, size)), cmap='inferno', alpha=0.6, vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
            if c == 0:
                ax.set_ylabel(f'layer {l}', fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_full_attention(full: torch.Tensor, path: str, title: str = '', dpi: int = 80, max_heads: int = 6) -> str:
    """Per-head N×N matrices (A Aᵀ for CBSA, softmax attention otherwise), log scale. full: (H, N, N)."""
    plt = _plt()
    H = min(full.shape[0], max_heads)
    fig, axes = plt.subplots(1, H, figsize=(2.0 * H, 2.2), squeeze=False)
    for h in range(H):
        ax = axes[0, h]
        ax.imshow(np.log10(full[h].double().clamp_min(1e-12).numpy()), cmap='viridis')
        ax.set_title(f'head {h}', fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_coding_rate(rows: List[Dict[str, object]], path: str, title: str = '', dpi: int = 90) -> str:
    """R(Z) and R^c = Σ_k R(U_kᵀZ) per layer; ISTA output sparsity on a second axis when present."""
    plt = _plt()
    layers = [r['layer'] for r in rows]
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.plot(layers, [r['R_Z'] for r in rows], 'o-', label='R(Z)')
    ax.plot(layers, [r['Rc'] for r in rows], 's-', label='R^c = Σ_k R(U_k^T Z)')
    ax.set_xlabel('layer')
    ax.set_ylabel('coding rate (nats, ε² = 0.01)')
    sp = [r['ista_zero_frac'] for r in rows]
    handles, labels = ax.get_legend_handles_labels()
    if not all(isinstance(s, float) and math.isnan(s) for s in sp):
        ax2 = ax.twinx()
        h2, = ax2.plot(layers, sp, 'd--', color='tab:green', label='ISTA zero fraction')
        ax2.set_ylabel('ISTA output zero fraction')
        ax2.set_ylim(0, 1)
        handles.append(h2), labels.append(h2.get_label())
    ax.legend(handles, labels, fontsize=7, loc='best')
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_step_rates(rows: List[Dict[str, object]], path: str, kappa_mode: str = 'one', title: str = '',
                    dpi: int = 90) -> str:
    """Fig. 6 style: per layer, the coding-rate change of tokens and of representatives for each head."""
    plt = _plt()
    rows = [r for r in rows if r['kappa_mode'] == kappa_mode]
    heads = sorted({r['head'] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.0), sharex=True)
    for h in heads:
        rr = sorted((r for r in rows if r['head'] == h), key=lambda r: r['layer'])
        axes[0].plot([r['layer'] for r in rr], [r['dR_tokens'] for r in rr], 'o-', ms=3, label=f'head {h}')
        axes[1].plot([r['layer'] for r in rr], [r['dR_reps'] for r in rr], 'o-', ms=3, label=f'head {h}')
    for ax, name in zip(axes, ('tokens: ΔR(U_k^T Z)', 'representatives: ΔR(U_k^T Q)')):
        ax.axhline(0, color='k', lw=0.5)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel('layer')
    axes[0].set_ylabel(f'coding-rate change (κ = {"1" if kappa_mode == "one" else "learned"})')
    axes[1].legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_zeroshot(img: np.ndarray, heat: np.ndarray, mask: np.ndarray, path: str, gt: Optional[np.ndarray] = None,
                  title: str = '', dpi: int = 80) -> str:
    """Photo | class-token heat map | predicted foreground mask (| ground truth)."""
    plt = _plt()
    base = _img01(img)
    n = 3 + (gt is not None)
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.3 * img.shape[0] / img.shape[1] + 0.4), squeeze=False)
    axes = axes[0]
    axes[0].imshow(base)
    axes[0].set_title('image', fontsize=7)
    axes[1].imshow(base)
    axes[1].imshow(_norm(heat), cmap='inferno', alpha=0.6)
    axes[1].set_title('class-token map', fontsize=7)
    over = base.copy()
    over[mask] = 0.5 * over[mask] + 0.5 * np.array([1.0, 0.2, 0.2])
    axes[2].imshow(over)
    axes[2].set_title('predicted foreground', fontsize=7)
    if gt is not None:
        axes[3].imshow(gt, cmap='gray')
        axes[3].set_title('ground truth', fontsize=7)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_image_grid_maps(images: Sequence[np.ndarray], maps: torch.Tensor, layers: Sequence[int], captions: Sequence[str],
                         path: str, title: str = '', dpi: int = 90) -> str:
    """Columns: images; rows: the image, then the head-mean class-token map of each layer in ``layers`` over it.

    maps: (L, B, H, gh, gw); the head mean is ``head_mean_map``.
    """
    plt = _plt()
    B = len(images)
    rows = 1 + len(layers)
    fig, axes = plt.subplots(rows, B, figsize=(1.3 * B, 1.3 * rows + 0.4), squeeze=False)
    for b, img in enumerate(images):
        base = _img01(img)
        size = img.shape[:2]
        axes[0, b].imshow(base)
        axes[0, b].set_title(captions[b], fontsize=6)
        for r, l in enumerate(layers, start=1):
            m = head_mean_map(maps[l, b])
            axes[r, b].imshow(_norm(upsample_map(m, size)), cmap='inferno', vmin=0, vmax=1)
            if b == 0:
                axes[r, b].set_ylabel(f'layer {l}', fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)
