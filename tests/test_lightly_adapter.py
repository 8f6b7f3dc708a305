"""Lightly adapter: DCSSClusterHead, DCSSClusterLoss (against a naive double loop and against DCSSLoss, the
estimator's objective; gradcheck; 2-process gloo), batched SimCLR views, and the fit used by ``dcss fit --ssl simclr``
(estimator interface, exact resume, quality on digits)."""

from __future__ import annotations

import math
import os
import types

import numpy as np
import pytest
import torch

pytest.importorskip("lightly")

from dcss_plugin import DCSS, DCSSHead, DCSSLoss, DCSSModel  # noqa: E402
from dcss_plugin.adapters.lightly import (  # noqa: E402
    BatchSimCLRViews,
    DCSSClusterHead,
    DCSSClusterLoss,
    fit_from_cli_args,
    fit_lightly,
    simclr_transform,
)

pytestmark = pytest.mark.usefixtures("torch_float32_one_thread")


# ---------------------------------------------------------------------------------------------------- helpers
def _assignments(b: int, k: int, seed: int, sharp: float = 8.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(2 * b, k, generator=g, dtype=dtype), 1).split(b)


def naive_loss(q0, q1, p0=None, p1=None, zeta=0.8, gamma=0.2, reduction="balanced", exclude_self=True,
               balance_weight=5.0, balance_tolerance=0.0, views_similar=False) -> float:
    """The documented formula, pair by pair, in plain Python floats. ``views_similar=True`` is the adapter's
    objective before it became the estimator's: the two views of an image set to ``s_ij = 1`` in the pair term."""
    q = torch.cat([q0, q1]).tolist()
    t = torch.cat([p0, p1]).tolist() if p0 is not None else q
    n, b, k = len(q), len(q0), len(q[0])
    dot = lambda a, c: sum(x * y for x, y in zip(a, c))  # noqa: E731
    pulled, pushed = [], []
    for i in range(n):
        for j in range(n):
            if exclude_self and i == j:
                continue
            s = 1.0 if views_similar and i % b == j % b else dot(t[i], t[j])
            if s > zeta:
                pulled.append(1.0 - dot(q[i], q[j]))
            elif s < gamma:
                pushed.append(dot(q[i], q[j]))
    if reduction == "balanced":
        loss = (sum(pulled) / max(len(pulled), 1)) + (sum(pushed) / max(len(pushed), 1))
    elif reduction == "sum":
        loss = sum(pulled) + sum(pushed)
    else:
        loss = (sum(pulled) + sum(pushed)) / max(len(pulled) + len(pushed), 1)
    loss += sum(-math.log(dot(q[i], q[i + b])) for i in range(b)) / b  # the known positives: the two views
    if balance_weight:
        mean = [sum(row[c] for row in q) / n for c in range(k)]
        kl = sum(m * math.log(m) for m in mean) + math.log(k)
        loss += balance_weight * max(0.0, kl - balance_tolerance)
    return loss


# ---------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("reduction", ["balanced", "mean", "sum"])
@pytest.mark.parametrize("with_p", [False, True])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_loss_equals_naive_reference(reduction, with_p, exclude_self):
    q0, q1 = _assignments(6, 3, seed=1)
    p0, p1 = _assignments(6, 3, seed=2, sharp=4.0) if with_p else (None, None)
    loss = DCSSClusterLoss(reduction=reduction, exclude_self=exclude_self)(q0, q1, p0, p1)
    ref = naive_loss(q0, q1, p0, p1, reduction=reduction, exclude_self=exclude_self)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    tolerant = DCSSClusterLoss(reduction=reduction, exclude_self=exclude_self, balance_tolerance=0.05)
    ref = naive_loss(q0, q1, p0, p1, reduction=reduction, exclude_self=exclude_self, balance_tolerance=0.05)
    assert tolerant(q0, q1, p0, p1).item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("with_p", [False, True])
@pytest.mark.parametrize("settings", [{}, dict(zeta=0.7, gamma=0.3, reduction="mean", exclude_self=False,
                                                balance_weight=2.0, balance_tolerance=0.01)])
