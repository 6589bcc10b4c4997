"""End-to-end tests of slurm.launch against a real SLURM cluster (see conftest.py / local_cluster.sh).

Every job runs the real trainer (train.train.main) on real Fashion-MNIST data through the launcher.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm import launch
from train.checkpoint import find_resume_checkpoint

ENTRY = "tests.slurm.slurm_entry:train_and_hash"
TRAIN = ["--dataset", "fashion_mnist", "--model", "cbsa_vit_tiny",
         "--model-kwargs", "patch_size=4", "rep_grid=4", "embed_dim=32", "depth=2", "num_heads=2",
         "--max-val-samples", "64", "-b", "16", "--epochs", "1", "--workers", "0", "--threads", "1",
         "--log-interval", "1", "--lr", "1e-3"]

pytestmark = pytest.mark.timeout(600)


def _common(cluster, job_dir) -> list:
    # --timeout 20: submitit calls a signal a time-out when the job ran >= min(0.8 T, T - 10 min) (any time at
    # all for T <= 10 min); with 20 min a signal in the first 10 minutes is a preemption, as on a real cluster
    return ["--partition", cluster["partition"], "--gpus-per-node", "0", "--cpus-per-task", "1",
            "--timeout", "20", "--signal-delay-s", "30", "--job-name", "cbsa-test", "--job-dir", str(job_dir)]


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State,ExitCode"],
                         capture_output=True, text=True).stdout.strip()
    return out.splitlines()[0] if out else ""


def _cluster_diag() -> str:
    out = []
    for cmd in (["squeue", "-o", "%i %T %r %N"], ["sinfo", "-N", "-o", "%N %T %E"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        out.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return "\n".join(out)


def _wait_for(cond, timeout: float, what: str, poll: float = 0.5, folder: Path = None):
    t0 = time.time()
    while True:
        v = cond()
        if v:
            return v
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{_cluster_diag()}\n"
                                 + (_log_tail(folder) if folder is not None else ""))
        time.sleep(poll)


def _log_tail(folder: Path) -> str:
    parts = []
    for p in sorted(folder.glob("*_log.*")):
        parts.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(parts)


def _job_folder(job) -> Path:
    return Path(str(job.paths.folder))


def test_ddp_multinode_and_multitask_train_identical_weights(slurm_cluster, in_repo_root, tmp_path):
    """(a) 2 nodes x 1 task and 1 node x 2 tasks: gloo process group, a few real training steps, same weights."""
    layouts = {"2x1": (2, 1), "1x2": (1, 2)}
    jobs = {}
    t0 = time.time()
    for name, (nodes, tpn) in layouts.items():
        argv = [*_common(slurm_cluster, tmp_path / name / "%j"), "--nodes", str(nodes), "--tasks-per-node",
                str(tpn), "--entry", ENTRY, *TRAIN, "--max-train-samples", "256", "--max-steps", "4"]
        jobs[name] = launch.submit(*launch.prepare(argv))
    for name, job in jobs.items():
        nodes, tpn = layouts[name]
        world = nodes * tpn
        try:
            results = job.results()
        except Exception as e:  # show the job logs on failure
            raise AssertionError(f"{name} job {job.job_id} failed: {e}\n{_log_tail(_job_folder(job))}") from e
        print(f"{name}: job {job.job_id} done after {time.time() - t0:.1f}s: "
              f"{[(r['rank'], r['node'], r['step'], r['weights_sha256'][:12]) for r in results]}")
        assert sorted(r["rank"] for r in results) == list(range(world))
        assert all(r["world_size"] == world for r in results)
        assert all(r["step"] == 4 for r in results), results
        assert all(0.0 <= r["top1"] <= 100.0 for r in results)
        # every rank wrote its final-weights hash into the job folder; all identical
        folder = _job_folder(job)
        files = sorted(folder.glob("weights_rank*.json"))
        assert len(files) == world, files
        infos = [json.loads(f.read_text()) for f in files]
        hashes = {i["weights_sha256"] for i in infos}
        assert len(hashes) == 1 and None not in hashes, infos
        # one rendezvous for all ranks, on the first node of the allocation (where rank 0 runs)
        assert len({i["master"] for i in infos}) == 1
        rank0 = next(i for i in infos if i["rank"] == 0)
        assert rank0["master"].rsplit(":", 1)[0] == rank0["node"], infos
        used_nodes = {i["node"] for i in infos}
        assert len(used_nodes) == nodes, infos
        assert sorted(i["local_rank"] for i in infos) == sorted(list(range(tpn)) * nodes)
        # training output went to the job folder (%j expanded), including a checkpoint
        assert find_resume_checkpoint(str(folder))[1]["global_step"] == 4, sorted(p.name for p in folder.iterdir())
        assert folder.name == str(job.job_id)
        assert _wait_for(lambda: _sacct_state(job.job_id).startswith("COMPLETED"), 60, "COMPLETED in sacct")


def _steps_logged(log_text: str):
    return [int(m.group(1)) for m in re.finditer(r"Train [\d/]+ \[\d+/\d+\] step (\d+)\b", log_text)]


def _resumed_steps(log_text: str):
    return [int(m.group(1)) for m in re.finditer(r"Resumed from .*global step (\d+)", log_text)]


def _signal_ckpt_steps(log_text: str):
    return [int(m.group(1)) for m in re.finditer(r"Preemption signal: checkpoint written .*optimizer step (\d+)",
                                                 log_text)]


def _max_step(folder: Path) -> int:
    log = folder / "log.txt"
    steps = _steps_logged(log.read_text(errors="replace")) if log.exists() else []
    return max(steps) if steps else 0


@pytest.mark.parametrize("how", ["preemption", "time_limit_signal", "scontrol_requeue"])
def test_signal_checkpoint_requeue_resume_continues_step_counter(slurm_cluster, in_repo_root, tmp_path, how):
    """Issue 13.6: with --checkpoint-interval-steps 0 (no periodic checkpoint) a job signalled mid-epoch writes a
    checkpoint at the next step boundary *before* it is requeued, and the requeued run resumes from that step.

    preemption:        ``job._interrupt()`` = ``scancel --signal TERM`` then ``--signal USR2`` to every task (2
                       nodes x 1 task: rank 1 gets the signals too and must leave, not train on alone);
    time_limit_signal: ``job._interrupt(timeout=True)`` = USR2 only, what ``#SBATCH --signal=USR2@N`` sends
                       before the time limit (1 task);
    scontrol_requeue:  SLURM's own requeue: SIGTERM to every task, SIGKILL after KillWait (1 node x 2 tasks).
    """
    max_steps = 30
    layout = {"preemption": ["--nodes", "2", "--tasks-per-node", "1"],
              "time_limit_signal": ["--nodes", "1", "--tasks-per-node", "1"],
              "scontrol_requeue": ["--nodes", "1", "--tasks-per-node", "2"]}[how]
    argv = [*_common(slurm_cluster, tmp_path / "%j"), *layout, "--entry", ENTRY, *TRAIN,
            "--max-train-samples", "1024", "--max-steps", str(max_steps), "--checkpoint-interval-steps", "0",
            "--preempt-check-interval", "1", "--debug-step-delay", "0.7"]
    t0 = time.time()
    job = launch.submit(*launch.prepare(argv))
    folder = Path(str(job.paths.folder).replace("%j", str(job.job_id)))
    _wait_for(lambda: _max_step(folder) >= 4, 240, f"step >= 4 logged in {folder}", folder=folder)
    seen = _max_step(folder)
    assert not list(folder.glob("*.pth.tar")), "no checkpoint may exist before the signal (interval 0)"
    t_sig = time.time()
    if how == "scontrol_requeue":
        subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True, capture_output=True, text=True)
    else:
        job._interrupt(timeout=how == "time_limit_signal")
    try:
        results = job.results()
    except Exception as e:
        raise AssertionError(f"job {job.job_id} failed after {how}: {e}\n{_log_tail(folder)}") from e
    log_text = (folder / "log.txt").read_text(errors="replace")
    resumed, saved = _resumed_steps(log_text), _signal_ckpt_steps(log_text)
    print(f"{how}: job {job.job_id} signalled after {t_sig - t0:.1f}s at logged step {seen}; checkpoint at step "
          f"{saved}; resumed at {resumed}; done after {time.time() - t0:.1f}s; "
          f"restarts {[r['restart'] for r in results]}")
    # the checkpoint was written by the signal, at the step boundary after it (at most the current step lost)
    assert len(saved) == 1, f"expected one signal-time checkpoint:\n{log_text[-3000:]}"
    assert seen <= saved[0] <= seen + 3, (seen, saved)
    assert resumed == saved, f"the requeued run must resume at the signalled step:\n{log_text[-3000:]}"
    assert all(r["step"] == max_steps for r in results), results
    assert all(r["restart"] >= 1 for r in results), results
    # after the restart the step counter continues from the checkpoint instead of restarting at 1
    after = _steps_logged(log_text[log_text.rindex("Resumed from"):])
    assert after and after[0] == saved[0] + 1, after
    assert after == list(range(after[0], after[0] + len(after))), after
    assert len({json.loads(f.read_text())["weights_sha256"] for f in folder.glob("weights_rank*.json")}) == 1
    logs = {p.name: p.read_text(errors="replace") for p in folder.glob("*_log.*")}
    task0 = logs.get(f"{job.job_id}_0_log.out", "") + logs.get(f"{job.job_id}_0_log.err", "")
    assert "restart 1" in task0, task0[-2000:]
    if how != "scontrol_requeue":
        # submitit's handler ran after the trainer's checkpoint (else interval 0 would leave nothing to resume
        # from) and requeued the job itself, as a preemption (no time-out used up)
        assert "Caught signal SIGUSR2" in task0 and "this job is preempted" in task0, task0[-3000:]
        assert re.search(r"Requeued job \d+ \(30 remaining timeouts\)", task0), task0[-3000:]
        if how == "preemption":  # rank 1 got the signals too; it wrote the checkpoint with rank 0, then submitit
            task1 = logs.get(f"{job.job_id}_1_log.err", "")  # left the requeue to rank 0
            assert "Not checkpointing nor requeuing since I am a slave (procid=1)" in task1, task1[-3000:]
            assert "Preemption signal: checkpoint written" in task1, task1[-3000:]
    else:
        assert "Requeued job" not in task0  # SLURM requeued it; submitit's USR2 path was not involved


def test_failing_job_shows_traceback_and_nonzero_state(slurm_cluster, in_repo_root, tmp_path):
    """(c) a job whose training raises (a NaN loss, which no check before submission can see): FAILED in SLURM,
    non-zero exit code, traceback surfaced by --wait."""
    cmd = [sys.executable, "-m", "slurm.launch", *_common(slurm_cluster, tmp_path / "%j"), "--nodes", "1",
           "--tasks-per-node", "1", "--wait", *TRAIN, "--max-train-samples", "64", "--debug-nan-at-step", "1"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=in_repo_root)
    print(f"failing job: launcher rc={r.returncode} after {time.time() - t0:.1f}s")
    assert r.returncode == 1, (r.stdout, r.stderr)
    m = re.search(r"Submitted job (\d+)", r.stdout)
    assert m, r.stdout
    job_id = m.group(1)
    assert "Traceback (most recent call last)" in r.stderr, r.stderr
    assert "NonFiniteLossError" in r.stderr, r.stderr
    assert f"job {job_id} failed" in r.stderr
    state = _wait_for(lambda: (s := _sacct_state(job_id)) and not s.startswith(("RUNNING", "PENDING",
                                                                                  "COMPLETING")) and s,
                      60, "final state in sacct")
    st, exit_code = state.split("|")
    assert st == "FAILED", state
    assert exit_code.split(":")[0] != "0", state


def test_unknown_partition_is_reported(slurm_cluster, in_repo_root, tmp_path, capsys):
    """Bad input: SLURM's own error for an unknown partition is surfaced; the launcher exits non-zero."""
    argv = [*_common(slurm_cluster, tmp_path / "%j"), "--partition", "no_such_partition", "--nodes", "1",
            "--tasks-per-node", "1", "--entry", ENTRY, *TRAIN, "--max-steps", "1"]
    rc = launch.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "SLURM rejected the submission" in err
    assert "Invalid partition name specified" in err, err


