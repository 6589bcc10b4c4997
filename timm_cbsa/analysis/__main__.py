"""``python -m timm_cbsa.analysis COMMAND ...``: the analysis command line (``cli.py``). ``main(argv)`` returns the
exit status."""
import sys

from .cli import command_line as main

if __name__ == '__main__':
    sys.exit(main())
