"""The interpretability commands (paper §6.7-6.8): subcommands of ``python -m timm_cbsa.analysis`` that work on the
model their shared options describe (``common.add_model_arguments``). Each module exposes ``measure(model, args)``
(see ``cli.py``); this package's ``measure`` is the subcommand ``all``: attention, coding-rate and zeroshot, in that
order, on one model."""
import argparse
from typing import Dict

import torch

from . import attention, coding_rate, zeroshot

__all__ = ['measure']


def measure(model: torch.nn.Module, args: argparse.Namespace) -> Dict[str, object]:
    summary = {}
    for command in (attention, coding_rate, zeroshot):
        summary.update(command.measure(model, args))
    return summary
