"""Input that used to be parsed wrongly without a word, misleading messages, and forged checkpoints (issue 20,
items 3, 5 and 6): each is now read right or refused with one clear message."""

import copy
import time
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from dcss_plugin import DCSS, DataError, DCSSModel, Normalize
from dcss_plugin.data import as_tensor, load_array
from dcss_plugin.errors import TrainingDivergedError
from dcss_plugin.nets import mlp_autoencoder

TINY = dict(mlp_hidden_dims=(16, 16), pretrain_epochs=2, phase1_epochs=1, phase2_epochs=2, verbose=False,
            device="cpu")


def blobs(n_per=20, k=3, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 5, size=(k, dim))
    x = np.concatenate([rng.normal(means[i], 1.0, size=(n_per, dim)) for i in range(k)]).astype(np.float32)
    return x[rng.permutation(len(x))]


@pytest.fixture(scope="module")
def fitted():
    x = blobs()
    return DCSS(3, seed=0, **TINY).fit(x), x


# ---------------------------------------------------------------- CSV files
def test_csv_with_utf8_bom_keeps_its_first_row(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeff1.5,2.0\n3.0,4.0\n5.0,6.0\n".encode("utf-8"))
    arr = load_array(path)
    assert arr.shape == (3, 2) and arr[0].tolist() == [1.5, 2.0]


def test_csv_row_of_column_numbers_above_real_data_is_a_header(tmp_path):
    path = tmp_path / "pandas.csv"
    path.write_text("0,1,2\n0.5,1.5,2.5\n3.5,4.5,5.5\n")
    assert load_array(path).tolist() == [[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]]


def test_csv_column_numbers_above_integers_are_reported_and_header_option_decides(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("0,1,2\n5,6,7\n8,9,10\n")
    with pytest.warns(UserWarning, match="header=True"):
        assert load_array(path).shape == (3, 3)
    assert load_array(path, header=True).tolist() == [[5, 6, 7], [8, 9, 10]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_array(path, header=False).shape == (3, 3)


def test_csv_pandas_index_column_is_not_a_feature(tmp_path):
    path = tmp_path / "indexed.csv"
    path.write_text(",a,b\n0,0.5,1.5\n1,2.5,3.5\n2,4.5,5.5\n")
    assert load_array(path).tolist() == [[0.5, 1.5], [2.5, 3.5], [4.5, 5.5]]


# ---------------------------------------------------------------- values float32 cannot hold
@pytest.mark.parametrize("data", [np.ones((4, 2), dtype=np.complex128), torch.ones(4, 2, dtype=torch.complex64)])
def test_complex_data_is_refused(data):
    with pytest.raises(DataError, match="complex"):
        as_tensor(data)


def test_complex_npy_file_is_refused(tmp_path):
    np.save(tmp_path / "c.npy", np.ones((4, 2), dtype=np.complex64))
    with pytest.raises(DataError, match="complex"):
        load_array(tmp_path / "c.npy")


def test_float64_beyond_float32_range_is_called_an_overflow():
    x = blobs().astype(np.float64)
    x[3, 1] = 1e39
    with pytest.raises(DataError, match="overflow float32") as info:
        DCSS(3, **TINY).fit(x)
    assert "NaN" not in str(info.value) and "[3]" in str(info.value)


def test_int64_ids_above_2_pow_24_are_said_to_lose_precision():
    ids = (2 ** 26 + np.arange(60)).reshape(30, 2)  # float32 spacing at 2**26 is 8: neighbours merge
    with pytest.raises(DataError, match="lose precision in float32") as info:
        DCSS(3, **TINY).fit(2 ** 26 + np.tile((np.arange(60) % 4)[:, None], (1, 2)))  # all become 2**26
    assert "constant" in str(info.value)
    with pytest.warns(UserWarning, match="lose precision"):
        as_tensor(ids)


def test_float64_variation_below_float32_resolution_is_refused():
    rng = np.random.default_rng(0)
    x = 1.0 + 1e-9 * rng.normal(size=(60, 4))
    with pytest.raises(DataError, match="below float32's resolution"):
        DCSS(3, **TINY).fit(x)


def test_tiny_but_real_spread_is_standardised():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 4)) * 1e-9
    x = torch.as_tensor(np.concatenate([c + 1e-10 * rng.normal(size=(20, 4)) for c in centers]), dtype=torch.float32)
    xn = Normalize.fit(x)(x)
    assert torch.allclose(xn.std(0, unbiased=False), torch.ones(4), atol=1e-2)
    const = torch.cat([x, torch.full((60, 1), 0.1)], 1)  # a constant feature stays unscaled
    assert float(Normalize.fit(const).scale[-1]) == 1.0
    images = x.reshape(60, 1, 2, 2)
    assert float(Normalize.fit(images)(images).max()) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- loaders, empty input, divergence
def test_fit_on_shuffled_loader_gives_labels_in_dataset_order():
    x = torch.as_tensor(blobs())
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=True)
    assert torch.equal(as_tensor(loader)[0], x)  # read in dataset order, not the loader's
    model = DCSS(3, seed=0, **TINY).fit(loader)
    assert np.array_equal(model.labels_, model.predict(x))
    assert np.array_equal(model.predict(loader), model.predict(x))


