#!/usr/bin/env bash
# Set up nlsr-hub in ./.venv on this machine: the CPU build of torch 2.13.0 (pinned here only; the package
# itself accepts any torch>=2.1), then nlsr-hub in editable mode with the given extras (default: dev).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
echo "nlsr-hub installed in .venv (extras: ${extras})"
