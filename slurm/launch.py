"""SLURM launcher (submitit) for ``train.train``: multi-node DDP, requeue on timeout/preemption, auto-resume.

    python -m slurm.launch --nodes 4 --gpus-per-node 8 --partition gpu --timeout 4320 \\
        --job-dir /checkpoint/$USER/cbsa/%j -- \\
        --model cbsa_vit_base --dataset imagenet --data-dir /datasets/imagenet --epochs 300 ...

Launcher flags are listed by ``--help``; every other flag is a training flag and goes, unchanged, to
``train.train.main`` (a ``--`` separator is optional). Training flags are validated with the trainer's own
parser *before* anything is submitted.

How a job runs
  * one SLURM task per GPU (``--ntasks-per-node = --gpus-per-node``; ``--tasks-per-node`` for CPU jobs);
  * every task exports RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT from
    submitit's :class:`submitit.JobEnvironment` (master = first node of the allocation, port =
    ``20000 + job_id % 20000`` unless ``--master-port``); ``CUDA_VISIBLE_DEVICES`` is *not* narrowed, so each
    task sees all GPUs of its node and the trainer picks ``cuda:LOCAL_RANK`` (NCCL) — or gloo on CPU;
  * training output (checkpoints, logs) goes to the job folder (``--job-dir``, ``%j`` = job id) unless
    ``--output`` is given, and ``--resume auto`` is added unless ``--resume`` is given;
  * the submitted callable (:class:`Trainer`) is checkpointable: on timeout / preemption (USR2) rank 0
    requeues the job with the *same* arguments, and the new run resumes from the newest checkpoint it finds in
    the output folder (nothing about a specific checkpoint file is pickled). ``scontrol requeue`` restarts
    the same pickle and therefore resumes the same way;
  * an exception makes the job FAILED (non-zero exit); with ``--wait`` the launcher prints the remote
    traceback and exits 1.

Other modes: ``--dry-run`` prints the sbatch script submitit would submit (submits nothing, needs no SLURM);
``--local`` runs the same callable with submitit's LocalExecutor (one node, ``--tasks-per-node`` processes).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

DEFAULT_ENTRY = "train.train:main"
DEFAULT_JOB_DIR = os.path.join("runs", "slurm", "%j")


class LaunchError(RuntimeError):
    """A problem found by the launcher (bad flags, rejected submission, failed job)."""


# ============================================================================ parser

def _key_value(s: str) -> Tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip().lstrip("-"), v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m slurm.launch",
        description="Submit timm_cbsa training (train.train) to SLURM with submitit. Flags not listed here are "
                    "training flags (see `python -m train.train --help`) and are passed through.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("Resources")
    g.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    g.add_argument("--gpus-per-node", "--ngpus", type=int, default=8,
                   help="GPUs per node; one task per GPU (default 8; 0 = CPU job)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node (default: --gpus-per-node, or 1 for CPU jobs)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default 10 per GPU task, 1 on CPU)")
    g.add_argument("--mem", default=None,
                   help="memory per node: SLURM syntax (e.g. 400G, 0 = all) or a plain number of GB")
    g.add_argument("--timeout", type=int, default=60 * 72, help="time limit in minutes (default 4320 = 72 h)")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None, help="e.g. volta32gb")
    g.add_argument("--exclude", default=None, help="nodes to exclude, e.g. node[01-03]")
    g.add_argument("--comment", default=None)
    g.add_argument("--job-name", default="cbsa", help="SLURM job name")

    g = p.add_argument_group("Job folder, requeue, rendezvous")
    g.add_argument("--job-dir", default=DEFAULT_JOB_DIR,
                   help="job folder on a shared file system; %%j becomes the job id (default runs/slurm/%%j). "
                        "submitit logs/pickles and (unless --output is given) checkpoints go here")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="SLURM sends USR2 this many seconds before the time limit (checkpoint + requeue)")
    g.add_argument("--max-num-timeout", type=int, default=30, help="how many times a timed-out job is requeued")
    g.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port (default 20000 + job_id %% 20000, identical after requeue)")

    g = p.add_argument_group("Pass-through to SLURM")
    g.add_argument("--slurm-param", "--sbatch", dest="slurm_params", action="append", type=_key_value, default=[],
                   metavar="KEY=VALUE",
                   help="extra #SBATCH parameter (submitit slurm_additional_parameters), repeatable, "
                        "e.g. --slurm-param gres=gpu:8 --slurm-param reservation=myres")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the sbatch script before srun (module load ..., export NCCL_...), "
                        "repeatable")
    g.add_argument("--srun-arg", dest="srun_args", action="append", default=[], metavar="ARG",
                   help="extra srun argument, repeatable (use --srun-arg=--foo)")

    g = p.add_argument_group("Modes")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script submitit would submit and exit")
    g.add_argument("--local", action="store_true",
                   help="run the same code without SLURM (submitit LocalExecutor, one node)")
    g.add_argument("--wait", action="store_true",
                   help="wait for the job; print its result, or its traceback and exit 1 if it failed")
    g.add_argument("--entry", default=DEFAULT_ENTRY, metavar="MODULE:FUNCTION",
                   help="training entry point called with the training argv (default train.train:main)")
    return p


def split_argv(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Split ``argv`` into launcher arguments and the training argv (everything the launcher does not know)."""
    argv = list(argv)
    explicit: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, explicit = argv[:i], argv[i + 1:]
    largs, rest = build_parser().parse_known_args(argv)
    largs.train_argv = rest + explicit
    _check_launcher_args(largs)
    return largs, largs.train_argv


