#!/usr/bin/env bash
# Install timm_cbsa for development on a fresh Debian/Ubuntu machine (CPU is enough).
#   - torch 2.14.1 + torchvision 0.29.1 (a matching pair; `import timm` needs torchvision)
#   - timm_cbsa in editable mode with the dev extra (pytest, submitit, scikit-image, imgviz, matplotlib, ...)
#   - Debian's dataset-fashion-mnist (real 28x28 images, used by the quickstart and the training tests)
# SLURM's Debian packages are installed by the SLURM test fixture itself, only when those tests run.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq || echo "warning: apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist \
        || echo "warning: could not install dataset-fashion-mnist (apt); Fashion-MNIST tests will fail"
fi

python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q --disable-pip-version-check -e ".[dev]"
python -c "import torch, timm, timm_cbsa; print('torch', torch.__version__, '| timm', timm.__version__, '| timm_cbsa', timm_cbsa.__version__)"
