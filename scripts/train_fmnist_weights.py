#!/usr/bin/env python3
"""Train and export the Fashion-MNIST weights shipped as ``cbt_nano_patch8_32.fmnist`` (the README's main job).

    python scripts/train_fmnist_weights.py                     # quickstart recipe, seed 0 → output/fmnist_weights
    python scripts/train_fmnist_weights.py -- --epochs 4       # extra train.train flags after --
    python scripts/train_fmnist_weights.py --reexport          # rewrite the shipped weights in the current format

1. trains with ``python -m train.train --config train/configs/fmnist_quickstart.yaml`` (same code path);
2. writes the final weights as safetensors into ``timm_cbsa/models/weights/`` (temp file + rename): the model's
   state dict, with the CBSA layers' settings records (``timm_cbsa/layers/settings.py``); with a JSON next to them
   recording the command, the recipe, the test accuracy and the software versions (the model's pretrained cfg reads
   it). ``--reexport`` skips training and rewrites the shipped weights themselves (same tensors, current state-dict
   format), keeping the JSON's training record and adding a ``reexported`` entry;
3. re-loads them through ``timm.create_model('cbt_nano_patch8_32.fmnist', pretrained=True)`` and measures the test
   top-1 on the 10k Debian Fashion-MNIST test images.

Training on another machine or thread count gives weights that differ in the last bits (and accuracy within a few
tenths); the shipped file is the one this script wrote, and the test re-measures its stated accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODEL = 'cbt_nano_patch8_32'
TAG = 'fmnist'


def fmnist_test_top1(model, data_dir=None, batch_size=500) -> float:
    """Top-1 (%) on the 10k Fashion-MNIST test images, preprocessed by timm's eval transform for the model's pretrained
    cfg (resize 28 → 32 bilinear, /255, mean/std), as the trainer evaluates."""
    import torch
    from timm.data import create_transform, resolve_data_config
    from timm_cbsa.data import FashionMNIST
    tf = create_transform(**resolve_data_config({}, model=model))
    ds = FashionMNIST(root=data_dir, split='test', transform=tf)
    correct = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            items = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
            x = torch.stack([t for t, _ in items])
            y = torch.tensor([c for _, c in items])
            correct += int((model(x).argmax(-1) == y).sum())
    return 100.0 * correct / len(ds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='train/configs/fmnist_quickstart.yaml')
    p.add_argument('--output', default='output/fmnist_weights')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--data-dir', default=None)
    p.add_argument('--export-only', action='store_true', help='skip training: export OUTPUT/last.pth.tar')
    p.add_argument('--reexport', action='store_true',
                   help='skip training: rewrite the shipped weights in the current state-dict format')
    p.add_argument('train_args', nargs='*', help='extra train.train flags (after --)')
    args = p.parse_args(argv)

    import torch
    import timm
    import timm_cbsa
    from safetensors.torch import save_file
    from timm_cbsa.checkpoint import load_weights, read_state_dict
    from timm_cbsa.models.cbt_fmnist import FMNIST_WEIGHTS, WEIGHTS_DIR
    from train.checkpoint import load_checkpoint_file
    from train.train import main as train_main

    path = os.path.join(WEIGHTS_DIR, FMNIST_WEIGHTS['file'])
    jpath = os.path.splitext(path)[0] + '.json'
    command = 'python scripts/train_fmnist_weights.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    train_argv = ['--config', args.config, '--model', MODEL, '--output', args.output, '--seed', str(args.seed)]
    if args.data_dir:
        train_argv += ['--data-dir', args.data_dir]
    train_argv += list(args.train_args)
    result = {}
    t0 = time.time()
    if args.reexport:
        source = read_state_dict(path)
    else:
        if not args.export_only:
            result = train_main(train_argv)
            wall = time.time() - t0
        else:   # the training run's own record (train.train writes result.json)
            try:
                with open(os.path.join(args.output, 'result.json')) as f:
                    result = json.load(f)
            except (OSError, ValueError):
                result = {}
            wall = result.get('train_time_s')
        source = load_checkpoint_file(os.path.join(args.output, 'last.pth.tar'))
    model = load_weights(timm.create_model(MODEL), source)    # checks the architecture before anything is written
    state = {k: v.contiguous() for k, v in model.state_dict().items()}   # with the layers' settings records

    os.makedirs(WEIGHTS_DIR, exist_ok=True)
    tmp = path + '.tmp'
    save_file(state, tmp, metadata={'arch': MODEL, 'tag': TAG})
    os.replace(tmp, path)

    loaded = timm.create_model(f'{MODEL}.{TAG}', pretrained=True)
    top1 = fmnist_test_top1(loaded, args.data_dir)
    versions = dict(torch=torch.__version__, timm=timm.__version__, timm_cbsa=timm_cbsa.__version__)
    if args.reexport:
        with open(jpath) as f:
            meta = json.load(f)
        meta.update(test_top1=round(top1, 2), sha256=_sha256(path), bytes=os.path.getsize(path), reexported=dict(
            command=command, date=time.strftime('%Y-%m-%d'), **versions,
            note='same tensors, state dict with the CBSA layers\' settings records (layers/settings.py)'))
    else:
        meta = dict(
            model=f'{MODEL}.{TAG}', test_top1=round(top1, 2), test_images=10000,
            dataset='Fashion-MNIST (Debian dataset-fashion-mnist), 60k train / 10k test',
            command=command, recipe=args.config, train_args=train_argv, seed=args.seed,
            train_top1_reported=result.get('top1'), train_wall_s=None if wall is None else round(wall, 1),
            linear_baseline_top1=result.get('linear_baseline_top1'), **versions,
            machine=platform.processor() or platform.machine(), threads=_train_threads(args.output),
            date=time.strftime('%Y-%m-%d'), sha256=_sha256(path), bytes=os.path.getsize(path))
    with open(jpath + '.tmp', 'w') as f:
        json.dump(meta, f, indent=1)
        f.write('\n')
    os.replace(jpath + '.tmp', jpath)
    print(f'wrote {path} ({meta["bytes"] / 1e3:.0f} kB) and {jpath}')
    print(f'{MODEL}.{TAG}: test top-1 {top1:.2f}% (loaded through timm.create_model(pretrained=True))')
    return meta


def _train_threads(output_dir):
    """The torch thread count the training ran with: its own record (OUTPUT/args.yaml, written by train.train), else
    torch's default here (``threads`` 0 / unset: the trainer left torch's default)."""
    import torch
    import yaml
    try:
        with open(os.path.join(output_dir, 'args.yaml')) as f:
            threads = (yaml.safe_load(f) or {}).get('threads')
    except OSError:
        threads = None
    return int(threads) if threads else torch.get_num_threads()


def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


if __name__ == '__main__':
    main()
