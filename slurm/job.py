"""Inside a SLURM job: :class:`Trainer`, the checkpointable callable that submitit pickles and runs on every task.

It holds only what to run (the trainer's entry point, or a script path), the training argv (``%j`` not yet
expanded) and the job folder template, never a checkpoint path. Every start of the job, the first and each
requeued one, exports torch.distributed's env:// variables with :class:`submitit.helpers.TorchDistributedEnvironment`,
decides the output folder and the resume (:func:`training_argv`: the trainer's ``--resume auto``, which picks the
newest checkpoint of the run folder), and calls the trainer. On a time-out or preemption, submitit calls
:meth:`Trainer.checkpoint` on global rank 0 and requeues the job with the same callable.
"""
from __future__ import annotations

import copy
import importlib
import os
import shlex
import signal
import socket
import sys
import threading
import traceback
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence

import submitit

from train import args as train_args
from train import preempt
from train.checkpoint import find_resume_checkpoint

from . import script as script_mode

DEFAULT_ENTRY = "train.train:main"


def resolve_entry(entry: str) -> Callable[[List[str]], Any]:
    """``MODULE:FUNCTION`` -> that function (it takes the training argv)."""
    mod_name, _, fn_name = entry.partition(":")
    return getattr(importlib.import_module(mod_name), fn_name)


def entry_flags(entry: str) -> ModuleType:
    """The module that reads the training flags of ``entry`` (``MODULE:FUNCTION``): the function's module when it has
    ``build_parser``, ``parse_args`` and ``validate_args`` (``train.train``, ``train.segment``), else ``train.args``
    (a wrapper around ``train.train`` takes its flags)."""
    mod = sys.modules.get(getattr(resolve_entry(entry), "__module__", ""))
    return mod if all(hasattr(mod, f) for f in ("build_parser", "parse_args", "validate_args")) else train_args


def training_argv(train_argv: Sequence[str], output_dir: str, job_id: str,
                  flags: ModuleType = train_args) -> List[str]:
    """The trainer's argv in job ``job_id``: ``%j`` expanded; ``--output output_dir`` unless the command line names an
    output folder (the recipes' ``--config`` files set one, which the job folder replaces, so that every job has its
    own); ``--resume auto`` unless a resume is set, and over a ``--resume PATH`` once the run folder holds a checkpoint
    (the PATH only starts the first run). Decided on the trainer's own parse of the flags; the added flags come last,
    so they win (argparse keeps the last value). ``flags``: the module that reads them (:func:`entry_flags`)."""
    argv = [tok.replace("%j", job_id) for tok in train_argv]
    command_line = flags.build_parser()
    command_line.set_defaults(output=None)  # no --config defaults: what the command line itself says
    if command_line.parse_args(argv).output is None:
        argv += ["--output", output_dir]
    args = flags.parse_args(argv)
    run_dir = os.path.join(args.output, args.experiment)
    if not args.resume or (args.resume != "auto" and find_resume_checkpoint(run_dir)):
        argv += ["--resume", "auto"]
    return argv


