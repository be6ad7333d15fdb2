#!/usr/bin/env bash
# Create the separate virtual environment the Unsloth backend runs in (default: .venv-unsloth).
#
# Why a separate venv, and why --no-deps from a freeze (verified 2026-11-25, CPU only):
# Unsloth 2026.10.9 needs transformers <= 5.17 and trl <= 1.15 (qplan's main venv has 5.23), and
# `pip install unsloth` cannot resolve: unsloth/unsloth_zoo pin certifi>=2026.10.19, which the
# registry does not have. .ci/constraints-unsloth.txt is a tested freeze of a working set
# (certifi 2026.10.18 works); installing it with --no-deps skips the unsatisfiable pin and the
# GPU-only extras (triton, xformers, torchvision — PyPI's torchvision fails to load beside the CPU
# torch 2.13). Point qplan at it with QPLAN_UNSLOTH_PYTHON=<venv>/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-unsloth}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r .ci/constraints-unsloth.txt tabulate==0.10.0
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
echo "Unsloth venv ready: QPLAN_UNSLOTH_PYTHON=$PWD/$VENV/bin/python"
