"""Arrays from files (``.npy``, numeric ``.csv``, ``.pt``) without importing torch for the first two.

The ``dcss assign`` command and the ONNX runtime read their input here, so a service image without torch can use
them; a ``.pt`` file imports torch when it is read.

Example:
    >>> x = load_array("X.csv")          # (N, F) float64; the header row and a pandas index column are detected
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["load_array"]


def _refuse_complex(dtype: Any, name: str) -> None:
    if np.issubdtype(np.dtype(dtype), np.complexfloating):
        raise DataError(f"{name} is complex ({np.dtype(dtype)}); DCSS clusters real numbers and would drop the "
                        "imaginary part. Pass real features, e.g. np.concatenate([x.real, x.imag], axis=1) or np.abs(x).")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: str, header: Any = "auto") -> np.ndarray:
    """A numeric CSV as a float64 (N, F) array; see :func:`load_array` for the header rule."""
    if header not in ("auto", True, False):
        raise DataError(f"header must be 'auto', True or False, got {header!r}.")
    with open(path, "r", encoding="utf-8-sig", newline="") as fh:  # utf-8-sig: Excel's byte-order mark is dropped
        sample = fh.read(65536)
    lines = [ln for ln in sample.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path!r} is empty; a CSV needs one row per sample.")
    try:
        delimiter = csv.Sniffer().sniff("\n".join(lines[:20]), delimiters=",;\t").delimiter
    except csv.Error:
        delimiter = ","
    first = next(csv.reader(io.StringIO(lines[0]), delimiter=delimiter))
    named = any(v.strip() and not _is_number(v) for v in first) or (len(first) > 1 and not first[0].strip())
    skip = 1 if (header is True or (header == "auto" and named)) else 0
    if named and header is False:
        raise DataError(f"The first row of {path!r} is not numeric ({lines[0][:80]!r}) but header=False was given.")
    arr = np.loadtxt(path, delimiter=delimiter, skiprows=skip, dtype=np.float64, ndmin=2, encoding="utf-8-sig",
                     quotechar='"')
    if skip and first and not first[0].strip() and len(first) == arr.shape[1] and len(arr) \
            and np.array_equal(arr[:, 0], np.arange(len(arr))):
        arr = arr[:, 1:]  # pandas' to_csv index column (its header cell is empty): row numbers, not a feature
    if not skip and header == "auto" and len(arr) > 1 and arr.shape[1] > 1:
        f = arr.shape[1]
        numbered = np.array_equal(arr[0], np.arange(f)) or np.array_equal(arr[0], np.arange(1, f + 1))
        if numbered:
            rest = arr[1:]
            if not np.all(rest == np.round(rest)):
                arr = rest  # a row of column numbers above non-integer data: a header (pandas writes one)
            else:
                warnings.warn(f"The first row of {path!r} reads {', '.join(str(i) for i in arr[0, :4].astype(int))}"
                              f"{', ...' if f > 4 else ''}: column numbers or data? It is read as data; pass "
                              "header=True if it is a header.", UserWarning, stacklevel=3)
    return arr


def load_array(path: str | os.PathLike, header: Any = "auto") -> np.ndarray:
    """Read ``.npy``, ``.csv`` (numeric) or ``.pt`` (a tensor, loaded with weights_only).

    CSV: UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8"); the delimiter (``,``, ``;`` or tab) is
    detected. ``header="auto"`` takes the first row as a header when any field of it is not a number or is empty,
    or when it reads ``0, 1, ..., F-1`` (or ``1, ..., F``) above data with non-integer values (pandas' column
    numbers); the same numbers above integer data are read as data, with a warning. ``header=True`` / ``False``
    decides explicitly. After a header whose first cell is empty, a first column ``0..N-1`` is pandas' index and
    is dropped. Complex data are refused.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"File not found: {path!r}.")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
            _refuse_complex(arr.dtype, f"{path!r}")
            return arr
        if ext == ".csv":
            return _read_csv(path, header)
        if ext == ".pt":
            import torch

            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - the reason without torch's weights_only=False advice
                from .errors import describe_load_error

                raise DataError(f"Could not read {path!r} as a tensor file: {describe_load_error(exc)}.") from None
            if isinstance(obj, dict):
                tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
                if len(tensors) != 1:
                    raise DataError(f"{path!r} holds a dict; save a single tensor with torch.save(tensor, path).")
                obj = tensors[0]
            if not isinstance(obj, torch.Tensor):
                raise DataError(f"{path!r} does not hold a tensor (found {type(obj).__name__}).")
            if obj.is_complex():
                _refuse_complex(np.complex64, f"{path!r}")
            return obj.numpy()
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as CSV UTF-8.") from None
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise DataError(f"Could not read {path!r} as {ext or 'an array'} file: {exc}") from exc
    raise DataError(f"Unsupported file type {ext!r} for {path!r}; use .npy, .csv or .pt.")
