#!/usr/bin/env bash
# The declared floors work. floor_smoke.py (import, build, forward, backward) runs in two fresh venvs:
#   1. the minimum timm from pyproject.toml on the installed torch / torchvision (--system-site-packages);
#   2. the minimum timm on the minimum torch from pyproject.toml and its torchvision (downloaded from PyPI, ~3 GB).
set -euo pipefail
cd "$(dirname "$0")/../.."
floor() { python -c "import re,sys;print(re.search(r'\"$1>=([0-9.]+)\"', open('pyproject.toml').read()).group(1))"; }
timm_floor=$(floor timm)
torch_floor=$(floor torch)
case "$torch_floor" in                     # torchvision release that pairs with each torch minor
    2.4) tv_floor=0.19 ;;
    *) echo "floor_smoke.sh: no torchvision pair known for torch $torch_floor; add it here"; exit 1 ;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python -m venv --system-site-packages "$tmp/timm_floor"
"$tmp/timm_floor/bin/pip" install --quiet --disable-pip-version-check --no-deps "timm==$timm_floor"
PYTHONPATH="$PWD" "$tmp/timm_floor/bin/python" tests/timm_suite/floor_smoke.py

python -m venv "$tmp/all_floors"
"$tmp/all_floors/bin/pip" install --quiet --disable-pip-version-check "torch==$torch_floor.*" \
    "torchvision==$tv_floor.*" "timm==$timm_floor" numpy safetensors huggingface-hub pyyaml
PYTHONPATH="$PWD" "$tmp/all_floors/bin/python" tests/timm_suite/floor_smoke.py
