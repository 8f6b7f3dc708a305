"""Cluster centers in u-space: k-means initialisation and fuzzy c-means updates."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as F

__all__ = ["ClusterCenters"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ClusterCenters(nn.Module):
    """K cluster centers ``mu`` (K, d) with fuzzy memberships and the paper's closed-form update.

    The update ``mu_k = sum_i p_ik^m u_i / sum_i p_ik^m`` is accumulated over a pass (any number of
    :meth:`accumulate` calls), numerator and denominator kept separately; :meth:`update` sums them across ranks
    with ``torch.distributed.all_reduce`` when a process group is running, then divides. k-means initialisation
    runs on rank 0 (scikit-learn) and is broadcast, so every rank starts from the same centers.

    Args:
        num_clusters: K, at least 2.
        dim: d, width of ``u``.
        m: fuzzifier used for memberships and updates (paper: 1.5).

    Example:
        >>> centers = ClusterCenters(num_clusters=3, dim=2)
        >>> centers.init_kmeans(torch.randn(100, 2), seed=0)
        >>> p = centers(torch.randn(8, 2))           # (8, 3) memberships
        >>> centers.accumulate(torch.randn(8, 2)); centers.update()
    """

    centers: Tensor
    numerator: Tensor
    denominator: Tensor

    def __init__(self, num_clusters: int, dim: int, m: float = 1.5) -> None:
        super().__init__()
        if int(num_clusters) < 2:
            raise ValueError(f"num_clusters (K) must be at least 2, got {num_clusters}.")
        if not m > 1:
            raise ValueError(f"The fuzzifier m must be > 1, got {m}.")
        self.num_clusters = int(num_clusters)
        self.dim = int(dim)
        self.m = float(m)
        self.register_buffer("centers", torch.zeros(self.num_clusters, self.dim))
        self.register_buffer("numerator", torch.zeros(self.num_clusters, self.dim))
        self.register_buffer("denominator", torch.zeros(self.num_clusters))

    def forward(self, u: Tensor) -> Tensor:
        """Memberships ``p`` (B, K) of ``u`` (B, d); no gradient reaches the centers."""
        return F.fuzzy_memberships(u, self.centers.detach(), self.m)

    @torch.no_grad()
    def init_kmeans(self, u: Tensor | np.ndarray, seed: int = 0, n_init: int = 10, metric: str = "euclidean") -> None:
        """Set the centers from scikit-learn k-means on ``u`` (N, d); rank 0 computes, all ranks get them.

        ``metric="euclidean"``: the k-means centroids of ``u``. ``metric="cosine"``: k-means on the directions
        ``u / ||u||`` (spherical k-means), each center then the mean of its cluster's ``u`` (so it lives in the same
        space as ``u``). Use ``"cosine"`` when ``u`` was trained with a cosine-similarity loss (NT-Xent): that loss
        shapes only the directions, and the norms (+-15 % on digits) blur Euclidean k-means.
        """
        from sklearn.cluster import KMeans

        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}.")
        u_np = u.detach().cpu().double().numpy() if isinstance(u, Tensor) else np.asarray(u, dtype=np.float64)
        if u_np.ndim != 2 or u_np.shape[1] != self.dim:
            raise ValueError(f"u must be (N, {self.dim}) to initialise the centers, got {u_np.shape}.")
        if u_np.shape[0] < self.num_clusters:
            raise ValueError(f"k-means needs at least K={self.num_clusters} samples, got {u_np.shape[0]}.")
        if not _distributed() or dist.get_rank() == 0:
            from sklearn.preprocessing import normalize

            km = KMeans(n_clusters=self.num_clusters, n_init=n_init, random_state=seed)
            if metric == "cosine":  # k-means on the unit rows; every cluster is non-empty, so each mean is defined
                labels = km.fit_predict(normalize(u_np))
                centers = np.stack([u_np[labels == k].mean(0) for k in range(self.num_clusters)])
            else:
                centers = km.fit(u_np).cluster_centers_
            self.centers.copy_(torch.as_tensor(centers, dtype=self.centers.dtype))
        if _distributed():
            dist.broadcast(self.centers, src=0)

    @torch.no_grad()
    def reset_statistics(self) -> None:
        self.numerator.zero_()
        self.denominator.zero_()

    @torch.no_grad()
    def accumulate(self, u: Tensor, p: Tensor | None = None) -> None:
        """Add one chunk's ``sum_i p_ik^m u_i`` and ``sum_i p_ik^m`` (``p`` from the current centers if omitted)."""
        if p is None:
            p = self(u)
        num, den = F.center_statistics(u.to(self.numerator.dtype), p, self.m)
        self.numerator += num
        self.denominator += den

    @torch.no_grad()
    def update(self) -> Tensor:
        """Replace the centers by the accumulated weighted means (all-reduced across ranks), reset, return them."""
        if _distributed():
            dist.all_reduce(self.numerator)
            dist.all_reduce(self.denominator)
        self.centers.copy_(F.centers_from_statistics(self.numerator, self.denominator, self.centers))
        self.reset_statistics()
        return self.centers

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, dim={self.dim}, m={self.m}"
