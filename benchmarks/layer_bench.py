"""Layer-level benchmark: forward+backward time and saved-for-backward memory of one attention layer.

CBSA (each backend) vs timm ``Attention`` (fused SDPA), Agent Attention, PVTv2-li linear SRA and ReLU linear
attention, at N = 1 + (img/16)² tokens. One process, interleaved rounds, min and median reported.

    python benchmarks/layer_bench.py                          # CPU, 2 threads, fp32, C=384, H=6, B=8
    python benchmarks/layer_bench.py --device cuda --dtype bf16 --batch 64

cbsa_triton (the Triton kernels, CUDA only) is in the default variants on CUDA; a variant whose backend falls back
(e.g. cbsa_triton without Triton, or on CPU) is dropped with the reason instead of being timed under its name.

--core-share (CUDA): the CBSA core's share of a CBSA layer's fwd+bwd time (backend 'triton': the layer vs
``contract_and_broadcast_triton`` alone on the layer's projected tokens) → <out>/layer_core_share.{md,csv,json}.

Writes <out>/layer_<device>_<dtype>.{md,csv,png}. Not a test: a script.
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fit_exponent, interleaved, loglog_plot, machine_description, markdown_table, runs_triton, \
    saved_bytes, write_csv  # noqa: E402
from peers import AgentAttention, CBSAProjections, PVTLinearSRA, ReLULinearAttention, SDPAAttention, \
    make_cbsa  # noqa: E402

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def build(name: str, dim: int, heads: int, grid):
    if name == 'timm_sdpa':
        return SDPAAttention(dim, heads, grid)
    if name == 'agent':
        return AgentAttention(dim, heads, grid)
    if name == 'pvt_li':
        return PVTLinearSRA(dim, heads, grid)
    if name == 'relu_linear':
        return ReLULinearAttention(dim, heads, grid)
    if name == 'proj_floor':
        return CBSAProjections(dim, heads, grid)
    if name.startswith('cbsa_'):
        return make_cbsa(dim, heads, grid, name[len('cbsa_'):])
    raise ValueError(name)


def core_share(args, device, dtype):
    """Per N: fwd+bwd ms of a CBSA layer (backend 'triton') and of its core alone, and the core's share."""
    from timm_cbsa.ops.contract_broadcast.triton import contract_and_broadcast_triton
    rows = []
    for g in args.grids:
        n = 1 + g * g
        try:
            layer = make_cbsa(args.dim, args.heads, (g, g), 'triton').to(device=device, dtype=dtype)
            x = torch.randn(args.batch, n, args.dim, device=device, dtype=dtype, requires_grad=True)
            w = layer.project(x).detach().requires_grad_()
            spec = layer.pool_spec(n, None)
            dy = torch.randn_like(x)
            dw = torch.randn_like(w)

            def full():
                (layer(x) * dy).sum().backward()

            def core():
                out = contract_and_broadcast_triton(w, layer.step_rep, layer.step_x, layer.scale, pool=spec)
                (out * dw).sum().backward()
            if not runs_triton(full):
                raise RuntimeError('the layer did not run the Triton kernels')
            res = interleaved({'layer': full, 'core': core}, rounds_for(n, args.rounds), device)
            lay, cor = min(res['layer']), min(res['core'])
            rows.append(dict(N=n, layer_ms=round(lay, 3), core_ms=round(cor, 3), core_share=round(cor / lay, 3)))
        except Exception as e:  # noqa: BLE001 (one size failing, e.g. out of memory, does not stop the others)
            rows.append(dict(N=n, error=f'{type(e).__name__}: {e}'[:300]))
        print(rows[-1], flush=True)
    cells = [[str(r['N']), '%.2f' % r['layer_ms'], '%.2f' % r['core_ms'], '%.0f%%' % (100 * r['core_share'])]
             if 'error' not in r else [str(r['N']), r['error'], '–', '–'] for r in rows]
    md = [f'### CBSA core share of a layer (fwd+bwd, backend triton), C={args.dim}, H={args.heads}, B={args.batch}, '
          f'{args.dtype}', '', f'Machine: {machine_description(device)}. min over interleaved rounds.', '',
          markdown_table(['N', 'layer ms', 'core ms', 'core share'], cells)]
    print('\n'.join(md))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'layer_core_share.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    write_csv(os.path.join(args.out, 'layer_core_share.csv'), rows)
    with open(os.path.join(args.out, 'layer_core_share.json'), 'w') as f:
        json.dump(rows, f, indent=1)


