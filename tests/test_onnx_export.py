"""ONNX export with both exporters (TorchScript-based ``dynamo=False``, timm's onnx_export.py default, and
``dynamo=True``), a dynamic batch axis, checked with onnxruntime against torch (fp32, 1e-4).

Every registered model name is exported at its default input size. To keep CI in minutes, the base / large sizes
(the same blocks as tiny / small, only wider and deeper) are exported with depth 2; ``CBSA_ONNX_FULL=1`` exports
them at full depth too. Models are built plainly (the layers then take their reference path while exporting) and
under timm's ``set_exportable(True)`` (built on the reference path).
"""
import os

import numpy as np
import pytest
import timm
import torch
from timm.layers import set_layer_config

ort = pytest.importorskip('onnxruntime', reason='onnxruntime is in the dev extra')
pytest.importorskip('onnxscript', reason='onnxscript is in the dev extra (the dynamo exporter needs it)')

pytestmark = pytest.mark.slow
FULL = os.environ.get('CBSA_ONNX_FULL', '0') not in ('', '0')
SHALLOW = {} if FULL else dict(depth=2)

MODELS = [
    ('cbt_nano_patch8_32', {}),                       # 4x4 patches, 2x2 representatives: equal windows
    ('cbsa_vit_tiny', {}),                            # 14x14 patches, 8x8 representatives: unequal windows
    ('cbsa_vit_tiny_patch16_224', dict(depth=2)),
    ('cbsa_vit_small', SHALLOW),
    ('cbsa_vit_small_patch16_224', dict(depth=2)),
    ('cbsa_vit_base', SHALLOW),
    ('cbsa_vit_base_patch16_224', dict(depth=2)),
    ('cbsa_vit_large', SHALLOW),
    ('cbsa_vit_large_patch16_224', dict(depth=2)),
    ('cbt_tiny', dict(depth=2, legacy_pool=True)),     # the released checkpoints' pooling
    ('cbt_small', SHALLOW),
    ('cbt_base', SHALLOW),
    ('cbt_large', SHALLOW),
    ('vit_small_patch16_224', dict(attn_layer='cbsa', **SHALLOW)),
]


def _export_and_run(model, path, dynamo: bool):
    size = model.pretrained_cfg['input_size']
    x = torch.randn(2, *size)
    kwargs = (dict(dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=64)},)) if dynamo
              else dict(dynamic_axes={'x': {0: 'batch'}, 'y': {0: 'batch'}}, opset_version=18))
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=['x'], output_names=['y'], **kwargs)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x3 = torch.randn(3, *size)                        # another batch size than the one traced
    got = session.run(None, {session.get_inputs()[0].name: x3.numpy()})[0]
    with torch.no_grad():
        want = model(x3).numpy()
    return got, want


@pytest.mark.parametrize('dynamo', [False, True], ids=['torchscript', 'dynamo'])
@pytest.mark.parametrize('name,kwargs', MODELS, ids=[m[0] + ('_legacy' if m[1].get('legacy_pool') else '')
                                                      for m in MODELS])
def test_export_matches_onnxruntime(name, kwargs, dynamo, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    assert model.blocks[0].attn.impl != 'eager', 'a plainly built model should not be on the reference path'
    got, want = _export_and_run(model, tmp_path / 'm.onnx', dynamo)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dynamo', [False, True], ids=['torchscript', 'dynamo'])
@pytest.mark.parametrize('name,kwargs', [MODELS[1], MODELS[9], MODELS[-1]], ids=['cbsa_vit_tiny', 'cbt_legacy', 'vit'])
def test_export_under_set_exportable(name, kwargs, dynamo, tmp_path):
    torch.manual_seed(0)
    with set_layer_config(exportable=True):
        model = timm.create_model(name, **kwargs).eval()
    assert model.blocks[0].attn.impl == 'eager'
    got, want = _export_and_run(model, tmp_path / 'm.onnx', dynamo)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
