"""Pure tensor functions of DCSS (Sadeghi & Armanfard, arXiv 2405.03590).

Everything the method computes lives here as a stateless function; the ``nn.Module`` wrappers in
:mod:`dcss_plugin.losses`, :mod:`dcss_plugin.centers` and :mod:`dcss_plugin.heads` are thin shells over them.

Shapes use the paper's vocabulary: ``u`` (B, d) latent embeddings, ``centers`` (K, d), ``p`` (B, K) fuzzy
memberships, ``q`` (B, K) head outputs, ``s`` (B, B) pairwise target similarities.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "squared_distances",
    "fuzzy_memberships",
    "center_statistics",
    "centers_from_statistics",
    "centering_loss",
    "pairwise_similarity_loss",
    "pairwise_similarity",
    "pairwise_similarity_weights",
    "view_contrastive_loss",
    "neighbor_embedding_loss",
    "balance_penalty",
    "phase1_size_prior",
    "known_positive_loss",
]

_REDUCTIONS = ("mean", "sum", "none")
_PAIR_REDUCTIONS = ("mean", "sum", "none", "balanced")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


def _check_m(m: float) -> None:
    if not m > 1.0:
        raise ValueError(f"The fuzzifier m must be > 1 (the paper uses 1.5), got m={m}.")


def squared_distances(u: Tensor, centers: Tensor) -> Tensor:
    """Squared Euclidean distances ``d_ik = ||u_i - mu_k||^2``.

    Computed without the ``||a||^2 - 2ab + ||b||^2`` expansion, so a point that coincides with a center
    gets exactly 0 (and a zero gradient), not a small negative or positive round-off.

    Args:
        u: (B, d) embeddings.
        centers: (K, d) cluster centers.

    Returns:
        (B, K) squared distances.

    Example:
        >>> d = squared_distances(torch.zeros(3, 2), torch.eye(2))
        >>> d.shape
        torch.Size([3, 2])
    """
    if u.dim() != 2 or centers.dim() != 2 or u.shape[1] != centers.shape[1]:
        raise ValueError(
            f"u must be (B, d) and centers (K, d) with the same d; got u {tuple(u.shape)} and "
            f"centers {tuple(centers.shape)}."
        )
    dist = torch.cdist(u, centers.to(u.dtype), p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.pow(2)


def fuzzy_memberships(u: Tensor, centers: Tensor, m: float = 1.5) -> Tensor:
    """Fuzzy c-means memberships ``p_ik = d_ik^(-1/(m-1)) / sum_j d_ij^(-1/(m-1))``.

    Evaluated as a softmax of ``-log(d_ik)/(m-1)``, which is finite everywhere: a sample that sits exactly on
    center k gets ``p_ik = 1`` (the limit of the formula), never inf or NaN.

    Args:
        u: (B, d) embeddings.
        centers: (K, d) cluster centers.
        m: fuzzifier, > 1. The paper uses 1.5.

    Returns:
        (B, K) memberships; each row sums to 1.

    Example:
        >>> p = fuzzy_memberships(torch.randn(5, 3), torch.randn(4, 3))
        >>> torch.allclose(p.sum(1), torch.ones(5))
        True
    """
    _check_m(m)
    d = squared_distances(u, centers)
    tiny = torch.finfo(d.dtype).tiny
    logits = -torch.log(d.clamp_min(tiny)) / (m - 1.0)
    return torch.softmax(logits, dim=1)


def center_statistics(u: Tensor, p: Tensor, m: float = 1.5) -> Tuple[Tensor, Tensor]:
    """Numerator and denominator of the fuzzy c-means center update over one chunk of data.

    ``numerator_k = sum_i p_ik^m u_i`` and ``denominator_k = sum_i p_ik^m``. They are kept apart so that
    chunks (batches, or ranks under ``torch.distributed``) can be summed before the division
    ``mu_k = numerator_k / denominator_k`` (see :func:`centers_from_statistics`).

    Args:
        u: (B, d) embeddings.
        p: (B, K) memberships.
        m: fuzzifier.

    Returns:
        ``(numerator (K, d), denominator (K,))``.
    """
    _check_m(m)
    w = p.detach().to(u.dtype).pow(m)
    return w.t() @ u.detach(), w.sum(0)


def centers_from_statistics(numerator: Tensor, denominator: Tensor, previous: Tensor | None = None) -> Tensor:
    """``mu_k = numerator_k / denominator_k``; a cluster with zero total weight keeps its previous center."""
    den = denominator.unsqueeze(1)
    new = numerator / den.clamp_min(torch.finfo(numerator.dtype).tiny)
    if previous is not None:
        new = torch.where(den > 0, new, previous.to(new.dtype))
    return new


def centering_loss(
    x: Tensor,
    x_hat: Tensor,
    u: Tensor,
    centers: Tensor,
    p: Tensor,
    m: float = 1.5,
    lam: float = 0.1,
    reduction: str = "mean",
) -> Tensor:
    """Phase-1 objective: the sum of the K cluster-specific losses, in one pass.

    ``L = sum_k L_k`` with ``L_k = sum_i p_ik^m (||x_i - x_hat_i||^2 + lam * ||u_i - mu_k||^2)``.
    The official code runs K forward/backward/optimizer steps per batch, one per ``L_k``; their sum is the
    same objective at 1/K of the cost. ``p`` is treated as a constant (no gradient flows into it).

    Args:
        x: (B, ...) inputs.
        x_hat: reconstructions, same shape as ``x``.
        u: (B, d) embeddings.
        centers: (K, d) cluster centers (gradient flows only if the caller passes a tensor that requires it).
        p: (B, K) memberships; detached here.
        m: fuzzifier.
        lam: weight of the centering term (the paper's lambda, 0.1).
        reduction: ``"sum"`` (the formula above), ``"mean"`` (divided by B) or ``"none"`` ((B,) per sample).

    Returns:
        The loss (scalar, or (B,) for ``"none"``).

    Example:
        >>> x = torch.randn(8, 4); u = torch.randn(8, 2); c = torch.randn(3, 2)
        >>> loss = centering_loss(x, x + 0.1, u, c, fuzzy_memberships(u, c))
    """
    _check_m(m)
    _check_reduction(reduction)
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}.")
    if p.shape != (u.shape[0], centers.shape[0]):
        raise ValueError(f"p must be (B, K) = {(u.shape[0], centers.shape[0])}, got {tuple(p.shape)}.")
    w = p.detach().to(u.dtype).pow(m)  # (B, K)
    rec = (x - x_hat).pow(2).flatten(1).sum(1)  # (B,)
    dist = squared_distances(u, centers)  # (B, K)
    per_sample = w.sum(1) * rec + lam * (w * dist).sum(1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()


def pairwise_similarity(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Inner products of soft assignments: ``s_ij = a_i . b_j``, i.e. ``p p^T`` or ``q q^T``. (B, B)."""
    return a @ (a if b is None else b).t()


def pairwise_similarity_loss(
    q: Tensor,
    s: Tensor,
    zeta: float = 0.8,
    gamma: float = 0.2,
    reduction: str = "mean",
    exclude_self: bool = False,
) -> Tensor:
    """Phase-2 objective on pairs within a batch.

    ``L = sum_ij [s_ij > zeta] (1 - q_i . q_j) + [s_ij < gamma] q_i . q_j``: pairs whose target similarity is
    above ``zeta`` are pulled together, pairs below ``gamma`` pushed apart, the rest ignored. ``s`` carries no
    gradient. Known positives (two views of one sample, say) are marked by setting their ``s_ij`` to 1.

    Args:
        q: (B, K) soft assignments (rows on the simplex).
        s: (B, B) target similarities, e.g. ``p p^T`` (u-space stage) or ``(q q^T).detach()`` (q-space stage).
        zeta: threshold for similar pairs (0.8 in the paper).
        gamma: threshold for dissimilar pairs (0.2 in the paper).
        reduction: ``"sum"`` (formula above), ``"mean"`` (divided by the number of selected pairs; 0 when none),
            ``"balanced"`` (mean over the pulled pairs plus mean over the pushed pairs, so that the few similar
            pairs of a many-cluster batch are not drowned by the dissimilar ones) or ``"none"`` ((B, B) matrix of
            per-pair terms, 0 where unselected).
        exclude_self: drop the pairs ``i == j`` (the paper counts them).

    Returns:
        The loss.

    Example:
        >>> q = torch.softmax(torch.randn(6, 3), 1)
        >>> loss = pairwise_similarity_loss(q, (q @ q.t()).detach())
    """
    if reduction not in _PAIR_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_PAIR_REDUCTIONS}, got {reduction!r}.")
    if not gamma <= zeta:
        raise ValueError(f"gamma must be <= zeta, got gamma={gamma}, zeta={zeta}.")
    n = q.shape[0]
    if s.shape != (n, n):
        raise ValueError(f"s must be (B, B) = {(n, n)} for q of shape {tuple(q.shape)}, got {tuple(s.shape)}.")
    s = s.detach()
    if reduction == "none":
        sim = pairwise_similarity(q)
        pos, neg = _pair_selection(s, zeta, gamma, exclude_self)
        return torch.where(pos, 1.0 - sim, torch.zeros_like(sim)) + torch.where(neg, sim, torch.zeros_like(sim))
    # at least float32: pair counts above 65504 overflow float16
    q = q.to(torch.promote_types(q.dtype, torch.float32))
    weights, offset = pairwise_similarity_weights(s, zeta, gamma, reduction, exclude_self, dtype=q.dtype)
    # sum_ij w_ij q_i . q_j = sum(q * (w q)): one (B, B) x (B, K) product, no (B, B) tensor in the autograd graph
    return offset - (q * (weights @ q)).sum()


