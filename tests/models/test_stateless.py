"""A CBSA model keeps no per-call state: one model serves many threads and image sizes at once, and deep copies,
pickles, replicas and torch.compile give the serial answers (layers/layout.py)."""
import copy
import io
import threading

import pytest
import timm
import torch

import timm_cbsa
from timm_cbsa.layers.layout import PatchGridHook

SIZES = ((64, 64), (48, 96))   # 4x4 and 3x6 patch grids at patch 16: same aspect class, different token counts


def _model(name='vit_small_patch16_224', **kw):
    torch.manual_seed(0)
    kw = dict(dict(attn_layer='cbsa_r2', dynamic_img_size=True, depth=2, img_size=64, num_classes=7), **kw)
    if name.startswith('cbsa_vit') or name.startswith('cbt'):
        kw.pop('attn_layer')
        kw.setdefault('rep_grid', 2)
    model = timm.create_model(name, **kw).eval()
    with torch.no_grad():   # timm's init (std .02) makes A nearly uniform, so the grid would hardly matter
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0, 0.05)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return {hw: torch.randn(2, 3, *hw, generator=g) for hw in SIZES}


def _serial(model, xs):
    with torch.no_grad():
        return {hw: model(x) for hw, x in xs.items()}


def _run_threads(model, xs, rounds=15):
    """Two threads, one per image size, each calling the model ``rounds`` times at once; returns the outputs."""
    results = {hw: [] for hw in xs}
    barrier = threading.Barrier(len(xs))

    def work(hw):
        barrier.wait()
        with torch.no_grad():
            for _ in range(rounds):
                results[hw].append(model(xs[hw]))

    _join([threading.Thread(target=work, args=(hw,)) for hw in xs])
    assert all(len(v) == rounds for v in results.values()), 'a thread failed (see the warnings)'
    return results


def _join(threads):
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize('backend', ['eager', 'fused'])
def test_two_threads_two_sizes_give_the_serial_answers(backend):
    model = _model(backend=None)
    timm_cbsa.configure_cbsa(model, backend=backend)
    xs = _inputs()
    ref = _serial(model, xs)
    # a square-grid-only reading of the tokens would be wrong at 3x6: the two sizes must give different poolings
    assert ref[SIZES[1]].shape == ref[SIZES[0]].shape
    results = _run_threads(model, xs)
    wrong = sum(not torch.equal(y, ref[hw]) for hw, ys in results.items() for y in ys)
    assert wrong == 0, f'{wrong} of {sum(map(len, results.values()))} threaded results differ from the serial ones'


def test_grid_follows_the_call_not_a_module_attribute():
    """The layer's pooling grid is the grid of the image it is called on: compare with an explicit-grid layer call."""
    model = _model()
    x = _inputs()[SIZES[1]]
    seen = {}
    blk = model.blocks[0]
    blk.attn.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    with torch.no_grad():
        model(x)
        y = blk.attn(seen['x'], grid_size=(3, 6))
        y_wrong = blk.attn(seen['x'], grid_size=(6, 3))
    out = {}
    blk.attn.register_forward_hook(lambda m, a, o: out.update(y=o))
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(out['y'], y, rtol=0, atol=0)
    assert not torch.allclose(out['y'], y_wrong)
    assert blk.attn.grid_size == (4, 4)   # the static grid is untouched by the 3x6 call


def test_deepcopy_and_pickle_keep_serial_answers():
    model = _model()
    xs = _inputs()
    ref = _serial(model, xs)
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (clone, loaded):
        # interleave calls on the original and the copy at different sizes
        with torch.no_grad():
            for hw in SIZES:
                a, b = other(xs[hw]), model(xs[SIZES[0] if hw == SIZES[1] else SIZES[1]])
                torch.testing.assert_close(a, ref[hw], rtol=0, atol=0)
        hooks = [h for h in other.patch_embed._forward_hooks.values() if isinstance(h, PatchGridHook)]
        assert len(hooks) == 1


def _replicate(module):
    """What torch.nn.parallel.replicate does per device, on CPU: shallow module copies (sharing the hooks dict
    entries) holding copies of the parameters."""
    rep = module._replicate_for_data_parallel()
    for name, p in module._parameters.items():
        setattr(rep, name, None if p is None else p.detach().clone())
    for name, child in module._modules.items():
        rep._modules[name] = None if child is None else _replicate(child)
    return rep


def test_data_parallel_replicas_keep_serial_answers():
    """``nn.DataParallel`` replicates the model (shallow module copies that share the hooks) and runs each replica
    in its own thread; emulate it on CPU with torch's replicate-style shallow copies and threads."""
    model = _model()
    xs = _inputs()
    ref = _serial(model, xs)
    replicas = [_replicate(model) for _ in xs]
    results = {}

    def work(rep, hw):
        with torch.no_grad():
            results[hw] = [rep(xs[hw]) for _ in range(10)]

    _join([threading.Thread(target=work, args=(rep, hw)) for rep, hw in zip(replicas, xs)])
    assert set(results) == set(xs), 'a replica thread failed (see the warnings)'
    for hw, ys in results.items():
        for y in ys:
            torch.testing.assert_close(y, ref[hw], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['eager', 'fused'])
def test_torch_compile_dynamic_img_size(backend):
    torch._dynamo.reset()
    model = _model()
    timm_cbsa.configure_cbsa(model, backend=backend)
    xs = _inputs()
    ref = _serial(model, xs)
    compiled = torch.compile(model, backend='aot_eager', dynamic=True)
    with torch.no_grad():
        for hw in list(SIZES) + list(SIZES):
            torch.testing.assert_close(compiled(xs[hw]), ref[hw], rtol=1e-5, atol=1e-5)