@pytest.mark.parametrize("extra, slurm_error", [
    (["--nodes", "5"], "More processors requested than permitted"),
    (["--cpus-per-task", "64"], "More processors requested than permitted"),
    (["--gpus-per-node", "8", "--cpus-per-task", "1"], "Invalid generic resource (gres) specification"),
    (["--mem", "999999"], "Requested node configuration is not available"),
], ids=["nodes", "cpus", "gpus", "mem"])
def test_impossible_resources_are_reported(slurm_cluster, in_repo_root, tmp_path, capsys, extra, slurm_error):
    """Bad input: resources the cluster cannot provide -> SLURM's own sbatch error, non-zero exit."""
    argv = [*_common(slurm_cluster, tmp_path / "%j"), "--tasks-per-node", "1", *extra, "--entry", ENTRY,
            *TRAIN, "--max-steps", "1"]
    rc = launch.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "SLURM rejected the submission" in err
    assert slurm_error in err, err


def test_missing_training_flags_not_submitted(slurm_cluster, in_repo_root, tmp_path, capsys):
    """A training flag without its value is caught by the trainer's parser before sbatch is called."""
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    job_dir = tmp_path / "jobs"
    argv = [*_common(slurm_cluster, job_dir / "%j"), "--nodes", "1", "--tasks-per-node", "1",
            "--dataset", "fashion_mnist", "--model"]
    rc = launch.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "--model: expected one argument" in err, err
    assert "nothing was submitted" in err
    assert not job_dir.exists() or not any(job_dir.rglob("*.pkl"))
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)


