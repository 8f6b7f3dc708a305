"""DCSS losses as ``nn.Module``s, in the style of ``lightly.loss``."""

from __future__ import annotations

from torch import Tensor, nn

from . import functional as F

__all__ = ["CenteringLoss", "PairwiseSimilarityLoss"]


class CenteringLoss(nn.Module):
    """Phase-1 loss of DCSS: the K cluster-specific losses summed in one pass.

    ``sum_k sum_i p_ik^m (||x_i - x_hat_i||^2 + lam ||u_i - mu_k||^2)`` (``reduction="sum"``), or its mean over the
    batch (``"mean"``, default). See :func:`dcss_plugin.functional.centering_loss`.

    Args:
        m: fuzzifier (paper: 1.5).
        lam: weight of the centering term (paper: 0.1).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> centers = ClusterCenters(10, 10)                         # after init_kmeans(...)
        >>> criterion = CenteringLoss()
        >>> u = encoder(x); x_hat = decoder(u)
        >>> loss = criterion(x, x_hat, u, centers.centers, centers(u))
        >>> loss.backward()
    """

    def __init__(self, m: float = 1.5, lam: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        self.m = m
        self.lam = lam
        self.reduction = reduction

    def forward(self, x: Tensor, x_hat: Tensor, u: Tensor, centers: Tensor, p: Tensor) -> Tensor:
        return F.centering_loss(x, x_hat, u, centers, p, m=self.m, lam=self.lam, reduction=self.reduction)


class PairwiseSimilarityLoss(nn.Module):
    """Phase-2 loss of DCSS: pull pairs with ``s_ij > zeta`` together, push pairs with ``s_ij < gamma`` apart.

    Args:
        zeta: similar-pair threshold (paper: 0.8).
        gamma: dissimilar-pair threshold (paper: 0.2).
        reduction: ``"mean"`` (over selected pairs), ``"sum"`` or ``"none"``.
        exclude_self: drop the ``i == j`` pairs (the paper counts them).

    Example:
        >>> criterion = PairwiseSimilarityLoss()
        >>> q = head(encoder(x))                        # (B, K)
        >>> s = (p @ p.t())                             # u-space targets, or (q @ q.t()).detach()
        >>> loss = criterion(q, s)
    """

    def __init__(
        self,
        zeta: float = 0.8,
        gamma: float = 0.2,
        reduction: str = "mean",
        exclude_self: bool = False,
    ) -> None:
        super().__init__()
        self.zeta = zeta
        self.gamma = gamma
        self.reduction = reduction
        self.exclude_self = exclude_self

    def forward(self, q: Tensor, s: Tensor) -> Tensor:
        return F.pairwise_similarity_loss(
            q, s, zeta=self.zeta, gamma=self.gamma, reduction=self.reduction, exclude_self=self.exclude_self
        )
