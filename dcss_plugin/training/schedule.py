"""How long each phase runs: epochs from a budget of optimizer steps, and Phase 2's u-space stage."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

__all__ = ["Schedule", "epochs_from_budget"]


def epochs_from_budget(requested: Optional[int], target_steps: int, steps_per_epoch: int, minimum: int,
                       maximum: int) -> int:
    """``requested`` if given, else enough epochs for ``target_steps`` optimizer steps, within [minimum, maximum]."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"Epoch counts must be >= 0, got {requested}.")
        return int(requested)
    return int(min(max(math.ceil(target_steps / steps_per_epoch), minimum), maximum))


@dataclass(frozen=True)
class Schedule:
    """Epochs of pretraining, Phase 1 and Phase 2, and of Phase 2's u-space stage (targets ``p p^T``).

    Example:
        >>> Schedule.for_data(n_samples=1797, batch_size=256, T1=2, T2=5)
        Schedule(pretrain=120, phase1=10, phase2=200, u_stage=5)
    """

    pretrain: int
    phase1: int
    phase2: int
    u_stage: int

    @classmethod
    def for_data(cls, n_samples: int, batch_size: int, T1: int = 2, T2: int = 5, T2_min_steps: int = 0,
                 pretrain_epochs: Optional[int] = None, phase1_epochs: Optional[int] = None,
                 phase2_epochs: Optional[int] = None, pretrain_min_epochs: int = 10) -> "Schedule":
        """Budgets of 960 / 80 / 1600 optimizer steps, so small data gets more epochs, with floors of
        ``pretrain_min_epochs`` / ``2 T1`` / ``T2 + 10`` epochs, so large data gets at least that many passes.

        The u-space stage lasts ``T2`` epochs, or more so that it spans at least ``T2_min_steps`` steps (capped at
        half of Phase 2)."""
        steps = max(1, math.ceil(n_samples / batch_size))
        phase2 = epochs_from_budget(phase2_epochs, 1600, steps, T2 + 10, 500)
        return cls(pretrain=epochs_from_budget(pretrain_epochs, 960, steps, pretrain_min_epochs, 500),
                   phase1=epochs_from_budget(phase1_epochs, 80, steps, 2 * T1, 200),
                   phase2=phase2,
                   u_stage=max(T2, min(math.ceil(T2_min_steps / steps), phase2 // 2)))

    def epochs(self) -> Dict[str, int]:
        """``{"pretrain": ..., "phase1": ..., "phase2": ...}``."""
        d = asdict(self)
        d.pop("u_stage")
        return d
