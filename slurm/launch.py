"""SLURM launcher (submitit) for ``train.train``: multi-node DDP, requeue on time-out / preemption, auto-resume.

    python -m slurm.launch --nodes 4 --gpus-per-node 8 --partition gpu --timeout 4320 \\
        --job-dir /checkpoint/$USER/cbsa/%j -- \\
        --model cbsa_vit_base --dataset imagenet --data-dir /datasets/imagenet --epochs 300 ...

The launcher's flags are listed by ``--help``; every other flag is a training flag and goes, unchanged, to
``train.train.main`` (a ``--`` separator is optional). The training flags are checked with the trainer's own parser
and ``train.args.validate_args`` before anything is submitted, and by ``--dry-run``. ``--script PATH`` runs a
training script by path instead (:mod:`slurm.script`). What runs in the job is :class:`slurm.job.Trainer`; see
docs/slurm.md for the whole story (requeue, resume, multi-node, the local test cluster).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, List, Optional, Sequence, Tuple

import submitit

from . import script as script_mode
from .job import DEFAULT_ENTRY, Trainer, entry_flags, resolve_entry

DEFAULT_JOB_DIR = os.path.join("runs", "slurm", "%j")


class LaunchError(RuntimeError):
    """A problem found by the launcher (bad flags, a rejected submission); nothing was submitted."""


class JobFailed(LaunchError):
    """A submitted job failed (``--wait``)."""


# ============================================================================ flags

def _key_value(s: str) -> Tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip().lstrip("-"), v


def build_parser() -> argparse.ArgumentParser:
    """The launcher's own flags (everything else on the command line is a training flag)."""
    p = argparse.ArgumentParser(
        prog="python -m slurm.launch", allow_abbrev=False,
        description="Submit timm_cbsa training (train.train) to SLURM with submitit. Flags not listed here are "
                    "training flags (see `python -m train.train --help`) and are passed through.")
    g = p.add_argument_group("Resources")
    g.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    g.add_argument("--gpus-per-node", "--ngpus", type=int, default=8,
                   help="GPUs per node; one task per GPU (default 8; 0 = CPU job)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node (default: --gpus-per-node, or 1 for CPU jobs)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default 10 per GPU task, 1 on CPU)")
    g.add_argument("--mem", default=None, help="memory per node: SLURM syntax (e.g. 400G, 0 = all) or a number of GB")
    g.add_argument("--timeout", type=int, default=60 * 72, help="time limit in minutes (default 4320 = 72 h)")
    for flag, example in (("--partition", ""), ("--account", ""), ("--qos", ""), ("--constraint", "e.g. volta32gb"),
                          ("--exclude", "nodes to exclude, e.g. node[01-03]"), ("--comment", "")):
        g.add_argument(flag, default=None, help=example or None)
    g.add_argument("--job-name", default="cbsa", help="SLURM job name")

    g = p.add_argument_group("Job folder, requeue, rendezvous")
    g.add_argument("--job-dir", default=DEFAULT_JOB_DIR,
                   help="job folder on a shared file system; %%j becomes the job id (default runs/slurm/%%j). "
                        "submitit logs/pickles and (unless --output is given) checkpoints go here")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="SLURM sends USR2 this many seconds before the time limit (checkpoint + requeue)")
    g.add_argument("--max-num-timeout", type=int, default=30, help="how many times a timed-out job is requeued")
    g.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port (default: MASTER_PORT of the submitting shell, else one derived from the job "
                        "id, identical after a requeue)")

    g = p.add_argument_group("Pass-through to SLURM")
    g.add_argument("--slurm-param", "--sbatch", dest="slurm_params", action="append", type=_key_value, default=[],
                   metavar="KEY=VALUE", help="extra #SBATCH parameter, repeatable, e.g. --slurm-param gres=gpu:8")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the sbatch script before srun (module load ..., export NCCL_...), "
                        "repeatable")
    g.add_argument("--srun-arg", dest="srun_args", action="append", default=[], metavar="ARG",
                   help="extra srun argument, repeatable (use --srun-arg=--foo)")

    g = p.add_argument_group("Modes")
    g.add_argument("--dry-run", action="store_true", help="check the flags, print the sbatch script and exit")
    g.add_argument("--local", action="store_true",
                   help="run the same code without SLURM (submitit LocalExecutor, one node)")
    g.add_argument("--wait", action="store_true",
                   help="wait for the job; print its result, or its traceback and exit 1 if it failed")
    g.add_argument("--entry", default=DEFAULT_ENTRY, metavar="MODULE:FUNCTION",
                   help="function called with the training argv instead of train.train:main, e.g. train.segment:main; "
                        "its module's parse_args / validate_args check the flags (else train.train's)")
    g.add_argument("--no-data-check", dest="data_check", action="store_false", default=True,
                   help="do not check before submitting that the data folder exists (data only on the compute "
                        "nodes); the other training-flag checks still run")
    g.add_argument("--script", default=None, metavar="PATH",
                   help="run a training script by path instead (e.g. timm's train.py), see docs/slurm.md")
    return p


