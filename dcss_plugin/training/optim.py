"""Adam for each phase: the autoencoder in pretraining and Phase 1, the encoder (slower) and heads in Phase 2."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

__all__ = ["adam", "param_groups", "phase_optimizer"]


def param_groups(module: Optional[nn.Module], lr: float) -> List[Dict[str, Any]]:
    """Parameter groups of ``module`` at base rate ``lr``: the module's own ``param_groups(lr)`` when it has one
    (a timm backbone with layer-wise decay, say), else one group."""
    if module is None:
        return []
    fn = getattr(module, "param_groups", None)
    if callable(fn):
        return list(fn(lr))
    return [{"params": list(module.parameters()), "lr": lr}]


def adam(groups: List[Dict[str, Any]], lr: float) -> torch.optim.Adam:
    """Adam over ``groups``, with torch's fused kernel when every parameter is a CPU or CUDA float tensor (one
    kernel per step instead of a Python loop over parameters: 1.1 ms instead of 6.0 ms on the digits conv net)."""
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(groups, lr=lr, fused=True if fused else None)


def phase_optimizer(model: nn.Module, phase: str, lr: float, phase1_lr_factor: float = 0.1,
                    encoder_lr_factor: float = 0.1) -> torch.optim.Adam:
    """Adam for ``phase`` of a :class:`~dcss_plugin.DCSSModel`.

    * ``"pretrain"``: encoder and decoder at ``lr``.
    * ``"phase1"``: encoder and decoder at ``lr * phase1_lr_factor`` (the centering term moves ``u`` gently).
    * ``"phase2"``: the heads at ``lr``, the encoder at ``lr * encoder_lr_factor`` (Phase 2 refines the
      representation instead of re-drawing it); the decoder is idle.
    """
    if phase in ("pretrain", "phase1"):
        rate = lr if phase == "pretrain" else lr * phase1_lr_factor
        return adam([*param_groups(model.encoder, rate), *param_groups(model.decoder, rate)], lr=rate)
    if phase == "phase2":
        return adam([*param_groups(model.encoder, lr * encoder_lr_factor),
                     {"params": list(model.heads.parameters()), "lr": lr}], lr=lr)
    raise ValueError(f"phase must be 'pretrain', 'phase1' or 'phase2', got {phase!r}.")