def _check_launcher_args(a: argparse.Namespace) -> None:
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
    if ":" not in a.entry:
        raise LaunchError(f"--entry must look like MODULE:FUNCTION (got {a.entry!r})")


# ============================================================================ training argv

def _has_flag(argv: Sequence[str], *names: str) -> bool:
    return any(tok == n or tok.startswith(n + "=") for tok in argv for n in names)


def validate_train_argv(entry: str, train_argv: Sequence[str]) -> None:
    """Parse the training flags with the entry point's own parser; raise LaunchError if it rejects them.

    Uses ``<module>.parse_args`` if the module has one (it also checks --config files), else
    ``<module>.build_parser().parse_args``. Entry modules with neither are not validated.
    """
    mod_name = entry.split(":", 1)[0]
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - report any import problem before submitting
        raise LaunchError(f"cannot import training module {mod_name!r}: {type(e).__name__}: {e}") from e
    if hasattr(mod, "parse_args"):
        parse: Optional[Callable[[List[str]], Any]] = mod.parse_args
    elif hasattr(mod, "build_parser"):
        parse = mod.build_parser().parse_args
    else:
        return
    try:
        parse(list(train_argv))
    except SystemExit as e:  # argparse already printed "usage: ... error: ..." to stderr
        if e.code not in (0, None):
            raise LaunchError("training flags rejected by the trainer's parser (see the error above); "
                              "nothing was submitted") from None
        raise  # --help of the training parser: exit quietly like argparse
    except Exception as e:  # noqa: BLE001 - e.g. ConfigError for a bad --config file
        raise LaunchError(f"training flags rejected: {type(e).__name__}: {e}; nothing was submitted") from e


def finalize_train_argv(train_argv: Sequence[str], output_dir: str, job_id: str) -> List[str]:
    """Training argv as run inside the job: %j expanded, --output/--resume auto added when not given."""
    argv = [tok.replace("%j", job_id) for tok in train_argv]
    if not _has_flag(argv, "--output"):
        argv += ["--output", output_dir]
    if not _has_flag(argv, "--resume", "--auto-resume"):
        argv += ["--resume", "auto"]
    return argv


def resolve_entry(entry: str) -> Callable[[List[str]], Any]:
    mod_name, fn_name = entry.split(":", 1)
    return getattr(importlib.import_module(mod_name), fn_name)


# ============================================================================ inside the job

