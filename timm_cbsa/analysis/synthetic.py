"""Hand-set tiny ViTs whose class-token map provably finds a bright object: a known answer for the map pipeline.

Construction (embed width C = 8, one head, 8-pixel patches, 64×64 input, one block):

* patch embedding: channel 0 = t = (mean patch intensity − 0.1)/0.8 ∈ [0, 1], channel 1 = 1 − t, others 0, so a
  bright (object) patch embeds to e₀, a dark one to e₁, a partly covered one in between; position embedding 0;
* class token = e₀ (it "looks like" the object), or e₁ for the background-query control;
* attention projection = g·I (CBSA: the single ``qkv``; softmax: q = k = g·I, v = I), g = 1.

After the block's LayerNorm, ⟨LN(e₀), LN(e₀)⟩ = 8 and ⟨LN(e₀), LN(e₁)⟩ = −8/7, so the scaled logits (s = 8^-½) differ
by ≈ 3.2 g²:
CBSA representatives pooled over object patches put almost all their extraction mass on object tokens and on the
class token, background representatives almost none on the class token. Hence the class-token row of A Aᵀ,
Σ_i A[i, cls] A[i, j], is large on object patches (and the softmax row of a plain ViT likewise). The representatives are 2×2-patch
averages (16-pixel cells), so objects should span about two cells; a larger g sharpens the softmax and favours
partly covered patches whose embedding matches a mixed representative, which lowers the IoU (g = 1 is used).
"""
import torch
from torch import nn

__all__ = ['square_finder_model']


@torch.no_grad()
def square_finder_model(attention: str = 'cbsa', query: str = 'foreground', gain: float = 1.0) -> nn.Module:
    """A 1-block ViT (64×64 input, patch 8, width 8, 1 head) with the weights above.

    attention: 'cbsa' (``cbsa_vit`` with rep_grid 4, i.e. m = 16) or 'softmax' (timm ``vit``, unfused path not needed).
    query: 'foreground' (class token = object embedding) or 'background' (class token = background embedding).
    The model expects inputs in [0, 1] (its pretrained_cfg has mean 0, std 1).
    """
    import timm
    import timm_cbsa  # noqa: F401  (registers cbsa_vit)
    common = dict(img_size=64, patch_size=8, embed_dim=8, depth=1, num_heads=1, num_classes=0, mlp_ratio=1.0)
    if attention == 'cbsa':
        model = timm.create_model('cbsa_vit_tiny', rep_grid=4, **common)
    elif attention == 'softmax':
        model = timm.create_model('vit_tiny_patch16_224', qkv_bias=False, **common)
    else:
        raise ValueError(f'attention must be cbsa or softmax, got {attention!r}')
    model.eval()
    C = 8
    conv = model.patch_embed.proj
    conv.weight.zero_()
    conv.bias.zero_()
    per_pixel = 1.0 / (0.8 * 3 * 8 * 8)
    conv.weight[0].fill_(per_pixel)
    conv.bias[0] = -0.1 / 0.8
    conv.weight[1].fill_(-per_pixel)
    conv.bias[1] = 1.0 + 0.1 / 0.8
    model.pos_embed.zero_()
    model.cls_token.zero_()
    model.cls_token[0, 0, 0 if query == 'foreground' else 1] = 1.0
    blk = model.blocks[0]
    nn.init.ones_(blk.norm1.weight)
    nn.init.zeros_(blk.norm1.bias)
    eye = torch.eye(C)
    if attention == 'cbsa':
        blk.attn.qkv.weight.copy_(gain * eye)
    else:
        blk.attn.qkv.weight.copy_(torch.cat([gain * eye, gain * eye, eye], 0))
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=(3, 64, 64))
    return model
