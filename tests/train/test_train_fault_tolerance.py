"""Fault tolerance: SIGKILL mid-epoch + resume == uninterrupted run; atomic writes; torchrun on CPU."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.checkpoint import (  # noqa: E402
    atomic_torch_save, clean_stale_tmp, find_resume_checkpoint, load_checkpoint_file,
)

RUN = ["--dataset", "synthetic", "--img-size", "16", "--num-classes", "4",
       "--model", "cbsa_vit_tiny", "--model-kwargs", "patch_size=4", "rep_grid=2", "embed_dim=32", "depth=1",
       "num_heads=2", "--drop-path", "0.1", "--batch-size", "16", "--max-train-samples", "192",
       "--max-val-samples", "32", "--epochs", "2", "--opt", "adamw", "--lr", "3e-3", "--sched", "cosine",
       "--sched-on-updates", "--warmup-epochs", "1", "--model-ema", "--model-ema-decay", "0.9",
       "--scale", "0.6", "1.0", "--hflip", "0.5", "--color-jitter", "0", "--workers", "0", "--seed", "3",
       "--threads", "1", "--deterministic", "--checkpoint-interval-steps", "3", "--log-interval", "1"]
STEPS = 2 * (192 // 16)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train(args, timeout=240):
    p = subprocess.run([sys.executable, "-m", "train.train"] + args, cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _ckpt_step(folder):
    try:
        return find_resume_checkpoint(str(folder))[1]["global_step"]
    except Exception:
        return -1


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    ref, broken = tmp_path / "ref", tmp_path / "broken"
    _train(RUN + ["--output", str(ref)])

    # interrupted run: slowed down so we can kill it after a mid-epoch checkpoint of epoch 1
    proc = subprocess.Popen([sys.executable, "-m", "train.train"] + RUN + ["--output", str(broken),
                            "--debug-step-delay", "0.25"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    step_at_kill = -1
    try:
        while time.time() < deadline and proc.poll() is None:
            s = _ckpt_step(broken)
            if s >= 15:  # mid-epoch checkpoint in epoch 1 (steps 13..24)
                step_at_kill = s
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and step_at_kill < 0:
            proc.kill()
        proc.wait()
    assert step_at_kill >= 15 and proc.returncode == -signal.SIGKILL, "process was not killed mid-run"
    ck = find_resume_checkpoint(str(broken))[1]
    assert not ck["epoch_complete"] and ck["epoch"] == 1 and ck["global_step"] < STEPS

    p = _train(RUN + ["--output", str(broken), "--resume", "auto"])
    out = p.stdout + p.stderr
    assert f"global step {ck['global_step']}" in out  # resumed from the kill-time checkpoint, nothing older

    a = load_checkpoint_file(str(ref / "last.pth.tar"))
    b = load_checkpoint_file(str(broken / "last.pth.tar"))
    assert a["global_step"] == b["global_step"] == STEPS
    for key in ("state_dict", "state_dict_ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), f"{key}/{k} differs after kill+resume"
    # the interrupted run's summary has one row per epoch like the reference one
    assert len((broken / "summary.csv").read_text().strip().splitlines()) == 3


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    target = tmp_path / "last.pth.tar"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, str(target))
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from train import checkpoint
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"partial-bytes" * 1000); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.torch.save = dying_save
        checkpoint.atomic_torch_save({{"state_dict": {{"w": torch.zeros(3)}}, "global_step": 8}}, {str(target)!r})
    """)
    p = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert leftovers, "the killed writer should have left its temp file"
    ck = load_checkpoint_file(str(target))
    assert ck["global_step"] == 7 and torch.equal(ck["state_dict"]["w"], torch.ones(3))
    path, found = find_resume_checkpoint(str(tmp_path))
    assert path == str(target) and found["global_step"] == 7
    assert clean_stale_tmp(str(tmp_path)) == leftovers
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_corrupt_last_falls_back_to_epoch_checkpoint(tmp_path):
    atomic_torch_save({"state_dict": {}, "global_step": 10}, str(tmp_path / "checkpoint-0.pth.tar"))
    (tmp_path / "last.pth.tar").write_bytes(b"truncated")
    path, ck = find_resume_checkpoint(str(tmp_path))
    assert path.endswith("checkpoint-0.pth.tar") and ck["global_step"] == 10
    assert find_resume_checkpoint(str(tmp_path / "empty")) is None


@pytest.mark.skipif(shutil.which("torchrun") is None and not hasattr(torch.distributed, "run"),
                    reason="torchrun unavailable")
def test_torchrun_two_cpu_processes_gloo(tmp_path):
    args = RUN[:]
    args[args.index("--epochs") + 1] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "train.train"] + args + ["--output", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ck = load_checkpoint_file(str(tmp_path / "last.pth.tar"))
    # 192 samples / 2 ranks / batch 16 = 6 optimizer steps per epoch; one RNG state per rank
    assert ck["world_size"] == 2 and ck["global_step"] == 6 and len(ck["rng_states"]) == 2
    assert p.stdout.count("*** Done") == 1  # only rank 0 reports
