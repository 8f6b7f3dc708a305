"""Atomic writes and safe loading of checkpoints and reports.

Every file is written to a temporary file beside its target, fsynced, then renamed over the target, so a reader
sees the old file or the new one, never half of one. Two more rules:

* Permissions: a new file gets ``0o666 & ~umask`` (0644 under umask 022, 0640 under 027), as ``open()`` would
  give it, not ``mkstemp``'s 0600; a file that replaces an existing one keeps that file's mode (a manual
  ``chmod`` survives a re-export).
* Stray temporary files: the temporary name is ``.tmp-<pid>-<host>-<random><name>`` (``<host>``: 8 hex digits of
  a hash of the host name). A writer killed mid-save leaves one behind; the next atomic write into the same
  directory removes those whose writer is gone: same host and no process with that pid, or (another host, e.g.
  a shared file system, where the pid cannot be checked) not modified for 24 hours. A temporary file of a live
  writer is never removed. Files of any other name are never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

from .errors import describe_load_error

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_torch_save", "atomic_save_npy", "current_umask",
           "load_checkpoint", "load_checkpoint_any", "remove_stale_temp_files"]

TMP_PREFIX = ".tmp-"
#: A temporary file of another host is removed when it has not been modified for this long (seconds).
FOREIGN_TMP_MAX_AGE = 24 * 3600
_TMP_NAME = re.compile(r"^\.tmp-(\d+)-([0-9a-f]{8})-")
_UMASK_LOCK = threading.Lock()


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux ``/proc/self/status``); else
    set and restored at once under a lock (``os.umask`` is process-wide: the lock keeps our own writers out of
    that window)."""
    try:
        with open("/proc/self/status", "r", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # the most restrictive value while it is briefly changed
        os.umask(mask)
    return mask


def _target_mode(path: str) -> int:
    """The mode of the file that replaces ``path``: the existing file's mode, else ``0o666 & ~umask``."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode) & 0o777  # not set-id or sticky bits
    except OSError:
        pass
    return 0o666 & ~current_umask()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can judge: keep the file
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_stale_temp_files(directory: str, now: Optional[float] = None) -> List[str]:
    """Remove the temporary files of dead writers in ``directory`` (see the module docstring); returns their
    names. Never raises: a file that cannot be checked or removed is left alone."""
    removed: List[str] = []
    if os.name != "posix":  # os.kill(pid, 0) is no liveness test elsewhere (on Windows it terminates)
        return removed
    host = _host_tag()
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if not match:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if match.group(2) == host:
                stale = not _pid_alive(int(match.group(1)))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > FOREIGN_TMP_MAX_AGE
            if stale:
                os.unlink(entry.path)
                removed.append(entry.name)
        except (OSError, ValueError):
            continue
    return removed


def _atomic(path: str | os.PathLike, write) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_files(directory)
    mode = _target_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-{_host_tag()}-", suffix=os.path.basename(path),
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, mode)
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
    """``torch.save(obj)`` to ``path`` atomically (torch is imported here, so this module loads without it)."""
    import torch

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
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path!r} could not be read as a DCSS checkpoint (corrupt, truncated, or not a "
                         f"checkpoint; only tensors and plain config are accepted): {describe_load_error(exc)}"
                         ) from None
    if not isinstance(state, dict) or state.get("format") not in formats:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path!r} is not a DCSS checkpoint of a known format ({', '.join(formats)}; found {found!r}).")
    return state
