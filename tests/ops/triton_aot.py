"""Ahead-of-time compile of the CBSA Triton kernels for sm_80 / sm_90 without a GPU, through the project's own
launch code (``function._representatives`` / ``_forward`` / ``_backward``) with a recording stand-in for the kernels
module: every launch the real code would make for a (dtype, float32 precision, m, d) is specialised the way Triton's
runtime specialises it (integers equal to 1 become constants, multiples of 16 and 16-byte-aligned pointers get the
divisibility hint, ``do_not_specialize`` arguments stay plain) and compiled with ``triton.compile(ASTSource(...),
target=GPUTarget('cuda', arch, 32))``, the path of Triton's own AOT tool. Registers and local-memory stack come from
``cuobjdump --dump-resource-usage`` on the cubin (the CUDA tools bundled in Triton's wheel), shared memory from the
compiled kernel's metadata.

    python tests/ops/triton_aot.py [--archs 80 90] [--jobs 2] [--markdown]   # compile matrix, JSON lines
    python tests/ops/triton_aot.py --sweep                     # choose the TABLE (compiles candidate tiles)

Used by test_triton_compile.py. TRITON_INTERPRET must be unset (the kernels must be JIT functions)."""
import argparse
import concurrent.futures
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

# shared memory per block with opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin) that a target's TABLE entries must fit:
# 80 serves every 8.x device, so the smallest 8.x limit (sm_86 / sm_89: 99 KB; sm_80: 163 KB); 90: sm_90 (227 KB)
SMEM_LIMIT = {80: 101376, 90: 232448}
MODES = {'bf16': (torch.bfloat16, 'tf32'), 'fp16': (torch.float16, 'tf32'), 'fp32_tf32': (torch.float32, 'tf32'),
         'fp32_ieee': (torch.float32, 'ieee')}
MODEL_MD = [(64, 64), (4, 32)]      # cbsa_vit_* / cbt_* (8×8 representatives, d = 64); cbt_nano_patch8_32 (2×2, 32)
MS = [16, 25, 49, 64, 100, 128]
DS = [16, 32, 48, 64, 80, 96, 128]
_DT = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16', torch.float64: 'fp64'}


class Launch(NamedTuple):
    kernel: str
    signature: Tuple[Tuple[str, str], ...]     # (name, type) in argument order; 'constexpr' for constants
    constants: Tuple[Tuple[str, object], ...]
    divisible: Tuple[int, ...]                 # argument indices with the 16-divisibility hint
    num_warps: int
    num_stages: int


def tools_problem() -> Optional[str]:
    """None when Triton (with its bundled ptxas and cuobjdump) can compile here, else why not."""
    if os.environ.get('TRITON_INTERPRET') == '1':
        return 'TRITON_INTERPRET=1 is set (the kernels are interpreted, not compiled)'
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f'Triton is not importable: {type(e).__name__}: {e}'
    for tool in ('ptxas', 'cuobjdump'):
        if not os.access(_tool(tool), os.X_OK):
            return f'Triton\'s bundled {tool} is missing ({_tool(tool)})'
    return None


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', name)


def _specialise(fn, args: tuple, kwargs: dict) -> Launch:
    """The signature Triton's runtime would build for this call (documented specialisation rules)."""
    sig, consts, div = [], [], []
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        if p.is_constexpr:
            sig.append((p.name, 'constexpr'))
            consts.append((p.name, v))
        elif isinstance(v, torch.Tensor):
            sig.append((p.name, '*' + _DT[v.dtype]))
            if v.data_ptr() % 16 == 0:
                div.append(i)
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f'{fn.__name__}: unexpected argument {p.name}={v!r}')
        elif isinstance(v, float):
            sig.append((p.name, 'fp32'))
        elif p.do_not_specialize:
            sig.append((p.name, 'i32' if -2 ** 31 <= v < 2 ** 31 else 'i64'))
        elif v == 1:
            sig.append((p.name, 'constexpr'))
            consts.append((p.name, 1))
        else:
            sig.append((p.name, 'i32' if -2 ** 31 <= v < 2 ** 31 else 'i64'))
            if v % 16 == 0:
                div.append(i)
    return Launch(fn.__name__, tuple(sig), tuple(consts), tuple(div), kwargs.get('num_warps', 4),
                  kwargs.get('num_stages', 3))


class _Recorder:
    """Stands in for the kernels module: ``K.name[grid](*args, **kw)`` records the specialised launch."""

    def __init__(self, module):
        self.module, self.launches = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    assert 0 < grid[0] < 2 ** 31 and all(0 < g <= 65535 for g in grid[1:]), (name, grid)
                    rec.launches.append(_specialise(fn, args, kwargs))
                return launch
        return _Grid()