def test_loss_is_the_estimators_objective(with_p, settings):
    """DCSSClusterLoss(q0, q1, p0, p1) is DCSSLoss([q0; q1], p=[p0; p1], known_positives=True) on the same batch:
    value and gradients, in the u-space stage (p given) and the q-space stage (no p)."""
    b, k = 6, 4
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2 * b, k, generator=g, dtype=torch.float64) * 3
    p0, p1 = _assignments(b, k, seed=4, sharp=4.0) if with_p else (None, None)
    ours = DCSSClusterLoss(**settings)
    theirs = DCSSLoss(u_stage_epochs=5, **settings)
    theirs.set_epoch(0 if with_p else 5)
    z_ours, z_theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    q = z_ours.softmax(1)
    loss_ours = ours(q[:b], q[b:], p0, p1)
    loss_theirs = theirs(z_theirs.softmax(1), torch.cat([p0, p1]) if with_p else None, known_positives=True)
    loss_ours.backward()
    loss_theirs.backward()
    assert torch.equal(loss_ours.detach(), loss_theirs.detach())
    assert torch.equal(z_ours.grad, z_theirs.grad)


def test_reference_case_has_all_pair_kinds():
    """The reference case above is not degenerate: it has pulled, pushed and ignored pairs."""
    q0, q1 = _assignments(6, 3, seed=1)
    q = torch.cat([q0, q1])
    s = q @ q.t()
    i = torch.arange(12)
    other = (i.view(-1, 1) % 6) != (i.view(1, -1) % 6)  # neither i == j nor the two views of one image
    assert (s[other] > 0.8).sum() > 0 and (s[other] < 0.2).sum() > 0
    assert ((s[other] >= 0.2) & (s[other] <= 0.8)).sum() > 0


def test_views_are_known_positives_pulled_by_the_log_term_not_set_similar():
    """View 0 of every image in cluster 0, view 1 in cluster 1: the targets call the view pairs dissimilar. The pair
    term treats them as such (s_ij is not overridden, as in the estimator); with the default balanced reduction the
    -log(q0 . q1) pull wins."""
    b = 4
    z0 = torch.log(torch.tensor([[0.98, 0.01, 0.01]] * b, dtype=torch.float64))
    z1 = torch.log(torch.tensor([[0.01, 0.98, 0.01]] * b, dtype=torch.float64)).requires_grad_()
    loss_fn = DCSSClusterLoss(balance_weight=0.0, reduction="sum")
    q0, q1 = z0.softmax(1), z1.softmax(1)
    loss = loss_fn(q0, q1)
    q0d, q1d = q0.detach(), q1.detach()
    assert loss.item() == pytest.approx(naive_loss(q0d, q1d, reduction="sum", balance_weight=0))
    assert loss.item() != pytest.approx(naive_loss(q0d, q1d, reduction="sum", balance_weight=0, views_similar=True))
    d = float((q0d[0] * q1d[0]).sum())
    within = 2 * b * (b - 1) * (1 - float((q0d[0] * q0d[0]).sum()))  # same-view pairs: s > zeta, pulled
    across = 2 * b * b * d  # every cross-view pair, the view pairs included: s < gamma, pushed
    assert loss.item() == pytest.approx(within + across - math.log(d))
    DCSSClusterLoss()(q0, z1.softmax(1)).backward()  # the defaults: balanced reduction, balance guard
    with torch.no_grad():  # one gradient step on view 1 brings the views together
        closer = (q0d * (z1 - 0.1 * z1.grad).softmax(1)).sum(1)
    assert (closer > d).all()


def test_collapse_is_not_a_minimum_with_the_balance_guard():
    b, k = 8, 4
    collapsed = torch.zeros(b, k, dtype=torch.float64)
    collapsed[:, 0] = 1.0
    spread = torch.eye(k, dtype=torch.float64).repeat(2, 1)
    without = DCSSClusterLoss(balance_weight=0.0)
    with_guard = DCSSClusterLoss(balance_weight=5.0)
    assert without(collapsed, collapsed).item() == pytest.approx(0.0)  # why the guard is needed
    assert with_guard(collapsed, collapsed).item() == pytest.approx(5 * math.log(k))
    assert with_guard(spread, spread).item() == pytest.approx(0.0, abs=1e-12)


