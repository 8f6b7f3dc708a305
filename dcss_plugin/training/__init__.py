"""The DCSS recipe as small public steps, for the estimator and for a user's own loop.

* :mod:`.schedule`: epochs per phase from a step budget, and the length of Phase 2's u-space stage.
* :mod:`.optim`: Adam per phase (encoder at a lower rate in Phase 2).
* :mod:`.passes`: eval-mode passes over the data: ``encode_all``, ``init_centers`` (k-means), ``update_centers``
  (the T1 fuzzy c-means update).
* :mod:`.neighbors`: mining k-nearest neighbours and drawing one per sample as a known positive.
* :mod:`.heads`: choosing among several MNet heads by their own loss.
* :mod:`.steps`: one batch (``*_step``: the loss) or one epoch (``*_epoch``: with optimizer steps) of pretraining,
  Phase 1, Phase 2 (DDP-aware).
* :mod:`.run`: the bookkeeping of a run: seeded generator, history, progress file and exact resume.
"""

from .heads import HeadSelector
from .neighbors import NeighborPositives, mine_neighbors
from .optim import adam, phase_optimizer
from .passes import encode_all, init_centers, update_centers
from .schedule import Schedule
from .steps import (AutoencoderForward, Batches, Phase2Forward, phase1_epoch, phase1_step, phase2_epoch, phase2_step,
                    pretrain_epoch, pretrain_step)

__all__ = ["HeadSelector", "NeighborPositives", "mine_neighbors", "adam", "phase_optimizer", "encode_all",
           "init_centers", "update_centers", "Schedule", "AutoencoderForward", "Phase2Forward", "Batches",
           "pretrain_epoch", "phase1_epoch", "phase2_epoch", "pretrain_step", "phase1_step", "phase2_step"]