def _pair_selection(s: Tensor, zeta: float, gamma: float, exclude_self: bool) -> Tuple[Tensor, Tensor]:
    """Boolean (B, B) masks of the pulled (``s > zeta``) and pushed (``s < gamma``) pairs."""
    pos = s > zeta
    neg = s < gamma
    if exclude_self:
        pos.fill_diagonal_(False)
        neg.fill_diagonal_(False)
    return pos, neg


@torch.no_grad()
def pairwise_similarity_weights(
    s: Tensor,
    zeta: float = 0.8,
    gamma: float = 0.2,
    reduction: str = "mean",
    exclude_self: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """The pairwise loss as a linear function of ``q q^T``: ``L = offset - sum_ij w_ij q_i . q_j``.

    Pulled pairs get weight ``+1`` and pushed pairs ``-1`` (``"sum"``), both divided by the number of selected pairs
    (``"mean"``), or each by its own count (``"balanced"``); ``offset`` is the pulled pairs' total weight. The
    weights depend only on the targets ``s``, so heads trained on the same targets can share them.

    Args:
        s: (B, B) target similarities.
        zeta, gamma, reduction, exclude_self: as in :func:`pairwise_similarity_loss` (``reduction`` not ``"none"``).
        dtype: dtype of the weights (that of ``q``); ``s.dtype`` by default.

    Returns:
        ``(weights, offset)``: (B, B) and a scalar tensor.

    Example:
        >>> q = torch.softmax(torch.randn(6, 3), 1)
        >>> w, c = pairwise_similarity_weights((q @ q.t()).detach())
        >>> loss = c - (q * (w @ q)).sum()
    """
    if reduction not in _PAIR_REDUCTIONS or reduction == "none":
        raise ValueError(f"reduction must be one of {tuple(r for r in _PAIR_REDUCTIONS if r != 'none')}, "
                         f"got {reduction!r}.")
    dtype = dtype or s.dtype
    pos, neg = _pair_selection(s, zeta, gamma, exclude_self)
    n_pos, n_neg = pos.sum().to(dtype), neg.sum().to(dtype)
    if reduction == "sum":
        w_pos, w_neg = torch.ones((), dtype=dtype, device=s.device), torch.ones((), dtype=dtype, device=s.device)
    elif reduction == "mean":
        w_pos = w_neg = 1.0 / (n_pos + n_neg).clamp_min(1)
    else:  # balanced
        w_pos, w_neg = 1.0 / n_pos.clamp_min(1), 1.0 / n_neg.clamp_min(1)
    weights = pos.to(dtype) * w_pos - neg.to(dtype) * w_neg
    return weights, n_pos * w_pos


def view_contrastive_loss(u_a: Tensor, u_b: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent over two views: row i of ``u_a`` and of ``u_b`` are the positive pair, all other rows negatives.

    Used (optionally) beside reconstruction in pretraining so that ``u`` is invariant to the augmentations
    before k-means initialises the centers. Cosine similarities, temperature ``temperature``.

    Args:
        u_a, u_b: (B, d) embeddings of two augmented views of the same B samples.
        temperature: softmax temperature.

    Returns:
        Scalar loss (mean over the 2B anchors).
    """
    if u_a.shape != u_b.shape or u_a.dim() != 2:
        raise ValueError(f"u_a and u_b must both be (B, d), got {tuple(u_a.shape)} and {tuple(u_b.shape)}.")
    b = u_a.shape[0]
    z = torch.nn.functional.normalize(torch.cat([u_a, u_b]), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return torch.nn.functional.cross_entropy(logits, target)


def neighbor_embedding_loss(u_a: Tensor, u_b: Tensor) -> Tensor:
    """InfoNCE with a Cauchy kernel: row i of ``u_b`` is an input-space neighbour of row i of ``u_a``.

    The similarity of two embeddings is ``w = 1 / (1 + ||u - v||^2)`` (t-SNE's Student-t kernel); each of the
    2B rows is pulled toward its partner and pushed from the other 2B - 2 rows:
    ``-log(w_partner / sum_{j != self} w_j)``, averaged. With neighbours taken from the input's k-nearest-neighbour
    graph this is a parametric, batch-wise neighbour embedding (contrastive t-SNE, Damrich et al., ICLR 2023), in
    Euclidean ``u``, so k-means on ``u`` sees its clusters. Unlike :func:`view_contrastive_loss` it uses squared
    distances, not cosines, and no temperature.

    Args:
        u_a, u_b: (B, d) embeddings of B samples and of one neighbour of each.

    Returns:
        Scalar loss (mean over the 2B anchors).

    Example:
        >>> u = torch.randn(8, 2)
        >>> neighbor_embedding_loss(u, u + 0.01)  # partners close: near log(2B - 1) minus the pull
    """
    if u_a.shape != u_b.shape or u_a.dim() != 2:
        raise ValueError(f"u_a and u_b must both be (B, d), got {tuple(u_a.shape)} and {tuple(u_b.shape)}.")
    b = u_a.shape[0]
    z = torch.cat([u_a, u_b])
    logits = -torch.log1p(squared_distances(z, z))  # log of the Cauchy kernel
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return torch.nn.functional.cross_entropy(logits, target)


def balance_penalty(q: Tensor, tolerance: float = 0.0, prior: Optional[Tensor] = None) -> Tensor:
    """``max(0, KL(mean q || prior) - tolerance)``: how far the batch's cluster sizes are from ``prior``.

    ``KL = sum_k qbar_k log(qbar_k / prior_k)`` (>= 0, 0 iff the clusters are used in the proportions of
    ``prior``; uniform when ``prior`` is None, i.e. ``sum_k qbar_k log qbar_k + log K``).
    The guard of the default preset against collapse: once the Phase-2 targets are ``q q^T``, any hard partition
    (one cluster included) has zero pairwise loss. ``tolerance`` (>= 0, in nats) lets the sizes drift up to that
    divergence before the guard pushes back. ``q`` (B, K), ``prior`` (K,) positive, summing to 1; returns a scalar.

    Example:
        >>> q = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
        >>> balance_penalty(q)   # qbar = (0.85, 0.15): 0.85 log 0.85 + 0.15 log 0.15 + log 2 = 0.2704
        >>> balance_penalty(q, prior=torch.tensor([0.85, 0.15]))   # 0: sizes as in the prior
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
    qbar = q.mean(0).clamp_min(1e-12)
    if prior is None:
        kl = (qbar * qbar.log()).sum() + math.log(q.shape[1])
    else:
        if prior.shape != qbar.shape or not bool((prior > 0).all()):
            raise ValueError(f"prior must be ({q.shape[1]},) with positive entries, got {tuple(prior.shape)}.")
        kl = (qbar * (qbar.log() - prior.to(qbar).log())).sum()
    return torch.relu(kl - tolerance) if tolerance > 0 else kl


def phase1_size_prior(labels: Tensor, n_clusters: int, floor: float = 0.3) -> Tensor:
    """Cluster proportions of a hard partition, each raised to at least ``floor / K`` and renormalised.

    The size prior of :func:`balance_penalty` when it should keep the Phase-1 partition's (uneven) sizes rather
    than equal ones; the floor keeps a nearly empty Phase-1 cluster alive. ``labels`` (N,) int; returns (K,).

    Example:
        >>> phase1_size_prior(torch.tensor([0, 0, 0, 1]), 2)   # (0.75, 0.25)
    """
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must be in [0, 1], got {floor}.")
    sizes = torch.bincount(labels.long().flatten(), minlength=n_clusters).double() / max(labels.numel(), 1)
    sizes = sizes.clamp_min(floor / n_clusters)
    return (sizes / sizes.sum()).float()


def known_positive_loss(q_a: Tensor, q_b: Tensor, kind: str = "log") -> Tensor:
    """Pull term on pairs known to be similar (row i of ``q_a`` with row i of ``q_b``), both (B, K).

    ``"linear"``: mean ``1 - q_a_i . q_b_i`` (the paper's pull term); ``"log"``: mean ``-log(q_a_i . q_b_i)``, whose
    gradient does not vanish when the two assignments disagree completely.
    """
    dot = (q_a * q_b).sum(1)
    if kind == "log":
        return -dot.clamp_min(1e-8).log().mean()
    return (1.0 - dot).mean()
