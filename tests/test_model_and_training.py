"""DCSSModel and the training pieces, each against a naive reference or a property that can fail."""

import numpy as np
import pytest
import torch
from torch import nn

from dcss_plugin import DCSSLoss, DCSSModel, Normalize, PairwiseSimilarityLoss, PretrainLoss
from dcss_plugin import functional as F
from dcss_plugin.nets import mlp_autoencoder
from dcss_plugin.training import (Batches, HeadSelector, NeighborPositives, Schedule, encode_all, init_centers,
                                  mine_neighbors, phase_optimizer, update_centers)


def _model(k=3, d=4, f=6, heads=1, normalize=None):
    torch.manual_seed(0)
    enc, dec = mlp_autoencoder(f, d, (16,))
    return DCSSModel(enc, k, d, decoder=dec, normalize=normalize, num_heads=heads, input_shape=(f,))


def test_model_forward_paths_equal_their_compositions():
    x = torch.randn(20, 6) * 3 + 1
    model = _model(normalize=Normalize.fit(x)).eval()
    xn = (x - x.mean(0)) / x.std(0, unbiased=False)
    torch.testing.assert_close(model.normalize(x), xn)
    u = model.encoder(xn)
    torch.testing.assert_close(model.encode(x), u)
    torch.testing.assert_close(model.memberships(x), F.fuzzy_memberships(u, model.centers.centers, 1.5))
    torch.testing.assert_close(model(x), model.heads[0](u))
    assert torch.equal(model.predict(x, batch_size=7), model(x).argmax(1))


def test_normalize_images_share_one_scale_and_vectors_skip_constant_features():
    img = torch.rand(5, 1, 4, 4) * 16
    norm = Normalize.fit(img)
    assert norm.offset.shape == (1, 1, 1) and float(norm.scale) == pytest.approx(float(img.max()))
    vec = torch.randn(10, 3)
    vec[:, 1] = 7.0
    out = Normalize.fit(vec)(vec)
    assert torch.all(out[:, 1] == 0) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="> 0"):
        Normalize(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))


def test_heads_select_reset_and_keep():
    model = _model(heads=3)
    x = torch.randn(8, 6)
    model.eval()
    model.select_head(2)
    torch.testing.assert_close(model(x), model.heads[2](model.encode(x)))
    kept = model.heads[2]
    model.keep_selected_head()
    assert len(model.heads) == 1 and model.head is kept and int(model.head_index) == 0
    old = [p.clone() for p in model.heads[0].parameters()]
    model.reset_heads(2)
    assert len(model.heads) == 2 and not torch.equal(old[0], model.heads[0].net[0].weight)
    with pytest.raises(ValueError, match="head index"):
        model.select_head(5)


def test_save_load_roundtrip_reference_and_custom(tmp_path):
    x = torch.randn(12, 6)
    model = _model(heads=2, normalize=Normalize.fit(x)).eval()
    model.select_head(1)
    model.centers.centers.normal_()
    model.save(tmp_path / "m.pt")
    again = DCSSModel.load(tmp_path / "m.pt")
    torch.testing.assert_close(again(x), model(x))
    torch.testing.assert_close(again.memberships(x), model.memberships(x))
    assert again.input_shape == (6,) and int(again.head_index) == 1
    custom = DCSSModel(nn.Linear(6, 4), 3, 4, input_shape=(6,)).eval()
    custom.save(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="custom encoder"):
        DCSSModel.load(tmp_path / "c.pt")
    back = DCSSModel.load(tmp_path / "c.pt", encoder=nn.Linear(6, 4))
    torch.testing.assert_close(back(x), custom(x))
    assert back.decoder is None


def test_pretrain_loss_equals_naive_terms():
    g = torch.Generator().manual_seed(0)
    x_hat, target, u = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    plain = sum(((x_hat[i] - target[i]) ** 2).sum() for i in range(8)) / 8
    torch.testing.assert_close(PretrainLoss()(x_hat, target), plain)
    half = torch.randn(4, 5, generator=g)
    rec = sum(((x_hat[i] - half[i % 4]) ** 2).sum() for i in range(8)) / 8
    torch.testing.assert_close(PretrainLoss(contrastive_weight=0.5)(x_hat, half, u),
                               rec + 0.5 * F.view_contrastive_loss(u[:4], u[4:]))
    rec_mean = sum(((x_hat[i] - target[i]) ** 2).mean() for i in range(8)) / 8
    torch.testing.assert_close(PretrainLoss(neighbor_embedding_weight=2.0)(x_hat, target, u),
                               rec_mean + 2.0 * F.neighbor_embedding_loss(u[:4], u[4:]))
    with pytest.raises(ValueError, match="one pair term"):
        PretrainLoss(1.0, 1.0)
    with pytest.raises(ValueError, match="two halves"):
        PretrainLoss(contrastive_weight=1.0)(x_hat, half, None)


