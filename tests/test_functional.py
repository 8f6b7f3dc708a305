"""The pure functions against naive reference implementations."""

import itertools
import math

import pytest
import torch

from dcss_plugin import functional as F



@pytest.fixture(autouse=True)
def float64_default():
    """Reference comparisons in double precision, restored afterwards so other test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def naive_memberships(u, c, m):
    n, k = u.shape[0], c.shape[0]
    p = torch.zeros(n, k)
    for i in range(n):
        d = [float(((u[i] - c[j]) ** 2).sum()) for j in range(k)]
        if min(d) == 0.0:
            p[i, d.index(0.0)] = 1.0
            continue
        w = [dj ** (-1.0 / (m - 1)) for dj in d]
        for j in range(k):
            p[i, j] = w[j] / sum(w)
    return p


@pytest.mark.parametrize("m", [1.2, 1.5, 2.0])
def test_memberships_match_formula_and_sum_to_one(m):
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(20, 4, generator=g), torch.randn(5, 4, generator=g)
    p = F.fuzzy_memberships(u, c, m)
    torch.testing.assert_close(p, naive_memberships(u, c, m))
    torch.testing.assert_close(p.sum(1), torch.ones(20))


def test_memberships_finite_and_exact_at_centers():
    c = torch.randn(4, 3, dtype=torch.float32)
    u = torch.cat([c, c[:1] + 1e-20, torch.randn(2, 3, dtype=torch.float32)])
    p = F.fuzzy_memberships(u, c, 1.5)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p[:4], torch.eye(4, dtype=torch.float32))
    torch.testing.assert_close(p.sum(1), torch.ones(len(u), dtype=torch.float32))


def test_memberships_reject_bad_m_and_shapes():
    with pytest.raises(ValueError, match="fuzzifier"):
        F.fuzzy_memberships(torch.randn(3, 2), torch.randn(2, 2), m=1.0)
    with pytest.raises(ValueError, match="same d"):
        F.fuzzy_memberships(torch.randn(3, 2), torch.randn(2, 3))


def naive_cluster_losses(x, x_hat, u, c, p, m, lam):
    """The paper's K cluster-specific losses L_k, one at a time."""
    losses = []
    for k in range(c.shape[0]):
        lk = 0.0
        for i in range(x.shape[0]):
            w = p[i, k].detach() ** m
            lk = lk + w * (((x[i] - x_hat[i]) ** 2).sum() + lam * ((u[i] - c[k]) ** 2).sum())
        losses.append(lk)
    return losses


def _phase1_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = torch.nn.Linear(6, 3)
    dec = torch.nn.Linear(3, 6)
    x = torch.randn(9, 6, generator=g)
    c = torch.randn(4, 3, generator=g)
    return enc, dec, x, c


def test_centering_loss_equals_sum_of_cluster_losses_and_gradients():
    enc, dec, x, c = _phase1_setup()
    m, lam = 1.5, 0.1
    u = enc(x)
    x_hat = dec(u)
    p = F.fuzzy_memberships(u, c, m)
    one_pass = F.centering_loss(x, x_hat, u, c, p, m=m, lam=lam, reduction="sum")
    grads = torch.autograd.grad(one_pass, list(enc.parameters()) + list(dec.parameters()))

    u2 = enc(x)
    x_hat2 = dec(u2)
    p2 = F.fuzzy_memberships(u2, c, m)
    per_cluster = naive_cluster_losses(x, x_hat2, u2, c, p2, m, lam)
    naive_grads = [torch.zeros_like(g) for g in grads]
    for lk in per_cluster:  # K separate backward passes, as in the official schedule
        gk = torch.autograd.grad(lk, list(enc.parameters()) + list(dec.parameters()), retain_graph=True)
        naive_grads = [a + b for a, b in zip(naive_grads, gk)]
    torch.testing.assert_close(one_pass, sum(per_cluster))
    for a, b in zip(grads, naive_grads):
        torch.testing.assert_close(a, b)