def record(dtype: torch.dtype, prec: str, m: int, d: int, arch: int, pool: bool = True, cfg=None) -> List[Launch]:
    """The launches of one forward + backward for (dtype, float32 precision, m, d) on target ``arch``: the real launch
    code (configuration from ``function.TABLE``, or ``cfg``), on small CPU tensors (B = H = 2, (B, N, H, d) layout,
    N = 1 + 16·16 tokens with a 16×16 patch grid when pooled)."""
    from timm_cbsa.ops.contract_broadcast.pooling import PoolSpec
    from timm_cbsa.ops.contract_broadcast.triton import function, kernels
    from timm_cbsa.ops.contract_broadcast.triton.function import _backward, _forward, _plan, _representatives
    B, H, N = 2, 2, 257
    rep = next((a, m // a) for a in range(int(m ** 0.5), 0, -1) if m % a == 0)
    spec = PoolSpec((16, 16), rep, 0) if pool else None
    K = _Recorder(kernels)
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = prec
    try:
        assert function.fp32_precision() == prec
        w = torch.zeros(B, N, H, d, dtype=dtype).transpose(1, 2)
        r = None if pool else torch.zeros(B, H, m, d, dtype=dtype)
        pl = _plan(w, m, arch)
        pl = pl._replace(cfg=cfg or pl.cfg)
        assert pl.cfg is not None, f'no configuration for {dtype} {prec} m={m} d={d} sm_{arch}'
        eta = kap = torch.zeros(H, dtype=pl.sd)
        r0 = _representatives(K, pl, w, r, spec, dtype)
        out, *saved = _forward(K, pl, w, r0, eta, kap, 0.125)
        _backward(K, pl, [w, r0] + saved, torch.zeros_like(out), eta, kap, 0.125, spec)
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    return K.launches


def _resources(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool('cuobjdump'), '--dump-resource-usage', f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(tok.split(':', 1) for line in out.splitlines() if 'REG:' in line for tok in line.split()
                  if ':' in tok)
    return {'registers': int(fields['REG']), 'stack': int(fields['STACK']), 'local': int(fields['LOCAL'])}


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one launch for sm_<arch>: shared memory, registers, local-memory stack, atomics; or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from timm_cbsa.ops.contract_broadcast.triton import kernels
    fn = getattr(kernels, launch.kernel)
    target = GPUTarget('cuda', arch, 32)
    rec = dict(kernel=launch.kernel, arch=arch, num_warps=launch.num_warps,
               **{k: v for k, v in launch.constants if k in ('M_PAD', 'D_PAD', 'BLOCK_N', 'BM', 'PREC', 'MM_PREC')})
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=dict(launch.signature), constexprs=dict(launch.constants),
                        attrs={(i,): [['tt.divisibility', 16]] for i in launch.divisible})
        opts = make_backend(target).parse_options({'num_warps': launch.num_warps, 'num_stages': launch.num_stages})
        k = triton.compile(src, target=target, options=opts.__dict__)
        rec.update(ok=True, shared=int(k.metadata.shared), atomics=k.asm['ttir'].count('atomic'),
                   **_resources(k.asm['cubin']))
    except Exception as e:  # noqa: BLE001 (a compile failure is a result)
        rec.update(ok=False, error=f'{type(e).__name__}: {str(e)[-500:]}')
    rec['seconds'] = round(time.time() - t0, 2)
    return rec


def matrix() -> List[Tuple[str, int, int]]:
    """(mode, m, d) of the compile matrix: the registered models' (m, d) and m ∈ MS × d ∈ DS in every mode, which
    reaches every ``TABLE`` entry with each element type (the kernels specialise on M_PAD, D_PAD, the tiles and the
    element types only, so repeated (M_PAD, D_PAD) cost nothing: ``plan`` compiles each distinct launch once)."""
    pairs = list(dict.fromkeys(MODEL_MD + [(m, d) for m in MS for d in DS]))
    return [(mode, m, d) for mode in MODES for m, d in pairs]


def accepted(mode: str, m: int, d: int, arch: int) -> bool:
    """Whether ``not_supported_reasons``' table check accepts (mode's dtype, m, d) on sm_<arch> with its full
    per-block shared memory (float32: both TF32 settings)."""
    from timm_cbsa.ops.contract_broadcast.triton import function
    return not function.shared_memory_reasons(d, m, MODES[mode][0], arch, SMEM_LIMIT[arch])


def plan(archs=(80, 90)):
    """{(mode, m, d, arch): [launches]} for the accepted entries of the matrix, and the distinct (launch, arch)
    compiles they need, largest tiles first (the longest compiles start first on the workers)."""
    uses, todo = {}, {}
    for mode, m, d in matrix():
        dtype, prec = MODES[mode]
        for arch in archs:
            if not accepted(mode, m, d, arch):
                continue
            keys = [(launch, arch) for pool in (True, False) for launch in record(dtype, prec, m, d, arch, pool)]
            uses[(mode, m, d, arch)] = list(dict.fromkeys(keys))
            todo.update(dict.fromkeys(keys))
    size = {k: dict(k[0].constants) for k in todo}
    return uses, sorted(todo, key=lambda k: -size[k].get('M_PAD', 0) * size[k].get('D_PAD', 0))


def _compile_star(item):
    return item, compile_launch(*item)


def run(archs=(80, 90), jobs: int = 2, log=None) -> Dict[tuple, List[dict]]:
    """Compile every distinct launch once (``jobs`` processes) → {(mode, m, d, arch): [result per kernel]}."""
    uses, todo = plan(archs)
    done = {}
    with concurrent.futures.ProcessPoolExecutor(jobs) if jobs > 1 else _Serial() as ex:
        for item, res in ex.map(_compile_star, todo):
            done[item] = res
            if log is not None:
                print(json.dumps(res), file=log, flush=True)
    return {key: [done[k] for k in keys] for key, keys in uses.items()}


def clean(res: dict, arch: int) -> bool:
    return res['ok'] and res['stack'] == 0 and res['local'] == 0 and res['shared'] <= SMEM_LIMIT[arch]


GROUPS = {'main': ('_extract_partial', '_broadcast_fwd', '_ag_partial'),
          'bwd': ('_broadcast_bwd', '_broadcast_bwd_blocks'), 'pool': ('_pool_partial', '_pool_adjoint')}
# Candidates in order of preference: (BLOCK_N, num_warps, num_stages[, representative block, d chunk]), 'M' / 'D' for
# M_PAD / D_PAD (numbers above them are clipped). First whole tiles (one pass, nothing recomputed), larger token blocks
# and software pipelining first; then blocks of representatives and d chunks, which hold smaller tiles (float32
# 'ieee' products keep whole-K operand rows in registers; the backward broadcast becomes two passes).
CANDIDATES = {'main': [(64, 4, 2, 'M', 'D'), (64, 8, 2, 'M', 'D'), (32, 4, 2, 'M', 'D'), (32, 8, 2, 'M', 'D'),
                       (32, 8, 1, 'M', 'D'), (16, 8, 1, 'M', 'D'), (32, 8, 2, 32, 32), (32, 8, 1, 32, 32),
                       (32, 4, 2, 16, 16), (16, 8, 1, 16, 16)],
              'bwd': [(64, 8, 2, 'M', 'D'), (32, 4, 2, 'M', 'D'), (32, 8, 2, 'M', 'D'), (16, 4, 2, 'M', 'D'),
                      (16, 8, 2, 'M', 'D'), (32, 8, 1, 'M', 'D'), (16, 8, 1, 'M', 'D'), (32, 4, 2, 32, 'D'),
                      (32, 8, 2, 32, 32), (32, 4, 1, 16, 16), (16, 4, 1, 16, 16), (16, 8, 1, 16, 16)],
              'pool': [(64, 4, 2), (32, 4, 2), (32, 8, 2), (16, 4, 2), (16, 8, 2), (32, 8, 1), (16, 8, 1)]}
_SMALL = {'main': (32, 4, 1, 16, 16), 'bwd': (32, 4, 1, 16, 16), 'pool': (32, 4, 1)}   # groups not being swept


def resolve(cand: tuple, mp: int, dp: int) -> tuple:
    """A candidate for (M_PAD, D_PAD): 'M' / 'D' replaced, blocks clipped; the one-pass backward (representative
    block M_PAD) takes whole d."""
    if len(cand) == 3:
        return cand
    bm = mp if cand[3] == 'M' else min(cand[3], mp)
    return cand[:3] + (bm, dp if cand[4] == 'D' or bm == mp else min(cand[4], dp))


def candidates(group: str, mp: int, dp: int) -> List[tuple]:
    return list(dict.fromkeys(resolve(c, mp, dp) for c in CANDIDATES[group]))


def sweep_config(group: str, cand: tuple, mp: int, dp: int):
    """The ``function.Config`` with ``cand`` for ``group`` and small tiles elsewhere."""
    from timm_cbsa.ops.contract_broadcast.triton.function import Config
    tiles = {g: resolve(_SMALL[g], mp, dp) for g in GROUPS}
    tiles[group] = cand
    return Config(*tiles['main'], *tiles['bwd'], *tiles['pool'], 16, 4)


def _sweep_one(task):
    """First candidate (in order of preference) of one kernel group that compiles cleanly, per target."""
    mode, mp, dp, group, archs = task
    dtype, prec = MODES[mode]
    found, tried = {}, []
    for cand in candidates(group, mp, dp):
        for arch in [a for a in archs if a not in found]:
            cfg = sweep_config(group, cand, mp, dp)
            launches = [l for l in dict.fromkeys(record(dtype, prec, mp, dp, arch, True, cfg))
                        if l.kernel in GROUPS[group]]
            res = [compile_launch(l, arch) for l in launches]
            tried.append((cand, arch, [(r['kernel'], r.get('registers'), r.get('stack'), r.get('shared'))
                                       for r in res]))
            if all(clean(r, arch) for r in res):
                found[arch] = (cand, max(r['shared'] for r in res))
        if len(found) == len(archs):
            break
    return task, found, tried


def sweep(modes=('bf16', 'fp32_tf32', 'fp32_ieee'), pads=None, archs=(80, 90), jobs: int = 2, log=None) -> dict:
    """The TABLE entries: per (arch, kind, M_PAD, D_PAD), each group's first clean candidate (a missing group:
    the entry is left out, i.e. refused). Slow (hundreds of compiles); run by hand when the kernels change."""
    from timm_cbsa.ops.contract_broadcast.triton import function
    pads = pads or [(mp, dp) for mp in function.M_PADS for dp in function.D_PADS]
    tasks = [(mode, mp, dp, g, tuple(archs)) for mode in modes for mp, dp in pads for g in GROUPS]
    found = {}
    with concurrent.futures.ProcessPoolExecutor(jobs) if jobs > 1 else _Serial() as ex:
        for (mode, mp, dp, g, _), got, tried in ex.map(_sweep_one, tasks):
            if log is not None:
                print(json.dumps(dict(task=[mode, mp, dp, g], found=got, tried=tried)), file=log, flush=True)
            for arch, (cand, shared) in got.items():
                found.setdefault((arch, mode, mp, dp), {})[g] = (cand, shared)
    table = {}
    for (arch, mode, mp, dp), groups in found.items():
        if len(groups) == len(GROUPS):
            dtype, prec = MODES[mode]
            table[(arch, function.kind(dtype, prec), mp, dp)] = (
                tuple(groups['main'][0]), tuple(groups['bwd'][0]), tuple(groups['pool'][0]),
                max(sh for _, sh in groups.values()))
    return table


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def table(results: Dict[tuple, List[dict]]) -> str:
    """Markdown: per (arch, mode, M_PAD, D_PAD) and kernel: shared KB / registers / stack bytes."""
    from timm_cbsa.ops.contract_broadcast.triton import function
    rows: Dict[tuple, Dict[str, str]] = {}
    kernels: List[str] = []
    for (mode, m, d, arch), recs in results.items():
        cells: Dict[str, str] = {}
        for r in recs:
            kernels += [r['kernel']] if r['kernel'] not in kernels else []
            cell = (f"{r['shared'] // 1024}K/r{r['registers']}" + (f"/stk{r['stack']}" if r['stack'] else '')
                    if r['ok'] else 'FAIL')
            cells[r['kernel']] = cells[r['kernel']] + ' + ' + cell if r['kernel'] in cells else cell   # two passes
        rows[(arch, mode, function.pad_m(m), function.pad_d(d))] = cells
    head = ['sm', 'mode', 'M_PAD', 'D_PAD'] + [k.strip('_') for k in kernels]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for key in sorted(rows, key=lambda k: (k[0], list(MODES).index(k[1]), k[2], k[3])):
        lines.append('| ' + ' | '.join(map(str, key)) + ' | '
                     + ' | '.join(rows[key].get(k, '–') for k in kernels) + ' |')
    return '\n'.join(lines)


@functools.lru_cache(maxsize=None)
def _main_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--archs', type=int, nargs='+', default=[80, 90])
    p.add_argument('--jobs', type=int, default=os.cpu_count() or 2)
    p.add_argument('--markdown', action='store_true', help='print the per-kernel table at the end')
    p.add_argument('--json', default=None, help='write {mode/m/d/arch: results} here')
    p.add_argument('--sweep', action='store_true', help='choose the configurations: print the TABLE entries')
    return p


def main(argv=None):
    args = _main_parser().parse_args(argv)
    problem = tools_problem()
    if problem is not None:
        raise SystemExit(problem)
    t0 = time.time()
    if args.sweep:
        entries = sweep(archs=tuple(args.archs), jobs=args.jobs, log=sys.stdout)
        print('TABLE = {')
        for k in sorted(entries):
            print(f'    {k}: {entries[k]},')
        print('}', f'# {time.time() - t0:.0f} s')
        return
    res = run(tuple(args.archs), args.jobs, log=sys.stdout)
    print(f'# {sum(len(v) for v in res.values())} kernel results, {time.time() - t0:.0f} s', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'/'.join(map(str, k)): v for k, v in res.items()}, f)
    if args.markdown:
        print(table(res))


if __name__ == '__main__':
    main()