def test_dcss_loss_stages_positives_and_guard_equal_naive_reference():
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(10, 3, generator=g) * 3, 1)
    p = torch.softmax(torch.randn(10, 3, generator=g) * 3, 1)
    pair = PairwiseSimilarityLoss(0.8, 0.2, reduction="balanced", exclude_self=True)
    loss = DCSSLoss(u_stage_epochs=2, balance_weight=5.0)
    loss.set_epoch(1)  # u-space stage: s = p p^T
    assert not loss.q_space
    qbar = q.mean(0)
    guard = (qbar * qbar.log()).sum() + np.log(3)
    pull = -sum(torch.log((q[i] * q[i + 5]).sum()) for i in range(5)) / 5
    torch.testing.assert_close(loss(q, p, known_positives=True), pair(q, p @ p.t()) + pull + 5 * guard)
    loss.set_epoch(2)  # q-space stage: s = q q^T, p ignored
    assert loss.q_space
    torch.testing.assert_close(loss(q, known_positives=False), pair(q, (q @ q.t()).detach()) + 5 * guard)
    assert float(loss.last_positive_share) == pytest.approx(float(((q @ q.t()) > 0.8).float().mean()))
    with pytest.raises(ValueError, match="u-space stage needs"):
        DCSSLoss(u_stage_epochs=5)(q)


def test_dcss_loss_tolerance_from_a_partition_and_gradient():
    loss = DCSSLoss(u_stage_epochs=0, balance_weight=1.0)
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    sizes = np.array([0.6, 0.3, 0.1])
    assert loss.set_tolerance_from_labels(labels, 3) == pytest.approx(float(np.sum(sizes * np.log(sizes * 3))))
    assert loss.set_tolerance_from_labels(torch.tensor([0, 1, 2]), 3) == 0.0  # even sizes: no slack
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: loss(torch.softmax(z, 1), known_positives=True), (logits,))


def test_schedule_budgets_and_u_stage():
    s = Schedule.for_data(1797, 256, T1=2, T2=5)  # 8 steps per epoch
    assert (s.pretrain, s.phase1, s.phase2, s.u_stage) == (120, 10, 200, 5)
    s = Schedule.for_data(300, 256, T2=5, T2_min_steps=400)  # 2 steps per epoch: 200 epochs, capped at half
    assert s.u_stage == min(200, s.phase2 // 2)
    assert Schedule.for_data(70000, 256, pretrain_epochs=3).pretrain == 3
    with pytest.raises(ValueError, match=">= 0"):
        Schedule.for_data(100, 10, phase1_epochs=-1)


def test_passes_run_in_eval_mode_and_restore_training_mode():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model = DCSSModel(enc, 2, 2)
    xn = torch.randn(30, 4)
    model.train()
    enc(xn)  # move the running statistics away from their start
    u = encode_all(model, xn, chunk=7)
    assert model.encoder.training  # restored
    model.eval()
    torch.testing.assert_close(u, enc(xn))  # eval-mode u (running statistics), whatever the chunks
    model.train()
    init_centers(model, xn, seed=0)
    p = model.centers(u)
    w = p.pow(model.centers.m)
    expected = (w.t() @ u) / w.sum(0)[:, None]
    torch.testing.assert_close(update_centers(model, xn), expected)


def test_neighbors_equal_brute_force_and_draws_come_from_them():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 3, generator=g)
    knn = mine_neighbors(f, 4)
    d = torch.cdist(f, f) + torch.eye(40) * 1e9
    brute = d.argsort(1)[:, :4]
    assert torch.equal(knn.sort(1).values, brute.sort(1).values)
    pos = NeighborPositives(k=4, refresh_every=3, knn=knn)
    idx = torch.arange(40)
    drawn = pos.sample(idx, torch.Generator().manual_seed(1))
    assert all(int(drawn[i]) in knn[i].tolist() for i in range(40))
    assert [pos.due(e) for e in range(7)] == [False, False, False, True, False, False, True]


def test_head_selector_picks_lowest_mean_loss():
    sel = HeadSelector(3)
    sel.start_epoch()
    for h, loss in ((0, 0.5), (1, 0.2), (2, 0.9), (0, 0.5), (1, 0.4), (2, 0.1)):
        sel.add(h, loss, rows=10)
    assert sel.end_epoch(20) == pytest.approx([0.5, 0.3, 0.5])
    assert sel.best() == 1 and HeadSelector.best_of([]) == 0


def test_phase_optimizer_rates_per_phase():
    model = _model(heads=2)
    opt = phase_optimizer(model, "phase2", lr=1e-3, encoder_lr_factor=0.1)
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(rates[id(p)] == pytest.approx(1e-4) for p in model.encoder.parameters())
    assert all(rates[id(p)] == 1e-3 for p in model.heads.parameters())
    assert not any(id(p) in rates for p in model.decoder.parameters())  # idle in Phase 2
    opt1 = phase_optimizer(model, "phase1", lr=1e-3, phase1_lr_factor=0.1)
    assert all(g["lr"] == pytest.approx(1e-4) for g in opt1.param_groups)
    with pytest.raises(ValueError, match="phase"):
        phase_optimizer(model, "phase3", 1e-3)


def test_batches_shard_the_global_batch_contiguously():
    b = Batches(torch.arange(10).float()[:, None], 4, torch.Generator().manual_seed(0), world_size=3, rank=1)
    assert b.shard(torch.arange(10)).tolist() == [4, 5, 6]
    assert b.local_share(10) == pytest.approx(3 * 3 / 10)
    assert sorted(torch.cat(b.epoch()).tolist()) == list(range(10))


def test_passes_refuse_diverged_embeddings():
    """NaN weights after the last step (finite loss) stop at the center passes with a message, not in k-means."""
    model = _model()
    with torch.no_grad():
        model.encoder.layers[0].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="diverged"):
        init_centers(model, torch.randn(20, 6))
    with pytest.raises(ValueError, match="diverged"):
        update_centers(model, torch.randn(20, 6))