def test_loader_with_a_reordering_sampler_is_refused():
    x = torch.as_tensor(blobs())
    sampler = WeightedRandomSampler(torch.ones(len(x)), num_samples=len(x))
    with pytest.raises(DataError, match="shuffle=False"):
        DCSS(3, **TINY).fit(DataLoader(TensorDataset(x), batch_size=16, sampler=sampler))


def test_predict_on_zero_rows_gives_empty_results(fitted):
    model, x = fitted
    labels = model.predict(x[:0])
    assert labels.shape == (0,) and labels.dtype == np.int64
    assert model.predict_proba(x[:0]).shape == (0, 3)
    assert model.transform(x[:0]).shape == (0, model.model_.latent_dim)


def test_diverging_run_says_so_and_how_to_fix():
    with pytest.raises(TrainingDivergedError, match="lower lr") as info:
        DCSS(3, seed=0, lr=1e6, **TINY).fit(blobs())
    assert isinstance(info.value, ValueError) and info.value.phase == "pretraining"
    assert "impute" not in str(info.value)


# ---------------------------------------------------------------- untrusted files
def _small_checkpoint():
    enc, dec = mlp_autoencoder(4, 3, (8, 8))
    model = DCSSModel(enc, 3, 3, decoder=dec, normalize=Normalize(torch.zeros(4), torch.ones(4)),
                      input_shape=(4,))
    return model.checkpoint()


@pytest.mark.parametrize("field", ["hidden_dims", "head_hidden_dims"])
def test_forged_checkpoint_with_huge_layers_is_refused_fast(tmp_path, field):
    state = copy.deepcopy(_small_checkpoint())
    if field == "hidden_dims":
        state["model"]["spec"]["hidden_dims"] = [20000, 20000]
    else:
        state["model"]["head_hidden_dims"] = [20000, 20000]
    torch.save(state, tmp_path / "forged.pt")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="does not match its tensors"):
        DCSSModel.load(tmp_path / "forged.pt")
    assert time.perf_counter() - t0 < 1.0


def test_forged_checkpoint_with_huge_layer_lists_is_refused(tmp_path):
    state = copy.deepcopy(_small_checkpoint())
    state["model"]["spec"]["hidden_dims"] = [8] * 100_000
    torch.save(state, tmp_path / "forged.pt")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="more than its"):
        DCSSModel.load(tmp_path / "forged.pt")
    assert time.perf_counter() - t0 < 1.0


def test_genuine_checkpoint_still_loads(tmp_path):
    torch.save(_small_checkpoint(), tmp_path / "ok.pt")
    assert DCSSModel.load(tmp_path / "ok.pt").predict(torch.randn(5, 4)).shape == (5,)


class Payload:
    pass


def test_refused_tensor_file_gives_no_weights_only_false_advice(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "obj.pt")
    with pytest.raises(DataError, match="Python object of type") as info:
        load_array(tmp_path / "obj.pt")
    assert "weights_only" not in str(info.value)


def test_refused_checkpoint_gives_no_weights_only_false_advice(tmp_path):
    """A checkpoint holding pickled objects is refused by DCSS.load / DCSSModel.load without torch's advice to retry
    with weights_only=False (which would run the file's code)."""
    from dcss_plugin import DCSS, DCSSModel

    path = tmp_path / "evil.pt"
    torch.save({"format": "dcss-plugin/model-v1", "obj": Payload()}, path)
    for load in (DCSS.load, DCSSModel.load):
        with pytest.raises(ValueError, match="could not be read") as info:
            load(path)
        assert "weights_only=False" not in str(info.value)
