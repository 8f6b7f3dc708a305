"""The bookkeeping of one training run: the seeded generator, history, progress bars, callbacks, and the progress
file that makes ``--resume`` end with the same result as an uninterrupted run.

The progress file holds tensors and plain data only: the model's state dict, the optimizer's, the generator and
torch RNG states, the neighbour table, the history; it is written atomically after the first epoch, at the start
of Phase 1 and Phase 2, and after any epoch ending at least ``every_s`` seconds after the last save.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..distributed import mean_over_ranks
from ..io import atomic_torch_save, load_checkpoint

__all__ = ["TrainingRun", "PROGRESS_FORMAT", "PHASES"]

log = logging.getLogger("dcss_plugin")

PROGRESS_FORMAT = "dcss-plugin/progress-v2"
PHASES = ("pretrain", "phase1", "phase2")
Callback = Callable[[str, int, Dict[str, float]], None]


def _to_state(history: Dict[str, Any]) -> Dict[str, Any]:
    """History with numpy arrays as tensors, so that ``torch.load(weights_only=True)`` reads it back."""
    return {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in history.items()}


def _from_state(state: Dict[str, Any], fresh: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(fresh)
    for k, v in state.items():
        if k not in ("device", "n_samples", "epochs"):
            out[k] = v.numpy() if isinstance(v, Tensor) else v
    return out


class TrainingRun:
    """State of one fit outside the model: where it starts, its generator, history and progress file.

    Args:
        config: plain dict of the run's settings (checked on resume).
        data: fingerprint of the training data (checked on resume).
        epochs: epochs per phase.
        seed: seeds the generator (shuffling, augmentation, neighbour draws).
        checkpoint_path: the progress file (None: no saves, no resume).
        resume: continue from ``checkpoint_path``.
        every_s: least seconds between two end-of-epoch saves.
        callback: ``callback(phase, epoch, stats)`` after every epoch (rank 0).
        verbose: progress bars.
        lead: whether this process writes files and reports (rank 0).
    """

    def __init__(self, config: Dict[str, Any], data: Optional[Dict[str, Any]], epochs: Dict[str, int], seed: int,
                 checkpoint_path: Optional[str | os.PathLike] = None, resume: bool = False, every_s: float = 10.0,
                 callback: Optional[Callback] = None, verbose: bool = False, lead: bool = True,
                 history: Optional[Dict[str, Any]] = None) -> None:
        if not every_s >= 0:
            raise ValueError(f"checkpoint_every_s must be >= 0 seconds, got {every_s}.")
        if resume and checkpoint_path is None:
            raise ValueError("resume=True needs checkpoint_path (the progress file of the interrupted run).")
        self.config, self.data, self.epochs = config, data, epochs
        self.path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        self.every_s, self.callback, self.verbose, self.lead = every_s, callback, verbose, lead
        self.generator = torch.Generator().manual_seed(int(seed))
        self.history: Dict[str, Any] = {"epochs": epochs, "loss": {p: [] for p in PHASES},
                                        "time_s": {"pretrain": 0.0, "kmeans_init": 0.0, "phase1": 0.0, "phase2": 0.0},
                                        "time_per_epoch_s": {}, **(history or {})}
        self.phase, self.epoch = "pretrain", 0
        self.resumed: Optional[Dict[str, Any]] = self._load() if resume else None
        self.knn: Optional[Tensor] = None
        self._last_save = -math.inf
        self._bar: Any = None

    # ------------------------------------------------------------------ resume
    def _load(self) -> Dict[str, Any]:
        from .. import __version__

        path = self.path
        assert path is not None
        if not os.path.exists(path):
            raise FileNotFoundError(f"Nothing to resume: {path!r} does not exist (the run finished, or never started).")
        state = load_checkpoint(path, PROGRESS_FORMAT)
        if state.get("version") != __version__:
            raise ValueError(f"{path!r} was written by dcss-plugin {state.get('version')}, this is {__version__}; "
                             "start a new run (without --resume) or use that version.")
        theirs = state.get("config") or {}
        if theirs != self.config:
            diff = sorted(k for k in set(theirs) | set(self.config) if theirs.get(k) != self.config.get(k))
            raise ValueError(f"{path!r} is from a run with a different config (differs in: {', '.join(diff)}); "
                             "resume with the same settings, or start a new run in another directory.")
        if state.get("data") != self.data:
            raise ValueError(f"{path!r} is from a run on different data; resume with the same input.")
        if state.get("phase") not in PHASES:
            raise ValueError(f"{path!r} has an unknown phase {state.get('phase')!r}.")
        return state

    def restore(self, model: nn.Module) -> None:
        """Load the model, generator, RNG, neighbours and history of the interrupted run (no-op on a fresh one)."""
        state = self.resumed
        if state is None:
            return
        self.phase, self.epoch = str(state["phase"]), int(state["epoch"])
        model.load_state_dict(state["model"])
        self.history = _from_state(state["history"], self.history)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.knn = state.get("knn")
        log.info("resuming at %s epoch %d", self.phase, self.epoch)

    def todo(self, phase: str) -> bool:
        """Whether ``phase`` still has to run (it is the phase the run starts in, or a later one)."""
        return PHASES.index(phase) >= PHASES.index(self.phase)

    def resuming_inside(self, phase: str) -> bool:
        """Whether the run resumes part-way through ``phase`` (its optimizer state and heads come from the file)."""
        return self.resumed is not None and self.phase == phase and self.epoch > 0

    # ------------------------------------------------------------------ progress file
    def save(self, phase: str, epoch: int, model: nn.Module, opt: Optional[torch.optim.Optimizer],
             force: bool = True) -> None:
        """Write the progress file (rank 0; unless not ``force`` and the last save is under ``every_s`` old)."""
        from .. import __version__

        if self.path is None or not self.lead:
            return
        if not force and time.perf_counter() - self._last_save < self.every_s:
            return
        state = {
            "format": PROGRESS_FORMAT, "version": __version__, "config": self.config, "data": self.data,
            "phase": phase, "epoch": epoch,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict() if opt is not None else None,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "knn": self.knn if phase == "phase2" else None, "history": _to_state(self.history),
        }
        atomic_torch_save(state, self.path)
        self._last_save = time.perf_counter()

    # ------------------------------------------------------------------ epochs
    def begin_phase(self, phase: str, opt: torch.optim.Optimizer, label: str) -> int:
        """First epoch to run in ``phase`` (loading the optimizer state when resuming inside it); opens its bar."""
        from tqdm.auto import tqdm

        first = 0
        if self.resuming_inside(phase):
            opt.load_state_dict(self.resumed["optimizer"])  # type: ignore[index]
            first = self.epoch
        self._bar = tqdm(range(self.epochs[phase]), desc=label, disable=not (self.verbose and self.lead),
                         leave=False, dynamic_ncols=True)
        self._bar.update(first)
        return first

    def end_epoch(self, phase: str, epoch: int, t0: float, stats: Dict[str, float], model: nn.Module,
                  opt: torch.optim.Optimizer, **postfix: str) -> None:
        """Record an epoch's loss and time, show it, report it, and maybe save the progress file."""
        stats = {k: mean_over_ranks(v) for k, v in stats.items()}  # the global-batch figures
        self.history["loss"][phase].append(stats["loss"])
        self.history["time_s"][phase] += time.perf_counter() - t0
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{stats['loss']:.4f}", **postfix)
        if self.callback and self.lead:
            self.callback(phase, epoch, stats)
        self.save(phase, epoch + 1, model, opt, force=False)

    def end_phase(self, phase: str) -> None:
        self._bar.close()
        log.info("%s: %d epochs, %.1f s", phase, self.epochs[phase], self.history["time_s"][phase])

    def finish(self) -> Dict[str, Any]:
        """The history, with the mean time per epoch of each phase."""
        for phase, e in self.epochs.items():
            self.history["time_per_epoch_s"][phase] = self.history["time_s"][phase] / max(e, 1)
        return self.history
