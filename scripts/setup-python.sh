#!/usr/bin/env bash
# Creates .venv with the Python packages dinostream's tests and runtime lookups use:
# onnxruntime (its shared library serves the `ort` crate), onnx (model checker) and numpy.
# Idempotent: does nothing when the venv already has them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DINOSTREAM_VENV:-.venv}
PY=${PYTHON:-python3}
ORT_VERSION=${ORT_VERSION:-1.30.0}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import numpy, onnx, onnxruntime" 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check numpy onnx "onnxruntime==$ORT_VERSION"
