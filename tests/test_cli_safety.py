"""`dcss` never loses data without asking, and says what went wrong in one line (issue 20, items 1, 5 and 6)."""

import json
import os

import numpy as np
import pytest
import torch

from dcss_plugin.app.cli import main
from helpers import tiny

FAST = ["--pretrain-epochs", "1", "--phase1-epochs", "2", "--phase2-epochs", "11", "--quiet", "--no-html"]


def fit_args(data, out, *extra):
    return ["fit", "--data", str(data), "--clusters", "3", "--seed", "0", "--out", str(out), *FAST, *extra]


def snapshot(folder):
    """Every file below ``folder``: its bytes and its modification time."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = (fh.read(), os.stat(path).st_mtime_ns)
    return found


def old_run(folder, n=1797):
    """A stand-in for an earlier run on other data (contents need not be valid: nothing may read or change them)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "labels.npy", np.zeros(n, np.int64))
    for name in ("checkpoint.pt", "report.json", "report.html", "samples.npz", "log.jsonl"):
        (folder / name).write_bytes(f"old {name}\n".encode())
    return folder


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One real run and its exported assigner, shared by the export/assign tests."""
    base = tmp_path_factory.mktemp("fitted")
    data = tiny(base / "X.npy")
    run = base / "run"
    assert main(fit_args(data, run)) == 0
    assert main(["export", str(run), "--full", "--out", str(base / "model.onnx")]) == 0
    return base, data, run, base / "model.onnx"


# ---------------------------------------------------------------- fit: refuse, or replace as a whole


@pytest.mark.parametrize("marker", ["checkpoint.pt", "labels.npy", "report.json", "progress.pt", "log.jsonl"])
def test_fit_into_an_existing_run_is_refused_and_changes_nothing(tmp_path, capsys, marker):
    data = tiny(tmp_path / "X.npy")
    run = tmp_path / "run"
    run.mkdir()
    (run / marker).write_bytes(b"an earlier run")
    (run / "report.html").write_bytes(b"<html>old</html>")
    before = snapshot(run)
    assert main(fit_args(data, run)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "nothing was changed" in err
    if marker == "progress.pt":  # an interrupted run: re-running it without --resume would discard its progress
        assert "--resume" in err
    assert snapshot(run) == before
    assert sorted(os.listdir(run)) == sorted(before)


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    data = tiny(tmp_path / "X.npy")
    run = old_run(tmp_path / "run")
    (run / "progress.pt").write_bytes(b"progress")
    before = snapshot(run)
    assert main(fit_args(data, run, "--resume", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_as_a_whole(tmp_path, capsys):
    data = tiny(tmp_path / "X.npy")
    run = old_run(tmp_path / "run")
    (run / "progress.pt").write_bytes(b"progress of an old interrupted run")
    (run / "notes.txt").write_text("mine")  # not written by dcss fit: kept
    assert main(fit_args(data, run, "--overwrite")) == 0
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "labels.npy", "log.jsonl", "notes.txt", "report.json",
                                       "samples.npz"]  # no old report.html, no progress.pt, no work folder
    assert np.load(run / "labels.npy").shape == (60,)
    assert json.loads((run / "report.json").read_text())["n_samples"] == 60
    assert torch.load(run / "checkpoint.pt", weights_only=True)["format"].startswith("dcss-plugin/")
    assert all("phase" in json.loads(line) for line in (run / "log.jsonl").read_text().splitlines())
    assert (run / "notes.txt").read_text() == "mine"
    assert "notes.txt" in capsys.readouterr().err


def test_overwrite_with_input_that_is_refused_keeps_the_old_run(tmp_path, capsys):
    x = np.load(tiny(tmp_path / "X.npy"))
    x[3, 1] = np.nan
    np.save(tmp_path / "bad.npy", x)
    run = old_run(tmp_path / "run")
    before = snapshot(run)
    assert main(fit_args(tmp_path / "bad.npy", run, "--overwrite")) == 2
    assert "NaN" in capsys.readouterr().err
    assert snapshot(run) == before
    assert sorted(os.listdir(run)) == sorted(before)  # no work folder left behind


# ---------------------------------------------------------------- export / assign: an output is never an input


def test_export_over_its_own_checkpoint_is_refused(fitted, capsys, monkeypatch):
    base, _, run, _ = fitted
    before = snapshot(run)
    os.symlink(run / "checkpoint.pt", base / "link.pt")
    monkeypatch.chdir(base)
    for source, out, extra in [(str(run), str(run / "checkpoint.pt"), []),
                               ("run/checkpoint.pt", "./run/../run/checkpoint.pt", ["--overwrite"]),
                               (str(run), "link.pt", ["--overwrite"])]:
        assert main(["export", source, "--out", out, *extra]) == 2
        err = capsys.readouterr().err
        assert "same file" in err and "--out" in err
    assert snapshot(run) == before


def test_export_and_assign_refuse_an_existing_output_unless_overwrite(fitted, tmp_path, capsys):
    _, data, run, model = fitted
    out = tmp_path / "a.onnx"
    out.write_bytes(b"keep me")
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"keep me"

    labels = tmp_path / "labels.npy"
    labels.write_bytes(b"keep me")
    assert main(["assign", str(model), "--data", str(data), "--out", str(labels)]) == 2
    assert "--overwrite" in capsys.readouterr().err and labels.read_bytes() == b"keep me"
    assert main(["assign", str(model), "--data", str(data), "--out", str(labels), "--overwrite"]) == 0
    assert np.load(labels).shape == (60,)


def test_assign_over_its_model_or_its_data_is_refused(fitted, capsys, monkeypatch):
    base, data, _, model = fitted
    before = snapshot(base)
    monkeypatch.chdir(base)
    for out, extra in [(str(model), []), ("./model.onnx", ["--overwrite"]), (str(data), []),
                       ("X.npy", ["--overwrite"])]:
        assert main(["assign", "model.onnx", "--data", "X.npy", "--out", out, *extra]) == 2
        assert "same file" in capsys.readouterr().err
    assert snapshot(base) == before


# ---------------------------------------------------------------- one clear line, exit 2, no traceback


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    data = tiny(tmp_path / "X.npy")
    assert main(fit_args(data, tmp_path / "run", "--device", "cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cpu" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["fit", "assign"])
def test_out_below_a_file_is_one_line(fitted, tmp_path, capsys, command):
    data = tiny(tmp_path / "X.npy")
    (tmp_path / "somefile.txt").write_text("x")
    if command == "fit":
        argv = fit_args(data, tmp_path / "somefile.txt" / "run")
    else:
        argv = ["assign", str(fitted[3]), "--data", str(data), "--out", str(tmp_path / "somefile.txt" / "labels.npy")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "somefile.txt" in err and "not a folder" in err


def test_a_diverging_run_says_so_in_one_line(tmp_path, capsys):
    data = tiny(tmp_path / "X.npy")
    assert main(fit_args(data, tmp_path / "run", "--lr", "1e6")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "impute" not in err
    assert "diverg" in err.lower()


# ---------------------------------------------------------------- log.jsonl after --resume


class Stop(Exception):
    pass


def test_resumed_epochs_are_logged_once(tmp_path, monkeypatch):
    import dcss_plugin.training.run as run_module

    data = tiny(tmp_path / "X.npy")
    run = tmp_path / "run"
    original = run_module.TrainingRun.end_epoch

    def stop_in_phase2(self, phase, epoch, *args, **kwargs):
        original(self, phase, epoch, *args, **kwargs)
        if (phase, epoch) == ("phase2", 6):  # logged up to here; progress.pt was last saved at phase 2's start
            raise Stop

    monkeypatch.setattr(run_module.TrainingRun, "end_epoch", stop_in_phase2)
    with pytest.raises(Stop):
        main(fit_args(data, run))
    monkeypatch.setattr(run_module.TrainingRun, "end_epoch", original)
    assert (run / "progress.pt").exists()
    assert main(fit_args(data, run, "--resume")) == 0
    keys = [(r["phase"], r["epoch"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]
    expected = [("pretrain", 0)] + [("phase1", e) for e in range(2)] + [("phase2", e) for e in range(11)]
    assert keys == expected
