#!/usr/bin/env bash
# Runs the tests marked `gpu` (deselected in the default CPU run) on a machine with a CUDA GPU.
#   bash scripts/gpu_check.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'"
# The GPU image has no pytest-xdist: replace pyproject's addopts (which start 2 workers).
exec python -m pytest -o addopts="--import-mode=importlib -ra" -m gpu -p no:cacheprovider "$@" tests/gpu
