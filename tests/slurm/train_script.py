"""``python tests/slurm/train_script.py ...`` = ``python -m train.train ...``: this repository's trainer as a plain
script, for the ``slurm.launch --script`` tests that must run where timm's train.py is not available."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from train.train import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
