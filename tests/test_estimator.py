"""The DCSS estimator end to end: quality on real data, reproducibility, persistence, label independence."""

import warnings

import numpy as np
import pytest
import torch

from dcss_plugin import DCSS, DataError, evaluate

FAST = dict(pretrain_epochs=15, phase1_epochs=4, phase2_epochs=15, verbose=False)


def blobs(n_per=60, k=4, dim=8, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 5, size=(k, dim))
    x = np.concatenate([rng.normal(means[i], spread, size=(n_per, dim)) for i in range(k)]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(len(x))  # not sorted by class
    return x[perm], y[perm]


@pytest.fixture(scope="module")
def blob_model():
    x, y = blobs()
    return DCSS(4, seed=0, mlp_hidden_dims=(64, 64), **FAST).fit(x), x, y


def test_recovers_well_separated_blobs(blob_model):
    model, x, y = blob_model
    assert evaluate(y, model.labels_)["acc"] >= 0.95


def test_seeded_runs_are_reproducible_on_cpu(blob_model):
    model, x, _ = blob_model
    again = DCSS(4, seed=0, mlp_hidden_dims=(64, 64), device="cpu", **FAST).fit(x)
    np.testing.assert_array_equal(again.labels_, model.labels_)
    np.testing.assert_array_equal(again.predict_proba(x), model.predict_proba(x))


def test_predictions_do_not_depend_on_batch_composition(blob_model):
    model, x, _ = blob_model
    perm = np.random.default_rng(1).permutation(len(x))
    np.testing.assert_allclose(model.predict_proba(x[perm]), model.predict_proba(x)[perm], atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(x[:1]), model.predict_proba(x)[:1], atol=1e-6)


def test_save_load_roundtrip(blob_model, tmp_path):
    model, x, _ = blob_model
    model.save(tmp_path / "m.pt")
    loaded = DCSS.load(tmp_path / "m.pt")
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))
    np.testing.assert_array_equal(loaded.transform(x), model.transform(x))
    assert loaded.config_ == model.config_


def test_labels_are_never_read(blob_model):
    model, x, y = blob_model
    other = DCSS(4, seed=0, mlp_hidden_dims=(64, 64), **FAST).fit(x, y=np.zeros(len(x)))
    np.testing.assert_array_equal(other.labels_, model.labels_)


def test_accepts_tensors_datasets_and_loaders(blob_model):
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y = blob_model
    ref = model.predict(x)
    ds = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    np.testing.assert_array_equal(model.predict(torch.as_tensor(x)), ref)
    np.testing.assert_array_equal(model.predict(ds), ref)
    np.testing.assert_array_equal(model.predict(DataLoader(ds, batch_size=17)), ref)
    frozen = x.copy()
    frozen.flags.writeable = False  # as pandas' to_numpy() may return: read, no "not writable" warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(model.predict(frozen), ref)


def test_bad_input_to_predict_and_fit(blob_model, tmp_path):
    model, x, _ = blob_model
    with pytest.raises(DataError, match="shape"):
        model.predict(x[:, :5])
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(DataError, match="NaN or inf"):
        model.predict(bad)
    with pytest.raises(RuntimeError, match="not fitted"):
        DCSS(3).predict(x)
    with pytest.raises(ValueError, match="preset"):
        DCSS(3, preset="fast").fit(x)
    (tmp_path / "bad.pt").write_bytes(b"\x00corrupt")
    with pytest.raises(ValueError, match="could not be read"):
        DCSS.load(tmp_path / "bad.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DCSS checkpoint"):
        DCSS.load(tmp_path / "other.pt")


def test_paper_preset_runs_faithful_settings():
    x, y = blobs(seed=2)
    model = DCSS(4, preset="paper", seed=0, mlp_hidden_dims=(64, 64), **FAST).fit(x)
    cfg = model.config_
    assert (cfg.m, cfg.lam, cfg.zeta, cfg.gamma, cfg.T1, cfg.T2) == (1.5, 0.1, 0.8, 0.2, 2, 5)
    assert (cfg.augment, cfg.neighbors, cfg.balance_weight, cfg.exclude_self) == (False, 0, 0.0, False)
    assert evaluate(y, model.labels_)["acc"] > 0.5  # well above chance (0.25) on easy blobs


def test_balance_tolerance_comes_from_the_phase1_partition():
    x, y = blobs(n_per=30, k=3, seed=3)
    x = x[np.sort(np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:15], np.flatnonzero(y == 2)[:6]]))]
    model = DCSS(3, seed=0, mlp_hidden_dims=(32, 32), balance_tolerance="phase1", **FAST).fit(x)
    sizes = np.bincount(model.history_["labels_after_phase1"], minlength=3) / len(x)
    sizes = sizes[sizes > 0]
    assert model.history_["balance_tolerance"] == pytest.approx(float(np.sum(sizes * np.log(sizes * 3))))
    assert model.history_["balance_tolerance"] > 0.05  # 30/15/6 blobs: clearly uneven
    fixed = DCSS(3, seed=0, mlp_hidden_dims=(32, 32), balance_tolerance=0.25, **FAST).fit(x)
    assert fixed.history_["balance_tolerance"] == 0.25
    for bad in (-1.0, "phase2"):
        with pytest.raises(ValueError, match="balance_tolerance"):
            DCSS(3, balance_tolerance=bad).fit(x)