def master_port_for(job_id: str) -> int:
    digits = "".join(c for c in str(job_id).split("_")[0] if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def _node_address(name: str) -> str:
    """The address of a SLURM node name: DNS if it resolves, else the node's NodeAddr from scontrol."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True,
                             timeout=30).stdout
        for tok in out.split():
            if tok.startswith("NodeAddr="):
                return tok.split("=", 1)[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def setup_distributed_env(master_port: Optional[int] = None) -> Dict[str, str]:
    """Export torch.distributed env:// variables from submitit's JobEnvironment (SLURM or local).

    Unlike ``submitit.helpers.TorchDistributedEnvironment().export()`` this never touches
    CUDA_VISIBLE_DEVICES: each task sees every GPU of its node and uses ``cuda:LOCAL_RANK``.
    """
    import submitit

    env = submitit.JobEnvironment()
    hosts = list(env.hostnames) or [env.hostname]
    port = master_port or int(os.environ.get("CBSA_MASTER_PORT", "0")) or master_port_for(env.raw_job_id)
    values = {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, env.num_tasks // max(1, env.num_nodes))),
        "NODE_RANK": str(env.node),
        "MASTER_ADDR": _node_address(hosts[0]),
        "MASTER_PORT": str(port),
    }
    os.environ.update(values)
    return values


class Trainer:
    """The callable submitit pickles. It holds only the entry point name, the training argv (with ``%j``
    placeholders) and the output folder template, so a requeued run resumes from whatever the newest
    checkpoint in that folder is at restart time."""

    def __init__(self, entry: str, train_argv: Sequence[str], output_template: str,
                 master_port: Optional[int] = None) -> None:
        self.entry = entry
        self.train_argv = list(train_argv)
        self.output_template = output_template
        self.master_port = master_port

    def __call__(self) -> Any:
        import submitit

        job_env = submitit.JobEnvironment()
        dist_env = setup_distributed_env(self.master_port)
        job_id = job_env.job_id
        output_dir = self.output_template.replace("%j", job_id)
        argv = finalize_train_argv(self.train_argv, output_dir, job_id)
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"[slurm.launch] job {job_id} restart {restart} rank {dist_env['RANK']}/{dist_env['WORLD_SIZE']} "
              f"local_rank {dist_env['LOCAL_RANK']} master {dist_env['MASTER_ADDR']}:{dist_env['MASTER_PORT']} "
              f"host {socket.gethostname()} node {os.environ.get('SLURMD_NODENAME', '-')}", flush=True)
        print(f"[slurm.launch] {self.entry} {shlex.join(argv)}", flush=True)
        return resolve_entry(self.entry)(argv)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit (global rank 0) on timeout/preemption: requeue the same job arguments; the
        training entry point's ``--resume auto`` picks the newest checkpoint in the output folder."""
        import submitit

        print(f"[slurm.launch] checkpoint requested: requeueing; the next run resumes from the newest "
              f"checkpoint in {self.output_template}", flush=True)
        return submitit.helpers.DelayedSubmission(
            type(self)(self.entry, self.train_argv, self.output_template, self.master_port))


# ============================================================================ submission

def _slurm_parameters(a: argparse.Namespace) -> Dict[str, Any]:
    """Native SlurmExecutor parameters (the names of submitit.slurm.slurm._make_sbatch_string)."""
    p: Dict[str, Any] = dict(
        job_name=a.job_name, time=a.timeout, nodes=a.nodes, ntasks_per_node=a.tasks_per_node,
        cpus_per_task=a.cpus_per_task, signal_delay_s=a.signal_delay_s,
    )
    if a.gpus_per_node > 0:
        p["gpus_per_node"] = a.gpus_per_node
    if a.mem is not None:
        mem = str(a.mem).strip()
        p["mem"] = f"{mem}GB" if mem.isdigit() and mem != "0" else mem
    for k in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        if getattr(a, k) is not None:
            p[k] = getattr(a, k)
    if a.slurm_params:
        p["additional_parameters"] = dict(a.slurm_params)
    if a.setup:
        p["setup"] = list(a.setup)
    if a.srun_args:
        p["srun_args"] = list(a.srun_args)
    return p


def _dry_run_executor_cls():
    from submitit.slurm.slurm import SlurmExecutor

    class _DryRunSlurmExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # no SLURM needed to render the script
            return 1

    return _DryRunSlurmExecutor


def make_executor(a: argparse.Namespace, job_dir: str):
    if a.local:
        import submitit

        ex = submitit.AutoExecutor(folder=job_dir, cluster="local", slurm_max_num_timeout=a.max_num_timeout)
        ex.update_parameters(timeout_min=a.timeout, nodes=1, tasks_per_node=a.tasks_per_node,
                             gpus_per_node=a.gpus_per_node, name=a.job_name)
        return ex
    if a.dry_run:
        cls = _dry_run_executor_cls()
    else:
        from submitit.slurm.slurm import SlurmExecutor

        cls = SlurmExecutor
        if SlurmExecutor.affinity() < 1:
            raise LaunchError("SLURM not found (no srun/sbatch on PATH); use --local to run here or --dry-run")
    ex = cls(folder=job_dir, max_num_timeout=a.max_num_timeout)
    try:
        ex.update_parameters(**_slurm_parameters(a))
    except ValueError as e:
        raise LaunchError(f"invalid SLURM parameters: {e}") from e
    return ex


def prepare(argv: Sequence[str]):
    """Parse + validate; returns (launcher args, executor, Trainer). Nothing is submitted."""
    a, train_argv = split_argv(argv)
    validate_train_argv(a.entry, train_argv)
    job_dir = os.path.abspath(os.path.expanduser(a.job_dir))
    if "%j" not in job_dir:
        print(f"[slurm.launch] warning: --job-dir {job_dir} has no %j: jobs will share it", file=sys.stderr)
    output_template = job_dir
    trainer = Trainer(a.entry, train_argv, output_template, a.master_port)
    ex = make_executor(a, job_dir)
    return a, ex, trainer


def dry_run_script(ex) -> str:
    return ex._make_submission_file_text(ex._submitit_command_str, uid="dry-run")


def submit(argv: Sequence[str]):
    """Validate and submit; returns the submitit Job (``--dry-run``: the sbatch script as a string)."""
    a, ex, trainer = prepare(argv)
    if a.dry_run:
        return dry_run_script(ex)
    try:
        return ex.submit(trainer)
    except Exception as e:  # noqa: BLE001 - sbatch rejected the job: surface SLURM's own message
        msg = str(e).strip()
        raise LaunchError(f"SLURM rejected the submission:\n{msg}") from e


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


def wait(job, poll_s: float = 2.0) -> Any:
    """Wait for all tasks; returns task 0's result, raises LaunchError with the remote traceback on failure."""
    import submitit

    try:
        return job.results()[0]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        state = "unknown"
        try:
            state = job.state
        except Exception:  # noqa: BLE001
            pass
        raise LaunchError(f"job {job.job_id} failed (state {state}); remote error:\n{e}") from e


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a, ex, trainer = prepare(argv)
        if a.dry_run:
            print(f"# dry run: sbatch script submitit would submit (training argv: "
                  f"{shlex.join(trainer.train_argv)})", file=sys.stderr)
            print(dry_run_script(ex))
            return 0
        try:
            job = ex.submit(trainer)
        except Exception as e:  # noqa: BLE001
            raise LaunchError(f"SLURM rejected the submission:\n{str(e).strip()}") from e
        folder = str(job.paths.folder)
        if not a.local:
            reason = check_unrunnable(job.job_id)
            if reason:
                subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=60)
                raise LaunchError(f"SLURM accepted job {job.job_id} but it can never start as requested "
                                  f"(pending reason: {reason}); it was cancelled. Check --nodes/--gpus-per-node/"
                                  f"--cpus-per-task/--mem/--timeout against `sinfo -p <partition>`.")
        print(f"Submitted job {job.job_id} ({'local' if a.local else 'slurm'}); job folder {folder}", flush=True)
        print(f"  logs: {job.paths.stdout} / {job.paths.stderr}", flush=True)
        if not a.wait:
            return 0
        t0 = time.time()
        result = wait(job)
        print(f"Job {job.job_id} finished in {time.time() - t0:.0f}s: {result}", flush=True)
        return 0
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1 if "failed (state" in str(e) else 2


if __name__ == "__main__":
    sys.exit(main())
