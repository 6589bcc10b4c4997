"""The interpretability commands (paper §6.7-6.8). Each module is a subcommand of ``python -m timm_cbsa.analysis``
(``add_arguments`` / ``run``, see ``cli.py``) and exposes its work on a built model as ``measure(model, args)``.
They share their options (``common.add_model_arguments``). This package itself is the subcommand ``all``: every
measurement on one model."""
import argparse
from typing import Dict

from ..common import add_model_arguments, run_on_model
from . import attention, coding_rate, zeroshot

__all__ = ['add_arguments', 'run']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> Dict[str, object]:
    """attention, coding-rate and zeroshot, in that order, on one model."""
    return run_on_model(args, [attention.measure, coding_rate.measure, zeroshot.measure])
