"""Semantic-segmentation metrics from a confusion matrix accumulated over a whole evaluation set.

    conf[i, j] = number of pixels of ground-truth class i predicted as class j   (ignored pixels not counted)
    IoU_k      = conf[k, k] / (Σ_j conf[k, j] + Σ_i conf[i, k] − conf[k, k])
    mIoU       = mean of IoU_k over the classes with a non-empty union (present in the ground truth or predicted)
    pixel acc. = Σ_k conf[k, k] / Σ conf

The matrix is additive, so shards of a distributed evaluation are summed (all-reduced) before the metrics.
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

__all__ = ['IGNORE_INDEX', 'confusion_matrix', 'logits_confusion', 'segmentation_metrics']

IGNORE_INDEX = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """pred, target: integer tensors of the same shape -> (K, K) int64 counts (rows: ground truth, columns: predicted);
    pixels whose target is ``ignore_index`` are left out. A target outside [0, K) that is not ignored is an error."""
    if pred.shape != target.shape:
        raise ValueError(f'prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ.')
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f'target holds labels outside [0, {num_classes}) that are not the ignore index '
                         f'{ignore_index}: found {int(t.min())}..{int(t.max())}.')
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def logits_confusion(logits: torch.Tensor, labels: Sequence[torch.Tensor], num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, K, h, w) logits and B labels of any sizes -> summed (K, K) confusion matrix: each image's logits are resized
    bilinearly to its label (the mmseg protocol: evaluation at the annotation's resolution), then arg-maxed."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=logits.device)
    for lg, label in zip(logits.float(), labels):
        label = label.to(logits.device)
        lg = F.interpolate(lg[None], size=tuple(label.shape), mode='bilinear', align_corners=False)
        conf += confusion_matrix(lg.argmax(1)[0], label, num_classes, ignore_index)
    return conf


def segmentation_metrics(conf: torch.Tensor) -> Dict[str, object]:
    """mIoU (%), pixel accuracy (%), mean class accuracy (%) and per-class IoU (%, NaN: class absent) of a
    (K, K) confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float('nan')))
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float('nan')))
    total = conf.sum()
    return dict(
        mIoU=100 * float(iou.nanmean()) if (union > 0).any() else float('nan'),
        pixel_acc=100 * float(tp.sum() / total) if total > 0 else float('nan'),
        mAcc=100 * float(acc.nanmean()) if (gt > 0).any() else float('nan'),
        iou=[100 * float(v) for v in iou],
    )