def test_centering_loss_p_carries_no_gradient_and_reductions():
    enc, dec, x, c = _phase1_setup(1)
    u = enc(x)
    x_hat = dec(u)
    p = F.fuzzy_memberships(u, c, 1.5)  # depends on u: must be treated as constant
    loss = F.centering_loss(x, x_hat, u, c, p, reduction="sum")
    g_with = torch.autograd.grad(loss, enc.weight, retain_graph=True)[0]
    loss_const = F.centering_loss(x, x_hat, u, c, p.detach(), reduction="sum")
    g_const = torch.autograd.grad(loss_const, enc.weight)[0]
    torch.testing.assert_close(g_with, g_const)
    none = F.centering_loss(x, x_hat, u, c, p, reduction="none")
    assert none.shape == (9,)
    torch.testing.assert_close(F.centering_loss(x, x_hat, u, c, p, reduction="mean"), none.mean())
    with pytest.raises(ValueError, match="reduction"):
        F.centering_loss(x, x_hat, u, c, p, reduction="avg")


def naive_pairwise(q, s, zeta, gamma, exclude_self=False):
    total, count = 0.0, 0
    n = q.shape[0]
    for i, j in itertools.product(range(n), range(n)):
        if exclude_self and i == j:
            continue
        qq = float(q[i] @ q[j])
        if s[i, j] > zeta:
            total += 1 - qq
            count += 1
        elif s[i, j] < gamma:
            total += qq
            count += 1
    return total, count


