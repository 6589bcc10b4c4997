"""Step hooks: where code outside the training loop acts on a step (tests inject faults here).

The loop calls ``hooks.on_loss(step, loss)`` on every micro-batch's loss before the backward pass and
``hooks.after_step(step)`` after every optimizer step (``step`` counts optimizer steps from 1). :class:`StepHooks`
does nothing; :class:`FaultInjection` is what the hidden ``--debug-*`` flags ask for, so that tests running the
trainer as a subprocess (or through the SLURM launcher) can inject a NaN, slow the loop down or signal the process.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch


class StepHooks:
    """No-op hooks; subclass and pass an instance to ``train.train.main(argv, hooks=...)``."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of a micro-batch of optimizer step ``step`` (returned, possibly replaced)."""
        return loss

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (scheduler and EMA updated)."""


class FaultInjection(StepHooks):
    """NaN losses from step ``nan_at_step`` on; ``step_delay`` seconds of sleep after each optimizer step; signal
    ``signum`` sent to this process after step ``signal_at_step``."""

    def __init__(self, nan_at_step: Optional[int] = None, step_delay: float = 0.0,
                 signal_at_step: Optional[int] = None, signum: int = 15):
        self.nan_at_step, self.step_delay = nan_at_step, step_delay
        self.signal_at_step, self.signum = signal_at_step, signum

    @classmethod
    def from_args(cls, args) -> StepHooks:
        """The hooks the ``--debug-*`` flags ask for (plain :class:`StepHooks` when none is given)."""
        if args.debug_nan_at_step is None and not args.debug_step_delay and args.debug_signal_at_step is None:
            return StepHooks()
        return cls(args.debug_nan_at_step, args.debug_step_delay, args.debug_signal_at_step, args.debug_signal)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.nan_at_step is not None and step >= self.nan_at_step:
            return loss * float("nan")
        return loss

    def after_step(self, step: int) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.signal_at_step is not None and step == self.signal_at_step:
            os.kill(os.getpid(), self.signum)
