"""``python -m slurm.launch --script PATH`` on the real local SLURM cluster, with timm's own train.py.

timm's train.py is not in timm's wheel. The test takes it from ``CBSA_TIMM_TRAIN_PY`` (train.py of a
pytorch-image-models checkout at the installed timm version) or, failing that, from the sdist of the installed
version (``pip download --no-deps --no-binary :all: timm==<version>``); it is skipped with the reason when
neither has it. Data: a tiny generated ImageFolder (2 classes, 32x32 PNGs) written by the test.
"""
from __future__ import annotations

import csv
import glob
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from slurm import launch

from tests.slurm.test_slurm_cluster import _common, _log_tail, _wait_for

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="session")
def timm_train_py(tmp_path_factory) -> str:
    env = os.environ.get("CBSA_TIMM_TRAIN_PY")
    if env:
        if not os.path.isfile(env):
            pytest.fail(f"CBSA_TIMM_TRAIN_PY={env}: no such file")
        return env
    import timm

    d = tmp_path_factory.mktemp("timm-sdist")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"timm=={timm.__version__}", "-d", str(d)], capture_output=True, text=True, timeout=300)
    archives = glob.glob(str(d / "timm-*.tar.gz"))
    if r.returncode != 0 or not archives:
        pytest.skip(f"could not download timm {timm.__version__}'s sdist: {r.stderr.strip()[-500:]}")
    with tarfile.open(archives[0]) as tf:
        members = [m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/train.py")]
        if not members:
            pytest.skip(f"timm {timm.__version__}'s sdist has no train.py (only the timm package); set "
                        f"CBSA_TIMM_TRAIN_PY to train.py of a pytorch-image-models checkout at v{timm.__version__}")
        tf.extractall(d, members=members, filter="data")
    return str(d / members[0].name)


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> Path:
    """2 classes x 16 train / 4 validation images, 32x32 RGB; class 1 has a bright left half."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("validation", 4)):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
                if c:
                    a[:, :16] = 255
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def _timm_flags(data: Path, epochs: int) -> list:
    return ["--data-dir", str(data), "--device-modules", "timm_cbsa", "--model", "cbsa_vit_tiny",
            "--model-kwargs", "img_size=32", "patch_size=4", "rep_grid=4", "embed_dim=32", "depth=2", "num_heads=2",
            "--img-size", "32", "--num-classes", "2", "--device", "cpu", "--no-prefetcher", "-j", "0", "-b", "8",
            "--epochs", str(epochs), "--warmup-epochs", "0", "--lr", "1e-3", "--log-interval", "1",
            "--seed", "0"]


def _summary_epochs(run_dir: Path) -> list:
    p = run_dir / "summary.csv"
    if not p.exists():
        return []
    lines = [ln for ln in p.read_text().splitlines() if ln and not ln.startswith("epoch")]
    return [int(float(r[0])) for r in csv.reader(lines)]


def test_timm_train_py_runs_by_path_and_resumes(timm_train_py, slurm_cluster, in_repo_root, tmp_path,
                                                tiny_image_folder):
    """timm's train.py via --script, one task (timm's train.py wraps DDP with device_ids=[device], which torch
    refuses for CPU modules, so it cannot run multi-process on CPU; the env it reads is the one the multi-node
    tests check), one epoch;
    a second job on the same run folder resumes from its last.pth.tar; a preemption of that job requeues it and
    the restarted run resumes from the newest checkpoint, so the epochs in summary.csv continue 0, 1, 2, ..."""
    out = tmp_path / "out"
    common = [*_common(slurm_cluster, tmp_path / "jobs" / "%j"), "--nodes", "1", "--tasks-per-node", "1",
              "--script", timm_train_py]
    t0 = time.time()
    job = launch.submit(*launch.prepare([*common, *_timm_flags(tiny_image_folder, 1), "--output", str(out),
                                         "--experiment", "exp"]))
    try:
        results = job.results()
    except Exception as e:
        raise AssertionError(f"job {job.job_id} failed: {e}\n{_log_tail(Path(str(job.paths.folder)))}") from e
    t1 = time.time()
    run_dir = out / "exp"
    print(f"timm train.py, 1 epoch: {t1 - t0:.1f}s")
    assert [r["rank"] for r in results] == [0]
    assert all(r["resumed_from"] is None and r["run_dir"] == str(run_dir) for r in results)
    assert _summary_epochs(run_dir) == [0]
    assert (run_dir / "last.pth.tar").exists() and (run_dir / "checkpoint-0.pth.tar").exists()
    log0 = "\n".join(p.read_text(errors="replace") for p in Path(str(job.paths.folder)).glob("*_log.*"))
    assert "Training with a single process on 1 device (cpu)" in log0, log0[-3000:]

    # a second job (more epochs, same run folder) resumes from the first one's last.pth.tar
    job2 = launch.submit(*launch.prepare([*common, *_timm_flags(tiny_image_folder, 40), "--output", str(out),
                                          "--experiment", "exp"]))
    folder2 = Path(str(job2.paths.folder))
    _wait_for(lambda: len(_summary_epochs(run_dir)) >= 2, 400, "epoch 1 of the second job", folder=folder2)
    job2._interrupt()  # preemption: SIGTERM (bypassed by submitit) then USR2 -> checkpoint() -> requeue
    _wait_for(lambda: "restart 1" in "".join(p.read_text(errors="replace") for p in folder2.glob("*_0_log.out")),
              300, "the requeued run", folder=folder2)
    n_before = len(_summary_epochs(run_dir))
    _wait_for(lambda: len(_summary_epochs(run_dir)) > n_before, 400, "an epoch after the requeue", folder=folder2)
    subprocess.run(["scancel", str(job2.job_id)], capture_output=True)
    epochs = _summary_epochs(run_dir)
    log = "".join(p.read_text(errors="replace") for p in folder2.glob("*_0_log.*"))
    resumed = re.findall(r"\[slurm\.launch\] resuming from (\S+)", log)
    print(f"second job {job2.job_id}: epochs {epochs}; resumed from {resumed}; {time.time() - t1:.1f}s")
    assert resumed[0] == str(run_dir / "last.pth.tar"), log[-3000:]
    assert len(resumed) >= 2 and all(r == str(run_dir / "last.pth.tar") for r in resumed), log[-3000:]
    assert epochs == list(range(len(epochs))), epochs  # no epoch trained twice, none skipped
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log, log[-3000:]


def test_script_by_path_is_requeued_and_resumed_from_its_run_folder(slurm_cluster, in_repo_root, tmp_path):
    """--script with this repository's trainer run as a plain script (tests/slurm/train_script.py; runs in CI where
    timm's train.py is absent): the job is requeued on preemption through the launcher's checkpointable wrapper
    and the restarted script gets ``--resume <run folder>/last.pth.tar``, the checkpoint written at the signal."""
    from tests.slurm.test_slurm_cluster import TRAIN, _resumed_steps, _signal_ckpt_steps, _steps_logged

    script = str(in_repo_root / "tests" / "slurm" / "train_script.py")
    argv = [*_common(slurm_cluster, tmp_path / "%j"), "--nodes", "1", "--tasks-per-node", "1", "--script", script,
            *TRAIN, "--max-train-samples", "1024", "--max-steps", "20", "--checkpoint-interval-steps", "0",
            "--debug-step-delay", "0.7"]
    t0 = time.time()
    job = launch.submit(*launch.prepare(argv))
    folder = Path(str(job.paths.folder))
    run_dir = folder / "train"  # --output <job folder> --experiment train, added by the launcher

    def logged_step():
        p = run_dir / "log.txt"
        steps = _steps_logged(p.read_text(errors="replace")) if p.exists() else []
        return max(steps) if steps else 0

    _wait_for(lambda: logged_step() >= 4, 240, "step >= 4", folder=folder)
    job._interrupt()
    try:
        results = job.results()
    except Exception as e:
        raise AssertionError(f"job {job.job_id} failed: {e}\n{_log_tail(folder)}") from e
    log = (run_dir / "log.txt").read_text(errors="replace")
    saved, resumed = _signal_ckpt_steps(log), _resumed_steps(log)
    print(f"--script train_script.py: job {job.job_id} checkpoint at step {saved}, resumed at {resumed}, "
          f"{time.time() - t0:.1f}s")
    assert len(results) == 1 and results[0]["restart"] == 1, results
    ckpt = results[0]["resumed_from"]  # the newest checkpoint of the run folder: the signal-time one
    assert ckpt and Path(ckpt).parent == run_dir and Path(ckpt).exists(), results
    assert results[0]["argv"][-2:] == ["--resume", ckpt]
    assert len(saved) == 1 and resumed == saved, log[-3000:]
    assert re.search(rf"Resumed from {re.escape(ckpt)}\b.*global step {saved[0]}\b", log), log[-3000:]
