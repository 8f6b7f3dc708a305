"""Interruption-safe training: a run stopped at any point and resumed ends exactly like an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dcss_plugin import DCSS

KW = dict(pretrain_epochs=4, phase1_epochs=4, phase2_epochs=8, mlp_hidden_dims=(32, 32), verbose=False,
          num_heads=2, neighbor_refresh=3)


def data():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 4, size=(3, 5))
    return np.concatenate([rng.normal(m, 1.0, size=(50, 5)) for m in means]).astype(np.float32)


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [("pretrain", 1), ("phase1", 2), ("phase2", 0), ("phase2", 5)])
def test_resume_in_process_matches_uninterrupted(tmp_path, stop_at):
    x = data()
    ref = DCSS(3, seed=0, **KW).fit(x)
    ckpt = tmp_path / "progress.pt"

    def interrupt(phase, epoch, stats):
        if (phase, epoch) == stop_at:
            raise Stop

    with pytest.raises(Stop):
        DCSS(3, seed=0, **KW).fit(x, callback=interrupt, checkpoint_path=ckpt)
    assert ckpt.exists()
    resumed = DCSS(3, seed=0, **KW).fit(x, checkpoint_path=ckpt, resume=True)
    np.testing.assert_array_equal(resumed.labels_, ref.labels_)
    np.testing.assert_array_equal(resumed.predict_proba(x), ref.predict_proba(x))


def test_progress_saves_are_rate_limited_and_resume_still_matches(tmp_path, monkeypatch):
    import dcss_plugin.training.run as run_module

    saved = []
    original = run_module.atomic_torch_save

    def spy(state, path):
        saved.append((state["phase"], state["epoch"]))
        return original(state, path)

    monkeypatch.setattr(run_module, "atomic_torch_save", spy)
    x = data()
    every = DCSS(3, seed=0, **KW).fit(x, checkpoint_path=tmp_path / "a.pt", checkpoint_every_s=0)
    assert len(saved) == 4 + 4 + 8 + 2  # every epoch, and the starts of Phase 1 and Phase 2
    saved.clear()

    def interrupt(phase, epoch, stats):
        if (phase, epoch) == ("phase2", 6):
            raise Stop

    with pytest.raises(Stop):
        DCSS(3, seed=0, **KW).fit(x, callback=interrupt, checkpoint_path=tmp_path / "b.pt", checkpoint_every_s=1e9)
    assert saved == [("pretrain", 1), ("phase1", 0), ("phase2", 0)]  # first epoch and the phase starts only
    resumed = DCSS(3, seed=0, **KW).fit(x, checkpoint_path=tmp_path / "b.pt", resume=True)  # replays phase 2
    np.testing.assert_array_equal(resumed.predict_proba(x), every.predict_proba(x))
    with pytest.raises(ValueError, match="checkpoint_every_s"):
        DCSS(3, seed=0, **KW).fit(x, checkpoint_path=tmp_path / "c.pt", checkpoint_every_s=-1)


def test_resume_rejects_other_config_other_data_and_corrupt_file(tmp_path):
    x = data()
    ckpt = tmp_path / "progress.pt"

    def interrupt(phase, epoch, stats):
        if phase == "phase1":
            raise Stop

    with pytest.raises(Stop):
        DCSS(3, seed=0, **KW).fit(x, callback=interrupt, checkpoint_path=ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match="different config.*seed"):
        DCSS(3, seed=1, **KW).fit(x, checkpoint_path=ckpt, resume=True)
    with pytest.raises(ValueError, match="different data"):
        DCSS(3, seed=0, **KW).fit(x * 2, checkpoint_path=ckpt, resume=True)
    assert ckpt.read_bytes() == before  # a refused resume leaves the file intact
    bad = tmp_path / "bad.pt"
    bad.write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="could not be read"):
        DCSS(3, seed=0, **KW).fit(x, checkpoint_path=bad, resume=True)
    with pytest.raises(FileNotFoundError, match="Nothing to resume"):
        DCSS(3, seed=0, **KW).fit(x, checkpoint_path=tmp_path / "none.pt", resume=True)


@pytest.mark.slow
def test_cli_run_killed_by_signal_then_resumed_gives_same_labels(tmp_path):
    """A real `dcss fit` subprocess is killed (SIGKILL) mid-run, resumed with --resume, and compared."""
    x = data()
    np.save(tmp_path / "X.npy", x)
    args = ["fit", "--data", str(tmp_path / "X.npy"), "--clusters", "3", "--seed", "0", "--quiet",
            "--pretrain-epochs", "30", "--phase1-epochs", "10", "--phase2-epochs", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dcss_plugin.app.cli"]
    ref = subprocess.run(cmd + args + ["--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(cmd + args + ["--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until it is inside phase 1 or later, then kill it hard
        log = run / "log.jsonl"
        if log.exists() and any('"phase1"' in line or '"phase2"' in line for line in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (run / "progress.pt").exists() and not (run / "labels.npy").exists()
    res = subprocess.run(cmd + args + ["--out", str(run), "--resume"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(run / "labels.npy"), np.load(tmp_path / "ref" / "labels.npy"))
    assert not (run / "progress.pt").exists()
    # resuming a finished run is refused with a clear message
    again = subprocess.run(cmd + args + ["--out", str(run), "--resume"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 2 and "no interrupted run" in again.stderr
