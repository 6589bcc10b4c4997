"""SLURM launcher (submitit) for ``train.train``: multi-node DDP, requeue on timeout/preemption, auto-resume.

    python -m slurm.launch --nodes 4 --gpus-per-node 8 --partition gpu --timeout 4320 \\
        --job-dir /checkpoint/$USER/cbsa/%j -- \\
        --model cbsa_vit_base --dataset imagenet --data-dir /datasets/imagenet --epochs 300 ...

Launcher flags are listed by ``--help``; every other flag is a training flag and goes, unchanged, to
``train.train.main`` (a ``--`` separator is optional). Training flags are checked with the trainer's own parser
and ``train.train.validate_args`` (model registered, data folder present, positive numbers) *before* anything is
submitted, and by ``--dry-run``. ``--script PATH`` runs a training script by path instead (timm's train.py:
``--device-modules timm_cbsa``; see :func:`finalize_script_argv` for its run folder and resume).

How a job runs
  * one SLURM task per GPU (``--ntasks-per-node = --gpus-per-node``; ``--tasks-per-node`` for CPU jobs);
  * every task exports RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT from
    submitit's :class:`submitit.JobEnvironment` (master = first node of the allocation, port =
    ``20000 + job_id % 20000`` unless ``--master-port``); ``CUDA_VISIBLE_DEVICES`` is *not* narrowed, so each
    task sees all GPUs of its node and the trainer picks ``cuda:LOCAL_RANK`` (NCCL) — or gloo on CPU;
  * training output (checkpoints, logs) goes to the job folder (``--job-dir``, ``%j`` = job id) unless
    ``--output`` is given, and ``--resume auto`` is added unless ``--resume`` is given;
  * preemption / time limit: the trainer (train/preempt.py) catches SIGTERM / USR2, writes a checkpoint at the
    next step boundary and then hands the signals to submitit's handlers (installed in the job process before
    the trainer starts), where global rank 0 calls :meth:`Trainer.checkpoint` and requeues the job with the
    *same* arguments; the new run resumes from the newest checkpoint it finds in the output folder (nothing
    about a specific checkpoint file is pickled). ``scontrol requeue`` (SIGTERM, then SLURM's own requeue)
    restarts the same pickle and therefore resumes the same way;
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
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
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
    g.add_argument("--no-data-check", dest="data_check", action="store_false", default=True,
                   help="do not check before submitting that the data folder exists (for data that exist only "
                        "on the compute nodes); the other training-flag checks still run")
    g.add_argument("--script", default=None, metavar="PATH",
                   help="run a training script by path instead of --entry, e.g. timm's train.py (run in the job "
                        "process as __main__ with the training argv; --output/--experiment/--resume are managed "
                        "for timm's train.py flags, see README)")
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
    if a.script is not None:
        if a.entry != DEFAULT_ENTRY:
            raise LaunchError("--script and --entry are alternatives: give one of them")
        path = os.path.abspath(os.path.expanduser(a.script))
        if not os.path.isfile(path):
            raise LaunchError(f"--script {a.script}: no such file")
        a.script = path


# ============================================================================ training argv

def _has_flag(argv: Sequence[str], *names: str) -> bool:
    return any(tok == n or tok.startswith(n + "=") for tok in argv for n in names)


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
    """Value of the last ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (None if absent)."""
    value = None
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(name + "="):
            value = tok.split("=", 1)[1]
    return value


def _drop_flag(argv: Sequence[str], name: str) -> List[str]:
    """``argv`` without any ``--name VALUE`` / ``--name=VALUE``."""
    out: List[str] = []
    skip = False
    for tok in argv:
        if skip:
            skip = False
        elif tok == name:
            skip = True
        elif not tok.startswith(name + "="):
            out.append(tok)
    return out


def _rejected(e: BaseException) -> LaunchError:
    if isinstance(e, SystemExit):  # argparse already printed "usage: ... error: ..." to stderr
        return LaunchError("training flags rejected by the trainer's parser (see the error above); "
                           "nothing was submitted")
    return LaunchError(f"training flags rejected: {type(e).__name__}: {e}; nothing was submitted")


def validate_train_argv(entry: str, train_argv: Sequence[str], check_paths: bool = True) -> None:
    """Run the entry point's own argument parsing and validation; raise LaunchError if it rejects the flags.

    Parses with ``<module>.parse_args`` if the module has one (it also checks --config files), else
    ``<module>.build_parser().parse_args``; then calls ``<module>.validate_args(args)`` when the module has it
    (the trainer's full check: model name registered, data folder present, positive numbers, ...), so a bad
    job is refused before it waits in the queue (``check_paths=False``: not the data folder, where the
    validator takes that switch). Entry modules with neither parser are not validated.
    """
    import inspect

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
    validate = getattr(mod, "validate_args", None)
    try:
        args = parse(list(train_argv))
        if validate is not None:
            try:
                takes_switch = "check_paths" in inspect.signature(validate).parameters
            except (TypeError, ValueError):
                takes_switch = False
            validate(args, check_paths=check_paths) if takes_switch else validate(args)
    except SystemExit as e:
        if e.code in (0, None):
            raise  # --help of the training parser: exit quietly like argparse
        raise _rejected(e) from None
    except Exception as e:  # noqa: BLE001 - ConfigError, ModelNotFoundError, FileNotFoundError, ValueError ...
        raise _rejected(e) from e


def _load_script(path: str) -> Dict[str, Any]:
    """Execute a script's top level (imports, parser construction) without running its ``__main__`` block."""
    import runpy

    sys.path.insert(0, os.path.dirname(path))
    try:
        return runpy.run_path(path, run_name="__slurm_launch_check__")
    finally:
        sys.path.pop(0)


def validate_script_argv(script: str, train_argv: Sequence[str], check_paths: bool = True) -> None:
    """Check a --script's flags before submitting, where the script lets us.

    A script with a ``_parse_args()`` / ``parse_args()`` that reads ``sys.argv`` (timm's train.py has
    ``_parse_args``) is parsed with the training argv. For timm-style flags the model name is checked against
    timm's registry (after importing ``--device-modules``) and ``--data-dir`` must exist when given.
    """
    import inspect

    try:
        ns = _load_script(script)
    except SystemExit as e:
        raise LaunchError(f"--script {script} exited while loading (status {e.code})") from None
    except Exception as e:  # noqa: BLE001
        raise LaunchError(f"cannot load --script {script}: {type(e).__name__}: {e}") from e
    parse = ns.get("_parse_args") or ns.get("parse_args")
    if not callable(parse):
        return
    try:
        if any(p.default is inspect.Parameter.empty for p in inspect.signature(parse).parameters.values()):
            return  # needs arguments we cannot guess
    except (TypeError, ValueError):
        return
    old_argv = sys.argv
    sys.argv = [script, *train_argv]
    try:
        out = parse()
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise _rejected(e) from None
    except Exception as e:  # noqa: BLE001 - e.g. a --config file that does not exist
        raise _rejected(e) from e
    finally:
        sys.argv = old_argv
    args = out[0] if isinstance(out, tuple) else out
    modules = list(getattr(args, "device_modules", None) or [])
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001
            raise LaunchError(f"--device-modules {m}: cannot import it: {type(e).__name__}: {e}; nothing was "
                              f"submitted") from e
    model = getattr(args, "model", None)
    if isinstance(model, str) and model and not model.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        import timm

        if not timm.is_model(model):
            hint = "" if "timm_cbsa" in modules else " (timm_cbsa's models need --device-modules timm_cbsa)"
            raise LaunchError(f"--model {model}: no such timm model{hint}; nothing was submitted")
    data_dir = getattr(args, "data_dir", None)
    if check_paths and isinstance(data_dir, str) and data_dir and "://" not in data_dir and \
            not os.path.isdir(data_dir):
        raise LaunchError(f"--data-dir {data_dir}: no such folder; nothing was submitted")


# checkpoint files timm's CheckpointSaver (and train.train) write, in order of preference on equal mtimes
CHECKPOINT_PATTERNS = ("last.pth.tar", "checkpoint-*.pth.tar", "recovery-*.pth.tar")


def find_newest_checkpoint(folder: str) -> Optional[str]:
    """The newest complete checkpoint in ``folder`` (``last.pth.tar``, ``checkpoint-*``, ``recovery-*``), or None.

    torch.save writes a zip archive whose directory is at the end, so a file cut short by a kill is not a valid
    zip and is skipped (timm's saver also writes through a temporary name; those are ignored).
    """
    import glob
    import zipfile

    found = []
    for pref, pat in enumerate(CHECKPOINT_PATTERNS):
        for p in glob.glob(os.path.join(glob.escape(folder), pat)):
            try:
                if os.path.isfile(p) and zipfile.is_zipfile(p):
                    found.append((os.path.getmtime(p), -pref, p))
                elif os.path.isfile(p):
                    print(f"[slurm.launch] skipping incomplete checkpoint {p}", file=sys.stderr, flush=True)
            except OSError:
                continue
    return max(found)[2] if found else None


def finalize_train_argv(train_argv: Sequence[str], output_dir: str, job_id: str) -> List[str]:
    """Training argv as run inside the job: %j expanded, --output/--resume auto added when not given.

    An explicit ``--resume PATH`` only starts the first run: once the output folder holds a checkpoint, a
    requeued run resumes from there (``--resume auto``) instead of going back to PATH.
    """
    argv = [tok.replace("%j", job_id) for tok in train_argv]
    if not _has_flag(argv, "--output"):
        argv += ["--output", output_dir]
    resume = _flag_value(argv, "--resume")
    if resume not in (None, "auto") and not _has_flag(argv, "--auto-resume"):
        out = _flag_value(argv, "--output") or output_dir
        run_dir = os.path.join(out, _flag_value(argv, "--experiment") or "")
        if find_newest_checkpoint(run_dir):
            argv = _drop_flag(argv, "--resume") + ["--resume", "auto"]
    elif not _has_flag(argv, "--resume", "--auto-resume"):
        argv += ["--resume", "auto"]
    return argv


SCRIPT_EXPERIMENT = "train"


def finalize_script_argv(train_argv: Sequence[str], output_dir: str, job_id: str) -> Tuple[List[str], str,
                                                                                            Optional[str]]:
    """A --script's argv inside the job (timm train.py flags): %j expanded; ``--output`` (the job folder) and
    ``--experiment`` added when not given, so the run folder ``<output>/<experiment>`` is the same after every
    requeue; ``--resume`` set to the newest checkpoint in that folder if there is one (replacing a ``--resume``
    given by the user, which only starts the first run). Returns (argv, run folder, checkpoint or None)."""
    argv = [tok.replace("%j", job_id) for tok in train_argv]
    if not _has_flag(argv, "--output"):
        argv += ["--output", output_dir]
        if not _has_flag(argv, "--experiment"):
            argv += ["--experiment", SCRIPT_EXPERIMENT]
    elif not _has_flag(argv, "--experiment"):  # timm's default name has a time stamp: differs after a requeue
        argv += ["--experiment", str(job_id)]
    run_dir = os.path.join(_flag_value(argv, "--output") or output_dir, _flag_value(argv, "--experiment") or "")
    newest = find_newest_checkpoint(run_dir)
    if newest is not None:
        argv = _drop_flag(argv, "--resume") + ["--resume", newest]
    return argv, run_dir, newest


def _preempt_signals() -> Tuple[int, ...]:
    """Preemption signals the trainer's handler (train.preempt) caught in this process, if it is loaded."""
    mod = sys.modules.get("train.preempt")
    return tuple(mod.signals_received()) if mod is not None and hasattr(mod, "signals_received") else ()


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
    """The callable submitit pickles. It holds only the entry point name (or the script path), the training argv
    (with ``%j`` placeholders) and the output folder template, so a requeued run resumes from whatever the newest
    checkpoint in that folder is at restart time.

    It is submitit-checkpointable (it has :meth:`checkpoint`), which is what makes timeouts requeue: a
    ``submitit.helpers.CommandFunction`` job is not requeued (submitit issue #1732), so scripts are run by this
    class too, in the job process, rather than as a command."""

    def __init__(self, entry: str, train_argv: Sequence[str], output_template: str,
                 master_port: Optional[int] = None, script: Optional[str] = None) -> None:
        self.entry = entry
        self.train_argv = list(train_argv)
        self.output_template = output_template
        self.master_port = master_port
        self.script = script
        self._requeued = False

    def __call__(self) -> Any:
        import submitit

        job_env = submitit.JobEnvironment()
        dist_env = setup_distributed_env(self.master_port)
        job_id = job_env.job_id
        output_dir = self.output_template.replace("%j", job_id)
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"[slurm.launch] job {job_id} restart {restart} rank {dist_env['RANK']}/{dist_env['WORLD_SIZE']} "
              f"local_rank {dist_env['LOCAL_RANK']} master {dist_env['MASTER_ADDR']}:{dist_env['MASTER_PORT']} "
              f"host {socket.gethostname()} node {os.environ.get('SLURMD_NODENAME', '-')}", flush=True)
        self._watch_requeue_signal(job_env)
        try:
            if self.script is not None:
                return self._run_script(output_dir, job_id)
            argv = finalize_train_argv(self.train_argv, output_dir, job_id)
            print(f"[slurm.launch] {self.entry} {shlex.join(argv)}", flush=True)
            try:
                return resolve_entry(self.entry)(argv)
            except SystemExit as e:
                self._check_exit(e, self.entry)
                return None
        except Exception:
            rank = int(os.environ.get("RANK", "0"))
            if rank != 0 and self._got_requeue_signal():
                # rank 0 has left to requeue the job, so this rank's next collective failed: expected. An error
                # result here would be read by the submitter as the job's outcome (it polls every task's result
                # file) although the requeued run is about to report; leave without one.
                traceback.print_exc()
                print(f"[slurm.launch] rank {rank} failed after the job's requeue signal (rank 0 left to requeue "
                      f"the job); exiting without a result: the requeued run reports instead", file=sys.stderr,
                      flush=True)
                raise SystemExit(1) from None
            raise

    def _watch_requeue_signal(self, job_env) -> None:
        """Record submitit's checkpoint-and-requeue signal (USR2) in this process, then hand it on unchanged."""
        self._signalled = False
        try:
            sig = job_env._usr_sig()
        except Exception:  # noqa: BLE001 - private submitit API: fall back to its default
            sig = getattr(signal, "SIGUSR2", None)
        if sig is None or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(sig)
        if not callable(previous):
            return
        self._requeue_sig = sig

        def on_requeue_signal(signum, frame):
            self._signalled = True
            return previous(signum, frame)

        signal.signal(sig, on_requeue_signal)

    def _got_requeue_signal(self) -> bool:
        sig = getattr(self, "_requeue_sig", getattr(signal, "SIGUSR2", None))
        return bool(getattr(self, "_signalled", False)) or sig in _preempt_signals()

    def _check_exit(self, e: SystemExit, what: str) -> None:
        """sys.exit inside the training code. It passes through, leaving no result, after a preemption / time-out
        signal: submitit's own exit after the requeue, or the trainer leaving after its signal-time checkpoint
        (a result pickle would make the submitter think the requeued job had finished). Otherwise exit 0 is a
        normal end and any other status fails the job with a traceback (instead of an output-less dead task)."""
        if self._requeued or _preempt_signals() or getattr(self, "_signalled", False):
            raise e
        if e.code not in (0, None):
            raise RuntimeError(f"{what} exited with status {e.code}") from e

    def _run_script(self, output_dir: str, job_id: str) -> Dict[str, Any]:
        import runpy

        argv, run_dir, newest = finalize_script_argv(self.train_argv, output_dir, job_id)
        if newest is not None:
            print(f"[slurm.launch] resuming from {newest}", flush=True)
        print(f"[slurm.launch] {self.script} {shlex.join(argv)}", flush=True)
        old_argv = sys.argv
        sys.argv = [self.script, *argv]
        sys.path.insert(0, os.path.dirname(self.script))
        try:
            runpy.run_path(self.script, run_name="__main__")
        except SystemExit as e:
            self._check_exit(e, self.script)
        finally:
            sys.argv = old_argv
            if sys.path and sys.path[0] == os.path.dirname(self.script):
                sys.path.pop(0)
        return dict(script=self.script, argv=argv, run_dir=run_dir, resumed_from=newest,
                    rank=int(os.environ.get("RANK", "0")), restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")))

    def __getstate__(self) -> Dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_signalled", "_requeue_sig")}
        state["_requeued"] = False
        return state

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit (global rank 0) on timeout/preemption: requeue the same job arguments; the
        training entry point's ``--resume auto`` (or, for a script, the newest checkpoint in its run folder)
        picks up where it stopped."""
        import submitit

        self._requeued = True
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # submitit runs `scontrol requeue` right after this returns. The requeue makes slurmd SIGTERM every
            # process of the job step, that scontrol child included: when it is hit before it exits, submitit
            # sees "died with SIGTERM" and fails the job instead of requeueing it (seen on the loaded test
            # cluster). An ignored signal stays ignored across exec, so the child cannot be killed that way;
            # this process is about to exit, and submitit only logs SIGTERM anyway.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"[slurm.launch] checkpoint requested: requeueing; the next run resumes from the newest "
              f"checkpoint in {self.output_template}", flush=True)
        return submitit.helpers.DelayedSubmission(
            type(self)(self.entry, self.train_argv, self.output_template, self.master_port, self.script))


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
    if a.script is not None:
        validate_script_argv(a.script, train_argv, check_paths=a.data_check)
    else:
        validate_train_argv(a.entry, train_argv, check_paths=a.data_check)
    job_dir = os.path.abspath(os.path.expanduser(a.job_dir))
    if "%j" not in job_dir:
        print(f"[slurm.launch] warning: --job-dir {job_dir} has no %j: jobs will share it", file=sys.stderr)
    output_template = job_dir
    trainer = Trainer(a.entry, train_argv, output_template, a.master_port, a.script)
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
            what = f"script {trainer.script}" if trainer.script else f"entry {trainer.entry}"
            print(f"# dry run: sbatch script submitit would submit ({what}; training argv: "
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
