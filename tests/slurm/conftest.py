"""Fixtures for the SLURM tests: a real single-machine SLURM cluster (tests/slurm/local_cluster.sh).

The session fixture ``slurm_cluster`` installs the Debian packages when missing (apt-get, needs root), starts
munged, MariaDB, slurmdbd, slurmctld and two slurmd (emulated nodes node1/node2) on 127.0.0.1 with all state
under a temporary directory, waits until both nodes are idle, and stops exactly those daemons (by PID) at the
end of the session.

If the cluster cannot be installed or started the SLURM tests are skipped with the reason — except under CI
(``CI=true``), where they fail with it. ``CBSA_SLURM_KEEP=1`` keeps the temp dir (logs) after the session.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
SCRIPT = HERE / "local_cluster.sh"
PARTITION = "debug"
_TIMINGS: dict = {}

if str(REPO_ROOT) not in sys.path:  # `slurm` and `train` are imported from the repo root
    sys.path.insert(0, str(REPO_ROOT))


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        terminalreporter.write_sep("-", "local SLURM cluster")
        for k, v in _TIMINGS.items():
            terminalreporter.write_line(f"{k}: {v}")


def _unavailable(reason: str):
    reason = f"local SLURM cluster unavailable: {reason}"
    _TIMINGS["status"] = reason
    if _on_ci():
        pytest.fail(reason + " (CI=true: SLURM tests must run)", pytrace=False)
    pytest.skip(reason)


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def _needs_install() -> bool:
    if not os.path.exists(FASHION_MNIST):
        return True
    bins = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/slurmdbd", "/usr/sbin/munged",
            "/usr/sbin/mariadbd", "/usr/bin/sbatch", "/usr/bin/sacct"]
    return not all(os.path.exists(b) for b in bins)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.name != "posix" or not sys.platform.startswith("linux"):
        _unavailable("needs Linux")
    if os.geteuid() != 0:
        _unavailable("needs root (the daemons and apt-get run as root)")
    if _needs_install():
        if shutil.which("apt-get") is None:
            _unavailable("SLURM is not installed and apt-get is not available")
        t0 = time.time()
        r = _run_script("install", "dataset-fashion-mnist", timeout=900)
        _TIMINGS["apt install (slurm, munge, slurmdbd, mariadb)"] = f"{time.time() - t0:.1f}s"
        if r.returncode != 0:
            _unavailable(f"package installation failed:\n{r.stderr[-3000:]}")
    else:
        _TIMINGS["apt install"] = "packages already installed"
    base = tempfile.mkdtemp(prefix="cbsa-slurm-")
    t0 = time.time()
    try:
        r = _run_script("start", base, timeout=300)
    except subprocess.TimeoutExpired:
        r = None
    _TIMINGS["cluster start (config + daemons + nodes idle)"] = f"{time.time() - t0:.1f}s"
    if r is None or r.returncode != 0:
        log = "timed out"
        if r is not None:
            errors = [ln for ln in r.stderr.splitlines() if "ERROR" in ln]
            log = "\n".join(errors + ["--- local_cluster.sh output:", r.stderr[-3000:]])
        tails = []
        for name in ("slurmctld.log", "slurmdbd.log", "slurmd-node1.log", "mariadbd.err"):
            p = Path(base, "log", name)
            if p.exists():
                tails.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]))
        _run_script("stop", base, timeout=120)
        if not os.environ.get("CBSA_SLURM_KEEP"):
            shutil.rmtree(base, ignore_errors=True)
        _unavailable(f"cluster start failed:\n{log}\n" + "\n".join(tails))
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = os.path.join(base, "etc", "slurm.conf")
    try:
        yield dict(base=base, partition=PARTITION, slurm_conf=os.environ["SLURM_CONF"])
    finally:
        t0 = time.time()
        _run_script("stop", base, timeout=300)
        _TIMINGS["cluster stop"] = f"{time.time() - t0:.1f}s"
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if os.environ.get("CBSA_SLURM_KEEP"):
            _TIMINGS["kept"] = base
        else:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def in_repo_root(monkeypatch):
    """Jobs inherit the submitting process' working directory: make it the repo root so that the job's
    ``python -m submitit.core._submit`` can import ``slurm``, ``train`` and ``tests.slurm``."""
    monkeypatch.chdir(REPO_ROOT)
    return REPO_ROOT
