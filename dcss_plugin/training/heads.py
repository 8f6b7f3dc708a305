"""Choosing among several MNet heads trained side by side: the one with the lowest loss over the last epoch."""

from __future__ import annotations

from typing import List

import torch

from ..distributed import mean_over_ranks

__all__ = ["HeadSelector"]


class HeadSelector:
    """Accumulates each head's Phase-2 loss over an epoch; :meth:`best` is the head with the lowest (label-free).

    Heads start from different random weights and follow different self-training paths from the same Phase-1
    targets; the loss picks one that fits its own targets best.

    Example:
        >>> selector = HeadSelector(num_heads=3)
        >>> selector.start_epoch()
        >>> selector.add(head_index, loss.item(), rows=len(batch))     # per batch and head
        >>> model.select_head(selector.best())
    """

    def __init__(self, num_heads: int) -> None:
        self.num_heads = int(num_heads)
        self.totals = torch.zeros(self.num_heads, dtype=torch.float32)
        self.rows = 0
        self.last_epoch: List[float] = []

    def start_epoch(self) -> None:
        self.totals = torch.zeros(self.num_heads, dtype=torch.float32)
        self.rows = 0

    def add(self, head: int, loss: float, rows: int) -> None:
        self.totals[head] += loss * rows

    def end_epoch(self, n_samples: int) -> List[float]:
        """Mean loss per head over the epoch (averaged over ranks); kept as :attr:`last_epoch`."""
        self.last_epoch = [mean_over_ranks(v) for v in (self.totals / n_samples).tolist()]
        return self.last_epoch

    def best(self) -> int:
        """Index of the head with the lowest mean loss over the last epoch (0 before any epoch)."""
        return self.best_of(self.last_epoch)

    @staticmethod
    def best_of(losses: List[float]) -> int:
        """Index of the lowest of ``losses`` (the first on ties; 0 for an empty list)."""
        return int(min(range(len(losses)), key=losses.__getitem__)) if losses else 0
