"""Segmenter on the backbones of this package (tiny configs): shapes, gradients, padding / cropping, prefix tokens,
feature index, sliding windows, mIoU."""
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_cbsa
from timm_cbsa.segmentation import (
    Segmenter, confusion_matrix, create_segmenter, merge_windows, segmentation_metrics, segmenter_from_config,
    slide_inference, window_boxes,
)

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
SMALL_DEC = {'cbsa': dict(embed_dim=24, num_heads=3, rep_grid=2, depth=2), 'mhsa': dict(num_heads=2, depth=1),
             'linear': {}}


def _converted_vit():
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=0, dynamic_img_size=True, **TINY_VIT)
    return timm_cbsa.convert(vit, variant='cbsa', rep_grid=2)


BACKBONES = {
    'vit': lambda dec: create_segmenter('vit_tiny_patch16_224', 5, decoder=dec, decoder_kwargs=SMALL_DEC[dec],
                                        **TINY_VIT),
    'cbsa_vit': lambda dec: create_segmenter('cbsa_vit_tiny', 5, decoder=dec, decoder_kwargs=SMALL_DEC[dec],
                                             rep_grid=2, **TINY_VIT),
    'cbt': lambda dec: create_segmenter('cbt_nano_patch8_32', 5, decoder=dec, decoder_kwargs=SMALL_DEC[dec],
                                        in_chans=3, depth=2),
    'converted_vit': lambda dec: create_segmenter(_converted_vit(), 5, decoder=dec, decoder_kwargs=SMALL_DEC[dec]),
}


@pytest.mark.parametrize('backbone', list(BACKBONES))
@pytest.mark.parametrize('decoder', ['cbsa', 'mhsa', 'linear'])
def test_shapes_and_gradients(backbone, decoder):
    torch.manual_seed(0)
    model = BACKBONES[backbone](decoder)
    x = torch.randn(2, 3, 40, 52)          # not a multiple of the patch size: padded, then cropped back
    out = model(x)
    assert out.shape == (2, 5, 40, 52)
    F.cross_entropy(out, torch.randint(0, 5, (2, 40, 52))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.decoder.state_dict().keys()
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in model.decoder.named_parameters() if 'step' not in n), \
        [n for n, p in model.decoder.named_parameters() if p.grad.abs().sum() == 0]


def test_padding_is_cropped_back():
    """forward(x) equals the top-left crop of the logits of x zero-padded to the next patch multiple."""
    torch.manual_seed(0)
    model = BACKBONES['vit']('cbsa').eval()
    x = torch.randn(1, 3, 37, 45)
    padded = F.pad(x, (0, 48 - 45, 0, 40 - 37))
    feats = model.forward_features(padded)
    masks = model.decoder(feats)
    ref = F.interpolate(masks, size=(40, 48), mode='bilinear', align_corners=False)[:, :, :37, :45]
    torch.testing.assert_close(model(x), ref)


def test_linear_decoder_values():
    """Linear decoder logits = bilinear upsampling of W·f + b of every patch feature f (written out)."""
    torch.manual_seed(0)
    model = BACKBONES['vit']('linear').eval()
    x = torch.randn(1, 3, 32, 40)
    feats = model.encoder.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
    w, b = model.decoder.head.weight, model.decoder.head.bias
    masks = torch.einsum('kc,bchw->bkhw', w, feats) + b[None, :, None, None]
    torch.testing.assert_close(model(x), F.interpolate(masks, size=(32, 40), mode='bilinear', align_corners=False))


def test_prefix_tokens_dropped():
    """A ViT with a class token and register tokens: the decoder sees exactly the H_p x W_p patch features."""
    model = create_segmenter('vit_tiny_patch16_224', 3, decoder='cbsa', decoder_kwargs=SMALL_DEC['cbsa'],
                             reg_tokens=2, **TINY_VIT)
    assert model.encoder.num_prefix_tokens == 3
    seen = []
    model.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model(torch.randn(1, 3, 48, 32))
    assert seen == [(1, 24, 6, 4)]


def test_feature_index_and_rebuild():
    torch.manual_seed(0)
    full = timm.create_model('vit_tiny_patch16_224', num_classes=0, dynamic_img_size=True, **TINY_VIT).eval()
    model = create_segmenter('vit_tiny_patch16_224', 3, decoder='linear', feature_index=0, **TINY_VIT).eval()
    assert len(model.encoder.blocks) == 1                    # later blocks pruned (no unused DDP parameters)
    full.load_state_dict(model.encoder.state_dict(), strict=False)
    x = torch.randn(1, 3, 32, 32)
    ref = full.forward_intermediates(x, indices=[0], norm=True, intermediates_only=True)[0]
    torch.testing.assert_close(model.forward_features(x), ref)
    again = segmenter_from_config(model.segmenter_config)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.eval()(x), model(x))
    with pytest.raises(ValueError, match='out of range'):
        create_segmenter('vit_tiny_patch16_224', 3, decoder='linear', feature_index=5, **TINY_VIT)
    with pytest.raises(ValueError, match='forward_intermediates'):
        create_segmenter(torch.nn.Linear(3, 3), 3)


@pytest.mark.parametrize('size,window,stride', [((32, 32), 16, 16), ((37, 50), 16, 8), ((37, 50), 16, 5),
                                                ((10, 50), 16, 12)])
def test_sliding_windows_cover_and_average(size, window, stride):
    boxes = window_boxes(size, window, stride)
    cover = torch.zeros(size)
    for t, l, b, r in boxes:
        assert 0 <= t < b <= size[0] and 0 <= l < r <= size[1]
        assert b - t == min(window, size[0]) and r - l == min(window, size[1])
        cover[t:b, l:r] += 1
    assert cover.min() >= 1
    img = torch.randn(2, 3, *size)
    # an identity "model" returns its input: any overlap average gives back the image
    torch.testing.assert_close(slide_inference(lambda c: c, img, window, stride, max_batch=3), img)
    # a model that returns the window's index everywhere: the average over the windows covering each pixel
    crops = torch.cat([torch.full((2, 1, min(window, size[0]), min(window, size[1])), float(i))
                       for i in range(len(boxes))])
    got = merge_windows(crops, boxes, size)
    expect = torch.zeros(size)
    for i, (t, l, b, r) in enumerate(boxes):
        expect[t:b, l:r] += i
    torch.testing.assert_close(got[1, 0], expect / cover)


def test_confusion_matrix_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    conf = confusion_matrix(pred, target, 4)
    # rows = truth, columns = prediction; the ignored pixel (255) is not counted
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expected)
    m = segmentation_metrics(conf)
    iou = [1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 1 / (2 + 2 - 1)]      # class 3: absent everywhere -> left out
    assert m['mIoU'] == pytest.approx(100 * sum(iou) / 3)
    assert m['pixel_acc'] == pytest.approx(100 * 4 / 7)
    assert m['mAcc'] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert m['iou'][3] != m['iou'][3]                                 # NaN
    with pytest.raises(ValueError, match='outside'):
        confusion_matrix(pred, torch.full_like(target, 7), 4)
    halves = confusion_matrix(pred[:1], target[:1], 4) + confusion_matrix(pred[1:], target[1:], 4)
    assert torch.equal(halves, conf)                                  # additive: shards are summed


def test_segmenter_is_a_module_with_config():
    model = BACKBONES['cbt']('cbsa')
    assert isinstance(model, Segmenter) and model.patch_size == 8 and model.num_classes == 5
    assert model.segmenter_config['backbone'] == 'cbt_nano_patch8_32'
    assert BACKBONES['converted_vit']('linear').segmenter_config is None
