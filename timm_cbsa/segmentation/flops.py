"""Decoder FLOPs of a Segmenter, counted by torch's ``FlopCounterMode`` (2 FLOPs per multiply-add over linears and
matmuls; norms, softmax, pooling and the final bilinear upsampling are not counted), as in ``timm_cbsa.flops``."""
from typing import Dict, Tuple, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..layers.config import use_backend

__all__ = ['decoder_flops']


def decoder_flops(model: torch.nn.Module, img_size: Union[int, Tuple[int, int]]) -> Dict[str, int]:
    """FLOPs of ``model.decoder`` for one image of ``img_size`` pixels: ``total`` (projection in, blocks, mask head)
    and ``blocks`` (the attention / MLP blocks alone, the paper's "decoder GFLOPs"). Works on the meta device."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    p = model.patch_size
    param = next(model.decoder.parameters())
    enc_dim = model.encoder.feature_info[model.feature_index]['num_chs']
    feats = torch.zeros(1, enc_dim, -(-h // p), -(-w // p), device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with use_backend(model.decoder, 'eager'), counter, torch.no_grad():
        model.decoder(feats)
    counts = counter.get_flop_counts()
    blocks = sum(sum(ops.values()) for name, ops in counts.items() if _is_block(name))
    return dict(total=counter.get_total_flops(), blocks=blocks)


def _is_block(name: str) -> bool:
    """FlopCounterMode names modules 'Cls.blocks.<i>'; count each block once (not its children again)."""
    parts = name.split('.')
    return len(parts) == 3 and parts[1] == 'blocks' and parts[2].isdigit()
