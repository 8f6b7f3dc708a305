"""Atomic writes and safe loading of checkpoints and reports."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict

import torch

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_torch_save", "atomic_save_npy", "load_checkpoint",
           "load_checkpoint_any"]


def _atomic(path: str | os.PathLike, write) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    _atomic(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    import numpy as np

    _atomic(path, lambda fh: np.save(fh, array, allow_pickle=False))


def load_checkpoint(path: str | os.PathLike, expected_format: str) -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only) and check its format tag."""
    return load_checkpoint_any(path, (expected_format,))


def load_checkpoint_any(path: str | os.PathLike, formats: tuple) -> Dict[str, Any]:
    """Like :func:`load_checkpoint`, accepting any of several format tags."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint not found: {path!r}. Pass the run directory written by `dcss fit` "
                                "or the checkpoint.pt inside it.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path!r} could not be read as a DCSS checkpoint (corrupt, truncated, or not a "
                         f"checkpoint; only tensors and plain config are accepted): {exc}") from exc
    if not isinstance(state, dict) or state.get("format") not in formats:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path!r} is not a DCSS checkpoint of a known format ({', '.join(formats)}; found {found!r}).")
    return state