@pytest.mark.slow
def test_real_time_limit_signal_checkpoints_and_requeues(slurm_cluster, in_repo_root, tmp_path):
    """The time-limit path as SLURM drives it: ``--timeout 3 --signal-delay-s 60`` makes slurmctld send USR2 about a
    minute before the limit (its time-limit check runs every ~30 s); the trainer checkpoints at the next step,
    submitit sees a *time-out* (wall time vs --timeout) and requeues with one time-out fewer left; the next run
    resumes at the signalled step. The job would run for minutes, so the test cancels it after the resume."""
    argv = [*_common(slurm_cluster, tmp_path / "%j"), "--timeout", "3", "--signal-delay-s", "60", "--nodes", "1",
            "--tasks-per-node", "1", "--entry", ENTRY, *TRAIN, "--max-train-samples", "4096", "--max-steps", "400",
            "--checkpoint-interval-steps", "0", "--debug-step-delay", "1.0"]
    t0 = time.time()
    job = launch.submit(*launch.prepare(argv))
    folder = Path(str(job.paths.folder))

    def resumed():
        log = folder / "log.txt"
        return _resumed_steps(log.read_text(errors="replace")) if log.exists() else []

    try:
        _wait_for(lambda: resumed() and _max_step(folder) > resumed()[-1], 400, "a resumed run past its first step",
                  poll=2, folder=folder)
    finally:
        subprocess.run(["scancel", str(job.job_id)], capture_output=True)
    log_text = (folder / "log.txt").read_text(errors="replace")
    saved = _signal_ckpt_steps(log_text)
    err0 = "".join(p.read_text(errors="replace") for p in folder.glob(f"{job.job_id}_0_log.*"))
    print(f"time limit: job {job.job_id} checkpoint at step {saved}, resumed at {resumed()}, "
          f"{time.time() - t0:.1f}s")
    assert "Caught signal SIGUSR2" in err0 and "this job is timed-out" in err0, err0[-3000:]
    assert re.search(r"Requeued job \d+ \(29 remaining timeouts\)", err0), err0[-3000:]
    assert saved and resumed()[0] == saved[0] > 0, log_text[-3000:]
