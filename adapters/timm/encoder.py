"""TimmEncoder: images in [0, 1] -> timm's preprocessing -> a timm backbone -> pooled features (B, F)."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import timm.data
import torch
from torch import Tensor, nn

from .backbone import as_pair, create_backbone, pooled_width, resolve_model_name
from .errors import TimmAdapterError, TimmInputError
from .preprocess import TimmPreprocess, ValueRange, prepare_images

__all__ = ["TimmEncoder", "in_chunks"]


def in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, size: int) -> Tensor:
    """``fn(x)`` in chunks of ``size`` rows when no gradient is recorded (inference: the estimator encodes up to
    4096 samples at once, too many images for a backbone's activations); one call while training or tracing."""
    if torch.is_grad_enabled() or torch.jit.is_tracing() or size <= 0 or len(x) <= size:
        return fn(x)
    return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), size)])


class TimmEncoder(nn.Module):
    """A timm backbone on images in [0, 1]: ``x -> TimmPreprocess -> backbone -> pooled features``.

    Args:
        model_name: timm model name (see :func:`~dcss_plugin.adapters.timm.create_backbone`).
        pretrained_file: local weights file; ``None``: random weights.
        pretrained: hub weights (refused without ``pretrained_file``: no network).
        img_size: backbone input size override (int or (H, W)).
        in_chans: backbone input channels.
        checkpoint_filter: let timm's converter adapt a weights file that does not match as it is.
        **timm_kwargs: passed to ``timm.create_model``.

    Attributes:
        backbone, num_features (F), data_config, input_size (the backbone's (C, S, S)), preprocess
        (:class:`TimmPreprocess`), weights_report (from the weights file), spec (plain data that rebuilds it),
        inference_batch_size (images per backbone pass without gradients).

    Shapes:
        forward: images in [0, 1] ``x`` (B, 1 or C, h, w) -> (B, F); features: backbone-ready (B, C, S, S) -> (B, F).

    Example:
        >>> enc = TimmEncoder("test_resnet", img_size=32)
        >>> enc(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 96])
    """

    def __init__(self, model_name: str, pretrained_file: Optional[Union[str, os.PathLike]] = None, *,
                 pretrained: bool = False, img_size: Optional[Union[int, Sequence[int]]] = None, in_chans: int = 3,
                 checkpoint_filter: bool = True, **timm_kwargs: Any) -> None:
        super().__init__()
        self.model_name = resolve_model_name(model_name)
        self.backbone = create_backbone(self.model_name, pretrained_file, pretrained=pretrained, img_size=img_size,
                                        in_chans=in_chans, checkpoint_filter=checkpoint_filter, **timm_kwargs)
        self.weights_report: Optional[Dict[str, Any]] = getattr(self.backbone, "dcss_weights_report", None)
        self.num_features = pooled_width(self.backbone)
        self.data_config: Dict[str, Any] = dict(timm.data.resolve_model_data_config(self.backbone))
        self.input_size: Tuple[int, int, int] = tuple(int(s) for s in self.data_config["input_size"])  # type: ignore
        self.preprocess = TimmPreprocess(self.data_config)
        self.inference_batch_size = 256
        plain = {k: v for k, v in timm_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))}
        self.spec: Dict[str, Any] = {
            "model_name": self.model_name,
            "img_size": list(as_pair(img_size)) if img_size is not None else None,
            "in_chans": int(in_chans),
            "timm_kwargs": plain,
            "pretrained_file": os.fspath(pretrained_file) if pretrained_file is not None else None,
            "weights_sha256": (self.weights_report or {}).get("sha256"),
            "num_features": self.num_features,
        }

    @classmethod
    def from_spec(cls, spec: Dict[str, Any]) -> "TimmEncoder":
        """The architecture of :attr:`spec` with random weights (a checkpoint's tensors are loaded afterwards)."""
        return cls(spec["model_name"], None, img_size=spec.get("img_size"), in_chans=int(spec.get("in_chans", 3)),
                   **dict(spec.get("timm_kwargs") or {}))

    def check_input(self, x: Tensor) -> None:
        """Raise :class:`TimmInputError` unless ``x`` is (B, C, S, S) with the data config's (C, S, S)."""
        if torch.jit.is_tracing():
            return
        if x.dim() != 4:
            raise TimmInputError(f"{self.model_name} takes images (B, C, H, W); got shape {tuple(x.shape)}.")
        if int(x.shape[1]) != self.input_size[0]:
            raise TimmInputError(f"{self.model_name} takes {self.input_size[0]}-channel input (data config "
                                 f"input_size {self.input_size}), got {int(x.shape[1])} channels. Convert raw images "
                                 "with prepare_images() / encoder.prepare() (grayscale is broadcast to 3 channels).")
        if tuple(int(s) for s in x.shape[-2:]) != self.input_size[1:]:
            raise TimmInputError(f"{self.model_name} takes {self.input_size[1]}x{self.input_size[2]} input (data "
                                 f"config input_size {self.input_size}), got {int(x.shape[-2])}x{int(x.shape[-1])}. "
                                 "Resize with prepare_images() / encoder.prepare(), or build the encoder with "
                                 "img_size=.")

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features (B, F) of backbone-ready input (B, C, S, S)."""
        self.check_input(x)
        f = self.backbone(x)
        if not torch.jit.is_tracing() and (f.dim() != 2 or int(f.shape[1]) != self.num_features):
            raise TimmAdapterError(f"{self.model_name} returned shape {tuple(f.shape)}, expected (B, "
                                   f"{self.num_features}) pooled features.")
        return f

    def forward(self, x: Tensor) -> Tensor:
        """Images in [0, 1] (B, 1 or C, h, w) -> pooled features (B, F); in chunks when no gradient is recorded."""
        return in_chunks(lambda xb: self.features(self.preprocess(xb)), x, self.inference_batch_size)

    def prepare(self, images: Any, value_range: ValueRange = "auto") -> Tensor:
        """Raw images -> backbone-ready input (:func:`prepare_images` with this model's data config)."""
        return prepare_images(images, self, value_range)

    def timm_transform(self) -> Callable:
        """timm's own eval transform for PIL images / tensors: ``timm.data.create_transform(**data_config)``."""
        return timm.data.create_transform(**self.data_config)
