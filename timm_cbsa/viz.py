"""``python -m timm_cbsa.viz``: the former name of ``python -m timm_cbsa.analysis`` (same commands, arguments and
outputs; see ``timm_cbsa/analysis/cli.py``)."""
from .analysis.cli import console_main, main
from .analysis.common import build_model, write_csv

__all__ = ['main', 'build_model', 'write_csv']

if __name__ == '__main__':
    console_main(prog='python -m timm_cbsa.viz')
