"""Model-level benchmark: train and inference img/s of CBSA models vs their ViT counterparts.

    python benchmarks/model_bench.py                                    # CPU fp32, 224 px, small batch
    python benchmarks/model_bench.py --device cuda --amp bf16 --img-sizes 224 512 1024 --batch 64

Default backends: fused on CPU; fused and triton (the Triton kernels) on CUDA. A triton model whose backend falls back
is skipped with the reason instead of being timed under its name.

Pairs: cbsa_vit_small (each --backends) vs vit_small_patch16_224, and cbt_small vs vit_small_patch16_224, the same
batch at every image size. Train step = forward + cross-entropy + backward + SGD step. One process, interleaved rounds,
best round reported; the ratio to the ViT is printed next to the issue's targets for training (≥ 1.0× at 224 px,
≥ 1.45× at 512, ≥ 2.9× at 1024). --flash-vit runs the ViT under sdpa_kernel(FLASH_ATTENTION).
Writes <out>/model_<device>_<amp>.{md,csv,json}. Not a test: a script.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleaved, machine_description, markdown_table, runs_triton, write_csv  # noqa: E402

import timm  # noqa: E402
import timm_cbsa  # noqa: E402,F401


TARGETS = {224: 1.0, 512: 1.45, 1024: 2.9}   # training img/s of CBSA / ViT-S wanted (issue 20)


def _flash():
    """sdpa_kernel(FLASH_ATTENTION) where this torch has it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def build(name: str, img: int, backend: str, device, channels_last=False):
    kw = dict(img_size=img, num_classes=1000)
    if name.startswith('cbsa_') or name.startswith('cbt_'):
        kw['backend'] = backend
    model = timm.create_model(name, **kw).to(device)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', default=None, choices=[None, 'bf16', 'fp16'], help='autocast dtype (default: bf16 on cuda)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--img-sizes', type=int, nargs='+', default=[224])
    p.add_argument('--batch', type=int, default=None, help='batch at 224 px; scaled by (224/img)² (min 1)')
    p.add_argument('--backends', nargs='+', default=None, help="default: fused (CPU); fused triton (CUDA)")
    p.add_argument('--pairs', nargs='+', default=['cbsa_vit_small:vit_small_patch16_224',
                                                   'cbt_small:vit_small_patch16_224'])
    p.add_argument('--rounds', type=int, default=None)
    p.add_argument('--iters', type=int, default=None, help='steps per round')
    p.add_argument('--modes', nargs='+', default=['train', 'infer'])
    p.add_argument('--compile', action='store_true', help='torch.compile every model')
    p.add_argument('--flash-vit', action='store_true', help='run the ViT baselines under sdpa_kernel(FLASH_ATTENTION)')
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    amp = args.amp or ('bf16' if cuda else None)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, None: None}[amp]
    if not cuda:
        torch.set_num_threads(args.threads)
    base_batch = args.batch or (128 if cuda else 8)
    backends = args.backends or (['fused', 'triton'] if cuda else ['fused'])
    rounds = args.rounds or (5 if cuda else 3)
    iters = args.iters or (10 if cuda else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    rows = []
    for img in args.img_sizes:
        batch = max(1, int(base_batch * (224 / img) ** 2))
        x = torch.randn(batch, 3, img, img, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        names = []
        for pair in args.pairs:
            a, b = pair.split(':')
            for be in backends:
                names.append((a, be))
            names.append((b, None))
        names = list(dict.fromkeys(names))
        for mode in args.modes:
            fns, models = {}, {}
            for name, be in names:
                key = name if be is None else f'{name}[{be}]'
                try:
                    model = build(name, img, be or 'eager', device)
                except Exception as e:  # noqa: BLE001
                    print(f'skip {key} at {img}: {type(e).__name__}: {e}')
                    continue
                model.train(mode == 'train')
                if be == 'triton':
                    def probe(model=model):
                        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            model(x[:1])
                    if not runs_triton(probe):
                        print(f'skip {key} at {img}: the triton backend fell back (its reason is logged above)')
                        continue
                run = torch.compile(model) if args.compile else model
                opt = torch.optim.SGD(model.parameters(), lr=1e-4) if mode == 'train' else None

                flash = args.flash_vit and be is None

                def step(run=run, opt=opt, mode=mode, flash=flash):
                    for _ in range(iters):
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None), \
                                (_flash() if flash else contextlib.nullcontext()):
                            if mode == 'train':
                                loss = torch.nn.functional.cross_entropy(run(x), y)
                            else:
                                with torch.no_grad():
                                    run(x)
                        if mode == 'train':
                            loss.backward()
                            opt.step()
                            opt.zero_grad(set_to_none=True)
                fns[key] = step
                models[key] = model
            peak = {}
            if cuda:
                for k, f in fns.items():
                    torch.cuda.reset_peak_memory_stats(device)
                    f()
                    peak[k] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            try:
                res = interleaved(fns, rounds, device, warmup=0 if cuda else 1)
            except Exception as e:  # noqa: BLE001 (OOM, a kernel failing at one size: the other sizes still run)
                print(f'{type(e).__name__} at {img} {mode}: {e}')
                continue
            for k, ts in res.items():
                ips = batch * iters / (min(ts) / 1e3)
                row = dict(img=img, mode=mode, model=k, batch=batch, img_per_s=float('%.3g' % ips),
                           median_img_per_s=float('%.3g' % (batch * iters / (statistics.median(ts) / 1e3))))
                if cuda:
                    row['peak_GiB'] = round(peak[k], 2)
                rows.append(row)
                print(row, flush=True)
            del fns, models
            if cuda:
                torch.cuda.empty_cache()

    machine = machine_description(device)
    header = ['img', 'mode', 'model', 'batch', 'img/s', 'vs ViT-S', 'target']
    table = []
    for r in rows:
        ref = next((q['img_per_s'] for q in rows if q['img'] == r['img'] and q['mode'] == r['mode']
                    and q['model'] == 'vit_small_patch16_224'), None)
        r['vs_vit'] = round(r['img_per_s'] / ref, 3) if ref else None
        target = TARGETS.get(r['img']) if r['mode'] == 'train' and not r['model'].startswith('vit_') else None
        r['target'] = target
        table.append([str(r['img']), r['mode'], r['model'], str(r['batch']), '%.3g' % r['img_per_s'],
                      '%.2f×' % r['vs_vit'] if ref else '–',
                      '–' if target is None or ref is None else
                      f'≥ {target}× ' + ('met' if r['vs_vit'] >= target else 'missed')])
    text = '\n'.join([f'### Model benchmark ({device.type}, amp={amp}, compile={args.compile})', '',
                      f'Machine: {machine}. Best of {rounds} interleaved rounds × {iters} steps.', '',
                      markdown_table(header, table)])
    print(text)
    os.makedirs(args.out, exist_ok=True)
    tag = f'model_{device.type}_{amp or "fp32"}'
    with open(os.path.join(args.out, tag + '.md'), 'w') as f:
        f.write(text + '\n')
    write_csv(os.path.join(args.out, tag + '.csv'), rows)
    with open(os.path.join(args.out, tag + '.json'), 'w') as f:
        json.dump(dict(machine=machine, amp=amp, rounds=rounds, iters=iters, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
