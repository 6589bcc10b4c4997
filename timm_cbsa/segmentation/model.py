"""Segmenter-style semantic segmentation on any timm backbone with ``forward_intermediates``.

    model = timm_cbsa.create_segmenter('vit_small_patch16_384', num_classes=150, decoder='cbsa', img_size=512)
    logits = model(images)                     # (B, 3, H, W) -> (B, 150, H, W), any H, W

The encoder's features of one block (the last by default) are taken with ``forward_intermediates`` (prefix tokens
dropped, final norm applied), the decoder turns them into class masks on the patch grid, and the masks are upsampled
bilinearly to the input. Inputs are zero-padded on the right / bottom to a multiple of the patch size and the logits
cropped back, so any input size works (ViT backbones are built with ``dynamic_img_size=True``).

``slide_inference`` is Segmenter's single-scale sliding-window evaluation (window = training crop).
"""
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import timm

from .decoder import build_decoder

__all__ = ['Segmenter', 'create_segmenter', 'segmenter_from_config', 'window_boxes', 'crop_windows', 'merge_windows',
           'slide_inference', 'equal_size_batches']

_logger = logging.getLogger(__name__)


class Segmenter(nn.Module):
    """Encoder (timm backbone) + segmentation decoder.

    Args:
        encoder: a timm model with ``forward_intermediates`` and ``feature_info`` (ViT, cbsa_vit, cbt, converted ViT).
        decoder: maps (B, C, H_p, W_p) features to (B, K, H_p, W_p) masks (``decoder.build_decoder``).
        feature_index: encoder block whose output is decoded (negative: from the end; -1 = last).
        patch_size: the features' stride in pixels (the ViT patch size).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, feature_index: int, patch_size: int):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.feature_index, self.patch_size = feature_index, patch_size
        self.num_classes = decoder.num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images, H and W multiples of the patch size -> (B, C_enc, H / p, W / p) features."""
        feats = self.encoder.forward_intermediates(
            x, indices=[self.feature_index], norm=True, output_fmt='NCHW', intermediates_only=True)
        return feats[0]

    def forward_head(self, feats: torch.Tensor, size: Tuple[int, int], decoder: Optional[nn.Module] = None
                     ) -> torch.Tensor:
        """(B, C_enc, H_p, W_p) features -> (B, K, H, W) logits for an input of ``size`` = (H, W) pixels
        (``decoder``: another decoder for the same features, e.g. a perturbed copy; default ``self.decoder``)."""
        masks = (self.decoder if decoder is None else decoder)(feats)
        masks = F.interpolate(masks, size=(feats.shape[2] * self.patch_size, feats.shape[3] * self.patch_size),
                              mode='bilinear', align_corners=False)
        return masks[:, :, :size[0], :size[1]]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad (right / bottom) to a multiple of the patch size."""
        p = self.patch_size
        return F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, K, H, W) class logits."""
        return self.forward_head(self.forward_features(self.pad(x)), (x.shape[2], x.shape[3]))


