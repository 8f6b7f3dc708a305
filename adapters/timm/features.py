"""Pooled backbone features of a whole data set, computed once (eval mode, ``no_grad``, batched), with a ``.npy``
cache that is reused only when data, model, weights and preprocessing are the same."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from dcss_plugin.io import atomic_save_npy, atomic_write_json

from .encoder import TimmEncoder
from .preprocess import ValueRange, as_images, unit_range

__all__ = ["extract_features"]

log = logging.getLogger("dcss_plugin")
_CACHE_FORMAT = "dcss-plugin/timm-features-v1"


def _sha256_of_tensor(x: Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def _sha256_of_module(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cache_key(encoder: TimmEncoder, x: Tensor) -> Dict[str, Any]:
    return {"format": _CACHE_FORMAT, "model_name": encoder.model_name, "n": int(len(x)),
            "num_features": encoder.num_features, "data_sha256": _sha256_of_tensor(x),
            "weights_sha256": _sha256_of_module(encoder.backbone),
            "data_config": json.loads(json.dumps(encoder.preprocess.data_config))}


def _read_cache(path: str, key: Dict[str, Any], n: int, width: int) -> Optional[Tensor]:
    """The cached features when ``path`` and its ``.json`` sidecar hold exactly ``key``; else None."""
    sidecar = path + ".json"
    if not (os.path.exists(path) and os.path.exists(sidecar)):
        return None
    try:
        with open(sidecar, "r", encoding="utf-8") as fh:
            if json.load(fh) == key:
                feats = np.load(path, allow_pickle=False)
                if feats.shape == (n, width):
                    log.info("features read from %s", path)
                    return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
        log.info("feature cache %s is for other data or weights; recomputing", path)
    except (OSError, ValueError) as exc:
        log.info("feature cache %s unreadable (%s); recomputing", path, exc)
    return None


@torch.no_grad()
def extract_features(encoder: TimmEncoder, images: Any, batch_size: int = 256, value_range: ValueRange = None,
                     device: Union[str, torch.device, None] = None,
                     cache_file: Optional[Union[str, os.PathLike]] = None) -> Tensor:
    """Pooled backbone features of all ``images``, once: eval mode, ``no_grad``, ``batch_size`` images a pass.

    Args:
        encoder: a :class:`~dcss_plugin.adapters.timm.TimmEncoder`.
        images: (N, H, W) or (N, C, H, W).
        batch_size: images per backbone pass.
        value_range: how to bring ``images`` to [0, 1] (see :func:`prepare_images`); ``None``: already there.
        device: where the backbone runs (default: where it is).
        cache_file: a ``.npy`` path. When it exists and ``<cache_file>.json`` holds the same fingerprint (data,
            model name, weights, preprocessing), it is read instead of running the backbone; otherwise the
            features are computed and written there (atomically).

    Returns:
        (N, F) float32 on the CPU.

    Example:
        >>> feats = extract_features(TimmEncoder("resnet18", "resnet18.pth"), x, value_range=(0, 16))
        >>> feats.shape                                             # (N, 512)
    """
    x = unit_range(as_images(images), value_range)
    key: Dict[str, Any] = {}
    if cache_file is not None:
        cache_file = os.fspath(cache_file)
        key = _cache_key(encoder, x)
        cached = _read_cache(cache_file, key, len(x), encoder.num_features)
        if cached is not None:
            return cached
    dev = torch.device(device) if device is not None else next(encoder.backbone.parameters()).device
    was_training = encoder.training
    encoder.to(dev).eval()
    try:
        out = [encoder.features(encoder.preprocess(x[i:i + batch_size].to(dev))).float().cpu()
               for i in range(0, len(x), batch_size)]
    finally:
        encoder.train(was_training)
    feats = torch.cat(out) if out else torch.empty(0, encoder.num_features)
    if cache_file is not None:
        atomic_save_npy(cache_file, feats.numpy())
        atomic_write_json(cache_file + ".json", key)
    return feats
