"""Inputs for DCSS: arrays, tensors, Datasets, DataLoaders, files and named datasets, validated up front.

Everything is brought to a float32 tensor ``x`` (N, ...) — vectors (N, F) or images (N, C, H, W) — plus
optional integer labels (only ever used for reported metrics), before any training work starts.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .arrays import _refuse_complex, load_array  # torch-free, for the ONNX runtime and `dcss assign`
from .errors import DataError  # defined there (torch-free) so that the ONNX runtime can raise it too

__all__ = [
    "DataError",
    "data_fingerprint",
    "shuffled_batches",
    "as_tensor",
    "to_float32",
    "validate_features",
    "validate_labels",
    "load_array",
    "load_named_dataset",
    "NAMED_DATASETS",
]

NAMED_DATASETS = ("digits", "mnist", "fashion-mnist", "usps", "cifar10", "stl10")


def _to_numpy(obj: Any) -> np.ndarray:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().numpy()
    return np.asarray(obj)


_F32_MAX = float(np.finfo(np.float32).max)
_F32_EXACT_INT = 2 ** 24  # every integer up to this is exact in float32; above it neighbours merge


def to_float32(arr: Any, name: str = "data", check_variation: bool = True) -> np.ndarray:
    """``arr`` as a float32 numpy array, refusing what the cast would silently damage (:class:`DataError`).

    * complex values (the imaginary part would be dropped);
    * finite values beyond float32's range (|x| > 3.4e38 would become inf);
    * integers above 2**24 whose distinct values merge in float32, and wider floats whose whole variation is
      below float32's resolution, when the data would come out constant (a warning when only some features lose
      variation).

    ``check_variation=False`` skips the last check (for one batch or item of a larger dataset).

    Example:
        >>> to_float32(np.array([[1e39, 0.0]]))      # DataError: overflows float32
    """
    arr = _to_numpy(arr)
    if arr.dtype == object:
        raise DataError(f"{name} could not be read as a numeric array (ragged or mixed types); pass an (N, ...) array.")
    _refuse_complex(arr.dtype, name)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}.")
    with np.errstate(over="ignore"):  # an overflow is reported below, with the rows
        out = arr.astype(np.float32, copy=False)
    if out is arr or arr.dtype == bool or arr.size == 0:
        return out
    if np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize > 4:
        if not np.isfinite(out).all():
            over = np.isfinite(arr) & ~np.isfinite(out)
            if over.any():
                rows = np.nonzero(over.reshape(len(over), -1).any(1) if over.ndim > 1 else over)[0]
                raise DataError(
                    f"{name} has values that overflow float32 (|x| > {_F32_MAX:.3g}, largest {np.abs(arr[over]).max():.3g}) "
                    f"in {len(rows)} row(s) (first: {rows[:5].tolist()}); DCSS computes in float32. Rescale "
                    "those features (e.g. divide by a power of ten, or take a log) before clustering.")
        if check_variation:
            _check_lost_variation(arr, out, name, integer=False)
    elif check_variation and np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize > 2:
        if arr.size and max(int(arr.max()), -int(arr.min())) > _F32_EXACT_INT:
            _check_lost_variation(arr, out, name, integer=True)
    return out


def _check_lost_variation(arr: np.ndarray, out: np.ndarray, name: str, integer: bool) -> None:
    """Refuse a cast that makes varying data constant; warn when it makes some varying features constant or
    (integers) merges distinct values."""
    if arr.ndim == 0 or len(arr) < 2:
        return
    a, o = arr.reshape(len(arr), -1), out.reshape(len(out), -1)
    varies = a.max(0) != a.min(0)
    still = o.max(0) != o.min(0)
    lost = varies & ~still
    if integer:
        what = (f"its integers above 2**24 = {_F32_EXACT_INT} lose precision in float32 (neighbouring values "
                "become equal)")
        fix = "subtract an offset first (e.g. x - x.min(0)), or drop identifier columns, which are not features"
    else:
        what = "its variation is below float32's resolution at the values' magnitude (about 6e-8 relative)"
        fix = "subtract the per-feature mean in float64 first (x - x.mean(0)), then pass the result"
    if varies.any() and not still.any():
        raise DataError(f"{name} becomes constant when converted to float32, which DCSS computes in: {what}; {fix}.")
    if lost.any():
        cols = np.nonzero(lost)[0]
        warnings.warn(f"{name}: {len(cols)} feature(s) (first: {cols[:5].tolist()}) become constant in float32: "
                      f"{what}; {fix}.", UserWarning, stacklevel=3)
    elif integer and (o.astype(np.int64) != a).any():
        merged = sum(len(np.unique(a[:, j])) - len(np.unique(o[:, j])) for j in range(a.shape[1]))
        if merged:
            warnings.warn(f"{name}: {merged} distinct value(s) merge with a neighbour in float32: {what}; {fix}.",
                          UserWarning, stacklevel=3)


def _in_dataset_order(loader: Any) -> Any:
    """``loader`` itself when it yields its dataset in order; otherwise an unshuffled loader over the same dataset
    (same batch size and collate function), so that results come in dataset order; DataError when that cannot be."""
    from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler

    if isinstance(loader.dataset, IterableDataset):
        return loader  # the dataset's own iteration order
    batch_sampler = loader.batch_sampler
    sampler = batch_sampler.sampler if type(batch_sampler) is BatchSampler else (
        loader.sampler if batch_sampler is None else None)
    if isinstance(sampler, SequentialSampler):
        if type(batch_sampler) is BatchSampler and batch_sampler.drop_last:
            pass  # fall through: read every sample, in order
        else:
            return loader
    elif not (isinstance(sampler, RandomSampler) and not sampler.replacement
              and sampler.num_samples == len(loader.dataset)):
        raise DataError(
            f"The DataLoader draws its samples with {type(sampler or batch_sampler).__name__}, so its order is not the "
            "dataset's and results (labels_) could not be matched to your samples. Pass the Dataset itself, or a "
            "DataLoader with shuffle=False and no sampler.")
    batched = loader.batch_size is not None
    return DataLoader(loader.dataset, batch_size=loader.batch_size if batched else 256, shuffle=False,
                      collate_fn=loader.collate_fn if batched else None, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory)


def _batch_tensor(obj: Any, name: str) -> Tensor:
    if isinstance(obj, Tensor) and obj.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        return obj.float()
    return torch.as_tensor(to_float32(obj, name, check_variation=False))


def as_tensor(data: Any) -> Tuple[Tensor, Optional[Tensor]]:
    """Bring ``data`` to ``(x, y)``: ``x`` float32 (N, ...), ``y`` int64 (N,) when the input carries labels.

    Accepts a numpy array, a tensor, a ``torch.utils.data.Dataset`` (items ``x`` or ``(x, y, ...)``) or a
    ``DataLoader`` (batches ``x`` or ``(x, y, ...)``). Datasets and loaders are read once into memory, always in
    dataset order: a shuffling loader (``shuffle=True``) is read through an unshuffled one over the same dataset,
    and a loader with any other sampler is refused. Complex values, values beyond float32's range and data whose
    variation float32 cannot hold are refused (see :func:`to_float32`).
    """
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, (np.ndarray, Tensor)) or isinstance(data, (list, tuple)) and not isinstance(data, Dataset):
        arr = to_float32(data, "Data")
        if not arr.flags.writeable:  # e.g. a read-only view from pandas: copy, since torch cannot share it
            arr = arr.copy()
        return torch.as_tensor(arr), None
    if isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in _in_dataset_order(data):
            bx, by = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else (batch, None)
            if isinstance(batch, (list, tuple)) and len(batch) == 1:
                bx = batch[0]
            xs.append(_batch_tensor(bx, "A DataLoader batch"))
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
                xs.append(_batch_tensor(np.asarray(item[0]), "A Dataset item"))
                if len(item) > 1:
                    ys.append(int(item[1]))
            else:
                xs.append(_batch_tensor(np.asarray(item), "A Dataset item"))
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


def load_named_dataset(name: str, data_root: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``(x, y)`` of a named dataset: ``digits`` (embedded in scikit-learn, 1797 8x8 images) or a torchvision
    dataset (MNIST, Fashion-MNIST, USPS, CIFAR-10, STL-10; train and test splits joined) read from ``data_root``.

    Nothing is downloaded: the files must already be in ``data_root`` in torchvision's layout; MNIST and
    Fashion-MNIST are also read from their four IDX files (``train-images-idx3-ubyte[.gz]``, ...) directly in
    ``data_root`` (:mod:`dcss_plugin.idx`). Pixels keep their stored scale (0..255).
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
        raise DataError(f"Dataset {name!r} is read from local files: pass --data-root DIR (torchvision layout"
                        f"{'; or the four IDX files directly in DIR' if key in ('mnist', 'fashion-mnist') else ''}).")
    root = os.path.expanduser(data_root)
    if key in ("mnist", "fashion-mnist"):  # IDX files in DIR or DIR/MNIST/raw, read without torchvision
        from .idx import load_idx_pair

        x_np, y_np = load_idx_pair(root, key)
        return torch.as_tensor(x_np).float(), torch.as_tensor(y_np)
    import torchvision.datasets as tvd

    try:
        if key == "usps":
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
