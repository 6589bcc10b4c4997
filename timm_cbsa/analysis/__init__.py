"""Interpretability tools for CBSA models (paper §6.7-6.8): attention maps A Aᵀ, class-token heat maps, coding rate
per layer, the compression step of eq. (7) and the softmax step of eq. (8), zero-shot segmentation.

The command-line front end is ``python -m timm_cbsa.viz``.
"""
from .coding_rate import (
    EPS2, coding_rate, compression_term, exact_cbsa_direction, exact_cbsa_step, head_coding_rates, orthonormal_heads,
    representative_objective,
)
from .images import SKIMAGE_PHOTOS, load_image, load_voc, synthetic_square, to_model_input
from .layerwise import LAYER_COLUMNS, STEP_COLUMNS, cbsa_step_rates, layer_coding_rates, projected_tokens
from .maps import (
    LayerTrace, ModelTrace, attention_kind, attention_layers, class_token_maps, extraction_matrix, full_attention,
    query_attention, trace_model,
)
from .synthetic import square_finder_model
from .zeroshot import ZEROSHOT_COLUMNS, iou, map_to_mask, otsu_threshold, upsample_map, zeroshot_table
