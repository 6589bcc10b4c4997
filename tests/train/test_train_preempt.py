"""Checkpoint on preemption: a trainer signalled mid-epoch (USR2 / TERM, as SLURM does before preemption or the time
limit) writes a checkpoint at the step it was on, with no periodic checkpoints configured, then hands the signal on;
``--resume auto`` continues from that step."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.checkpoint import find_resume_checkpoint, load_checkpoint_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_train_fault_tolerance import RUN, STEPS, _env, _train  # noqa: E402

NO_PERIODIC = [a if i == 0 or RUN[i - 1] != "--checkpoint-interval-steps" else "0" for i, a in enumerate(RUN)]
assert NO_PERIODIC != RUN


def _preempt_step(log: str) -> int:
    m = re.search(r"Preemption signal: checkpoint written at epoch \d+, batch \d+ \(optimizer step (\d+)\)", log)
    assert m, log[-3000:]
    return int(m.group(1))


def test_sigusr2_mid_epoch_checkpoints_at_that_step_and_resumes_exactly(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _train(NO_PERIODIC + ["--output", str(ref)])
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "train.train"] + NO_PERIODIC +
                                ["--output", str(run), "--debug-step-delay", "0.2"],
                                cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    seen = -1
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            steps = [int(s) for s in re.findall(r"step (\d+) of", log.read_text())]
            if steps and steps[-1] >= 15:  # inside epoch 1 (steps 13..24)
                seen = steps[-1]
                proc.send_signal(signal.SIGUSR2)
                break
            time.sleep(0.05)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert seen >= 15, text[-3000:]
    # no previous handler: after the checkpoint the signal's default action ends the process
    assert proc.returncode == -signal.SIGUSR2, (proc.returncode, text[-3000:])
    step = _preempt_step(text)
    assert seen <= step <= seen + 2  # the step in flight when the signal came (the log line lags by < 1 step)
    path, ck = find_resume_checkpoint(str(run))
    assert ck["global_step"] == step and not ck["epoch_complete"] and ck["epoch"] == 1
    assert ck["batches_done"] == step - 12

    p = _train(NO_PERIODIC + ["--output", str(run), "--resume", "auto"])
    assert f"global step {step}" in p.stdout + p.stderr
    a = load_checkpoint_file(str(ref / "last.pth.tar"))
    b = load_checkpoint_file(str(run / "last.pth.tar"))
    assert a["global_step"] == b["global_step"] == STEPS
    for key in ("state_dict", "state_dict_ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), f"{key}/{k} differs after preemption + resume"


def test_sigterm_checkpoint_then_resume_continues_from_that_step(tmp_path):
    p = subprocess.run([sys.executable, "-m", "train.train"] + NO_PERIODIC +
                       ["--output", str(tmp_path), "--debug-signal-at-step", "7", "--debug-signal",
                        str(int(signal.SIGTERM))], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == -signal.SIGTERM, p.stdout[-2000:] + p.stderr[-2000:]
    assert _preempt_step(p.stdout + p.stderr) == 7
    path, ck = find_resume_checkpoint(str(tmp_path))
    assert path.endswith("recovery-0-7.pth.tar") and ck["global_step"] == 7
    res = _train(NO_PERIODIC + ["--output", str(tmp_path), "--resume", "auto", "--max-steps", "9"])
    assert "global step 7" in res.stdout + res.stderr
    assert find_resume_checkpoint(str(tmp_path))[1]["global_step"] == 9


def test_previous_handler_runs_after_the_checkpoint(tmp_path):
    """submitit installs its USR2 handler before the trainer starts; ours must write the checkpoint, then call it."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        def submitit_like(signum, frame):
            ckpts = sorted(os.listdir({str(tmp_path)!r}))
            print("previous handler ran; files:", ckpts, flush=True)
            sys.exit(3)
        signal.signal(signal.SIGUSR2, submitit_like)
        from train.train import main
        main({NO_PERIODIC + ["--output", str(tmp_path), "--debug-signal-at-step", "5",
                             "--debug-signal", str(int(signal.SIGUSR2))]!r})
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "previous handler ran" in p.stdout and "recovery-0-5.pth.tar" in p.stdout
    assert find_resume_checkpoint(str(tmp_path))[1]["global_step"] == 5
