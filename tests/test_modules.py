"""ClusterCenters, DCSSHead, the reference networks and the metrics."""

import itertools

import numpy as np
import pytest
import torch

from dcss_plugin import ClusterCenters, DCSSHead, cluster_accuracy, evaluate
from dcss_plugin.nets import conv_autoencoder, mlp_autoencoder
from dcss_plugin import functional as F


def test_cluster_centers_kmeans_init_matches_sklearn():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    u = torch.cat([torch.randn(50, 2, generator=g) + torch.tensor(c) for c in ([0.0, 8.0], [8.0, 0.0], [-8.0, -8.0])])
    cc = ClusterCenters(3, 2)
    cc.init_kmeans(u, seed=1)
    ref = KMeans(3, n_init=10, random_state=1).fit(u.double().numpy()).cluster_centers_
    np.testing.assert_allclose(cc.centers.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_cluster_centers_cosine_init_finds_rays_and_uses_their_means():
    """Three rays 0.6 rad apart, norms 1 to 12: spherical k-means finds the rays, Euclidean k-means cuts across."""
    g = torch.Generator().manual_seed(0)
    angles = torch.tensor([0.0, 0.6, 1.2]).repeat_interleave(60) + 0.05 * torch.randn(180, generator=g)
    norms = 1 + 11 * torch.rand(180, generator=g)
    u = torch.stack([angles.cos(), angles.sin()], 1) * norms[:, None]
    truth = np.repeat(np.arange(3), 60)
    ray_means = torch.stack([u[torch.as_tensor(truth == k)].mean(0) for k in range(3)])
    cos, euc = ClusterCenters(3, 2), ClusterCenters(3, 2)
    cos.init_kmeans(u, seed=0, metric="cosine")
    euc.init_kmeans(u, seed=0)

    def matched_error(centers: torch.Tensor) -> float:  # largest distance to the ray means, best matching
        d = torch.cdist(centers, ray_means)
        return min(max(float(d[i, j]) for i, j in enumerate(perm)) for perm in itertools.permutations(range(3)))

    assert matched_error(cos.centers) < 1e-4  # spherical k-means found the rays; centers are their means of u
    assert matched_error(euc.centers) > 1.0  # Euclidean k-means cut across them
    with pytest.raises(ValueError, match="metric"):
        cos.init_kmeans(u, metric="manhattan")


def test_cluster_centers_update_over_chunks_equals_weighted_mean():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(40, 3, generator=g)
    cc = ClusterCenters(4, 3, m=1.5)
    cc.centers.copy_(torch.randn(4, 3, generator=g))
    p = F.fuzzy_memberships(u, cc.centers, 1.5)
    expected = (p.pow(1.5).t() @ u) / p.pow(1.5).sum(0)[:, None]
    for chunk in u.split(9):
        cc.accumulate(chunk)
    cc.update()
    torch.testing.assert_close(cc.centers, expected)
    assert float(cc.denominator.abs().sum()) == 0.0  # statistics reset after the update


def test_cluster_centers_bad_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        ClusterCenters(1, 3)
    cc = ClusterCenters(5, 3)
    with pytest.raises(ValueError, match="at least K=5"):
        cc.init_kmeans(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        cc.init_kmeans(torch.randn(10, 4))


def test_head_outputs_rows_on_simplex_and_is_safe_for_large_inputs():
    head = DCSSHead(6, 4, hidden_dims=(16, 8)).eval()
    q = head(torch.randn(10, 6) * 1e4)
    assert q.shape == (10, 4)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(10))
    assert [m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear)] == [16, 8, 4]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28), (2, 7, 9)])
def test_conv_autoencoder_reconstructs_exact_shape(shape):
    enc, dec = conv_autoencoder(shape, latent_dim=5)
    x = torch.randn(3, *shape)
    u = enc(x)
    x_hat = dec(u)
    assert u.shape == (3, 5) and x_hat.shape == x.shape


def test_mlp_autoencoder_learns_to_reconstruct():
    torch.manual_seed(0)
    x = torch.randn(64, 2) @ torch.randn(2, 12)  # rank-2 data: a 2-d bottleneck can reconstruct it
    enc, dec = mlp_autoencoder(12, latent_dim=2, hidden_dims=(32,))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    first = None
    for _ in range(300):
        x_hat = dec(enc(x))
        loss = (x - x_hat).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_accuracy_equals_best_permutation_bruteforce():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    pred = rng.integers(0, 4, 200)
    best = max(np.mean(np.array(perm)[pred] == y) for perm in itertools.permutations(range(4)))
    assert cluster_accuracy(y, pred) == pytest.approx(best)
    relabeled = (pred + 2) % 4
    assert cluster_accuracy(y, relabeled) == pytest.approx(best)
    m = evaluate(y, y)
    assert m == {"acc": 1.0, "nmi": 1.0, "ari": 1.0}


def test_pairwise_loss_module_targets_and_known_positive_ids_match_naive():
    """``target=p`` means ``s = p p^T``; no target means ``s = q q^T``; equal ``sample_ids`` force ``s_ij = 1``."""
    from dcss_plugin import PairwiseSimilarityLoss

    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(8, 3, generator=g, dtype=torch.float64) * 3, 1)
    p = torch.softmax(torch.randn(8, 3, generator=g, dtype=torch.float64) * 3, 1)
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    crit = PairwiseSimilarityLoss(0.7, 0.3, reduction="sum", exclude_self=True)

    def naive(s):
        total = 0.0
        for i, j in itertools.product(range(8), range(8)):
            if i == j:
                continue
            sim = float(q[i] @ q[j])
            total += (1 - sim) if s[i][j] > 0.7 else (sim if s[i][j] < 0.3 else 0.0)
        return total

    s_p = [[float(p[i] @ p[j]) for j in range(8)] for i in range(8)]
    s_q = [[float(q[i] @ q[j]) for j in range(8)] for i in range(8)]
    s_ids = [[1.0 if ids[i] == ids[j] else s_q[i][j] for j in range(8)] for i in range(8)]
    assert crit(q, target=p).item() == pytest.approx(naive(s_p))
    assert crit(q).item() == pytest.approx(naive(s_q))
    assert crit(q, sample_ids=ids).item() == pytest.approx(naive(s_ids))
    assert crit(q, p @ p.t()).item() == pytest.approx(naive(s_p))
    with pytest.raises(ValueError, match="not both"):
        crit(q, p @ p.t(), target=p)
    with pytest.raises(ValueError, match="sample_ids"):
        crit(q, sample_ids=ids[:5])
    with pytest.raises(ValueError, match="target"):
        crit(q, target=p[:, :2])