def split_argv(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """(launcher args, training argv): the launcher's flags, and every other token in order (all after a ``--``)."""
    argv = list(argv)
    tail: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    a, rest = build_parser().parse_known_args(argv)
    _check_launcher_args(a)
    return a, rest + tail


def _check_launcher_args(a: argparse.Namespace) -> None:
    """Range checks and the defaults that depend on other flags."""
    if a.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1 (got {a.nodes})")
    if a.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0 (got {a.gpus_per_node})")
    if a.tasks_per_node is None:
        a.tasks_per_node = a.gpus_per_node if a.gpus_per_node > 0 else 1
    if a.tasks_per_node < 1:
        raise LaunchError(f"--tasks-per-node must be >= 1 (got {a.tasks_per_node})")
    if a.cpus_per_task is None:
        a.cpus_per_task = 10 if a.gpus_per_node > 0 else 1
    if a.timeout < 1:
        raise LaunchError(f"--timeout must be >= 1 minute (got {a.timeout})")
    if a.local and a.nodes > 1:
        raise LaunchError("--local runs on this machine only: use --nodes 1")
    if a.local and a.dry_run:
        raise LaunchError("--dry-run prints an sbatch script; it cannot be combined with --local")
    if a.script is not None:
        if a.entry != DEFAULT_ENTRY:
            raise LaunchError("--script and --entry are alternatives: give one of them")
        a.script = os.path.abspath(os.path.expanduser(a.script))
        if not os.path.isfile(a.script):
            raise LaunchError(f"--script {a.script}: no such file")
        return
    try:
        resolve_entry(a.entry)
    except (ImportError, AttributeError, ValueError) as e:
        raise LaunchError(f"--entry {a.entry}: cannot load it ({type(e).__name__}: {e})") from e


def check_training_flags(a: argparse.Namespace, train_argv: Sequence[str]) -> None:
    """The training flags as the job will read them: the entry's parser (``--config`` included) and its full check
    (:func:`slurm.job.entry_flags`; for ``train.train`` ``train.args.validate_args``: positive numbers, a registered
    model, the data folder unless ``--no-data-check``), or for ``--script`` the script's own parser
    (:func:`slurm.script.validate`)."""
    try:
        if a.script is not None:
            script_mode.validate(a.script, train_argv, check_paths=a.data_check)
        else:
            flags = entry_flags(a.entry)
            flags.validate_args(flags.parse_args(list(train_argv)), check_paths=a.data_check)
    except SystemExit as e:
        if e.code in (0, None):
            raise  # --help of the training parser
        raise LaunchError("training flags rejected by the trainer's parser (see the error above); nothing was "
                          "submitted") from None
    except Exception as e:  # noqa: BLE001 - ConfigError, ModelNotFoundError, DatasetNotFoundError, ValueError ...
        raise LaunchError(f"training flags rejected: {type(e).__name__}: {e}; nothing was submitted") from e


def prepare(argv: Sequence[str]) -> Tuple[argparse.Namespace, Trainer]:
    """Parse and check every flag; returns the launcher args and the job's callable. Nothing is submitted."""
    a, train_argv = split_argv(argv)
    check_training_flags(a, train_argv)
    a.job_dir = os.path.abspath(os.path.expanduser(a.job_dir))
    if "%j" not in a.job_dir:
        print(f"[slurm.launch] warning: --job-dir {a.job_dir} has no %j: jobs will share it", file=sys.stderr)
    return a, Trainer(train_argv, a.job_dir, entry=a.entry, script=a.script, master_port=a.master_port)


# ============================================================================ submission

def make_executor(a: argparse.Namespace, folder: str) -> submitit.AutoExecutor:
    """submitit's executor for ``a``: SLURM, or with ``--local`` the LocalExecutor (which ignores the slurm_ ones)."""
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster="local" if a.local else "slurm",
                                   slurm_max_num_timeout=a.max_num_timeout)
    except RuntimeError as e:  # submitit found no srun
        raise LaunchError(f"SLURM not found ({e}); use --local to run here, or --dry-run") from e
    mem = None if a.mem is None else str(a.mem).strip()
    slurm = dict(partition=a.partition, account=a.account, qos=a.qos, constraint=a.constraint, exclude=a.exclude,
                 comment=a.comment, signal_delay_s=a.signal_delay_s, setup=a.setup or None,
                 srun_args=a.srun_args or None, additional_parameters=dict(a.slurm_params) or None,
                 mem=f"{mem}GB" if mem and mem.isdigit() and mem != "0" else mem)
    try:
        ex.update_parameters(name=a.job_name, timeout_min=a.timeout, nodes=a.nodes, tasks_per_node=a.tasks_per_node,
                             cpus_per_task=a.cpus_per_task, gpus_per_node=a.gpus_per_node or None,
                             **{f"slurm_{k}": v for k, v in slurm.items()})
    except ValueError as e:
        raise LaunchError(f"invalid SLURM parameters: {e}") from e
    return ex


