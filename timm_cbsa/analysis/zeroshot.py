"""Zero-shot foreground segmentation from class-token attention maps (paper §6.7).

map (gh, gw) → bilinear upsampling to the image size → threshold (Otsu or mean) → foreground mask → IoU / Jaccard
against a ground-truth mask. Reported per layer and head, and for the head-averaged map of each layer.
"""
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .maps import head_map, head_names

__all__ = ['otsu_threshold', 'upsample_map', 'map_to_mask', 'iou', 'zeroshot_table']


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximises the between-class variance of a 256-bin histogram)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist / hist.sum()
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(p)
    mu0 = np.cumsum(p * centers)
    mu_t = mu0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide='ignore', invalid='ignore'):
        between = (mu_t * w0 - mu0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    b = between[:-1]
    best = np.flatnonzero(b >= b.max() - 1e-12 * abs(b.max()))
    # a flat optimum (empty bins between two modes): take the middle of the plateau
    return float(0.5 * (edges[best[0] + 1] + edges[best[-1] + 1]))


def upsample_map(m: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    """(gh, gw) map → (H, W) float64 by bilinear interpolation."""
    t = m.detach().float().reshape(1, 1, *m.shape[-2:])
    return F.interpolate(t, size=tuple(size), mode='bilinear', align_corners=False)[0, 0].double().numpy()


def map_to_mask(m: np.ndarray, method: str = 'otsu') -> np.ndarray:
    """Foreground = map above the threshold ('otsu' or 'mean')."""
    if method == 'otsu':
        thr = otsu_threshold(m)
    elif method == 'mean':
        thr = float(np.mean(m))
    else:
        raise ValueError(f'unknown threshold {method!r} (otsu, mean)')
    return m > thr


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index |pred ∩ gt| / |pred ∪ gt| (1.0 when both are empty)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)


def zeroshot_table(maps: torch.Tensor, gt: np.ndarray, method: str = 'otsu', image_index: int = 0
                   ) -> List[Dict[str, object]]:
    """IoU per layer and head (and head='mean', ``head_mean_map``) for maps (L, B, H, gh, gw)."""
    gt = np.asarray(gt, bool)
    size = gt.shape
    rows = []
    for l in range(maps.shape[0]):
        per_head = maps[l, image_index]                                  # (H, gh, gw)
        for head in head_names(per_head.shape[0]):
            up = upsample_map(head_map(per_head, head), size)
            mask = map_to_mask(up, method)
            rows.append({
                'layer': l, 'head': head, 'threshold': method,
                'iou_fg': iou(mask, gt), 'iou_bg': iou(~mask, ~gt),
                'mask_frac': float(mask.mean()), 'gt_frac': float(gt.mean()), 'iou_all_fg': float(gt.mean()),
            })
    return rows
