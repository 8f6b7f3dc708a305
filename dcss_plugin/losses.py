"""DCSS losses as ``nn.Module``s, in the style of ``lightly.loss``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as F
from .distributed import gather, is_distributed

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

    The target similarity comes from one of: an explicit ``s`` (B, B); assignments ``target`` (B, K), giving
    ``s = target target^T`` (``p`` in the u-space stage); or, when neither is given, ``q`` itself (detached: the
    q-space stage, ``s = q q^T``). ``sample_ids`` (B,) marks known similar pairs: rows with the same id (two
    augmented views of one image, say) get ``s_ij = 1`` and are pulled together whatever the thresholds say.

    With ``gather_distributed=True`` and a running process group, ``q``, ``target`` and ``sample_ids`` are gathered
    from all ranks first (:func:`dcss_plugin.distributed.gather`, which passes gradients back), so pairs across
    ranks count too: every rank computes the loss of the whole global batch, equal to the single-process loss on
    it, and DDP's gradient averaging gives the single-process gradient. Cost per rank: one (B_global, B_global)
    pair matrix and B_global x K gathered floats. An explicit ``s`` cannot be gathered (it has no cross-rank
    pairs): pass ``target`` instead.

    Args:
        zeta: similar-pair threshold (paper: 0.8).
        gamma: dissimilar-pair threshold (paper: 0.2).
        reduction: ``"mean"`` (over selected pairs), ``"sum"``, ``"balanced"`` or ``"none"``.
        exclude_self: drop the ``i == j`` pairs (the paper counts them).
        gather_distributed: gather across ranks before forming pairs.

    Example:
        >>> criterion = PairwiseSimilarityLoss()
        >>> q = head(encoder(x))                        # (B, K)
        >>> loss = criterion(q, target=centers(u.detach()))   # u-space stage: s = p p^T
        >>> loss = criterion(q)                          # q-space stage: s = (q q^T).detach()
        >>> q2 = head(encoder(torch.cat([view_a, view_b])))
        >>> loss = criterion(q2, sample_ids=torch.arange(B).repeat(2))   # the two views are positives
    """

    def __init__(
        self,
        zeta: float = 0.8,
        gamma: float = 0.2,
        reduction: str = "mean",
        exclude_self: bool = False,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= gamma <= zeta <= 1.0:
            raise ValueError(f"Need 0 <= gamma <= zeta <= 1, got gamma={gamma}, zeta={zeta}.")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch build lacks.")
        self.zeta = zeta
        self.gamma = gamma
        self.reduction = reduction
        self.exclude_self = exclude_self
        self.gather_distributed = gather_distributed

    def forward(self, q: Tensor, s: Optional[Tensor] = None, *, target: Optional[Tensor] = None,
                sample_ids: Optional[Tensor] = None) -> Tensor:
        """Loss of ``q`` (B, K) against ``s`` (B, B), or ``target`` (B, K), or ``q`` itself; see the class doc."""
        if q.dim() != 2:
            raise ValueError(f"q must be (B, K), got shape {tuple(q.shape)}.")
        if s is not None and target is not None:
            raise ValueError("Give the target similarity either as s (B, B) or as target (B, K), not both.")
        if target is not None and target.shape != q.shape:
            raise ValueError(f"target must have q's shape {tuple(q.shape)}, got {tuple(target.shape)}.")
        if sample_ids is not None and sample_ids.shape != (q.shape[0],):
            raise ValueError(f"sample_ids must be ({q.shape[0]},) like q's rows, got {tuple(sample_ids.shape)}.")
        if self.gather_distributed and is_distributed():
            if s is not None:
                raise ValueError("gather_distributed=True cannot gather an explicit s (B, B): it has no pairs across "
                                 "ranks. Pass target=p (or nothing, for s = q q^T) instead.")
            q = gather(q)
            target = gather(target.detach()) if target is not None else None
            sample_ids = gather(sample_ids) if sample_ids is not None else None
        if s is None:
            t = (q if target is None else target).detach()
            s = F.pairwise_similarity(t)
        if sample_ids is not None:
            same = sample_ids.view(-1, 1) == sample_ids.view(1, -1)
            s = torch.where(same, torch.ones_like(s), s)
        return F.pairwise_similarity_loss(
            q, s, zeta=self.zeta, gamma=self.gamma, reduction=self.reduction, exclude_self=self.exclude_self
        )
