#!/usr/bin/env bash
# The declared timm floor works: a venv reusing the installed torch / torchvision (--system-site-packages) with the
# minimum timm from pyproject.toml, then floor_smoke.py (import, build, forward, backward).
set -euo pipefail
cd "$(dirname "$0")/../.."
floor=$(python -c "import re;print(re.search(r'\"timm>=([0-9.]+)\"', open('pyproject.toml').read()).group(1))")
venv=$(mktemp -d)/floor
python -m venv --system-site-packages "$venv"
"$venv/bin/pip" install --quiet --no-deps "timm==$floor"
PYTHONPATH="$PWD" "$venv/bin/python" tests/timm_suite/floor_smoke.py
rm -rf "$(dirname "$venv")"
