"""One epoch of each phase. The estimator calls these; so can a user's loop (see ``examples/own_loop.py``).

Every epoch function takes the normalised data through a :class:`Batches` (shuffled index batches drawn from one
seeded generator, the augmentation, and this rank's shard under DDP) and a *forward* module
(:class:`AutoencoderForward` or :class:`Phase2Forward`), which the estimator wraps in ``DistributedDataParallel``
when several processes train. In one process ``Batches(xn, batch_size, generator)`` is all it takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..data import shuffled_batches
from ..distributed import shard_bounds
from ..errors import TrainingDivergedError
from ..losses import CenteringLoss, DCSSLoss, PretrainLoss
from .heads import HeadSelector
from .neighbors import NeighborPositives
from .passes import update_centers

__all__ = ["Batches", "AutoencoderForward", "Phase2Forward", "pretrain_step", "phase1_step", "phase2_step",
           "pretrain_epoch", "phase1_epoch", "phase2_epoch"]


@dataclass
class Batches:
    """Where an epoch's batches come from.

    Args:
        xn: (N, ...) normalised data (every rank holds all of it).
        batch_size: global batch size.
        generator: seeds the shuffling, the augmentations and the neighbour draws (reproducible runs).
        device: where the model lives.
        augment: ``augment(batch, generator)`` makes a random view (None: the batch itself).
        world_size, rank: this process's place in a DDP group (1, 0 in one process).
    """

    xn: Tensor
    batch_size: int
    generator: torch.Generator
    device: torch.device = torch.device("cpu")
    augment: Optional[nn.Module] = None
    world_size: int = 1
    rank: int = 0

    def epoch(self) -> List[Tensor]:
        """Index batches of one shuffled epoch (global: every rank draws the same)."""
        return shuffled_batches(len(self.xn), self.batch_size, self.generator)

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch (all of it in one process)."""
        lo, hi = shard_bounds(len(batch), self.world_size, self.rank)
        return batch[lo:hi]

    def local_share(self, rows: int) -> float:
        """world size x this rank's share of a global batch of ``rows`` (1 in one process)."""
        lo, hi = shard_bounds(rows, self.world_size, self.rank)
        return self.world_size * (hi - lo) / rows

    def view(self, batch: Tensor) -> Tensor:
        """A random view of ``batch`` (on the device), or the batch itself without augmentation."""
        batch = batch.to(self.device)
        return self.augment(batch, self.generator) if self.augment is not None else batch


