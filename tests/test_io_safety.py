"""Atomic writes: file modes that follow the umask (or the replaced file), and temporary files of killed writers."""

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from dcss_plugin.io import (
    FOREIGN_TMP_MAX_AGE,
    _host_tag,
    atomic_save_npy,
    atomic_torch_save,
    atomic_write_bytes,
    remove_stale_temp_files,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes and pids")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _temp_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith(".tmp-"))


@pytest.fixture
def umask():
    """Set the process umask for one test, restored afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


# ---------------------------------------------------------------------------------------------------- modes
@posix_only
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"data")
    atomic_save_npy(tmp_path / "b.npy", np.arange(3))
    atomic_torch_save({"x": 1}, tmp_path / "c.pt")
    for name in ("a.bin", "b.npy", "c.pt"):
        assert _mode(tmp_path / name) == expected, (name, oct(_mode(tmp_path / name)))


@posix_only
def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "assigner.onnx"
    atomic_write_bytes(path, b"first")
    os.chmod(path, 0o664)  # e.g. shared with a service's group by hand
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second" and _mode(path) == 0o664
    os.chmod(path, 0o600)  # made private by hand: a re-export does not widen it either
    umask(0o000)
    atomic_write_bytes(path, b"third")
    assert _mode(path) == 0o600
    assert _temp_files(tmp_path) == []


@posix_only
def test_umask_is_left_unchanged(tmp_path, umask):
    umask(0o027)
    atomic_write_bytes(tmp_path / "a", b"x")
    current = os.umask(0o027)
    assert current == 0o027


# ---------------------------------------------------------------------------------------------------- stale temp files
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)
    return child.pid


@posix_only
def test_temp_file_of_a_dead_writer_is_removed_a_live_ones_stays(tmp_path):
    host = _host_tag()
    stale = tmp_path / f".tmp-{_dead_pid()}-{host}-abcd1234labels.npy"
    live = tmp_path / f".tmp-{os.getpid()}-{host}-efgh5678report.json"
    parent = tmp_path / f".tmp-{os.getppid()}-{host}-ijkl9012model.pt"  # another live process
    other_host = tmp_path / ".tmp-12345-00000000-mnop3456x.pt"  # a pid we cannot check: recent, kept
    old_other_host = tmp_path / ".tmp-12345-00000000-qrst7890y.pt"  # ... untouched for over a day: removed
    unrelated = tmp_path / ".tmp-notes.txt"  # not our naming: never touched
    for f in (stale, live, parent, other_host, old_other_host, unrelated):
        f.write_bytes(b"partial")
    long_ago = time.time() - FOREIGN_TMP_MAX_AGE - 60
    os.utime(old_other_host, (long_ago, long_ago))
    os.utime(unrelated, (long_ago, long_ago))
    atomic_write_bytes(tmp_path / "labels.npy", b"new")
    left = set(_temp_files(tmp_path))
    assert stale.name not in left and old_other_host.name not in left
    assert {live.name, parent.name, other_host.name, unrelated.name} == left
    assert (tmp_path / "labels.npy").read_bytes() == b"new"


@posix_only
def test_writer_killed_during_a_save_leaves_nothing_after_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.pt"
    code = (
        "import sys, time\n"
        "from dcss_plugin.io import _atomic\n"
        "def slow(fh):\n"
        "    fh.write(b'half a checkpoint'); fh.flush()\n"
        "    time.sleep(60)\n"
        f"_atomic({str(target)!r}, slow)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.time() + 60
        while not _temp_files(tmp_path) and time.time() < deadline and child.poll() is None:
            time.sleep(0.05)
        left = _temp_files(tmp_path)
        assert len(left) == 1 and left[0].startswith(f".tmp-{child.pid}-")
        remove_stale_temp_files(str(tmp_path))
        assert _temp_files(tmp_path) == left  # the writer is alive: its file stays
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert _temp_files(tmp_path) == left and not target.exists()  # what a kill leaves behind
    atomic_torch_save({"step": 1}, target)
    assert _temp_files(tmp_path) == [] and target.exists()
