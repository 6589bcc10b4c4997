"""``python -m timm_cbsa.viz``: the former name of ``python -m timm_cbsa.analysis`` (same commands, arguments and
outputs; see ``timm_cbsa/analysis/cli.py``)."""
import sys

from .analysis.cli import command_line, main
from .analysis.common import build_model, write_csv

__all__ = ['main', 'build_model', 'write_csv']

if __name__ == '__main__':
    sys.exit(command_line(prog='python -m timm_cbsa.viz'))
