"""Interpretability tools for CBSA models (paper §6.7-6.8): attention maps A Aᵀ, class-token heat maps, coding rate
per layer, the compression step of eq. (7) and the softmax step of eq. (8), zero-shot segmentation.

The command line is ``python -m timm_cbsa.analysis`` (``cli.py``; ``python -m timm_cbsa.viz`` is an alias).
"""
from .coding_rate import (
    EPS2, coding_rate, coding_rate_gradient, compression_term, exact_cbsa_direction, exact_cbsa_step,
    head_coding_rates, orthonormal_heads, representative_objective,
)
from .images import SKIMAGE_PHOTOS, load_image, load_voc, synthetic_square, to_model_input
from .layerwise import LAYER_COLUMNS, STEP_COLUMNS, cbsa_step_rates, layer_coding_rates, projected_tokens
from .maps import (
    LayerTrace, ModelTrace, attention_layers, class_token_maps, extraction_matrix, full_attention, head_map,
    head_mean_map, head_names, map_kind, query_attention, trace_model,
)
from .synthetic import square_finder_model
from .zeroshot import iou, map_to_mask, otsu_threshold, upsample_map, zeroshot_table
