"""Run a test module without pytest (a bare GPU machine may have only torch and timm): the few pytest features the
GPU tests use — mark.parametrize / skipif, pytest.skip, the monkeypatch, tmp_path and caplog fixtures — and a runner.

    python tests/gpu/standalone.py tests/gpu/test_gpu_backends.py tests/kernels/test_triton_cuda.py
"""
import contextlib
import importlib.util
import inspect
import itertools
import logging
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path


class Skipped(Exception):
    pass


class _Mark:
    def __getattr__(self, name):          # pytest.mark.<anything> (gpu, slow, ...) as a no-op decorator
        return lambda *a, **k: (a[0] if len(a) == 1 and callable(a[0]) and not k else (lambda f: f))

    def parametrize(self, names, values, ids=None):   # ids: labels are built from the values
        def deco(fn):
            fn.__dict__.setdefault('_params', []).insert(0, ([n.strip() for n in names.split(',')], list(values)))
            return fn
        return deco

    def skipif(self, condition, reason=''):
        def deco(fn):
            if condition:
                fn._skip = reason
            return fn
        return deco


def _skip(reason=''):
    raise Skipped(reason)


def _fixture(fn=None, *, autouse=False, **_):
    """pytest.fixture: only autouse generator fixtures (set-up, yield, tear-down around every test) are supported."""
    def deco(f):
        f._autouse = autouse
        return f
    return deco(fn) if callable(fn) else deco


pytest_shim = types.SimpleNamespace(mark=_Mark(), skip=_skip, fixture=_fixture,
                                    fail=lambda msg='': (_ for _ in ()).throw(AssertionError(msg)))


class MonkeyPatch:
    def __init__(self):
        self._undo = []

    def setattr(self, target, name, value):
        old = getattr(target, name)
        self._undo.append(lambda: setattr(target, name, old))
        setattr(target, name, value)

    def setitem(self, d, key, value):
        missing = key not in d
        old = d.get(key)
        self._undo.append(lambda: d.pop(key, None) if missing else d.__setitem__(key, old))
        d[key] = value

    def undo(self):
        for f in reversed(self._undo):
            f()
        self._undo.clear()


class LogCapture:
    """pytest's ``caplog``, the part the GPU tests use: ``records`` and ``at_level(level, logger=name)``."""

    def __init__(self):
        self.records = []
        self._handler = logging.Handler()
        self._handler.emit = self.records.append

    @contextlib.contextmanager
    def at_level(self, level, logger=None):
        log = logging.getLogger(logger)
        old = log.level
        log.setLevel(level)
        log.addHandler(self._handler)
        try:
            yield
        finally:
            log.removeHandler(self._handler)
            log.setLevel(old)


def _cases(fn):
    groups = getattr(fn, '_params', [])
    for combo in itertools.product(*[vals for _, vals in groups]):
        kwargs = {}
        for (names, _), val in zip(groups, combo):
            vals = val if len(names) > 1 else (val,)
            kwargs.update(zip(names, vals))
        yield kwargs


def main(path: str) -> int:
    sys.modules.setdefault('pytest', pytest_shim)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'support'))
    spec = importlib.util.spec_from_file_location('gpu_tests_' + Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    counts = {'passed': 0, 'failed': 0, 'skipped': 0}
    autouse = [f for _, f in inspect.getmembers(mod, inspect.isfunction) if getattr(f, '_autouse', False)]
    marks = getattr(mod, 'pytestmark', [])                     # module-level marks (skipif, gpu)
    marks = marks if isinstance(marks, list) else [marks]
    start = time.time()
    for name, fn in inspect.getmembers(mod, inspect.isfunction):
        if not name.startswith('test_') or fn.__module__ != mod.__name__:
            continue
        for mark in marks:
            fn = mark(fn) or fn
        for kwargs in _cases(fn):
            label = name + (f'[{"-".join(str(v) for v in kwargs.values())}]' if kwargs else '')
            mp, tmp = MonkeyPatch(), tempfile.TemporaryDirectory()
            params = inspect.signature(fn).parameters
            if 'monkeypatch' in params:
                kwargs['monkeypatch'] = mp
            if 'tmp_path' in params:
                kwargs['tmp_path'] = Path(tmp.name)
            if 'caplog' in params:
                kwargs['caplog'] = LogCapture()
            active = []
            try:
                if getattr(fn, '_skip', None):
                    raise Skipped(fn._skip)
                for fixture in autouse:
                    gen = fixture()
                    next(gen)
                    active.append(gen)
                fn(**kwargs)
                counts['passed'] += 1
                print(f'PASSED {label}', flush=True)
            except Skipped as e:
                counts['skipped'] += 1
                print(f'SKIPPED {label}: {e}', flush=True)
            except Exception:  # noqa: BLE001
                counts['failed'] += 1
                print(f'FAILED {label}\n{traceback.format_exc()}', flush=True)
            finally:
                for gen in reversed(active):
                    next(gen, None)
                mp.undo()
                tmp.cleanup()
    print(f"{counts['failed']} failed, {counts['passed']} passed, {counts['skipped']} skipped "
          f'in {time.time() - start:.1f}s')
    return 1 if counts['failed'] else 0


if __name__ == '__main__':
    sys.exit(max(main(path) for path in sys.argv[1:]) if len(sys.argv) > 1 else 2)