def rounds_for(n: int, base: int) -> int:
    return max(2, base if n <= 256 else base // 2 if n <= 1024 else base // 4 if n <= 4096 else 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', default='fp32', choices=list(DTYPES))
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads on CPU')
    p.add_argument('--dim', type=int, default=384)
    p.add_argument('--heads', type=int, default=6)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--grids', type=int, nargs='+', default=[14, 28, 56, 112], help='patch grid side: N = 1 + g²')
    p.add_argument('--variants', nargs='+', default=None)
    p.add_argument('--rounds', type=int, default=16, help='rounds at N≈197; fewer at larger N')
    p.add_argument('--quadratic-max-n', type=int, default=1 << 30, help='skip timm_sdpa above this N')
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    p.add_argument('--core-share', action='store_true', help='only the core-share table (backend triton, CUDA)')
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.core_share:
        return core_share(args, device, dtype)
    if device.type == 'cpu':
        torch.set_num_threads(args.threads)
    variants = args.variants or (
        ['timm_sdpa', 'cbsa_eager', 'cbsa_fused', 'cbsa_sdpa']
        + (['cbsa_xformers', 'cbsa_triton'] if device.type == 'cuda' else [])
        + ['agent', 'pvt_li', 'relu_linear', 'proj_floor'])
    torch.manual_seed(0)
    rows, times, medians = [], {v: {} for v in variants}, {v: {} for v in variants}
    for g in args.grids:
        n = 1 + g * g
        x = torch.randn(args.batch, n, args.dim, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        layers, fns = {}, {}
        for v in variants:
            if v == 'timm_sdpa' and n > args.quadratic_max_n:
                continue
            layer = build(v, args.dim, args.heads, (g, g)).to(device=device, dtype=dtype)
            if v == 'cbsa_triton' and not runs_triton(lambda layer=layer: layer(x)):
                print(f'N={n}: skip cbsa_triton: the backend fell back (its reason is logged above)', flush=True)
                continue
            layers[v] = layer

            def step(layer=layer):
                y = layer(x)
                (y * dy[:, -y.shape[1]:]).sum().backward()
                x.grad = None
                layer.zero_grad(set_to_none=True)
            fns[v] = step
        mem = {}
        for v, layer in layers.items():
            mem[v] = saved_bytes(lambda layer=layer: layer(x)) / 2 ** 20
        if device.type == 'cuda':
            peak = {}
            for v, f in fns.items():
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                f()
                peak[v] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        r = rounds_for(n, args.rounds)
        res = interleaved(fns, r, device, warmup=1 if n <= 4096 or device.type == 'cuda' else 0)
        for v, ts in res.items():
            times[v][n], medians[v][n] = min(ts), statistics.median(ts)
            row = dict(N=n, variant=v, min_ms=round(min(ts), 3), median_ms=round(statistics.median(ts), 3),
                       rounds=r, saved_MB=round(mem[v], 2))
            if device.type == 'cuda':
                row['peak_MB'] = round(peak[v], 1)
            rows.append(row)
        print(f'N={n}: ' + ', '.join(f'{v} {min(ts):.1f}' for v, ts in res.items()), flush=True)

    machine = machine_description(device)
    tag = f'layer_{device.type}_{args.dtype}'
    ns = [1 + g * g for g in args.grids]
    header = ['N'] + [f'{v} ms' for v in variants] + [f'SDPA/{v}' for v in variants if v.startswith('cbsa_')]
    table = []
    for n in ns:
        line = [str(n)]
        for v in variants:
            line.append('%.1f (%.1f)' % (times[v][n], medians[v][n]) if n in times[v] else '–')
        for v in variants:
            if v.startswith('cbsa_'):
                sd = times.get('timm_sdpa', {}).get(n)
                line.append('%.2f×' % (sd / times[v][n]) if sd and n in times[v] else '–')
        table.append(line)
    mem_table = [[str(n)] + ['%.1f' % next((r['saved_MB'] for r in rows if r['N'] == n and r['variant'] == v), float('nan'))
                             if n in times[v] else '–' for v in variants] for n in ns]
    exps = {v: fit_exponent(sorted(times[v]), [times[v][n] for n in sorted(times[v])]) for v in variants
            if len(times[v]) >= 2}
    md = [f'### Layer benchmark: fwd+bwd, C={args.dim}, H={args.heads}, B={args.batch}, {args.dtype}, {device.type}',
          '', f'Machine: {machine}. min (median) ms over interleaved rounds.', '',
          markdown_table(header, table), '',
          'Saved-for-backward MB (autograd saved tensors, dedup by storage):', '',
          markdown_table(['N'] + variants, mem_table), '',
          'Fitted time exponent over N=%d..%d: ' % (ns[0], ns[-1])
          + ', '.join(f'{v} {e:.2f}' for v, e in exps.items())]
    if 'proj_floor' in times and 'timm_sdpa' in times:
        md += ['', 'proj_floor is not attention: only CBSA\'s two C×C projections (fwd+bwd), a floor for any CBSA '
               'implementation. Reachable SDPA/CBSA ratio at most SDPA/proj_floor: '
               + ', '.join('N=%d %.2f×' % (n, times['timm_sdpa'][n] / times['proj_floor'][n]) for n in ns
                           if n in times['timm_sdpa'] and n in times['proj_floor'])]
    text = '\n'.join(md)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, tag + '.md'), 'w') as f:
        f.write(text + '\n')
    write_csv(os.path.join(args.out, tag + '.csv'), rows)
    png = loglog_plot(os.path.join(args.out, tag + '.png'), times,
                      f'fwd+bwd per layer, C={args.dim} H={args.heads} B={args.batch} {args.dtype}\n{machine}')
    if png:
        print('plot:', png)


if __name__ == '__main__':
    main()