def _create_encoder(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    """timm.create_model without a classifier; ViTs get ``dynamic_img_size=True`` (any input size)."""
    kwargs = dict(kwargs, num_classes=0)
    if 'dynamic_img_size' not in kwargs:
        try:
            return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
        except TypeError as e:
            if 'dynamic_img_size' not in str(e):
                raise
            _logger.info('%s takes no dynamic_img_size: its own input-size rules apply', name)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def create_segmenter(
        backbone: Union[str, nn.Module],
        num_classes: int,
        decoder: str = 'cbsa',
        pretrained: bool = False,
        feature_index: int = -1,
        decoder_kwargs: Optional[Dict[str, Any]] = None,
        **backbone_kwargs,
) -> Segmenter:
    """Build a Segmenter: a timm backbone (name or model) + a 'cbsa' / 'mhsa' mask transformer or a 'linear' decoder.

    Args:
        backbone: a timm model name (``vit_small_patch16_384``, ``cbsa_vit_small``, ``cbt_tiny``, ...) or a built
            model with ``forward_intermediates`` (e.g. a ``timm_cbsa.convert``-ed ViT).
        num_classes: K segmentation classes.
        decoder: 'cbsa' (the paper's CBT decoder), 'mhsa' (Segmenter's mask transformer) or 'linear'.
        pretrained: load the backbone's pretrained weights (names only).
        feature_index: encoder block to decode (-1: the last); later blocks and the classifier are pruned.
        decoder_kwargs: overrides of ``DECODER_DEFAULTS[decoder]`` (depth, embed_dim, num_heads, rep_grid, ...).
        **backbone_kwargs: passed to ``timm.create_model`` (img_size, drop_path_rate, patch_size, ...).
    """
    config = dict(backbone=backbone, num_classes=num_classes, decoder=decoder, feature_index=feature_index,
                  decoder_kwargs=dict(decoder_kwargs or {}), backbone_kwargs=dict(backbone_kwargs))
    if isinstance(backbone, str):
        encoder = _create_encoder(backbone, pretrained, backbone_kwargs)
    elif backbone_kwargs or pretrained:
        raise ValueError('create_segmenter: backbone options (pretrained, **backbone_kwargs) need a model name; '
                         'pass a built model as it is.')
    else:
        encoder, config = backbone, None
    if not hasattr(encoder, 'forward_intermediates') or not getattr(encoder, 'feature_info', None):
        raise ValueError(f'{type(encoder).__name__} has no forward_intermediates / feature_info: it cannot be a '
                         'Segmenter backbone (timm ViTs, cbsa_vit_*, cbt_* and converted ViTs can).')
    index = feature_index + len(encoder.feature_info) if feature_index < 0 else feature_index
    if not 0 <= index < len(encoder.feature_info):
        raise ValueError(f'feature_index {feature_index} is out of range for {len(encoder.feature_info)} blocks.')
    info = encoder.feature_info[index]
    if hasattr(encoder, 'prune_intermediate_layers'):   # later blocks and the head would be unused parameters
        encoder.prune_intermediate_layers(indices=[index], prune_norm=False, prune_head=True)
    grid = getattr(getattr(encoder, 'patch_embed', None), 'grid_size', None)
    dec = build_decoder(decoder, int(info['num_chs']), num_classes,
                        grid_size=None if grid is None else tuple(int(g) for g in grid), **(decoder_kwargs or {}))
    model = Segmenter(encoder, dec, index, int(info['reduction']))
    model.segmenter_config = config   # how to rebuild it (checkpoints); None for a backbone given as a model
    return model


def segmenter_from_config(config: Dict[str, Any]) -> Segmenter:
    """Rebuild (random weights) the model a ``segmenter_config`` describes, e.g. from a training checkpoint."""
    cfg = dict(config)
    return create_segmenter(cfg.pop('backbone'), cfg.pop('num_classes'), decoder=cfg.pop('decoder'),
                            feature_index=cfg.pop('feature_index'), decoder_kwargs=cfg.pop('decoder_kwargs'),
                            **cfg.pop('backbone_kwargs'))


# ------------------------------------------------------------------------------------------- sliding-window inference

def window_boxes(size: Tuple[int, int], window: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """(top, left, bottom, right) of the windows covering an H x W image: ``window`` squares every ``stride`` pixels,
    the last row / column moved back to end at the border; a side shorter than the window is one window."""
    if window < 1 or stride < 1:
        raise ValueError(f'window and stride must be >= 1, got window={window}, stride={stride}.')

    def starts(n: int) -> List[int]:
        if n <= window:
            return [0]
        last = n - window
        return sorted(set(list(range(0, last, stride)) + [last]))
    h, w = size
    return [(t, l, min(t + window, h), min(l + window, w)) for t in starts(h) for l in starts(w)]


def crop_windows(img: torch.Tensor, boxes: List[Tuple[int, int, int, int]]) -> torch.Tensor:
    """(B, C, H, W) -> (len(boxes) * B, C, h, w) crops, box-major (all crops have the same size)."""
    return torch.cat([img[:, :, t:b, l:r] for t, l, b, r in boxes])


def merge_windows(window_logits: torch.Tensor, boxes: List[Tuple[int, int, int, int]], size: Tuple[int, int]
                  ) -> torch.Tensor:
    """Average the (len(boxes) * B, K, h, w) logits of ``crop_windows`` into (B, K, H, W)."""
    n = len(boxes)
    B = window_logits.shape[0] // n
    out = window_logits.new_zeros(B, window_logits.shape[1], *size)
    count = window_logits.new_zeros(1, 1, *size)
    for (t, l, b, r), logits in zip(boxes, window_logits.split(B)):
        out[:, :, t:b, l:r] += logits
        count[:, :, t:b, l:r] += 1
    return out / count


def slide_inference(predict: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor, window: int, stride: int,
                    max_batch: int = 8) -> torch.Tensor:
    """Single-scale sliding-window logits: ``predict`` ((n, C, h, w) crops -> (n, K, h, w) logits, e.g. a Segmenter)
    on every window of ``img`` (B, C, H, W), ``max_batch`` crops at a time, overlaps averaged -> (B, K, H, W)."""
    boxes = window_boxes((img.shape[2], img.shape[3]), window, stride)
    crops = crop_windows(img, boxes)
    logits = torch.cat([predict(c) for c in crops.split(max_batch)])
    return merge_windows(logits, boxes, (img.shape[2], img.shape[3]))


def equal_size_batches(dataset: Sequence, max_batch: int) -> Iterator[Tuple[torch.Tensor, List[torch.Tensor]]]:
    """Evaluation batches: consecutive (image (C, h, w), label) samples of the same image size stacked, at most
    ``max_batch`` at a time -> (images (B, C, h, w), [labels]). (Labels keep their own sizes.)"""
    images: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    for i in range(len(dataset)):
        img, label = dataset[i]
        if images and (img.shape != images[0].shape or len(images) == max_batch):
            yield torch.stack(images), labels
            images, labels = [], []
        images.append(img)
        labels.append(label)
    if images:
        yield torch.stack(images), labels
