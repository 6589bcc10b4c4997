"""Run timm's own model tests (tests/test_models.py of the *installed* timm version) for every model we register.

    python tests/timm_suite/run_timm_model_tests.py [--all] [extra pytest args]

Fetches the sdist of the installed timm with pip (``pip download --no-deps --no-binary :all: timm==X``; or set
``TIMM_SDIST_DIR`` to an already extracted ``timm-X`` folder), copies its ``tests/test_models.py`` unchanged except
that our models are added to timm's own lists the way timm lists its non-standard models (``NON_STD_FILTERS``: ViT
style models; ``FEAT_INTER_FILTERS``: modules with ``forward_intermediates``), and runs it with ``import timm_cbsa``
first and the parametrised model lists narrowed to our names. Exit status: pytest's (any failure fails CI).
"""
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUR_PATTERNS = ['cbsa_vit_*', 'cbt_*']      # added to NON_STD_FILTERS
OUR_MODULES = ['cbsa_vit', 'cbt', 'cbt_fmnist']           # added to FEAT_INTER_FILTERS (register_model module names)
# Left out, like timm's own CI leaves out its biggest models: test_prune_intermediate_layers_contract deep-copies the
# model and runs forward + backward once per block at 224 px, which for the 24-block ViT-L-sized models takes 15+ min
# each on a 2-core CPU. Every other test of the file runs for every name. --all runs these too.
SKIP_IN_CI = [('test_prune_intermediate_layers_contract', 'large')]

CONFTEST = '''
import fnmatch
import timm
import timm_cbsa  # noqa: F401  (registers our models before timm's test file lists them)

_list_models = timm.list_models
OURS = {ours!r}


def _ours_only(*args, **kwargs):
    return [m for m in _list_models(*args, **kwargs) if any(fnmatch.fnmatch(m, p) for p in OURS)]


timm.list_models = _ours_only   # the test file does `from timm import list_models` when it is imported
'''


def _sdist_tests(version: str, workdir: Path) -> Path:
    given = os.environ.get('TIMM_SDIST_DIR')
    if given:
        return Path(given) / 'tests'
    subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
                    f'timm=={version}', '-d', str(workdir)], check=True)
    archive = next(workdir.glob(f'timm-{version}.tar.gz'))
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter='data') if sys.version_info >= (3, 12) else tar.extractall(workdir)
    return workdir / f'timm-{version}' / 'tests'


def _add_to_list(text: str, name: str, items) -> str:
    new, n = re.subn(rf'^{name} = \[', f'{name} = [' + ''.join(f'{i!r}, ' for i in items), text, flags=re.M)
    if n != 1:
        raise SystemExit(f'timm test_models.py: expected one `{name} = [` line, found {n}; update this script.')
    return new


def main(argv) -> int:
    import timm
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tests = _sdist_tests(timm.__version__, tmp)
        text = (tests / 'test_models.py').read_text()
        text = _add_to_list(text, 'NON_STD_FILTERS', OUR_PATTERNS)
        text = _add_to_list(text, 'FEAT_INTER_FILTERS', OUR_MODULES)
        run = tmp / 'run'
        run.mkdir()
        (run / 'test_models.py').write_text(text)
        (run / 'conftest.py').write_text(CONFTEST.format(ours=OUR_PATTERNS))
        (run / 'pytest.ini').write_text('[pytest]\naddopts = -p no:cacheprovider\n'
                                        'filterwarnings = ignore::pytest.PytestUnknownMarkWarning\n')
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
                   HF_HUB_OFFLINE='1')
        print(f'timm {timm.__version__}: running its tests/test_models.py for {OUR_PATTERNS}', flush=True)
        select = '(' + ' or '.join(p.rstrip('*') for p in OUR_PATTERNS) + ')'
        if '--all' in argv:
            argv = [a for a in argv if a != '--all']
        else:
            select += ''.join(f' and not ({test} and {name})' for test, name in SKIP_IN_CI)
        cmd = [sys.executable, '-m', 'pytest', '-q', '-rfE', '--durations=10', '-c', str(run / 'pytest.ini'),
               '--rootdir', str(run), str(run / 'test_models.py'), '-k', select] + argv
        return subprocess.run(cmd, cwd=str(ROOT), env=env).returncode


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
