"""The IDX files MNIST and Fashion-MNIST come in (``train-images-idx3-ubyte[.gz]``, ...), read without torchvision.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), the dimensions as big-endian
uint32, then the values, row-major. :func:`read_idx` reads one file (gzipped or not); :func:`load_idx_pair` finds
the four files of a data set in a folder, directly or in torchvision's layout (``DIR/MNIST/raw``), and joins the
train and test splits.

Example:
    >>> x, y = load_idx_pair("~/data/mnist", "mnist")   # x (70000, 1, 28, 28) uint8, y (70000,) int64
"""

from __future__ import annotations

import gzip
import os
from typing import List, Optional, Tuple

import numpy as np

from .data import DataError

__all__ = ["read_idx", "find_idx_files", "load_idx_pair"]

# type code -> big-endian numpy dtype (the IDX specification's table)
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLITS = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in the IDX file ``path`` (``.gz`` is decompressed), in its native byte order.

    Raises :class:`~dcss_plugin.errors.DataError` for a file that is not IDX or is cut short.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"Could not read the IDX file {path!r}: {exc}.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path!r} is not an IDX file (its first bytes are {raw[:4]!r}; an IDX file starts with "
                        f"0x00 0x00, a type code and the number of dimensions).")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(raw) < head:
        raise DataError(f"{path!r}: IDX header of {ndim} dimensions is cut short.")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - head != need:
        raise DataError(f"{path!r}: the header says shape {shape} ({need} bytes of data) but the file holds "
                        f"{len(raw) - head}; the file is cut short or damaged. Copy it again.")
    return np.frombuffer(raw, dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def _candidates(root: str, name: str) -> List[str]:
    dirs = [root]
    sub = _TORCHVISION_DIRS.get(name)
    if sub:
        dirs.append(os.path.join(root, sub, "raw"))
    return dirs


def find_idx_files(root: str | os.PathLike, name: str = "mnist") -> Optional[List[Tuple[str, str]]]:
    """``[(train images, train labels), (test images, test labels)]`` found in ``root`` or in torchvision's layout
    ``root/MNIST/raw`` (``root/FashionMNIST/raw``), each file plain or ``.gz``; ``None`` when not all four are in one
    of these folders."""
    root = os.path.expanduser(os.fspath(root))
    for folder in _candidates(root, name):
        found = []
        for pair in _SPLITS:
            files = []
            for stem in pair:
                hit = next((os.path.join(folder, stem + ext) for ext in ("", ".gz")
                            if os.path.isfile(os.path.join(folder, stem + ext))), None)
                files.append(hit)
            found.append(tuple(files))
        if all(f is not None for pair in found for f in pair):
            return found  # type: ignore[return-value]
    return None


def load_idx_pair(root: str | os.PathLike, name: str = "mnist") -> Tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: the train and test splits of ``name`` joined, ``x`` (N, 1, 28, 28) uint8, ``y`` (N,) int64.

    Raises :class:`~dcss_plugin.errors.DataError` naming the files looked for when they are not there.
    """
    files = find_idx_files(root, name)
    if files is None:
        where = " or ".join(repr(d) for d in _candidates(os.path.expanduser(os.fspath(root)), name))
        raise DataError(f"No {name} IDX files in {where}: expected train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                        f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally .gz). This machine "
                        f"does not download: copy the four files there and run again.")
    xs, ys = [], []
    for img_path, lab_path in files:
        img, lab = read_idx(img_path), read_idx(lab_path)
        if img.ndim != 3 or lab.ndim != 1 or len(img) != len(lab):
            raise DataError(f"{img_path!r} {img.shape} and {lab_path!r} {lab.shape} are not images (N, H, W) with "
                            f"one label each.")
        xs.append(img)
        ys.append(lab.astype(np.int64))
    return np.concatenate(xs)[:, None], np.concatenate(ys)
