"""DCSS losses as ``nn.Module``s, in the style of ``lightly.loss``.

* :class:`PretrainLoss`: reconstruction, plus an optional term on paired rows of ``u`` (two views: NT-Xent; a sample
  and an input-space neighbour: neighbour embedding).
* :class:`CenteringLoss`: Phase 1, the K cluster-specific losses in one pass.
* :class:`PairwiseSimilarityLoss`: the paper's thresholded pairwise term.
* :class:`DCSSLoss`: the default Phase-2 objective as one stateful module: thresholded pairs on ``p p^T`` for the
  u-space stage, then on ``q q^T``; a pull on known positive pairs; the balance guard with its tolerance.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as F
from .distributed import gather, is_distributed

__all__ = ["CenteringLoss", "PairwiseSimilarityLoss", "PretrainLoss", "DCSSLoss"]


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


class PretrainLoss(nn.Module):
    """Pretraining objective: reconstruction, plus an optional pair term on ``u``.

    * Reconstruction: ``||x_hat_i - target_i||^2`` summed over features and averaged over rows; averaged over
      features too when ``neighbor_embedding_weight > 0`` (so the two terms share a scale whatever F is).
    * ``contrastive_weight * NT-Xent(u_a, u_b)``: the rows of ``u`` are two augmented views ``[a; b]`` of the same
      samples (:func:`~dcss_plugin.functional.view_contrastive_loss`); ``target`` then has half as many rows and
      is compared with both halves of ``x_hat``.
    * ``neighbor_embedding_weight * NE(u_a, u_b)``: the rows of ``u`` are samples and one input-space neighbour of
      each, ``[a; b]`` (:func:`~dcss_plugin.functional.neighbor_embedding_loss`); ``target`` has all rows.

    At most one pair term is on. With ``gather_distributed=True`` the halves of ``u`` are gathered from all ranks
    before the pair term (pairs across ranks count).

    Example:
        >>> loss_fn = PretrainLoss(contrastive_weight=1.0)
        >>> views = torch.cat([augment(xb), augment(xb)])            # (2B, ...)
        >>> u = model.encoder(views); x_hat = model.decoder(u)
        >>> loss = loss_fn(x_hat, model.reconstruction_target(xb), u)
    """

    def __init__(self, contrastive_weight: float = 0.0, neighbor_embedding_weight: float = 0.0,
                 gather_distributed: bool = False) -> None:
        super().__init__()
        if contrastive_weight < 0 or neighbor_embedding_weight < 0:
            raise ValueError("contrastive_weight and neighbor_embedding_weight must be >= 0, got "
                             f"{contrastive_weight} and {neighbor_embedding_weight}.")
        if contrastive_weight > 0 and neighbor_embedding_weight > 0:
            raise ValueError("Use one pair term in pretraining: contrastive_weight or neighbor_embedding_weight.")
        self.contrastive_weight = float(contrastive_weight)
        self.neighbor_embedding_weight = float(neighbor_embedding_weight)
        self.gather_distributed = gather_distributed

    @property
    def paired(self) -> bool:
        """Whether the batch must be two halves of paired rows (views or neighbours)."""
        return self.contrastive_weight > 0 or self.neighbor_embedding_weight > 0

    def forward(self, x_hat: Tensor, target: Tensor, u: Optional[Tensor] = None, local_share: float = 1.0) -> Tensor:
        """Loss of ``x_hat`` (R, ...) against ``target`` (R or R/2, ...), with ``u`` (R, d) for the pair term.

        ``local_share`` scales the reconstruction mean (under DDP: world size x this rank's share of the global
        batch, so that DDP's gradient averaging gives the global mean; 1 in a single process).
        """
        gather_fn = gather if self.gather_distributed else (lambda t: t)
        if self.neighbor_embedding_weight > 0:
            loss = (x_hat.view_as(target) - target).pow(2).flatten(1).mean(1).mean() * local_share
            h = self._half(u, "neighbor_embedding_weight")
            return loss + self.neighbor_embedding_weight * F.neighbor_embedding_loss(gather_fn(u[:h]),
                                                                                     gather_fn(u[h:]))
        if self.contrastive_weight > 0:
            h = self._half(u, "contrastive_weight")
            rec = x_hat.view(2 * h, *target.shape[1:]) - target.repeat(2, *([1] * (target.dim() - 1)))
            loss = rec.pow(2).flatten(1).sum(1).mean() * local_share
            return loss + self.contrastive_weight * F.view_contrastive_loss(gather_fn(u[:h]), gather_fn(u[h:]))
        return (x_hat.view_as(target) - target).pow(2).flatten(1).sum(1).mean() * local_share

    @staticmethod
    def _half(u: Optional[Tensor], name: str) -> int:
        if u is None or u.dim() != 2 or u.shape[0] % 2:
            raise ValueError(f"With {name} > 0, pass u (2B, d): two halves of paired rows.")
        return u.shape[0] // 2

    def extra_repr(self) -> str:
        return (f"contrastive_weight={self.contrastive_weight}, "
                f"neighbor_embedding_weight={self.neighbor_embedding_weight}")


class DCSSLoss(nn.Module):
    """The default Phase-2 objective of one MNet head, with its state (the stage and the balance tolerance).

    ``loss = L_pair(q, s) + [known positives] -mean_i log(q_a_i . q_b_i) + balance_weight * guard(mean q)``

    * ``s = p p^T`` during the u-space stage (the first ``u_stage_epochs`` epochs, memberships ``p`` from the
      Phase-1 centers), then ``s = q q^T`` (detached): :meth:`set_epoch` moves the stage, as Lightly's
      ``DINOLoss.update`` moves its schedule. ``L_pair`` is :class:`PairwiseSimilarityLoss` (pull ``s_ij > zeta``,
      push ``s_ij < gamma``).
    * Known positives (``known_positives=True``): the batch is two halves ``[a; b]`` whose row i are known to be
      similar (two views of one sample, or a sample and a u-space neighbour).
    * The balance guard ``max(0, KL(mean q || uniform) - tolerance)``: once targets are ``q q^T`` a single cluster
      has zero pairwise loss; the guard makes it costly. The tolerance comes from the Phase-1 partition
      (:meth:`set_tolerance_from_labels`) or is fixed.

    Args:
        zeta, gamma: similar / dissimilar thresholds (paper 0.8 / 0.2).
        u_stage_epochs: epochs with ``s = p p^T`` (paper T2 = 5).
        reduction: of the pairwise term: ``"balanced"`` (pulled and pushed pairs weighted equally) or ``"mean"``.
        exclude_self: drop ``i == j`` pairs.
        balance_weight: weight of the guard (0: off).
        balance_tolerance: nats of divergence from even sizes the guard lets pass.
        gather_distributed: gather ``q`` and ``p`` from all ranks before forming pairs.

    Shapes:
        ``q`` (B, K) of one head; ``p`` (B, K) (needed in the u-space stage); returns a scalar.

    Example:
        >>> loss_fn = DCSSLoss(u_stage_epochs=5)
        >>> for epoch in range(epochs):
        ...     loss_fn.set_epoch(epoch)
        ...     for xb, xnb in batches:                           # a sample and one of its neighbours
        ...         u = model.encoder(torch.cat([xb, xnb]))
        ...         loss = loss_fn(model.head(u), p=model.centers(u.detach()), known_positives=True)
    """

    balance_tolerance: Tensor
    epoch: Tensor

    def __init__(self, zeta: float = 0.8, gamma: float = 0.2, u_stage_epochs: int = 5, reduction: str = "balanced",
                 exclude_self: bool = True, balance_weight: float = 5.0, balance_tolerance: float = 0.0,
                 gather_distributed: bool = False) -> None:
        super().__init__()
        if balance_weight < 0 or balance_tolerance < 0 or u_stage_epochs < 0:
            raise ValueError("balance_weight, balance_tolerance and u_stage_epochs must be >= 0, got "
                             f"{balance_weight}, {balance_tolerance} and {u_stage_epochs}.")
        self.pairwise = PairwiseSimilarityLoss(zeta, gamma, reduction=reduction, exclude_self=exclude_self)
        self.u_stage_epochs = int(u_stage_epochs)
        self.balance_weight = float(balance_weight)
        self.gather_distributed = gather_distributed
        self.register_buffer("balance_tolerance", torch.tensor(float(balance_tolerance), dtype=torch.float64))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.last_positive_share: Optional[Tensor] = None

    @property
    def q_space(self) -> bool:
        """Whether the targets are ``q q^T`` (after the u-space stage)."""
        return int(self.epoch) >= self.u_stage_epochs

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which Phase-2 epoch starts (0-based); the stage follows from it."""
        self.epoch.fill_(int(epoch))

    @torch.no_grad()
    def set_tolerance_from_labels(self, labels: Tensor, n_clusters: int) -> float:
        """Set the guard's tolerance to the KL divergence from even sizes of a hard partition (the Phase-1 one)."""
        sizes = F.phase1_size_prior(torch.as_tensor(labels), n_clusters, floor=0.0)[None].double()
        tolerance = max(0.0, F.balance_penalty(sizes).item())  # even sizes give -1e-9 in floating point
        self.balance_tolerance.fill_(tolerance)
        return tolerance

    def forward(self, q: Tensor, p: Optional[Tensor] = None, known_positives: bool = False,
                local_share: float = 1.0, q_space: Optional[bool] = None) -> Tensor:
        """Loss of one head's ``q`` (B, K); ``p`` (B, K) is required in the u-space stage.

        ``local_share`` scales the known-positive mean (under DDP: world size x this rank's share of the global
        batch; 1 in a single process); the pair and balance terms are computed on the gathered batch.
        ``q_space`` forces the stage (True: ``q q^T`` targets, False: ``p p^T``); None follows :meth:`set_epoch`.
        """
        if q.dim() != 2:
            raise ValueError(f"q must be (B, K), got shape {tuple(q.shape)}.")
        q_space = self.q_space if q_space is None else bool(q_space)
        if not q_space and p is None:
            raise ValueError("The u-space stage needs the memberships p (B, K) as targets: "
                             "loss(q, p=model.centers(u.detach())).")
        gather_fn = gather if self.gather_distributed else (lambda t: t)
        q_all = gather_fn(q)
        with torch.no_grad():
            t = q_all if q_space else gather_fn(p.detach())  # type: ignore[union-attr]
            s = t @ t.t()
            self.last_positive_share = (s > self.pairwise.zeta).float().mean()
        loss = self.pairwise(q_all, s)
        if known_positives:
            if q.shape[0] % 2:
                raise ValueError("known_positives=True needs two halves [a; b] of paired rows (an even B).")
            h = q.shape[0] // 2
            loss = loss + F.known_positive_loss(q[:h], q[h:], "log") * local_share
        if self.balance_weight > 0:
            loss = loss + self.balance_weight * F.balance_penalty(q_all, float(self.balance_tolerance))
        return loss

    def extra_repr(self) -> str:
        return (f"u_stage_epochs={self.u_stage_epochs}, balance_weight={self.balance_weight}, "
                f"balance_tolerance={float(self.balance_tolerance):.4g}")
