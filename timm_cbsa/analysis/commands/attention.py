"""attention: class-token maps per layer and head over each photo (``attention_<image>.png``), the N×N maps of the
drawn layers (``full_attention_<image>_layer<l>.png``: A·Aᵀ for CBSA-family layers, the softmax attention
otherwise) and per-map statistics (``attention_maps.csv``: entropy, peak-to-mean). With ``--dataset fashion_mnist``:
the Fashion-MNIST test images of ``--fmnist-index``, one figure each and a grid of all (``attention_images.csv``
holds their labels and predictions)."""
import argparse
import math
import os
from typing import Dict, List

import torch

from .. import common
from ..maps import ModelTrace, class_token_maps, full_attention

__all__ = ['measure']


def measure(model: torch.nn.Module, args: argparse.Namespace) -> Dict[str, object]:
    from ..plots import plot_class_token_maps, plot_full_attention
    if common.is_fmnist(args):
        return _fmnist(model, args)
    summary, rows = {}, []
    label = common.model_label(args)
    for name in args.image:
        img, tag = common.load_photo(name)
        trace = common.trace_photos(model, [img])
        maps = class_token_maps(trace, query=args.query)[:, 0]          # (L, H, gh, gw)
        layers = common.pick_layers(args.layers, maps.shape[0])
        summary[f'attention_{tag}.png'] = plot_class_token_maps(
            img, maps, layers, os.path.join(args.out, f'attention_{tag}.png'),
            title=f'{label}: class-token attention ({trace.layers[0].kind}), {tag}')
        for l in layers:
            what = 'A·Aᵀ' if trace.layers[l].kind != 'softmax' else 'softmax attention'
            plot_full_attention(full_attention(trace.layers[l])[0],
                                os.path.join(args.out, f'full_attention_{tag}_layer{l}.png'),
                                title=f'{label} layer {l}: {what}')
        rows += _map_statistics(tag, trace, maps)
    common.write_csv(rows, os.path.join(args.out, 'attention_maps.csv'))
    return summary


def _map_statistics(tag: str, trace: ModelTrace, maps: torch.Tensor) -> List[Dict[str, object]]:
    """Per layer and head: the entropy of the map as a distribution over the patches, and its peak-to-mean ratio."""
    rows = []
    for l in range(maps.shape[0]):
        for h in range(maps.shape[1]):
            m = maps[l, h].flatten().double()
            pr = m / m.sum().clamp_min(1e-300)
            ent = float(-(pr * pr.clamp_min(1e-300).log()).sum())
            rows.append({'image': tag, 'layer': l, 'head': h, 'kind': trace.layers[l].kind,
                         'map_entropy': ent, 'map_entropy_max': math.log(m.numel()),
                         'peak_to_mean': float(m.max() / m.mean().clamp_min(1e-300))})
    return rows


def _fmnist(model: torch.nn.Module, args: argparse.Namespace) -> Dict[str, object]:
    """Class-token maps of Fashion-MNIST test images: one figure per image and one grid of all of them."""
    from ...data import FASHION_MNIST_CLASSES
    from ..fmnist import to_rgb
    from ..plots import plot_class_token_maps, plot_image_grid_maps
    images, labels = common.fmnist_images(args)
    trace = common.trace_fmnist(model, images)
    maps = class_token_maps(trace, query=args.query)                      # (L, B, H, gh, gw)
    layers = common.pick_layers(args.layers, maps.shape[0])
    pred = trace.logits.argmax(-1).tolist() if trace.logits is not None else [None] * len(images)
    label = common.model_label(args)
    summary, rows = {}, []
    for b, (img, lab) in enumerate(zip(images, labels)):
        index = args.fmnist_index[b]
        summary[f'attention_fmnist{index}.png'] = plot_class_token_maps(
            to_rgb(img), maps[:, b], layers, os.path.join(args.out, f'attention_fmnist{index}.png'),
            title=f'{label}: class-token maps, test #{index} ({FASHION_MNIST_CLASSES[lab]})')
        rows.append({'image': index, 'label': FASHION_MNIST_CLASSES[lab],
                     'pred': FASHION_MNIST_CLASSES[pred[b]] if pred[b] is not None else ''})
    summary['attention_fmnist_grid.png'] = plot_image_grid_maps(
        [to_rgb(im) for im in images], maps, layers, [FASHION_MNIST_CLASSES[l] for l in labels],
        os.path.join(args.out, 'attention_fmnist_grid.png'),
        title=f'{label}: class-token maps (head mean) per layer, Fashion-MNIST test')
    common.write_csv(rows, os.path.join(args.out, 'attention_images.csv'))
    return summary
