"""``python -m slurm.launch --script PATH``: a training script run by path in the job (made for timm's ``train.py``).

Three parts: :func:`validate` checks the flags before submission with the script's own parser; :func:`job_argv`
gives the argv at every start of the job (a run folder that stays the same across requeues, ``--resume`` = the
newest checkpoint there); :func:`run` runs the script as ``__main__`` in the job process, which is what lets the
launcher's checkpointable callable requeue it (a ``submitit.helpers.CommandFunction`` job is not requeued on a
time-out, submitit issue #1732).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import runpy
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

DEFAULT_EXPERIMENT = "train"


def _managed_flags(argv: Sequence[str]) -> argparse.Namespace:
    """``--output`` and ``--experiment`` as the script will read them ("" when not given; timm train.py's names)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--output", "--experiment"):
        parser.add_argument(flag, default="")
    return parser.parse_known_args(argv)[0]


@contextlib.contextmanager
def _as_command_line(path: str, argv: Sequence[str]) -> Iterator[None]:
    """``sys.argv`` and ``sys.path`` as ``python PATH ARGV...`` has them (the script's folder first)."""
    old_argv, folder = sys.argv, os.path.dirname(path)
    sys.argv = [path, *argv]
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.argv = old_argv
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)


def run(path: str, argv: Sequence[str]) -> None:
    """Run the script as ``python PATH ARGV...`` would, in this process (``SystemExit`` passes through)."""
    with _as_command_line(path, argv):
        runpy.run_path(path, run_name="__main__")


def _parse_with_script(path: str, argv: Sequence[str]) -> Optional[argparse.Namespace]:
    """The script's own ``_parse_args()`` / ``parse_args()`` (reading ``sys.argv``, as timm's train.py does) applied
    to ``argv``, after running the script's top level but not its ``__main__`` block; None where it has neither."""
    with _as_command_line(path, argv):
        try:
            namespace = runpy.run_path(path, run_name="__slurm_launch_check__")
        except SystemExit as e:
            raise ValueError(f"--script {path} exited while loading (status {e.code})") from None
        parse = namespace.get("_parse_args") or namespace.get("parse_args")
        if not callable(parse) or any(p.default is inspect.Parameter.empty
                                      for p in inspect.signature(parse).parameters.values()):
            return None
        out = parse()
    return out[0] if isinstance(out, tuple) else out


def validate(path: str, argv: Sequence[str], check_paths: bool = True) -> None:
    """Check a script's flags before submission where the script lets us: its own parser, then for timm's flag
    names the ``--device-modules`` imports, ``--model`` in timm's registry and (``check_paths``) ``--data-dir``.
    Raises ValueError naming the flag (``SystemExit`` from the script's parser passes through)."""
    args = _parse_with_script(path, argv)
    if args is None:
        return
    modules = list(getattr(args, "device_modules", None) or [])
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - any import failure of a user module
            raise ValueError(f"--device-modules {m}: cannot import it: {type(e).__name__}: {e}") from e
    model = getattr(args, "model", None)
    if isinstance(model, str) and model and not model.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        import timm

        if not timm.is_model(model):
            hint = "" if "timm_cbsa" in modules else " (timm_cbsa's models need --device-modules timm_cbsa)"
            raise ValueError(f"--model {model}: no such timm model{hint}")
    data_dir = getattr(args, "data_dir", None)
    if check_paths and isinstance(data_dir, str) and data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
        raise ValueError(f"--data-dir {data_dir}: no such folder")


def newest_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint of ``run_dir`` that the trainer's own resume would pick
    (:func:`train.checkpoint.find_resume_checkpoint`). timm's checkpoints store the script's ``argparse.Namespace``,
    which the weights-only load is allowed to rebuild here."""
    import torch

    from train.checkpoint import find_resume_checkpoint

    with torch.serialization.safe_globals([argparse.Namespace]):
        found = find_resume_checkpoint(run_dir)
    return found[0] if found else None


def job_argv(train_argv: Sequence[str], output_dir: str, job_id: str) -> Tuple[List[str], str, Optional[str]]:
    """The script's argv in job ``job_id``: ``%j`` expanded; ``--output output_dir`` and ``--experiment train`` when
    not given (with your own ``--output``, the job id names the experiment: timm's default name has a time stamp,
    which would change at every requeue), so the run folder ``<output>/<experiment>`` stays the same; and
    ``--resume <newest checkpoint of the run folder>`` when there is one (it wins over a ``--resume`` you gave,
    which only starts the first run). Returns (argv, run folder, that checkpoint or None)."""
    argv = [tok.replace("%j", job_id) for tok in train_argv]
    given = _managed_flags(argv)
    output = given.output or output_dir
    experiment = given.experiment or (job_id if given.output else DEFAULT_EXPERIMENT)
    if not given.output:
        argv += ["--output", output]
    if not given.experiment:
        argv += ["--experiment", experiment]
    run_dir = os.path.join(output, experiment)
    checkpoint = newest_checkpoint(run_dir)
    if checkpoint is not None:
        argv += ["--resume", checkpoint]
    return argv, run_dir, checkpoint