def test_gradcheck_float64():
    b, k = 4, 3
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * b, k, generator=g, dtype=torch.float64, requires_grad=True)
    p0, p1 = _assignments(b, k, seed=5, sharp=4.0)
    loss_fn = DCSSClusterLoss()

    def with_p(z):
        q = z.softmax(1)
        return loss_fn(q[:b], q[b:], p0, p1)

    def q_space(z):
        q = z.softmax(1)
        return loss_fn(q[:b], q[b:])

    assert torch.autograd.gradcheck(with_p, (logits,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(q_space, (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "q0, q1, match",
    [
        (torch.full((4, 3), 1 / 3), torch.full((5, 3), 1 / 3), "same shape"),
        (torch.ones(4, 1), torch.ones(4, 1), "K >= 2"),
        (torch.full((4, 3), float("nan")), torch.full((4, 3), 1 / 3), "NaN"),
        (torch.randn(4, 3), torch.randn(4, 3), "not logits"),
        (torch.full((4,), 0.5), torch.full((4,), 0.5), r"\(B, K\)"),
    ],
)
def test_loss_rejects_bad_input(q0, q1, match):
    with pytest.raises(ValueError, match=match):
        DCSSClusterLoss()(q0, q1)


def test_loss_rejects_bad_targets_and_settings():
    q0, q1 = _assignments(4, 3, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="both views"):
        DCSSClusterLoss()(q0, q1, q0)
    with pytest.raises(ValueError, match="shape"):
        DCSSClusterLoss()(q0, q1, q0[:, :2].softmax(1), q1[:, :2].softmax(1))
    with pytest.raises(ValueError, match="gamma"):
        DCSSClusterLoss(zeta=0.2, gamma=0.8)
    with pytest.raises(ValueError, match="reduction"):
        DCSSClusterLoss(reduction="none")
    with pytest.raises(ValueError, match="balance_weight"):
        DCSSClusterLoss(balance_weight=-1.0)


# ---------------------------------------------------------------------------------------------------- head
def test_head_rows_sum_to_one_and_it_is_a_dcss_head():
    head = DCSSClusterHead(input_dim=16, num_clusters=5)
    q = head(torch.randn(32, 16))
    assert q.shape == (32, 5)
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-6) and (q >= 0).all()
    assert isinstance(head, DCSSHead)
    plain = DCSSHead(16, 5)
    plain.load_state_dict(head.state_dict())  # same keys and shapes: DCSS.load / ONNX export take it
    head.eval(), plain.eval()
    x = torch.randn(8, 16)
    assert torch.equal(head(x), plain(x))


def test_head_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        DCSSClusterHead(16, 1)
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        DCSSClusterHead(16, 4)(torch.randn(8, 15))
    with pytest.raises(ValueError, match="flatten"):
        DCSSClusterHead(16, 4)(torch.randn(8, 16, 1, 1))


# ---------------------------------------------------------------------------------------------------- views
def test_batch_views_shape_range_independence_and_seed():
    x = torch.rand(1, 1, 8, 8).repeat(64, 1, 1, 1)
    views = BatchSimCLRViews()
    v = views(x, torch.Generator().manual_seed(0))
    assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1
    assert (v[1:] - v[:1]).abs().flatten(1).amax(1).min() > 0  # every image got its own draw
    again = views(x, torch.Generator().manual_seed(0))
    assert torch.equal(v, again)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        views(torch.rand(4, 64))


def test_lightly_simclr_transform_on_small_grayscale():
    from PIL import Image

    img = Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8), mode="L")
    v0, v1 = simclr_transform(8)(img)
    assert tuple(v0.shape) == (1, 8, 8) and tuple(v1.shape) == (1, 8, 8)
    assert float(v0.min()) >= 0 and float(v0.max()) <= 1


# ---------------------------------------------------------------------------------------------------- fitting
def _digits(n=None):
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:n], d.target[:n]) if n else (d.images, d.target)


