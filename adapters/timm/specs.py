"""The network kinds ``"timm-frozen"`` and ``"timm-finetune"``: a saved model's ``spec`` rebuilds its networks.

Registered with :func:`dcss_plugin.registry.register_network_kind` when this package is imported (the registry
imports it on demand for a kind starting with ``timm``), so ``DCSS.load(path)`` and ``DCSSModel.load(path)`` read
timm-backed checkpoints without a weights file: the backbone architecture is rebuilt with random weights
(``pretrained=False``) and the checkpoint's tensors are loaded into it.

Specs (plain data):

* ``{"kind": "timm-frozen", "version": 1, "backbone": TimmEncoder.spec, "features": <the feature model's spec>,
  "input_shape": [C, H, W]}``: :class:`~dcss_plugin.adapters.timm.FrozenFeatureEncoder`, no decoder.
* ``{"kind": "timm-finetune", "version": 1, "backbone": ..., "latent_dim", "finetune", "train_blocks",
  "backbone_lr_scale", "layer_decay", "decoder_hidden_dims", "input_shape"}``: the
  :func:`~dcss_plugin.adapters.timm.timm_autoencoder` pair (the decoder's target is the current backbone).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn

from dcss_plugin import Normalize
from dcss_plugin.registry import build_networks, register_network_kind

from .encoder import TimmEncoder
from .errors import TimmAdapterError
from .finetune import timm_autoencoder
from .frozen import FrozenFeatureEncoder

__all__ = ["SPEC_VERSION", "build_timm_frozen", "build_timm_finetune"]

SPEC_VERSION = 1


def _check(spec: Mapping[str, Any]) -> TimmEncoder:
    if int(spec.get("version", 0)) != SPEC_VERSION:
        raise TimmAdapterError(f"timm spec version {spec.get('version')} is not supported (expected {SPEC_VERSION}).")
    encoder = TimmEncoder.from_spec(dict(spec["backbone"]))
    shape = spec.get("input_shape")
    if shape:
        encoder.preprocess.set_input_size(int(shape[-2]), int(shape[-1]))
    return encoder


def build_timm_frozen(spec: Mapping[str, Any]) -> Tuple[nn.Module, Optional[nn.Module]]:
    """A :class:`FrozenFeatureEncoder` of the architecture in ``spec`` (random weights), and no decoder.

    Example:
        >>> enc, _ = build_timm_frozen(model.spec); enc.load_state_dict(...)
    """
    timm_encoder = _check(spec)
    feature_encoder, _ = build_networks(spec["features"])
    width = timm_encoder.num_features
    return FrozenFeatureEncoder(timm_encoder, Normalize(torch.zeros(width), torch.ones(width)), feature_encoder), None


def build_timm_finetune(spec: Mapping[str, Any]) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The :func:`timm_autoencoder` pair of the architecture in ``spec`` (random weights, target ``"current"``).

    Example:
        >>> enc, dec = build_timm_finetune(model.spec)
    """
    enc, dec = timm_autoencoder(_check(spec), int(spec["latent_dim"]), finetune=str(spec["finetune"]),
                                train_blocks=int(spec.get("train_blocks", 1)),
                                backbone_lr_scale=spec.get("backbone_lr_scale"), layer_decay=spec.get("layer_decay"),
                                decoder_hidden_dims=tuple(spec.get("decoder_hidden_dims", (256,))), target="current")
    return enc, dec


register_network_kind("timm-frozen", build_timm_frozen)
register_network_kind("timm-finetune", build_timm_finetune)
