#!/usr/bin/env bash
# The declared floors work. floor_smoke.py (import, build, forward, backward) runs in two fresh venvs:
#   1. the minimum timm from pyproject.toml on the torch / torchvision of the Python running this script;
#   2. the minimum timm on the minimum torch from pyproject.toml and its torchvision (downloaded from PyPI, ~3 GB).
# Works whether `python` is a venv or the system interpreter: venv 1 sees the running Python's packages through a
# .pth file (listed after its own site-packages, so its timm wins), not through --system-site-packages, which would
# show the *base* interpreter's packages when the running Python is itself a venv.
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
pip_install() { "$1/bin/python" -m pip install --quiet --disable-pip-version-check "${@:2}"; }

t=$(date +%s)
python -m venv "$tmp/timm_floor"
site=$("$tmp/timm_floor/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python -c "import site, sys; print('\n'.join(p for p in sys.path if p.endswith('-packages')))" > "$site/outer.pth"
pip_install "$tmp/timm_floor" --no-deps "timm==$timm_floor"
PYTHONPATH="$PWD" "$tmp/timm_floor/bin/python" tests/timm_suite/floor_smoke.py --timm "$timm_floor"
echo "floor smoke 1 (timm $timm_floor on this torch) took $(( $(date +%s) - t )) s"

t=$(date +%s)
python -m venv "$tmp/all_floors"
pip_install "$tmp/all_floors" "torch==$torch_floor.*" "torchvision==$tv_floor.*" "timm==$timm_floor" \
    numpy safetensors huggingface-hub pyyaml
PYTHONPATH="$PWD" "$tmp/all_floors/bin/python" tests/timm_suite/floor_smoke.py --timm "$timm_floor" \
    --torch "$torch_floor"
echo "floor smoke 2 (timm $timm_floor, torch $torch_floor) took $(( $(date +%s) - t )) s"
