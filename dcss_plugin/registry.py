"""Network kinds a saved :class:`~dcss_plugin.DCSSModel` can be rebuilt from (its ``spec``).

The reference networks register ``"mlp"`` and ``"conv"`` here; an adapter registers its own kinds when it is
imported (``dcss_plugin.adapters.timm`` registers ``"timm-..."``). A spec whose kind starts with ``timm`` imports
that adapter on demand, so a checkpoint names its builder without ``dcss_plugin`` importing adapters up front.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from torch import nn

__all__ = ["register_network_kind", "build_networks"]

Builder = Callable[[Mapping[str, Any]], Tuple[nn.Module, Optional[nn.Module]]]
_BUILDERS: Dict[str, Builder] = {}
_PROVIDERS = {"timm": "dcss_plugin.adapters.timm"}  # kind prefix -> module that registers it on import


def register_network_kind(kind: str, builder: Builder) -> None:
    """Make ``build_networks({"kind": kind, ...})`` call ``builder(spec) -> (encoder, decoder or None)``."""
    _BUILDERS[kind] = builder


def build_networks(spec: Mapping[str, Any]) -> Tuple[nn.Module, Optional[nn.Module]]:
    """Fresh (untrained) encoder and decoder described by ``spec`` (weights are loaded afterwards)."""
    kind = str(spec.get("kind"))
    if kind not in _BUILDERS:
        for prefix, module in _PROVIDERS.items():
            if kind.startswith(prefix):
                importlib.import_module(module)
    if kind not in _BUILDERS:
        raise ValueError(f"unknown network kind {kind!r} in the model spec (known: {sorted(_BUILDERS)}).")
    return _BUILDERS[kind](spec)


def _mlp(spec: Mapping[str, Any]) -> Tuple[nn.Module, Optional[nn.Module]]:
    from .nets import mlp_autoencoder

    return mlp_autoencoder(int(spec["in_features"]), int(spec["latent_dim"]), tuple(spec["hidden_dims"]))


def _conv(spec: Mapping[str, Any]) -> Tuple[nn.Module, Optional[nn.Module]]:
    from .nets import conv_autoencoder

    return conv_autoencoder(tuple(spec["image_shape"]), int(spec["latent_dim"]),
                            tuple(spec.get("channels", (32, 64, 128))))


register_network_kind("mlp", _mlp)
register_network_kind("conv", _conv)
