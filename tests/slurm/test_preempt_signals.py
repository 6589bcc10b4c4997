"""train/preempt.py against the signal handlers submitit installs in a SLURM job (no cluster needed).

submitit's job process binds SIGTERM to a "bypass" handler (log, return) and USR2 to checkpoint-and-requeue.
A preemption (``job._interrupt()``, or SLURM with ``preempt_send_user_signal``) delivers SIGTERM and then USR2;
the trainer's handler must hand *both* on after its checkpoint, else the job is never requeued.
"""
from __future__ import annotations

import os
import signal
import sys

import pytest

from train import preempt

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="needs POSIX signals")


@pytest.fixture(autouse=True)
def _keep_process_record(monkeypatch):
    """preempt.signals_received() is process-wide: these deliberate signals must not leak into other tests."""
    monkeypatch.setattr(preempt, "_RECEIVED", [])


@pytest.fixture
def fake_submitit_handlers():
    """Bind TERM / USR2 like submitit's JobEnvironment._handle_signals does; restore afterwards."""
    calls = []
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}

    def bypass(signum, frame):
        calls.append(("bypass", signum))

    def checkpoint_and_try_requeue(signum, frame):
        calls.append(("requeue", signum))

    signal.signal(signal.SIGTERM, bypass)
    signal.signal(signal.SIGUSR2, checkpoint_and_try_requeue)
    yield calls, bypass, checkpoint_and_try_requeue
    for s, h in old.items():
        signal.signal(s, h)


def _deliver(sig):
    os.kill(os.getpid(), sig)  # Python runs the handler in the main thread before the next bytecode


def test_term_then_usr2_replays_both_previous_handlers_in_order(fake_submitit_handlers):
    calls, bypass, requeue = fake_submitit_handlers
    h = preempt.install()
    assert signal.getsignal(signal.SIGUSR2) == h._on_signal
    _deliver(signal.SIGTERM)
    _deliver(signal.SIGUSR2)
    _deliver(signal.SIGTERM)  # repeated: recorded once
    assert calls == []        # nothing reached submitit yet: the trainer saves first
    assert h.requested and h.signum == signal.SIGTERM
    assert h.received == [signal.SIGTERM, signal.SIGUSR2]
    h.finish()
    assert calls == [("bypass", signal.SIGTERM), ("requeue", signal.SIGUSR2)]
    # submitit's handlers are back in place for anything that arrives later
    assert signal.getsignal(signal.SIGTERM) is bypass and signal.getsignal(signal.SIGUSR2) is requeue


def test_time_limit_usr2_alone_goes_to_requeue(fake_submitit_handlers):
    calls, _, _ = fake_submitit_handlers
    h = preempt.install()
    _deliver(signal.SIGUSR2)
    h.finish()
    assert calls == [("requeue", signal.SIGUSR2)]


def test_no_signal_finish_is_a_no_op(fake_submitit_handlers):
    calls, bypass, _ = fake_submitit_handlers
    h = preempt.install()
    assert not h.requested
    h.finish()
    assert calls == [] and signal.getsignal(signal.SIGTERM) == h._on_signal  # still installed
    h.uninstall()
    assert signal.getsignal(signal.SIGTERM) is bypass


def test_default_action_terminates_after_the_checkpoint(tmp_path):
    """Without submitit (plain torchrun): SIGTERM's default action runs once finish() is called."""
    import subprocess

    code = (
        "import os, signal, sys\n"
        "from train import preempt\n"
        "h = preempt.install()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('alive after signal', h.requested, flush=True)\n"
        "h.finish()\n"
        "print('not reached', flush=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert "alive after signal True" in r.stdout
    assert "not reached" not in r.stdout
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stderr)


def test_signals_received_is_process_wide(fake_submitit_handlers):
    """slurm.launch reads it to leave without a result after a signal-time checkpoint (the job is requeued)."""
    assert preempt.signals_received() == ()
    h = preempt.install()
    _deliver(signal.SIGUSR2)
    _deliver(signal.SIGTERM)
    h.finish()
    h2 = preempt.install()
    _deliver(signal.SIGTERM)
    h2.finish()
    assert preempt.signals_received() == (signal.SIGUSR2, signal.SIGTERM)
