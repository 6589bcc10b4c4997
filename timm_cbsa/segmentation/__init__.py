"""Semantic segmentation with a CBSA decoder (paper Fig. 8): Segmenter's mask transformer with CBSA blocks, and
Segmenter's own MHSA mask transformer and linear decoder for comparison, on any timm backbone.

    import timm_cbsa
    model = timm_cbsa.create_segmenter('vit_small_patch16_384', num_classes=150, decoder='cbsa', img_size=512)

Training: ``python -m train.segment`` (docs/segmentation.md); data: ``timm_cbsa.data.ade20k``.
"""
from .decoder import DECODER_DEFAULTS, CBSADecoderBlock, LinearDecoder, MaskTransformer, MHSADecoderBlock, build_decoder
from .flops import decoder_flops
from .metrics import IGNORE_INDEX, confusion_matrix, logits_confusion, segmentation_metrics
from .model import (
    Segmenter, create_segmenter, crop_windows, equal_size_batches, merge_windows, segmenter_from_config, slide_inference,
    window_boxes,
)

__all__ = [
    'DECODER_DEFAULTS', 'CBSADecoderBlock', 'LinearDecoder', 'MaskTransformer', 'MHSADecoderBlock', 'build_decoder',
    'decoder_flops', 'IGNORE_INDEX', 'confusion_matrix', 'logits_confusion', 'segmentation_metrics', 'Segmenter', 'create_segmenter',
    'crop_windows', 'equal_size_batches', 'merge_windows', 'segmenter_from_config', 'slide_inference', 'window_boxes',
]
