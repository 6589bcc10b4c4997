"""Smoke test for the declared dependency floors (run by floor_smoke.sh in venvs holding the minimum timm / torch):
import, build cbsa_vit_small and vit_small_patch16_224 with attn_layer='cbsa', forward and backward.
``--timm V`` / ``--torch V``: fail unless the imported timm / torch have that version (the venv really uses it)."""
import argparse
import sys

import timm
import torch

import timm_cbsa

parser = argparse.ArgumentParser()
parser.add_argument('--timm', help='expected timm version')
parser.add_argument('--torch', help='expected torch version prefix (e.g. 2.4)')
args = parser.parse_args()
if args.timm and timm.__version__ != args.timm:
    sys.exit(f'floor smoke: expected timm {args.timm}, imported timm {timm.__version__} from {timm.__file__}')
if args.torch and not torch.__version__.startswith(args.torch + '.'):
    sys.exit(f'floor smoke: expected torch {args.torch}.*, imported torch {torch.__version__} from {torch.__file__}')
print(f'floor smoke: python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, '
      f'timm_cbsa from {timm_cbsa.__file__}')
for name, kw in (('cbsa_vit_small', {}), ('vit_small_patch16_224', dict(attn_layer='cbsa', dynamic_img_size=True))):
    torch.manual_seed(0)
    model = timm.create_model(name, depth=2, num_classes=10, **kw)
    assert type(model.blocks[0].attn).__name__ == 'CBSA', type(model.blocks[0].attn)
    for size in ((224, 224), (160, 320)) if kw else ((224, 224),):
        x = torch.randn(2, 3, *size)
        y = model(x)
        y.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert y.shape == (2, 10) and torch.isfinite(y).all()
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        model.zero_grad()
    print(f'  {name} {kw}: forward + backward ok')
print('floor smoke: ok')