class AutoencoderForward(nn.Module):
    """``xn -> (u, x_hat)`` through a model's encoder and decoder (a module, so DDP can wrap it)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, xn: Tensor) -> Tuple[Tensor, Tensor]:
        u = self.encoder(xn)
        return u, self.decoder(u)


class Phase2Forward(nn.Module):
    """``xn -> (u, [q of every head])`` (a module, so DDP can wrap it)."""

    def __init__(self, encoder: nn.Module, heads: nn.ModuleList) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = heads

    def forward(self, xn: Tensor) -> Tuple[Tensor, List[Tensor]]:
        u = self.encoder(xn)
        return u, [head(u) for head in self.heads]


def _finite(value: float, phase: str, batch: int, opt: torch.optim.Optimizer) -> float:
    """``value`` (a loss already fetched with ``.item()``), or :class:`TrainingDivergedError` when it is NaN or inf."""
    if not math.isfinite(value):
        raise TrainingDivergedError(phase, batch, value, opt.param_groups[0].get("lr") if opt.param_groups else None)
    return value


def _step(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def pretrain_step(model: nn.Module, forward: nn.Module, loss_fn: PretrainLoss, batches: Batches, idx: Tensor,
                  neighbors: Optional[Tensor] = None) -> Tensor:
    """The pretraining loss of the batch ``idx`` (B,) (call ``backward`` and step the optimizer yourself).

    Without a pair term the input is one view of each sample (a denoising autoencoder when ``batches.augment``
    is set). With ``loss_fn.contrastive_weight`` it is two views ``[a; b]``; with
    ``loss_fn.neighbor_embedding_weight`` it is each sample and one of its input-space ``neighbors`` (N, k).
    """
    xb = batches.xn[idx].to(batches.device)
    if loss_fn.neighbor_embedding_weight > 0:
        if neighbors is None:
            raise ValueError("neighbor_embedding_weight > 0 needs the input-space neighbours (N, k).")
        pick = torch.randint(neighbors.shape[1], (len(idx),), generator=batches.generator)
        xnb = batches.xn[neighbors[idx, pick]].to(batches.device)
        inputs = torch.cat([batches.shard(batches.view(xb)), batches.shard(batches.view(xnb))])
        target = torch.cat([model.reconstruction_target(batches.shard(xb)),
                            model.reconstruction_target(batches.shard(xnb))])
    elif loss_fn.contrastive_weight > 0:
        inputs = torch.cat([batches.shard(batches.view(xb)), batches.shard(batches.view(xb))])
        target = model.reconstruction_target(batches.shard(xb))
    else:
        target = model.reconstruction_target(batches.shard(xb))
        inputs = batches.shard(batches.view(xb))
    u, x_hat = forward(inputs)
    return loss_fn(x_hat, target, u if loss_fn.paired else None, local_share=batches.local_share(len(idx)))


def phase1_step(model: nn.Module, forward: nn.Module, loss_fn: CenteringLoss, batches: Batches,
                idx: Tensor) -> Tensor:
    """The Phase-1 loss of the batch ``idx``: the K cluster-specific losses in one pass, ``p`` fixed within the
    step. Phase 1 trains on the samples themselves: ``batches.augment`` is not used."""
    xb = batches.shard(batches.xn[idx]).to(batches.device)
    u, x_hat = forward(xb)
    target = model.reconstruction_target(xb)
    loss = loss_fn(target, x_hat.view_as(target), u, model.centers.centers, model.centers(u.detach()))
    return loss * batches.local_share(len(idx))


def phase2_step(model: nn.Module, forward: nn.Module, loss_fn: DCSSLoss, batches: Batches, idx: Tensor,
                positives: Optional[NeighborPositives] = None) -> Tuple[Tensor, List[Tensor], Tensor]:
    """The Phase-2 loss of the batch ``idx`` summed over the heads, each head's loss, and the share of pairs above
    ``zeta`` for head 0 (call ``loss_fn.set_epoch(epoch)`` at each epoch's start).

    Known positives: with ``positives`` each sample is paired with one of its neighbours, both as random views;
    with only ``batches.augment``, two views of each sample; with neither, the paper's plain batches.
    """
    paired = batches.augment is not None or positives is not None
    xa, share = batches.xn[idx], batches.local_share(len(idx))
    if paired:
        xb = batches.xn[positives.sample(idx, batches.generator)] if positives is not None else xa
        inputs = torch.cat([batches.shard(batches.view(xa)), batches.shard(batches.view(xb))])
    else:
        inputs = batches.shard(xa).to(batches.device)
    u, qs = forward(inputs)
    p = None if loss_fn.q_space else model.centers(u.detach())
    per_head, positive_share = [], None
    for q in qs:
        per_head.append(loss_fn(q, p, known_positives=paired, local_share=share))
        positive_share = loss_fn.last_positive_share if positive_share is None else positive_share
    return sum(per_head[1:], per_head[0]), per_head, positive_share  # type: ignore[return-value]


def pretrain_epoch(model: nn.Module, forward: nn.Module, loss_fn: PretrainLoss, opt: torch.optim.Optimizer,
                   batches: Batches, neighbors: Optional[Tensor] = None) -> float:
    """One epoch of :func:`pretrain_step` and optimizer steps; returns the mean loss."""
    model.train()
    total = 0.0
    for b, idx in enumerate(batches.epoch()):
        loss = pretrain_step(model, forward, loss_fn, batches, idx, neighbors)
        _step(opt, loss)
        total += _finite(loss.item(), "pretraining", b, opt) * len(idx)
    return total / len(batches.xn)


def phase1_epoch(model: nn.Module, forward: nn.Module, loss_fn: CenteringLoss, opt: torch.optim.Optimizer,
                 batches: Batches, update: bool) -> float:
    """One epoch of :func:`phase1_step` and optimizer steps; with ``update`` (every T1 epochs) the centers are then
    re-estimated in an eval-mode pass. Returns the mean loss."""
    model.train()
    total = 0.0
    for b, idx in enumerate(batches.epoch()):
        loss = phase1_step(model, forward, loss_fn, batches, idx)
        _step(opt, loss)
        total += _finite(loss.item(), "Phase 1", b, opt) * len(idx)
    if update:  # each rank adds its shard of the data; the update all-reduces
        update_centers(model, batches.shard(batches.xn))
    return total / len(batches.xn)


def phase2_epoch(model: nn.Module, forward: nn.Module, loss_fn: DCSSLoss, opt: torch.optim.Optimizer,
                 batches: Batches, positives: Optional[NeighborPositives] = None,
                 selector: Optional[HeadSelector] = None) -> Dict[str, float]:
    """One epoch of :func:`phase2_step` and optimizer steps with every head of ``model``. Returns the mean loss
    (per head) and the share of pairs above ``zeta`` (head 0); ``selector`` records each head's loss."""
    model.train()
    if selector is not None:
        selector.start_epoch()
    total, pos_total, n = 0.0, 0.0, len(batches.xn)
    for i, idx in enumerate(batches.epoch()):
        loss, per_head, positive_share = phase2_step(model, forward, loss_fn, batches, idx, positives)
        b = len(idx)
        pos_total += positive_share.item() * b
        for h, loss_h in enumerate(per_head):
            if selector is not None:
                selector.add(h, loss_h.item(), b)
        _step(opt, loss)
        total += _finite(loss.item(), "Phase 2", i, opt) / len(per_head) * b
    if selector is not None:
        selector.end_epoch(n)
    return {"loss": total / n, "positive_pair_share": pos_total / n}
