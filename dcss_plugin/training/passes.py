"""Eval-mode passes over the whole data: embeddings, k-means initialisation and the T1 center update.

Each pass runs the encoder in eval mode (BatchNorm uses its running statistics, no augmentation), so that the
centers are fitted to the same ``u`` that inference will see; the training mode is restored afterwards. Under DDP
every rank first takes rank 0's BatchNorm statistics, so all ranks compute the same ``u``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import broadcast_buffers

__all__ = ["encode_all", "init_centers", "update_centers"]


@torch.no_grad()
def encode_all(model: nn.Module, xn: Tensor, chunk: int = 4096) -> Tensor:
    """``u`` (N, d) of the normalised rows ``xn`` (N, ...), in eval mode, on the model's device.

    Example:
        >>> u = encode_all(model, model.normalize(x))
    """
    encoder = model.encoder
    broadcast_buffers(encoder)
    device = model.centers.centers.device
    was = encoder.training
    encoder.eval()
    try:
        return torch.cat([encoder(xn[i:i + chunk].to(device)) for i in range(0, len(xn), chunk)])
    finally:
        encoder.train(was)


def _check_finite(u: Tensor, what: str) -> Tensor:
    if not bool(torch.isfinite(u).all()):
        raise ValueError(f"The embeddings u hold NaN or inf before {what}: the encoder's weights diverged. Lower the "
                         "learning rate (lr) and fit again.")
    return u


@torch.no_grad()
def init_centers(model: nn.Module, xn: Tensor, seed: int = 0, metric: str = "euclidean") -> Tensor:
    """Set ``model.centers`` by k-means on ``u`` of all of ``xn`` (``metric="cosine"``: on ``u / ||u||``, for an
    encoder trained with a cosine loss); returns that ``u`` (N, d). Rank 0 computes, every rank receives."""
    u = _check_finite(encode_all(model, xn), "the k-means initialisation")
    model.centers.init_kmeans(u, seed=seed, metric=metric)
    return u


@torch.no_grad()
def update_centers(model: nn.Module, xn: Tensor) -> Tensor:
    """The paper's center update ``mu_k = sum_i p_ik^m u_i / sum_i p_ik^m`` over ``xn`` (this rank's rows; the
    statistics are all-reduced across ranks); returns the new centers (K, d). Call it every T1 Phase-1 epochs."""
    model.centers.accumulate(_check_finite(encode_all(model, xn), "the center update"))
    return model.centers.update()
