"""The DCSS estimator end to end: quality on real data, reproducibility, persistence, label independence."""

import warnings

import numpy as np
import pytest
import torch

from dcss_plugin import DCSS, DataError, evaluate, phase1_size_prior

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
    assert loaded.config == model.config


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
        DCSS(3, preset="fast")
    (tmp_path / "bad.pt").write_bytes(b"\x00corrupt")
    with pytest.raises(ValueError, match="could not be read"):
        DCSS.load(tmp_path / "bad.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dcss-plugin"):
        DCSS.load(tmp_path / "other.pt")


def test_paper_preset_runs_faithful_settings():
    x, y = blobs(seed=2)
    model = DCSS(4, preset="paper", seed=0, mlp_hidden_dims=(64, 64), **FAST).fit(x)
    cfg = model.config
    assert (cfg.m, cfg.lam, cfg.zeta, cfg.gamma, cfg.T1, cfg.T2) == (1.5, 0.1, 0.8, 0.2, 2, 5)
    assert (cfg.augment, cfg.neighbors, cfg.balance_weight, cfg.exclude_self) == (False, 0, 0.0, False)
    assert evaluate(y, model.labels_)["acc"] > 0.5  # well above chance (0.25) on easy blobs


def test_phase1_size_prior_and_tolerance_come_from_the_phase1_partition():
    x, y = blobs(n_per=30, k=3, seed=3)
    x = x[np.sort(np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:15], np.flatnonzero(y == 2)[:6]]))]
    model = DCSS(3, seed=0, mlp_hidden_dims=(32, 32), balance_tolerance="phase1", balance_prior="phase1",
                 **{**FAST, "phase2_epochs": 80}).fit(x)  # 40 epochs of u-space targets
    labels1 = torch.as_tensor(model.history_["labels_after_phase1"])
    # the prior is measured on the head when the targets switch to q q^T (its cluster indices, not the centers'):
    # the Phase-1 sizes, up to order, once the head has learned the Phase-1 memberships
    prior = model.history_["balance_prior"]
    assert prior.shape == (1, 3) and prior.sum() == pytest.approx(1.0, abs=1e-5) and prior.min() > 0.09
    np.testing.assert_allclose(np.sort(prior[0]), np.sort(phase1_size_prior(labels1, 3).numpy()), atol=0.05)
    final = np.bincount(model.labels_, minlength=3) / len(x)
    np.testing.assert_allclose(prior[0], final, atol=0.1)  # in the head's own order: its clusters keep these sizes
    sizes = np.bincount(model.history_["labels_after_phase1"], minlength=3) / len(x)
    sizes = sizes[sizes > 0]
    assert model.history_["balance_tolerance"] == pytest.approx(float(np.sum(sizes * np.log(sizes * 3))))
    assert model.history_["balance_tolerance"] > 0.05  # 30/15/6 blobs: clearly uneven
    fixed = DCSS(3, seed=0, mlp_hidden_dims=(32, 32), balance_tolerance=0.25, **FAST).fit(x)
    assert fixed.history_["balance_tolerance"] == 0.25
    for bad in (-1.0, "phase2"):
        with pytest.raises(ValueError, match="balance_tolerance"):
            DCSS(3, balance_tolerance=bad)
    with pytest.raises(ValueError, match="balance_prior"):
        DCSS(3, balance_prior="even")


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
    assert model.config.num_heads == 3 and len(losses) == 3 and len(set(losses)) == 3  # three distinct heads
    assert model.history_["selected_head"] == int(np.argmin(losses))
    with torch.no_grad():
        u = model.transform(images)
    assert torch.equal(model.head.eval()(torch.as_tensor(u)).argmax(1), torch.as_tensor(model.labels_))