class Trainer(submitit.helpers.Checkpointable):
    """The job's callable: runs ``entry(argv)`` (default ``train.train:main``), or ``script`` as ``__main__``."""

    def __init__(self, train_argv: Sequence[str], output_template: str, entry: str = DEFAULT_ENTRY,
                 script: Optional[str] = None, master_port: Optional[int] = None) -> None:
        self.train_argv = list(train_argv)
        self.output_template = output_template
        self.entry = entry
        self.script = script
        self.master_port = master_port
        self._signalled = False  # this process got the requeue signal (or checkpoint() ran): it is leaving

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, _signalled=False)  # a requeued run starts unsignalled

    def __call__(self) -> Any:
        job_id = submitit.JobEnvironment().job_id
        dist_env = self._export_distributed_env(job_id)
        self._watch_requeue_signal()
        try:
            return self._run(self.output_template.replace("%j", job_id), job_id)
        except Exception:
            if dist_env.rank != 0 and self.leaving():
                # rank 0 has left to requeue the job, so this rank's next collective failed: expected. An error result
                # would be read by the submitter as the job's outcome (it polls every task's result file) although
                # the requeued run is about to report; leave without one.
                traceback.print_exc()
                print(f"[slurm.launch] rank {dist_env.rank} failed after the job's requeue signal (rank 0 left to "
                      f"requeue the job); exiting without a result: the requeued run reports instead", flush=True)
                raise SystemExit(1) from None
            raise

    def _export_distributed_env(self, job_id: str) -> submitit.helpers.TorchDistributedEnvironment:
        """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the first node), MASTER_PORT (``--master-port``,
        else the submitter's MASTER_PORT, else one derived from the job id: the same after a requeue). Every task
        keeps all GPUs of its node visible and uses ``cuda:LOCAL_RANK``."""
        if self.master_port:
            os.environ["MASTER_PORT"] = str(self.master_port)
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        print(f"[slurm.launch] job {job_id} restart "
              f"{os.environ.get('SLURM_RESTART_COUNT', '0')} rank {env.rank}/{env.world_size} local_rank "
              f"{env.local_rank} master {env.master_addr}:{env.master_port} host {socket.gethostname()} node "
              f"{os.environ.get('SLURMD_NODENAME', '-')}", flush=True)
        return env

    def _run(self, output_dir: str, job_id: str) -> Any:
        if self.script is None:
            argv = training_argv(self.train_argv, output_dir, job_id, entry_flags(self.entry))
            return self._call(resolve_entry(self.entry), argv, self.entry)
        argv, run_dir, checkpoint = script_mode.job_argv(self.train_argv, output_dir, job_id)
        if checkpoint is not None:
            print(f"[slurm.launch] resuming from {checkpoint}", flush=True)
        self._call(lambda a: script_mode.run(self.script, a), argv, self.script)
        return dict(script=self.script, argv=argv, run_dir=run_dir, resumed_from=checkpoint,
                    rank=int(os.environ["RANK"]), restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")))

    def _call(self, fn: Callable[[List[str]], Any], argv: List[str], what: str) -> Any:
        """``fn(argv)``. A ``sys.exit`` in it passes through, leaving no result, when this process is leaving for a
        requeue (submitit's own exit, or the trainer's after its signal-time checkpoint: a result would make the
        submitter think the requeued job had finished); otherwise status 0 is a normal end and any other fails the
        job with a traceback."""
        print(f"[slurm.launch] {what} {shlex.join(argv)}", flush=True)
        try:
            return fn(argv)
        except SystemExit as e:
            if self.leaving():
                raise
            if e.code not in (0, None):
                raise RuntimeError(f"{what} exited with status {e.code}") from e
            return None

    def leaving(self) -> bool:
        """This process got submitit's requeue signal, or a preemption signal reached the trainer's handler."""
        return self._signalled or bool(preempt.signals_received())

    def _watch_requeue_signal(self) -> None:
        """Note submitit's checkpoint-and-requeue signal (``JobEnvironment.USR_SIG``) in this process, then hand it
        on unchanged to submitit's handler."""
        sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        previous = signal.getsignal(sig)
        if threading.current_thread() is not threading.main_thread() or not callable(previous):
            return

        def on_requeue_signal(signum, frame):
            self._signalled = True
            return previous(signum, frame)

        signal.signal(sig, on_requeue_signal)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit (global rank 0) on a time-out or preemption: requeue this callable as it was submitted;
        the next run resumes from the newest checkpoint of the run folder."""
        self._signalled = True
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # submitit runs `scontrol requeue` right after this returns. The requeue makes slurmd SIGTERM every
            # process of the job step, that scontrol child included: when it is hit before it exits, submitit sees
            # "died with SIGTERM" and fails the job instead of requeueing it (seen on the loaded test cluster). An
            # ignored signal stays ignored across exec, so the child cannot be killed that way; this process is about
            # to exit, and submitit only logs SIGTERM anyway.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"[slurm.launch] checkpoint requested: requeueing; the next run resumes from the newest checkpoint in "
              f"{self.output_template}", flush=True)
        return submitit.helpers.DelayedSubmission(copy.copy(self), *args, **kwargs)