_STAND_IN = "#!/bin/sh\necho 'Submitted batch job 1'\n"


def dry_run_script(a: argparse.Namespace, trainer: Trainer) -> str:
    """The sbatch script submitit writes for this job, obtained through its public ``submit``: the job goes, in a
    throw-away copy of the job folder, to stand-in ``sbatch`` / ``srun`` commands that only answer with a job id;
    the copy's location is then taken out of the script's paths. Needs no SLURM and writes nothing else."""
    with tempfile.TemporaryDirectory(prefix="slurm-dry-run-") as tmp:
        for command in ("sbatch", "srun"):
            stand_in = os.path.join(tmp, command)
            with open(stand_in, "w") as f:
                f.write(_STAND_IN)
            os.chmod(stand_in, 0o755)
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = tmp + os.pathsep + path
        try:
            job = make_executor(a, tmp + a.job_dir).submit(trainer)
            return job.paths.submission_file.read_text().replace(tmp, "")
        finally:
            os.environ["PATH"] = path


# pending reasons that mean "this job can never start as requested" (clusters without EnforcePartLimits accept
# such jobs and leave them pending forever)
UNRUNNABLE_REASONS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                      "InvalidAccount", "InvalidQOS", "QOSMaxNodePerJobLimit", "QOSMaxCpuPerJobLimit",
                      "QOSMaxGRESPerJob", "ReqNodeNotAvail", "AssocMaxNodesPerJobLimit")


def check_unrunnable(job_id: str, patience_s: float = 4.0) -> Optional[str]:
    """SLURM's pending reason if the freshly submitted job can never start, else None (best effort)."""
    t0 = time.time()
    while True:
        try:
            out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        state, _, reason = out.partition("|")
        if state != "PENDING":
            return None
        if reason.startswith(UNRUNNABLE_REASONS):
            return reason
        if reason not in ("None", "") or time.time() - t0 > patience_s:
            return None
        time.sleep(0.5)


def submit(a: argparse.Namespace, trainer: Trainer) -> submitit.Job:
    """Submit the prepared job (``--local``: start it here); a job SLURM can never start is cancelled at once."""
    try:
        job = make_executor(a, a.job_dir).submit(trainer)
    except LaunchError:
        raise
    except Exception as e:  # noqa: BLE001 - sbatch rejected the job: surface SLURM's own message
        raise LaunchError(f"SLURM rejected the submission:\n{str(e).strip()}") from e
    reason = None if a.local else check_unrunnable(job.job_id)
    if reason:
        subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=60)
        raise LaunchError(f"SLURM accepted job {job.job_id} but it can never start as requested (pending reason: "
                          f"{reason}); it was cancelled. Check --nodes/--gpus-per-node/--cpus-per-task/--mem/--timeout "
                          f"against `sinfo -p <partition>`.")
    return job


def wait(job: submitit.Job) -> Any:
    """Wait for all tasks; returns task 0's result, raises JobFailed with the remote traceback on failure."""
    try:
        return job.results()[0]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        raise JobFailed(f"job {job.job_id} failed (state {job.state}); remote error:\n{e}") from e


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        a, trainer = prepare(sys.argv[1:] if argv is None else argv)
        if a.dry_run:
            what = f"script {trainer.script}" if trainer.script else f"entry {trainer.entry}"
            print(f"# dry run: the sbatch script submitit would submit ({what}; training argv: "
                  f"{shlex.join(trainer.train_argv)})", file=sys.stderr)
            print(dry_run_script(a, trainer))
            return 0
        job = submit(a, trainer)
        print(f"Submitted job {job.job_id} ({'local' if a.local else 'slurm'}); job folder {job.paths.folder}",
              flush=True)
        print(f"  logs: {job.paths.stdout} / {job.paths.stderr}", flush=True)
        if a.wait:
            t0 = time.time()
            result = wait(job)
            print(f"Job {job.job_id} finished in {time.time() - t0:.0f}s: {result}", flush=True)
        return 0
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, JobFailed) else 2


if __name__ == "__main__":
    sys.exit(main())
