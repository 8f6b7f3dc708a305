"""Inputs for DCSS: arrays, tensors, Datasets, DataLoaders, files and named datasets, validated up front.

Everything is brought to a float32 tensor ``x`` (N, ...) — vectors (N, F) or images (N, C, H, W) — plus
optional integer labels (only ever used for reported metrics), before any training work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataError",
    "data_fingerprint",
    "shuffled_batches",
    "InputNormalizer",
    "as_tensor",
    "validate_features",
    "validate_labels",
    "load_array",
    "load_named_dataset",
    "NAMED_DATASETS",
]

NAMED_DATASETS = ("digits", "mnist", "fashion-mnist", "usps", "cifar10", "stl10")


class DataError(ValueError):
    """Input data that DCSS cannot use; the message says what, why and how to fix it."""


def _to_numpy(obj: Any) -> np.ndarray:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().numpy()
    return np.asarray(obj)


def as_tensor(data: Any) -> Tuple[Tensor, Optional[Tensor]]:
    """Bring ``data`` to ``(x, y)``: ``x`` float32 (N, ...), ``y`` int64 (N,) when the input carries labels.

    Accepts a numpy array, a tensor, a ``torch.utils.data.Dataset`` (items ``x`` or ``(x, y, ...)``) or a
    ``DataLoader`` (batches ``x`` or ``(x, y, ...)``). Datasets and loaders are read once into memory.
    """
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, (np.ndarray, Tensor)) or isinstance(data, (list, tuple)) and not isinstance(data, Dataset):
        arr = _to_numpy(data)
        if arr.dtype == object:
            raise DataError("Data could not be read as a numeric array (ragged or mixed types); pass an (N, ...) array.")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise DataError(f"Data must be numeric, got dtype {arr.dtype}.")
        arr = arr.astype(np.float32, copy=False)
        if not arr.flags.writeable:  # e.g. a read-only view from pandas: copy, since torch cannot share it
            arr = arr.copy()
        return torch.as_tensor(arr), None
    if isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in data:
            bx, by = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else (batch, None)
            if isinstance(batch, (list, tuple)) and len(batch) == 1:
                bx = batch[0]
            xs.append(torch.as_tensor(bx).float())
            if by is not None:
                ys.append(torch.as_tensor(by).long().reshape(-1))
        if not xs:
            raise DataError("The DataLoader yielded no batches.")
        return torch.cat(xs), (torch.cat(ys) if len(ys) == len(xs) else None)
    if isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise DataError("An iterable-style Dataset has no length; wrap it in a DataLoader instead.")
        xs, ys = [], []
        for i in range(len(data)):  # type: ignore[arg-type]
            item = data[i]
            if isinstance(item, (list, tuple)):
                xs.append(torch.as_tensor(np.asarray(item[0])).float())
                if len(item) > 1:
                    ys.append(int(item[1]))
            else:
                xs.append(torch.as_tensor(np.asarray(item)).float())
        if not xs:
            raise DataError("The Dataset is empty.")
        return torch.stack(xs), (torch.tensor(ys, dtype=torch.long) if len(ys) == len(xs) else None)
    raise DataError(
        f"Unsupported data of type {type(data).__name__}; pass a numpy array, a torch tensor, a Dataset or a DataLoader."
    )


def validate_features(x: Tensor, num_clusters: int, name: str = "data") -> None:
    """Raise :class:`DataError` for data DCSS cannot cluster into ``num_clusters`` groups."""
    if x.dim() not in (2, 3, 4):
        raise DataError(
            f"{name} must be vectors (N, F), grayscale images (N, H, W) or images (N, C, H, W); "
            f"got {x.dim()} dimension(s) with shape {tuple(x.shape)}. Reshape it to one of these."
        )
    n = x.shape[0]
    if n == 0 or x[0].numel() == 0:
        raise DataError(f"{name} is empty (shape {tuple(x.shape)}).")
    k = int(num_clusters)
    if k < 2:
        raise DataError(f"The number of clusters K must be at least 2, got {num_clusters}.")
    if k > n:
        raise DataError(f"The number of clusters K={k} exceeds the number of samples N={n}; use K <= N.")
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = torch.nonzero(bad.flatten(1).any(1)).flatten()
        raise DataError(
            f"{name} contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
            "drop or impute those rows before clustering."
        )
    flat = x.flatten(1)
    if bool((flat == flat[0]).all()):
        raise DataError(f"{name} is constant (all {n} rows are identical); there is nothing to cluster.")
    distinct = torch.unique(flat, dim=0).shape[0]
    if distinct < k:
        raise DataError(f"{name} has only {distinct} distinct rows, fewer than K={k} clusters; lower K.")


def validate_labels(y: Any, n: int) -> np.ndarray:
    arr = _to_numpy(y)
    if arr.ndim != 1:
        raise DataError(f"Labels must be 1-D (one per sample), got shape {arr.shape}.")
    if arr.shape[0] != n:
        raise DataError(f"Labels have {arr.shape[0]} entries but the data has {n} rows; they must match.")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            _, arr = np.unique(arr.astype(str), return_inverse=True)
    return arr.astype(np.int64)


def load_array(path: str | os.PathLike) -> np.ndarray:
    """Read ``.npy``, ``.csv`` (numeric, optional header row) or ``.pt`` (a tensor, loaded with weights_only)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"File not found: {path!r}.")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            return np.load(path, allow_pickle=False)
        if ext == ".csv":
            with open(path, "r", encoding="utf-8") as fh:
                first = fh.readline()
            try:
                [float(v) for v in first.strip().split(",") if v.strip()]
                skip = 0
            except ValueError:
                skip = 1
            arr = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)
            return arr
        if ext == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = [v for v in obj.values() if isinstance(v, Tensor)]
                if len(tensors) != 1:
                    raise DataError(f"{path!r} holds a dict; save a single tensor with torch.save(tensor, path).")
                obj = tensors[0]
            if not isinstance(obj, Tensor):
                raise DataError(f"{path!r} does not hold a tensor (found {type(obj).__name__}).")
            return obj.numpy()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise DataError(f"Could not read {path!r} as {ext or 'an array'} file: {exc}") from exc
    raise DataError(f"Unsupported file type {ext!r} for {path!r}; use .npy, .csv or .pt.")