def _cli_args(**kw):
    base = dict(clusters=10, seed=0, preset="default", device="cpu", quiet=True, out=None, ssl="simclr")
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_fit_from_cli_args_gives_the_estimator_interface(tmp_path):
    x, _ = _digits(240)
    seen = []
    model = fit_from_cli_args(_cli_args(out=str(tmp_path)), x,
                              {"pretrain_epochs": 2, "phase2_epochs": 2, "batch_size": 64},
                              callback=lambda phase, epoch, stats: seen.append((phase, epoch, stats["loss"])),
                              checkpoint_path=tmp_path / "progress.pt")
    n = len(x)
    assert model.labels_.shape == (n,) and model.labels_.dtype == np.int64
    h = model.history_
    assert h["device"] == "cpu"
    assert h["epochs"] == {"pretrain": 2, "phase1": 0, "phase2": 2}
    for key in ("time_s", "time_per_epoch_s", "loss"):
        assert set(h[key]) >= {"pretrain", "phase1", "phase2"}
    assert len(h["loss"]["pretrain"]) == 2 and len(h["loss"]["phase2"]) == 2
    assert len(h["ssl_loss"]) == 2 and len(h["cluster_loss"]) == 2
    for key in ("labels_after_pretrain", "labels_after_phase1"):
        assert h[key].shape == (n,) and h[key].dtype == np.int64
    assert [s[:2] for s in seen] == [("pretrain", 0), ("pretrain", 1), ("phase2", 0), ("phase2", 1)]
    assert os.path.exists(tmp_path / "progress.pt")  # `dcss fit` removes it once the run is written
    cfg = model.config_.to_dict()
    assert cfg["n_clusters"] == 10 and cfg["phase1_epochs"] == 0 and cfg["latent_dim"] == 32
    assert cfg["num_heads"] == 1  # what was trained (the estimator's image default is 3)
    assert model.get_params()["num_heads"] == 1 and model.get_params()["latent_dim"] == 32
    assert isinstance(model.model_, DCSSModel) and len(model.model_.heads) == 1 and model.model_.decoder is None
    assert model.input_shape_ == (1, 8, 8)
    assert model.transform(x).shape == (n, 32)
    q = model.predict_proba(x)
    assert q.shape == (n, 10) and np.allclose(q.sum(1), 1, atol=1e-5)
    assert np.array_equal(model.predict(x), model.labels_)
    path = tmp_path / "checkpoint.pt"
    model.save(path)
    torch.load(path, weights_only=True)  # tensors and plain config only
    loaded = DCSS.load(path)  # the backbone is a reference conv encoder: no custom module needed
    assert np.array_equal(loaded.predict(x), model.labels_)
    assert loaded.config_.to_dict() == cfg
    same = DCSSModel.load(path)
    assert torch.equal(same.predict(torch.as_tensor(x, dtype=torch.float32).unsqueeze(1)),
                       torch.as_tensor(model.labels_))


def test_fit_resume_gives_the_uninterrupted_labels(tmp_path):
    x, _ = _digits(160)
    kw = dict(pretrain_epochs=2, phase2_epochs=3, batch_size=64, seed=3, device="cpu")
    full = fit_lightly(x, 4, **kw)

    class Stop(Exception):
        pass

    for stop_at in [("pretrain", 1), ("phase2", 1)]:
        def stop(phase, epoch, stats):
            if (phase, epoch) == stop_at:
                raise Stop

        progress = tmp_path / f"progress_{stop_at[0]}.pt"
        with pytest.raises(Stop):
            fit_lightly(x, 4, callback=stop, checkpoint_path=progress, checkpoint_every_s=0.0, **kw)
        resumed = fit_lightly(x, 4, checkpoint_path=progress, resume=True, **kw)
        assert np.array_equal(resumed.labels_, full.labels_), stop_at
        np.testing.assert_allclose(resumed.history_["loss"]["phase2"], full.history_["loss"]["phase2"], rtol=1e-6)
        assert np.array_equal(resumed.history_["labels_after_pretrain"], full.history_["labels_after_pretrain"])
    with pytest.raises(ValueError, match="different config"):
        fit_lightly(x, 4, checkpoint_path=progress, resume=True, **{**kw, "phase2_epochs": 4})
    with pytest.raises(ValueError, match="different config"):
        fit_lightly(x, 4, checkpoint_path=progress, resume=True, temperature=0.2, **kw)


