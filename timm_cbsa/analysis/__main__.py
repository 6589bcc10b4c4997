"""``python -m timm_cbsa.analysis COMMAND ...``: see ``cli.py``."""
from .cli import console_main

console_main()