def test_kmeans_init_is_cosine_after_ntxent_pretraining(monkeypatch):
    from dcss_plugin import ClusterCenters, DCSSConfig

    assert DCSSConfig().resolved(images=True).kmeans_init == "cosine"  # NT-Xent on u in pretraining
    assert DCSSConfig().resolved(images=False).kmeans_init == "euclidean"
    assert DCSSConfig(contrastive_weight=0.0).resolved(images=True).kmeans_init == "euclidean"
    assert DCSSConfig(preset="paper").resolved(images=True).kmeans_init == "euclidean"
    assert DCSSConfig(kmeans_init="cosine").resolved(images=False).kmeans_init == "cosine"
    with pytest.raises(ValueError, match="kmeans_init"):
        DCSSConfig(kmeans_init="spherical")
    seen = []
    original = ClusterCenters.init_kmeans

    def spy(self, u, seed=0, n_init=10, metric="euclidean"):
        seen.append(metric)
        return original(self, u, seed=seed, n_init=n_init, metric=metric)

    monkeypatch.setattr(ClusterCenters, "init_kmeans", spy)
    images = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    DCSS(2, seed=0, pretrain_epochs=1, phase1_epochs=2, phase2_epochs=11, verbose=False).fit(images)
    assert seen == ["cosine"]


def test_three_heads_for_images_and_the_lowest_loss_head_is_kept():
    from dcss_plugin import DCSSConfig

    assert DCSSConfig().resolved(images=True).num_heads == 3
    assert DCSSConfig().resolved(images=False).num_heads == 1
    assert DCSSConfig(preset="paper").resolved(images=True).num_heads == 1
    assert DCSSConfig(num_heads=2).resolved(images=False).num_heads == 2
    with pytest.raises(ValueError, match="num_heads"):
        DCSSConfig(num_heads=0)
    images = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = DCSS(2, seed=0, pretrain_epochs=1, phase1_epochs=2, phase2_epochs=6, verbose=False).fit(images)
    losses = model.history_["head_losses_last_epoch"]
    assert model.config_.num_heads == 3 and len(losses) == 3 and len(set(losses)) == 3  # three distinct heads
    assert model.history_["selected_head"] == int(np.argmin(losses))
    with torch.no_grad():
        u = model.transform(images)
    assert len(model.model_.heads) == 1  # only the kept head is saved and exported
    assert torch.equal(model.model_.head.eval()(torch.as_tensor(u)).argmax(1), torch.as_tensor(model.labels_))


def test_phase2_neighbours_are_the_knn_of_u_after_phase1():
    from sklearn.neighbors import NearestNeighbors

    x, _ = blobs(n_per=15, k=3, dim=5, seed=5)
    common = dict(mlp_hidden_dims=(16, 16), pretrain_epochs=2, phase1_epochs=2, phase2_epochs=0, verbose=False)
    model_u = DCSS(3, seed=0, **common).fit(x)  # u as after Phase 1
    u = model_u.transform(x)
    expected_u = NearestNeighbors(n_neighbors=6).fit(u).kneighbors(u)[1][:, 1:]
    assert np.array_equal(np.sort(model_u.history_["knn"], 1), np.sort(expected_u, 1))


def test_u_space_stage_lasts_at_least_T2_min_steps():
    x, _ = blobs(n_per=20, k=3, seed=4)  # 60 rows: one step per epoch at batch 32 -> 2 steps
    common = dict(mlp_hidden_dims=(16, 16), pretrain_epochs=2, phase1_epochs=2, batch_size=32, verbose=False)
    model = DCSS(3, seed=0, phase2_epochs=40, T2_min_steps=30, **common).fit(x)
    assert model.history_["u_stage_epochs"] == 15  # ceil(30 / 2 steps per epoch) > T2 = 5
    capped = DCSS(3, seed=0, phase2_epochs=12, T2_min_steps=30, **common).fit(x)
    assert capped.history_["u_stage_epochs"] == 6  # at most half of Phase 2
    paper = DCSS(3, preset="paper", seed=0, phase2_epochs=12, **common).fit(x)
    assert paper.history_["u_stage_epochs"] == 5 and paper.config_.T2_min_steps == 0  # exactly T2 epochs
    with pytest.raises(ValueError, match="T2_min_steps"):
        DCSS(3, T2_min_steps=-1).fit(x)