def test_fit_bad_input():
    with pytest.raises(ValueError, match="images"):
        fit_lightly(np.random.rand(50, 6), 3, pretrain_epochs=0, phase2_epochs=0)
    with pytest.raises(ValueError, match="simclr"):
        fit_lightly(np.random.rand(50, 8, 8), 3, ssl="byol")
    bad = np.random.rand(50, 8, 8)
    bad[3, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_lightly(bad, 3, pretrain_epochs=0, phase2_epochs=0)
    with pytest.raises(TypeError, match="n_clusters"):
        fit_lightly(np.random.rand(50, 8, 8), 2.5)
    with pytest.raises(ValueError, match="n_clusters"):
        fit_lightly(np.random.rand(50, 8, 8), 1)
    with pytest.raises(ValueError, match="one cluster head"):
        fit_lightly(np.random.rand(50, 8, 8), 3, num_heads=3)
    with pytest.raises(ValueError, match="no Phase 1"):
        fit_lightly(np.random.rand(50, 8, 8), 3, phase1_epochs=5)


def test_epoch_needs_views():
    from dcss_plugin.adapters.lightly import SimCLRClusterModel, simclr_dcss_epoch
    from dcss_plugin.training import Batches

    model = SimCLRClusterModel(DCSSModel(torch.nn.Flatten(), n_clusters=3, latent_dim=64))
    batches = Batches(torch.rand(8, 1, 8, 8), 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="views"):
        simclr_dcss_epoch(model, torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.1), batches)


@pytest.mark.slow
def test_plain_loop_recipe_beats_kmeans_on_raw_digits():
    """A shortened real run (40 + 20 epochs, 35-70 s on one thread): SimCLR + DCSS beats k-means on raw pixels."""
    from sklearn.cluster import KMeans

    from dcss_plugin.metrics import evaluate

    x, y = _digits()
    model = fit_lightly(x, 10, pretrain_epochs=40, phase2_epochs=20, seed=0, device="cpu")
    ours = evaluate(y, model.labels_)
    km = evaluate(y, KMeans(10, n_init=10, random_state=0).fit_predict(x.reshape(len(x), -1)))
    assert ours["acc"] > km["acc"] + 0.03 and ours["nmi"] > km["nmi"] + 0.03, (ours, km)
    assert np.bincount(model.labels_, minlength=10).min() > 0  # no empty cluster


# ---------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, splits: list) -> None:
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _tiny_model()
        ddp = DDP(model)
        x0, x1, p0, p1 = _tiny_batch()
        loss_fn = DCSSClusterLoss(gather_distributed=True)
        for sizes in splits:  # equal shards, and unequal ones (the last batch of an epoch)
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            for use_p in (True, False):
                ddp.zero_grad()
                q0, q1 = ddp(x0[lo:hi]), ddp(x1[lo:hi])
                loss = loss_fn(q0, q1, p0[lo:hi], p1[lo:hi]) if use_p else loss_fn(q0, q1)
                loss.backward()
                torch.save({"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()]},
                           os.path.join(out_dir, f"rank{rank}_{sizes[0]}_{use_p}.pt"))
    finally:
        tdist.destroy_process_group()


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)  # no BatchNorm: its batch statistics would differ per rank by design
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4), torch.nn.Softmax(1))


def _tiny_batch():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(10, 6, generator=g)
    x1 = x0 + 0.3 * torch.randn(10, 6, generator=g)
    p = torch.softmax(3 * torch.randn(20, 4, generator=g), 1)
    return x0, x1, p[:10], p[10:]


def test_gather_distributed_matches_single_process(tmp_path):
    """Two gloo processes, each with its shard, DDP averaging: the loss of every rank and the parameter gradients
    equal the single-process loss and gradients on the whole batch (for 5+5 and 7+3 rows)."""
    import torch.multiprocessing as mp

    splits = [[5, 5], [7, 3]]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), splits), nprocs=2, join=True)
    model = _tiny_model()
    x0, x1, p0, p1 = _tiny_batch()
    loss_fn = DCSSClusterLoss()
    for use_p in (True, False):
        model.zero_grad()
        q0, q1 = model(x0), model(x1)
        loss = loss_fn(q0, q1, p0, p1) if use_p else loss_fn(q0, q1)
        loss.backward()
        for sizes in splits:
            for rank in (0, 1):
                got = torch.load(tmp_path / f"rank{rank}_{sizes[0]}_{use_p}.pt", weights_only=True)
                assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
                for g_ddp, p in zip(got["grads"], model.parameters()):
                    torch.testing.assert_close(g_ddp, p.grad, rtol=1e-4, atol=1e-6)
