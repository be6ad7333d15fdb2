#!/usr/bin/env bash
# Install the test oracles that cannot live in qplan's venv (default folders: .oracles/axolotl, .oracles/liger).
#
# axolotl 0.19.0 pins torch/transformers/trl versions other than qplan's, so `pip install axolotl` beside qplan
# cannot resolve. Its dataset preparation (prompt strategies, length filter, packing filter) runs fine on qplan's
# torch/transformers/datasets: .ci/oracles-axolotl.txt lists it and the few modules its imports need, installed
# --no-deps into a folder that tests put on PYTHONPATH of a subprocess (tests/oracles/axolotl_prepare.py).
# Uses the active Python (run it inside qplan's venv). Tests that need it skip, saying so, without it.
set -euo pipefail
cd "$(dirname "$0")/.."
# Liger-Kernel (.ci/oracles-liger.txt) and Triton's Python front end likewise: tests/oracles/liger_trace.py.
ROOT=${1:-.oracles}
for name in axolotl liger; do
  DEST=$ROOT/$name
  rm -rf "$DEST.partial"
  python -m pip install -q --disable-pip-version-check --no-deps --target "$DEST.partial" -r ".ci/oracles-$name.txt"
  rm -rf "$DEST"
  mv "$DEST.partial" "$DEST"
  echo "oracles ready: $PWD/$DEST"
done