@pytest.mark.parametrize("exclude_self", [False, True])
def test_pairwise_loss_selection_matches_naive(exclude_self):
    g = torch.Generator().manual_seed(3)
    q = torch.softmax(3 * torch.randn(12, 4, generator=g), 1)
    p = torch.softmax(3 * torch.randn(12, 4, generator=g), 1)
    s = p @ p.t()
    total, count = naive_pairwise(q, s, 0.8, 0.2, exclude_self)
    assert count > 0 and count < 144  # both selected and ignored pairs exist
    got_sum = F.pairwise_similarity_loss(q, s, 0.8, 0.2, "sum", exclude_self=exclude_self)
    got_mean = F.pairwise_similarity_loss(q, s, 0.8, 0.2, "mean", exclude_self=exclude_self)
    assert got_sum.item() == pytest.approx(total, rel=1e-10)
    assert got_mean.item() == pytest.approx(total / count, rel=1e-10)


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean", "balanced"])
def test_pairwise_loss_and_gradient_match_elementwise_reference(reduction, exclude_self):
    """The matmul form (``offset - sum(q * (w q))``) against the per-pair terms built elementwise, value and gradient,
    on a non-symmetric ``s`` (the weights need not be symmetric)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(16, 5, generator=g, requires_grad=True)
    s = torch.rand(16, 16, generator=g)
    q = torch.softmax(z, 1)
    sim = q @ q.t()
    pos, neg = s > 0.7, s < 0.3
    if exclude_self:
        pos, neg = pos & ~torch.eye(16, dtype=torch.bool), neg & ~torch.eye(16, dtype=torch.bool)
    pull, push = ((1 - sim) * pos).sum(), (sim * neg).sum()
    ref = {"sum": pull + push, "mean": (pull + push) / (pos.sum() + neg.sum()),
           "balanced": pull / pos.sum() + push / neg.sum()}[reduction]
    (g_ref,) = torch.autograd.grad(ref, z)
    got = F.pairwise_similarity_loss(torch.softmax(z, 1), s, 0.7, 0.3, reduction, exclude_self=exclude_self)
    (g_got,) = torch.autograd.grad(got, z)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    none = F.pairwise_similarity_loss(q, s, 0.7, 0.3, "none", exclude_self=exclude_self)
    torch.testing.assert_close(none.sum(), pull + push)
    assert not bool(none.detach()[~(pos | neg)].any())


def test_pairwise_loss_half_precision_counts_do_not_overflow():
    """400 x 400 = 160000 pairs: more than float16 can count (65504); the loss is computed in float32."""
    g = torch.Generator().manual_seed(6)
    q = torch.softmax(3 * torch.randn(400, 4, generator=g), 1)
    s = q @ q.t()
    ref = F.pairwise_similarity_loss(q.float(), s.float(), reduction="balanced")
    got = F.pairwise_similarity_loss(q.half(), s.half(), reduction="balanced")
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert abs(got.item() - ref.item()) < 1e-2


def test_pairwise_loss_gradient_only_through_q():
    q_logits = torch.randn(6, 3, requires_grad=True)
    q = torch.softmax(q_logits, 1)
    s = q @ q.t()  # not detached by the caller: the loss must detach it
    loss = F.pairwise_similarity_loss(q, s, 0.5, 0.3, "sum")
    (g,) = torch.autograd.grad(loss, q_logits)
    q2 = torch.softmax(q_logits, 1)
    loss2 = F.pairwise_similarity_loss(q2, s.detach(), 0.5, 0.3, "sum")
    (g2,) = torch.autograd.grad(loss2, q_logits)
    torch.testing.assert_close(g, g2)
    assert torch.autograd.gradcheck(
        lambda z: F.pairwise_similarity_loss(torch.softmax(z, 1), s.detach(), 0.5, 0.3, "mean"),
        (q_logits.detach().clone().requires_grad_(True),),
    )


def test_pairwise_loss_no_selected_pairs_is_zero_and_bad_thresholds():
    q = torch.full((4, 2), 0.5)
    s = torch.full((4, 4), 0.5)
    assert F.pairwise_similarity_loss(q, s, 0.8, 0.2).item() == 0.0
    with pytest.raises(ValueError, match="gamma"):
        F.pairwise_similarity_loss(q, s, zeta=0.2, gamma=0.8)
    with pytest.raises(ValueError, match=r"\(B, B\)"):
        F.pairwise_similarity_loss(q, torch.zeros(3, 3))


def test_center_update_is_weighted_mean():
    g = torch.Generator().manual_seed(4)
    u, c = torch.randn(30, 3, generator=g), torch.randn(4, 3, generator=g)
    m = 1.5
    p = F.fuzzy_memberships(u, c, m)
    num, den = F.center_statistics(u, p, m)
    new = F.centers_from_statistics(num, den)
    for k in range(4):
        w = p[:, k] ** m
        torch.testing.assert_close(new[k], (w[:, None] * u).sum(0) / w.sum())
    # accumulating over chunks gives the same result
    num2, den2 = torch.zeros_like(num), torch.zeros_like(den)
    for chunk in torch.arange(30).split(7):
        a, b = F.center_statistics(u[chunk], p[chunk], m)
        num2, den2 = num2 + a, den2 + b
    torch.testing.assert_close(F.centers_from_statistics(num2, den2), new)


def test_empty_cluster_keeps_previous_center():
    num = torch.tensor([[2.0, 2.0], [0.0, 0.0]])
    den = torch.tensor([2.0, 0.0])
    prev = torch.tensor([[9.0, 9.0], [5.0, -5.0]])
    out = F.centers_from_statistics(num, den, prev)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [5.0, -5.0]]))


def test_view_contrastive_loss_matches_naive():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = 0.5
    z = torch.cat([a, b])
    z = z / z.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(10):
        j = (i + 5) % 10
        den = sum(torch.exp(z[i] @ z[k] / t) for k in range(10) if k != i)
        total += -torch.log(torch.exp(z[i] @ z[j] / t) / den)
    torch.testing.assert_close(F.view_contrastive_loss(a, b, t), total / 10)
    # identical views of well-separated points give a small loss; shuffled partners a large one
    x = torch.eye(5) * 10
    assert F.view_contrastive_loss(x, x, 0.1) < F.view_contrastive_loss(x, x.roll(1, 0), 0.1)


def test_neighbor_embedding_loss_matches_naive_and_has_finite_gradients():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    z = torch.cat([a, b])
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        w = [1.0 / (1.0 + float(((z[i] - z[k]) ** 2).sum())) for k in range(8)]
        total += -math.log(w[j] / sum(w[k] for k in range(8) if k != i))
    assert F.neighbor_embedding_loss(a, b).item() == pytest.approx(total / 8, rel=1e-10)
    # gradients equal finite differences, also where a row coincides with its partner (distance 0)
    a2 = a.clone()
    a2[0] = b[0]
    assert torch.autograd.gradcheck(F.neighbor_embedding_loss, (a2.requires_grad_(), b.clone().requires_grad_()))
    # partners close and far from the rest: small loss; the same points with shuffled partners: larger
    x = torch.eye(5, dtype=torch.float64) * 10
    assert F.neighbor_embedding_loss(x, x + 0.01) < F.neighbor_embedding_loss(x, x.roll(1, 0))
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        F.neighbor_embedding_loss(a, b[:3])


def test_balance_penalty_is_kl_to_uniform_and_known_positive_loss():
    q = torch.softmax(torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 1)
    qbar = q.mean(0)
    assert F.balance_penalty(q).item() == pytest.approx(float((qbar * (qbar * 4).log()).sum()))
    assert F.balance_penalty(torch.full((5, 4), 0.25, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)
    assert F.balance_penalty(torch.eye(4, dtype=torch.float64)[[0, 0, 0]]).item() == pytest.approx(math.log(4))
    a, b = q[:3], q[3:6]
    dots = [float(a[i] @ b[i]) for i in range(3)]
    assert F.known_positive_loss(a, b, "log").item() == pytest.approx(-sum(torch.log(torch.tensor(dots))).item() / 3)
    assert F.known_positive_loss(a, b, "linear").item() == pytest.approx(sum(1 - d for d in dots) / 3)


def test_balance_penalty_tolerance_is_a_hinge_on_the_divergence():
    q = torch.softmax(3 * torch.randn(9, 3, generator=torch.Generator().manual_seed(1)), 1).requires_grad_()
    kl = F.balance_penalty(q)
    assert F.balance_penalty(q, tolerance=kl.item() / 2).item() == pytest.approx(kl.item() / 2)
    inside = F.balance_penalty(q, tolerance=kl.item() + 1e-3)  # uneven sizes within the tolerance: no pull
    assert inside.item() == 0.0
    inside.backward()
    assert torch.count_nonzero(q.grad) == 0
    with pytest.raises(ValueError, match="tolerance"):
        F.balance_penalty(q, tolerance=-0.1)



def test_balance_penalty_with_a_size_prior_and_the_phase1_prior():
    q = torch.softmax(torch.randn(12, 3, generator=torch.Generator().manual_seed(2)), 1)
    prior = torch.tensor([0.5, 0.3, 0.2])
    qbar = q.mean(0)
    naive = sum(float(qbar[k] * math.log(qbar[k] / prior[k])) for k in range(3))
    assert F.balance_penalty(q, prior=prior).item() == pytest.approx(naive)
    assert F.balance_penalty(q, prior=torch.full((3,), 1 / 3)).item() == pytest.approx(F.balance_penalty(q).item())
    assert F.balance_penalty(q, prior=qbar).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="prior"):
        F.balance_penalty(q, prior=torch.tensor([1.0, 0.0, 0.0]))
    labels = torch.tensor([0] * 9 + [1])  # 90 % / 10 % / empty, floor 0.3 / 3 = 0.1 each, renormalised
    prior = F.phase1_size_prior(labels, 3)
    assert prior.tolist() == pytest.approx([0.9 / 1.1, 0.1 / 1.1, 0.1 / 1.1])
    assert F.phase1_size_prior(torch.tensor([0, 1, 1, 1]), 2, floor=0.0).tolist() == pytest.approx([0.25, 0.75])
