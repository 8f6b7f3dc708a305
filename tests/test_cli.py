"""The `dcss` command's contract (files, shapes, dtypes) and its errors on bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dcss_plugin.app.cli import main

FAST = ["--pretrain-epochs", "3", "--phase1-epochs", "2", "--phase2-epochs", "2", "--quiet", "--no-html"]


def blobs(n_per=40, k=3, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 6, size=(k, dim))
    x = np.concatenate([rng.normal(means[i], 1.0, size=(n_per, dim)) for i in range(k)]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    return x, y


def test_fit_on_files_writes_the_contract(tmp_path, capsys):
    x, y = blobs()
    np.save(tmp_path / "X.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "run"
    rc = main(["fit", "--data", str(tmp_path / "X.npy"), "--labels", str(tmp_path / "y.npy"), "--clusters", "3",
               "--seed", "0", "--out", str(out), "--T2-min-steps", "50", *FAST])
    assert rc == 0
    labels = np.load(out / "labels.npy", allow_pickle=False)
    assert labels.dtype == np.int64 and labels.shape == (len(x),)
    assert labels.min() >= 0 and labels.max() < 3
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 0 and report["config"]["n_clusters"] == 3
    assert report["config"]["T2_min_steps"] == 50 and report["config"]["balance_tolerance"] == "phase1"
    assert set(report["metrics"]) == {"acc", "nmi", "ari"}
    assert set(report["kmeans_baseline"]) == {"acc", "nmi", "ari"}
    for phase in ("pretrain", "phase1", "phase2"):
        assert report["timings_s"][phase] > 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["format"].startswith("dcss-plugin/")
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # no half-written files left
    assert "k-means on the raw input" in capsys.readouterr().out


def test_fit_without_labels_and_from_csv(tmp_path):
    x, _ = blobs()
    np.savetxt(tmp_path / "X.csv", x, delimiter=",", header=",".join(f"f{i}" for i in range(x.shape[1])),
               comments="")
    out = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "X.csv"), "--clusters", "3", "--out", str(out),
                 "--augment", "off", "--mlp-hidden-dims", "16,16", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "metrics" not in report
    assert report["config"]["augment"] is False and report["config"]["mlp_hidden_dims"] == [16, 16]
    assert np.load(out / "labels.npy").shape == (len(x),)


def test_predict_after_load_matches_fit_labels(tmp_path):
    from dcss_plugin import DCSS

    x, _ = blobs()
    torch.save(torch.as_tensor(x), tmp_path / "X.pt")
    out = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "X.pt"), "--clusters", "3", "--out", str(out), *FAST]) == 0
    model = DCSS.load(out)
    np.testing.assert_array_equal(model.predict(x), np.load(out / "labels.npy"))


@pytest.mark.parametrize(
    "setup, args, message",
    [
        ("nan", ["--clusters", "3"], "NaN or inf"),
        ("const", ["--clusters", "3"], "constant"),
        ("ok", ["--clusters", "500"], "exceeds the number of samples"),
        ("5d", ["--clusters", "3"], "dimension"),
        ("badlabels", ["--clusters", "3"], "must match"),
        ("missing", ["--clusters", "3"], "not found"),
        ("garbage", ["--clusters", "3"], "Could not read"),
    ],
)
def test_bad_input_clear_error(tmp_path, capsys, setup, args, message):
    x, y = blobs()
    path = tmp_path / "X.npy"
    extra = []
    if setup == "nan":
        x[5, 2] = np.nan
    if setup == "const":
        x[:] = 1.0
    if setup == "5d":
        x = np.zeros((4, 2, 2, 2, 2), np.float32)
    if setup == "badlabels":
        np.save(tmp_path / "y.npy", y[:-3])
        extra = ["--labels", str(tmp_path / "y.npy")]
    if setup == "garbage":
        path = tmp_path / "X.npy"
        path.write_bytes(b"not a numpy file at all")
    elif setup != "missing":
        np.save(path, x)
    out = tmp_path / "run"
    rc = main(["fit", "--data", str(path), "--out", str(out), *args, *extra, *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (out / "checkpoint.pt").exists()  # failed before any work


def test_unknown_dataset_suggests_and_missing_files_say_how(tmp_path, capsys):
    assert main(["fit", "--dataset", "mnsit", "--clusters", "10", "--out", str(tmp_path / "r")]) == 2
    assert "Did you mean mnist" in capsys.readouterr().err
    assert main(["fit", "--dataset", "mnist", "--data-root", str(tmp_path), "--clusters", "10",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "No mnist IDX files" in err and "train-images-idx3-ubyte" in err and "download" in err


def test_console_script_runs(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "dcss")
    if not os.path.exists(exe):
        pytest.skip("dcss console script not installed in this environment")
    res = subprocess.run([exe, "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--clusters" in res.stdout


@pytest.mark.slow
def test_fit_ssl_simclr_on_digits_writes_the_contract_and_exports(tmp_path):
    """``dcss fit --ssl simclr``: Lightly SimCLR + DCSS from the command line, same files, exportable checkpoint."""
    out = tmp_path / "ssl"
    rc = main(["fit", "--dataset", "digits", "--clusters", "10", "--ssl", "simclr", "--pretrain-epochs", "2",
               "--phase2-epochs", "6", "--quiet", "--no-html", "--out", str(out)])
    assert rc == 0
    labels = np.load(out / "labels.npy")
    assert labels.shape == (1797,) and labels.dtype == np.int64
    report = json.loads((out / "report.json").read_text())
    assert report["epochs"]["phase2"] == 6 and report["metrics"]["acc"] > 0.3
    from dcss_plugin import DCSS
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(DCSS.load(out / "checkpoint.pt").predict(load_digits().images), labels)
    with pytest.raises(SystemExit):
        main(["fit", "--dataset", "digits", "--clusters", "10", "--ssl", "byol", "--out", str(out)])
    assert main(["fit", "--dataset", "digits", "--clusters", "10", "--ssl", "simclr", "--backbone", "timm:resnet18",
                 "--out", str(tmp_path / "x")]) == 2


def test_fit_devices_rejects_bad_input_and_combinations_before_spawning(tmp_path, capsys):
    x, _ = blobs(n_per=2)
    np.save(tmp_path / "X.npy", x)
    x[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    base = ["fit", "--devices", "2", "--out", str(tmp_path / "run"), *FAST]
    assert main([*base, "--data", str(tmp_path / "X.npy"), "--clusters", "7"]) == 2      # K > N
    assert "7" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "nan.npy"), "--clusters", "3"]) == 2    # NaN
    assert "NaN" in capsys.readouterr().err
    assert main([*base, "--dataset", "digits", "--clusters", "10", "--ssl", "simclr"]) == 2
    assert "--devices" in capsys.readouterr().err
    assert not (tmp_path / "run" / "log.jsonl").exists()


@pytest.mark.parametrize("extra, weight, k", [
    ([], 1.0, 10), (["--neighbor-embedding", "0"], 0.0, 10),
    (["--neighbor-embedding", "1", "--neighbor-embedding-k", "4"], 1.0, 4)])
def test_fit_neighbor_embedding_flags(tmp_path, extra, weight, k):
    x, _ = blobs(dim=6)
    np.save(tmp_path / "X.npy", x)
    out = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "X.npy"), "--clusters", "3", "--out", str(out), *extra, *FAST]) == 0
    config = json.loads((out / "report.json").read_text())["config"]
    assert config["neighbor_embedding_weight"] == weight and config["neighbor_embedding_k"] == k


@pytest.mark.parametrize("flags, message", [
    (["--neighbor-embedding", "-1"], "neighbor_embedding_weight must be a float >= 0"),
    (["--clusters", "1"], "n_clusters must be an int >= 2"),
    (["--neighbor-space", "input"], "unrecognized arguments: --neighbor-space"),  # removed options
    (["--linear-path", "on"], "unrecognized arguments: --linear-path")])
def test_fit_rejects_bad_flags_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--dataset", "digits", "--clusters", "10", "--out", str(tmp_path / "r"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.parametrize("script", ["phases.py", "ddp.py", "assign.py"])
def test_benchmark_scripts_answer_help(script):
    """The benchmarks (once ``dcss bench``) are scripts in benchmarks/; ``dcss bench`` is gone."""
    res = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--seed" in res.stdout, res.stderr
    with pytest.raises(SystemExit):
        main(["bench", "--help"])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["phases.py", "assign.py"])
def test_benchmark_scripts_run_quick(script):
    res = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), "--quick", "--repeats", "1"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("speed-up of one-pass" if script == "phases.py" else "bytes moved per row") in res.stdout