def test_neighbor_space_input_mines_the_standardised_inputs_knn_and_u_the_latent_knn():
    from sklearn.neighbors import NearestNeighbors

    from dcss_plugin import DCSSConfig

    assert DCSSConfig().resolved(images=False).neighbor_space == "u"  # opt-in (see README: mixed on tables)
    assert DCSSConfig(neighbor_space="input").resolved(images=True).neighbor_space == "input"
    with pytest.raises(ValueError, match="neighbor_space"):
        DCSSConfig(neighbor_space="pixels")
    x, _ = blobs(n_per=15, k=3, dim=5, seed=5)
    x[:, 0] *= 100.0  # unscaled features: the neighbours must come from the standardised input, not from x
    common = dict(mlp_hidden_dims=(16, 16), pretrain_epochs=2, phase1_epochs=2, phase2_epochs=3, verbose=False)
    z = (x - x.mean(0)) / x.std(0)
    expected = NearestNeighbors(n_neighbors=6).fit(z).kneighbors(z)[1][:, 1:]
    raw = NearestNeighbors(n_neighbors=6).fit(x).kneighbors(x)[1][:, 1:]
    assert not np.array_equal(np.sort(expected, 1), np.sort(raw, 1))  # the test can tell the two apart
    knn_in = DCSS(3, seed=0, neighbor_space="input", **common).fit(x).history_["knn"]
    assert np.array_equal(np.sort(knn_in, 1), np.sort(expected, 1))
    model_u = DCSS(3, seed=0, **{**common, "phase2_epochs": 0}).fit(x)  # u as after Phase 1
    u = model_u.transform(x)
    expected_u = NearestNeighbors(n_neighbors=6).fit(u).kneighbors(u)[1][:, 1:]
    assert np.array_equal(np.sort(model_u.history_["knn"], 1), np.sort(expected_u, 1))
    assert not np.array_equal(np.sort(expected_u, 1), np.sort(expected, 1))


def test_u_space_stage_lasts_at_least_T2_min_steps():
    x, _ = blobs(n_per=20, k=3, seed=4)  # 60 rows: one step per epoch at batch 32 -> 2 steps
    common = dict(mlp_hidden_dims=(16, 16), pretrain_epochs=2, phase1_epochs=2, batch_size=32, verbose=False)
    model = DCSS(3, seed=0, phase2_epochs=40, T2_min_steps=30, **common).fit(x)
    assert model.history_["u_stage_epochs"] == 15  # ceil(30 / 2 steps per epoch) > T2 = 5
    capped = DCSS(3, seed=0, phase2_epochs=12, T2_min_steps=30, **common).fit(x)
    assert capped.history_["u_stage_epochs"] == 6  # at most half of Phase 2
    paper = DCSS(3, preset="paper", seed=0, phase2_epochs=12, **common).fit(x)
    assert paper.history_["u_stage_epochs"] == 5 and paper.config.T2_min_steps == 0  # exactly T2 epochs
    with pytest.raises(ValueError, match="T2_min_steps"):
        DCSS(3, T2_min_steps=-1)


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
        DCSS(3, neighbor_embedding_weight=-1.0)
    with pytest.raises(ValueError, match="neighbor_embedding_k"):
        DCSS(3, neighbor_embedding_k=0)


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


def test_linear_path_option_starts_at_pca():
    """``mlp_linear_path`` is off unless asked for; when on, the estimator starts it at PCA of the standardised
    input (no training: u equals the PCA scores)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from dcss_plugin import DCSSConfig

    assert DCSSConfig(3).resolved(images=False).mlp_linear_path is False
    assert DCSSConfig(3, mlp_linear_path=True).resolved(images=False).mlp_linear_path is True
    x, _ = blobs(n_per=30, k=3, dim=16, seed=4)
    zero = dict(pretrain_epochs=0, phase1_epochs=0, phase2_epochs=0, verbose=False)
    assert not DCSS(3, seed=0, mlp_hidden_dims=(32,), **zero).fit(x).autoencoder.linear_path
    model = DCSS(3, seed=0, mlp_hidden_dims=(32,), mlp_linear_path=True, **zero).fit(x)
    scores = PCA(10).fit_transform(StandardScaler().fit_transform(x.astype(np.float64)))
    np.testing.assert_allclose(np.abs(model.transform(x)), np.abs(scores), atol=1e-3)


def test_linear_path_model_saves_loads_and_clusters(tmp_path):
    x, y = blobs(n_per=40, k=3, dim=16, seed=5)
    model = DCSS(3, seed=0, mlp_hidden_dims=(32, 32), mlp_linear_path=True, **FAST).fit(x)
    assert model.config.mlp_linear_path and model.autoencoder.linear_path
    assert evaluate(y, model.labels_)["acc"] > 0.9
    model.save(tmp_path / "m.pt")
    loaded = DCSS.load(tmp_path / "m.pt")
    assert loaded.autoencoder.linear_path
    np.testing.assert_allclose(loaded.predict_proba(x), model.predict_proba(x), atol=1e-6)