def load_named_dataset(name: str, data_root: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``(x, y)`` of a named dataset: ``digits`` (embedded in scikit-learn, 1797 8x8 images) or a torchvision
    dataset (MNIST, Fashion-MNIST, USPS, CIFAR-10, STL-10; train and test splits joined) read from ``data_root``.

    Nothing is downloaded: the files must already be in ``data_root`` in torchvision's layout.
    """
    key = name.lower().replace("_", "-")
    if key == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1), torch.as_tensor(d.target, dtype=torch.long)
    if key not in NAMED_DATASETS:
        import difflib

        close = difflib.get_close_matches(key, NAMED_DATASETS, n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DataError(f"Unknown dataset {name!r}; known: {', '.join(NAMED_DATASETS)}.{hint}")
    if not data_root:
        raise DataError(f"Dataset {name!r} is read from local files: pass --data-root DIR (torchvision layout).")
    import torchvision.datasets as tvd

    root = os.path.expanduser(data_root)
    try:
        if key in ("mnist", "fashion-mnist"):
            cls = tvd.MNIST if key == "mnist" else tvd.FashionMNIST
            parts = [cls(root, train=t, download=False) for t in (True, False)]
            x = torch.cat([p.data for p in parts]).float().unsqueeze(1)
            y = torch.cat([torch.as_tensor(p.targets) for p in parts]).long()
        elif key == "usps":
            parts = [tvd.USPS(root, train=t, download=False) for t in (True, False)]
            x = torch.cat([torch.as_tensor(np.asarray(p.data)) for p in parts]).float().unsqueeze(1)
            y = torch.cat([torch.as_tensor(p.targets) for p in parts]).long()
        elif key == "cifar10":
            parts = [tvd.CIFAR10(root, train=t, download=False) for t in (True, False)]
            x = torch.cat([torch.as_tensor(p.data) for p in parts]).float().permute(0, 3, 1, 2).contiguous()
            y = torch.cat([torch.as_tensor(p.targets) for p in parts]).long()
        else:  # stl10
            parts = [tvd.STL10(root, split=s, download=False) for s in ("train", "test")]
            x = torch.cat([torch.as_tensor(p.data) for p in parts]).float()
            y = torch.cat([torch.as_tensor(p.labels) for p in parts]).long()
    except (RuntimeError, FileNotFoundError) as exc:
        raise DataError(
            f"Dataset {name!r} was not found under {root!r} ({exc}). This machine does not download: place the "
            f"files there in torchvision's layout (e.g. from another machine, torchvision.datasets."
            f"{ {'mnist': 'MNIST', 'fashion-mnist': 'FashionMNIST', 'usps': 'USPS', 'cifar10': 'CIFAR10', 'stl10': 'STL10'}[key]}"
            f"(root, download=True)) and run again."
        ) from exc
    return x, y


@dataclass
class InputNormalizer:
    """``x_normalised = (x - offset) / scale``; images share one scalar scale, vectors are standardised per feature.

    ``offset`` and ``scale`` have the sample shape (or broadcast to it) and are saved with the model and in the
    ONNX metadata, so a service applies exactly what ``predict`` applies.
    """

    offset: Tensor
    scale: Tensor
    kind: str  # "image" or "vector"

    @classmethod
    def fit(cls, x: Tensor) -> "InputNormalizer":
        if x.dim() == 2:
            offset = x.mean(0)
            scale = x.std(0, unbiased=False)
            scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
            return cls(offset, scale, "vector")
        lo, hi = float(x.min()), float(x.max())
        offset = torch.full((1,) * (x.dim() - 1), min(lo, 0.0))
        scale = torch.full((1,) * (x.dim() - 1), max(hi - min(lo, 0.0), 1e-8))
        return cls(offset, scale, "image")

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.offset.to(x.device, x.dtype)) / self.scale.to(x.device, x.dtype)

    def state_dict(self) -> dict:
        return {"offset": self.offset.clone(), "scale": self.scale.clone(), "kind": self.kind}

    @classmethod
    def from_state_dict(cls, state: dict) -> "InputNormalizer":
        return cls(state["offset"], state["scale"], str(state["kind"]))


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> List[Tensor]:
    """Index batches of one shuffled epoch over ``n`` samples; a last batch of one sample joins the one before
    (BatchNorm needs two samples)."""
    perm = torch.randperm(n, generator=generator)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out[-2] = torch.cat([out[-2], out.pop()])
    return out


def data_fingerprint(x: Tensor) -> Dict[str, Any]:
    """Identity of training data (shape and a SHA-256 of its bytes), stored in progress files and checked on resume."""
    import hashlib

    digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {"shape": list(x.shape), "sha256": digest}