def test_neighbor_embedding_pretraining_gives_u_that_kmeans_clusters_better():
    """The neighbour-embedding term (input-space k-NN pairs, Cauchy kernel) on 400 digits as 64-d vectors: k-means
    on ``u`` after pretraining beats k-means on the standardised input and on the plain autoencoder's ``u``."""
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = x[:400].astype(np.float32), y[:400]
    xs = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    base = evaluate(y, KMeans(10, n_init=10, random_state=0).fit_predict(xs))["acc"]
    common = dict(mlp_hidden_dims=(64, 64), pretrain_epochs=60, phase1_epochs=0, phase2_epochs=0, verbose=False)
    acc = {w: evaluate(y, DCSS(10, seed=0, neighbor_embedding_weight=w, **common).fit(x)
                       .history_["labels_after_pretrain"])["acc"] for w in (0.0, 1.0)}
    assert acc[1.0] >= base + 0.08 and acc[1.0] >= acc[0.0] + 0.08, (acc, base)
    with pytest.raises(ValueError, match="neighbor_embedding_weight"):
        DCSS(3, neighbor_embedding_weight=-1.0).fit(x)
    with pytest.raises(ValueError, match="neighbor_embedding_k"):
        DCSS(3, neighbor_embedding_k=0).fit(x)


@pytest.mark.slow
def test_default_recipe_on_digits_beats_kmeans():
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits

    d = load_digits()
    km = KMeans(10, n_init=10, random_state=0).fit_predict(d.data)
    model = DCSS(10, seed=0, verbose=False).fit(d.images)
    ours, base = evaluate(d.target, model.labels_), evaluate(d.target, km)
    assert ours["acc"] >= base["acc"] + 0.08, (ours, base)
    assert ours["nmi"] >= base["nmi"] + 0.08, (ours, base)


def test_sklearn_estimator_contract():
    """``clone``, ``get_params``/``set_params``; ``__init__`` only stores; bad parameters fail fast in ``fit``."""
    import time

    from sklearn.base import clone

    est = DCSS(4, m=1.3, batch_size=64, verbose=False)
    params = est.get_params()
    assert params["m"] == 1.3 and params["batch_size"] == 64 and params["n_clusters"] == 4
    assert {"encoder", "decoder", "device", "verbose", "seed", "T1", "T2", "lam"} <= set(params)
    copy = clone(est)
    assert copy.get_params() == params and copy is not est
    assert est.set_params(m=1.4).m == 1.4
    assert not any(k.endswith("_") for k in vars(DCSS(3)))  # nothing fitted before fit
    x, _ = blobs(n_per=10, k=3)
    for bad, err in (({"n_clusters": 2.7}, TypeError), ({"n_clusters": 1}, ValueError), ({"m": 1.0}, ValueError),
                     ({"batch_size": "big"}, TypeError), ({"zeta": 0.1, "gamma": 0.5}, ValueError),
                     ({"verbose": "yes"}, TypeError), ({"encoder": "resnet"}, TypeError)):
        t0 = time.perf_counter()
        with pytest.raises(err):
            DCSS(**bad).fit(x)
        assert time.perf_counter() - t0 < 1.0, bad  # rejected before any work
    with pytest.raises(TypeError, match="unknown option"):
        DCSS(3, autoencoder_module=None)


def test_fitted_attributes_end_in_underscore(blob_model):
    model, x, _ = blob_model
    from dcss_plugin import DCSSModel

    assert isinstance(model.model_, DCSSModel) and model.input_shape_ == (8,)
    assert model.labels_.dtype == np.int64 and model.config_.m == 1.2 and "time_s" in model.history_
    fitted = {k for k in vars(model) if k.endswith("_")}
    assert fitted == {"model_", "labels_", "config_", "input_shape_", "history_"}


def test_own_encoder_and_decoder_modules(tmp_path):
    """``DCSS(encoder=, decoder=)`` trains a user's networks; ``load`` needs the same architecture again."""
    from torch import nn

    x, y = blobs(n_per=30, k=3, dim=8, seed=6)
    make = lambda: (nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)),  # noqa: E731
                    nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 8)))
    enc, dec = make()
    model = DCSS(3, seed=0, latent_dim=4, encoder=enc, decoder=dec, **FAST).fit(x)
    assert model.model_.encoder is enc and evaluate(y, model.labels_)["acc"] > 0.9
    model.save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="custom encoder"):
        DCSS.load(tmp_path / "m.pt")
    loaded = DCSS.load(tmp_path / "m.pt", encoder=make()[0], decoder=make()[1])
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))
    with pytest.raises(TypeError, match="decoder"):
        DCSS(3, encoder=make()[0]).fit(x)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_loads_checkpoints_of_the_previous_version(kind):
    """tests/data/checkpoint_v1_*.pt were written by dcss-plugin 0.1.0's estimator (format checkpoint-v1) with the
    predictions it made; this version reads them and predicts the same."""
    import os

    here = os.path.join(os.path.dirname(__file__), "data")
    ref = np.load(os.path.join(here, f"checkpoint_v1_{kind}_expected.npz"))
    est = DCSS.load(os.path.join(here, f"checkpoint_v1_{kind}.pt"))
    np.testing.assert_allclose(est.predict_proba(ref["x"]), ref["q"], atol=1e-6)
    np.testing.assert_allclose(est.transform(ref["x"]), ref["u"], atol=1e-5)
