"""tests/gpu/standalone.py, the pytest stand-in of the GPU script (a bare GPU image may have no pytest): the features
the GPU test files use — module-level skipif marks, autouse fixtures, parametrize with ids, monkeypatch, tmp_path and
caplog — behave as under pytest, and a failure makes the exit status non-zero."""
import subprocess
import sys
import textwrap
from pathlib import Path

RUNNER = Path(__file__).with_name('standalone.py')

MODULE = '''
import logging
import pytest

EVENTS = []

@pytest.fixture(autouse=True)
def _around():
    EVENTS.append('setup')
    yield
    EVENTS.append('teardown')

@pytest.mark.parametrize('a', [1, 2], ids=['one', 'two'])
@pytest.mark.parametrize('b', [10])
def test_params(a, b, monkeypatch, tmp_path):
    assert b == 10 and a in (1, 2) and tmp_path.is_dir()
    monkeypatch.setattr(logging, 'raiseExceptions', False)
    assert logging.raiseExceptions is False
    print('case', a, b)

def test_z_caplog_after_params(caplog):   # runs last (tests run in name order)
    assert logging.raiseExceptions is True   # the monkeypatch of the test before was undone
    with caplog.at_level(logging.WARNING, logger='demo.logger'):
        logging.getLogger('demo.logger').warning('fell back: %s', 'reason')
    assert [r.getMessage() for r in caplog.records] == ['fell back: reason']

def test_fixture_ran_around_each_test():
    assert EVENTS[-1] == 'setup' and EVENTS.count('teardown') == EVENTS.count('setup') - 1

@pytest.mark.skipif(True, reason='skip reason shown')
def test_skipped():
    raise AssertionError('must not run')
'''


def _run(tmp_path, source, name='test_demo.py'):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(RUNNER), str(path)], capture_output=True, text=True, timeout=120)


def test_runner_supports_what_the_gpu_tests_use(tmp_path):
    r = _run(tmp_path, MODULE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '0 failed, 4 passed, 1 skipped' in r.stdout, r.stdout
    assert 'case 1 10' in r.stdout and 'case 2 10' in r.stdout
    assert 'SKIPPED test_skipped: skip reason shown' in r.stdout


def test_module_level_skip_marks_apply_to_every_test(tmp_path):
    r = _run(tmp_path, '''
        import pytest
        pytestmark = [pytest.mark.gpu, pytest.mark.skipif(True, reason='needs a CUDA device')]
        def test_a():
            raise AssertionError('must not run')
        ''')
    assert r.returncode == 0 and '0 failed, 0 passed, 1 skipped' in r.stdout, r.stdout + r.stderr
    assert 'needs a CUDA device' in r.stdout


def test_a_failure_sets_the_exit_status_across_files(tmp_path):
    bad = tmp_path / 'test_bad.py'
    bad.write_text('def test_bad():\n    assert 1 == 2\n')
    good = tmp_path / 'test_good.py'
    good.write_text('def test_good():\n    pass\n')
    r = subprocess.run([sys.executable, str(RUNNER), str(bad), str(good)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
    assert 'FAILED test_bad' in r.stdout and 'PASSED test_good' in r.stdout
