"""Checkpoint on preemption: turn the scheduler's warning signal into a checkpoint at the next step boundary.

SLURM sends a signal some time before it preempts or times out a job (``--signal=USR2@120`` as submitit asks for it;
SIGTERM on preemption or ``scancel``). Saving inside a signal handler would catch the model in the middle of an
optimizer step, so the handler only raises a flag; the training loop looks at the flag (a plain Python bool: no device
sync) after each optimizer step, writes its mid-epoch checkpoint, and then calls :meth:`PreemptionHandler.finish`,
which hands the signal to whatever handler was installed before ours (submitit's: ``checkpoint()`` + requeue + exit)
or, where there was none, re-raises it with its default action. At most the current step is lost.

    handler = preempt.install()          # in the trainer, once, in the main thread
    ...
    if handler.requested:                # after an optimizer step
        save_checkpoint(...)
        handler.finish()                 # does not return where the signal's old action ends the process
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ['PreemptionHandler', 'install', 'signals_received', 'DEFAULT_SIGNALS']

DEFAULT_SIGNALS = tuple(s for s in (getattr(signal, 'SIGUSR2', None), signal.SIGTERM) if s is not None)

_Handler = Union[Callable, int, None]

# every preemption signal any handler of this process caught, for code around the trainer: the SLURM launcher's
# job callable must not report a result when the trainer leaves after a signal (the job is being requeued)
_RECEIVED: List[int] = []


def signals_received() -> Tuple[int, ...]:
    """The preemption signals caught in this process so far (by any :class:`PreemptionHandler`), in order."""
    return tuple(_RECEIVED)


class PreemptionHandler:
    """Records the first preemption signal; see the module docstring."""

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.signum: Optional[int] = None     # the first signal received
        self.received: List[int] = []         # every distinct signal received, in order of arrival
        self._previous: Dict[int, _Handler] = {}
        self._installed = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if signum not in self.received:      # e.g. SIGTERM then USR2 (submitit's job._interrupt(), a
            self.received.append(signum)     # preemption with preempt_send_user_signal): both are replayed
        if signum not in _RECEIVED:
            _RECEIVED.append(signum)

    def install(self) -> 'PreemptionHandler':
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError('preempt.install() must run in the main thread (Python delivers signals there).')
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back (the run ended normally)."""
        if not self._installed:
            return
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._installed = False

    def finish(self) -> None:
        """After the checkpoint is written: let each signal received do what it would have done without us.

        Every distinct signal is handed on, in order of arrival: under submitit SIGTERM goes to its "bypass"
        handler (logs, returns) and USR2 to its checkpoint-and-requeue handler (global rank 0: ``checkpoint()``,
        ``scontrol requeue``, ``sys.exit``; other ranks: log and return). Handing on only the first signal would
        lose the USR2 that follows SIGTERM on a preemption, and the job would never be requeued.
        """
        if self.signum is None:
            return
        received = list(self.received) or [self.signum]
        previous = {s: self._previous.get(s, signal.SIG_DFL) for s in received}
        self.uninstall()
        for signum in received:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)         # e.g. submitit: checkpoint() -> requeue -> exit
            elif handler in (signal.SIG_DFL, None):
                os.kill(os.getpid(), signum)  # default action (terminate) now that the checkpoint is safe
            # SIG_IGN: the signal was ignored before us; keep going


def install(signals: Sequence[int] = DEFAULT_SIGNALS) -> PreemptionHandler:
    """Install a :class:`PreemptionHandler` for ``signals`` (USR2 and TERM by default) and return it."""
    return PreemptionHandler(signals).install()
