"""``python -m timm_cbsa.analysis SUBCOMMAND ...``: analysis command line (today: ``robustness``, see
``timm_cbsa/analysis/robustness.py``; the interpretability figures are ``python -m timm_cbsa.viz``)."""
import argparse
import sys
from typing import List, Optional

from . import robustness


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m timm_cbsa.analysis', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    robustness.add_arguments(sub.add_parser('robustness', help='metric vs Gaussian noise on the attention parameters',
                                            description=robustness.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        robustness.run(args)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
