"""timm's evaluation transform as batched tensor ops: resize + center crop as two matrix products, then mean/std.

``timm.data.create_transform(**data_config)`` resizes the shorter side to ``floor(S / crop_pct)`` (``crop_mode
"center"``; ``"squash"``: both sides), center-crops ``S`` and normalises with the model's ``mean``/``std``. Resize
and crop are linear and separable, so per input size they are precomputed as ``R_h`` (S_h, h) and ``R_w``
(S_w, w) with torchvision's own resize (same interpolation, antialias) and applied as ``R_h @ x @ R_w^T``: one
batched op, on any device, exported to ONNX as MatMul, equal to timm's transform (checked by the tests).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import timm.data
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcss_plugin import Normalize
from dcss_plugin.data import as_tensor

from .errors import TimmAdapterError, TimmInputError

__all__ = ["TimmPreprocess", "prepare_images", "as_images", "unit_range"]

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
ValueRange = Union[str, Tuple[float, float], None]


def _resize_matrix(n_in: int, n_out: int, mode: str) -> Tensor:
    """(n_out, n_in) float64 matrix of torchvision's 1-D resize (``F.interpolate``, antialias for bilinear /
    bicubic, as ``transforms.Resize`` does on tensors), obtained by resizing the identity."""
    # width 2, not 1: torch's antialiased kernels mishandle a width-1 input (every output row copies input row 0)
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1).repeat(1, 1, 1, 2)
    if mode == "nearest":
        out = F.interpolate(eye, size=(n_out, 2), mode="nearest")
    else:
        out = F.interpolate(eye, size=(n_out, 2), mode=mode, align_corners=False, antialias=True)
    return out[:, 0, :, 0].t().contiguous()


class TimmPreprocess(nn.Module):
    """timm's evaluation transform for a data config, as batched tensor ops (two matrix products).

    Args:
        data_config: ``timm.data.resolve_model_data_config(model)`` (``input_size``, ``interpolation``, ``mean``,
            ``std``, ``crop_pct``, ``crop_mode``).

    Shapes:
        input ``x`` (N, c, h, w) float in [0, 1], ``c`` 1 (broadcast to every channel) or C; output
        (N, C, S_h, S_w), normalised.

    Example:
        >>> pre = TimmPreprocess(timm.data.resolve_model_data_config(backbone))
        >>> pre(torch.rand(4, 1, 8, 8)).shape                   # e.g. torch.Size([4, 3, 160, 160])
    """

    def __init__(self, data_config: Mapping[str, Any]) -> None:
        super().__init__()
        size = tuple(int(s) for s in data_config["input_size"])
        if len(size) != 3:
            raise TimmAdapterError(f"data_config input_size must be (C, H, W), got {size}.")
        self.input_size: Tuple[int, int, int] = size  # type: ignore[assignment]
        self.interpolation = str(data_config.get("interpolation") or "bilinear")
        if self.interpolation not in _INTERPOLATIONS:
            raise TimmAdapterError(f"Interpolation {self.interpolation!r} of the data config is not available for "
                                   f"tensors; override it with one of {', '.join(_INTERPOLATIONS)}.")
        self.crop_pct = float(data_config.get("crop_pct") or timm.data.DEFAULT_CROP_PCT)
        self.crop_mode = str(data_config.get("crop_mode") or "center")
        if self.crop_mode not in ("center", "squash"):
            raise TimmAdapterError(f"crop_mode {self.crop_mode!r} (padding) is not supported; use 'center' or "
                                   "'squash' in the data config.")
        if self.crop_mode == "center" and size[1] != size[2]:
            raise TimmAdapterError(f"Non-square input_size {size[1:]} with crop_mode 'center' is not supported; "
                                   "use crop_mode 'squash'.")
        mean = torch.tensor([float(v) for v in data_config["mean"]]).view(1, -1, 1, 1)
        std = torch.tensor([float(v) for v in data_config["std"]]).view(1, -1, 1, 1)
        if mean.shape[1] != size[0] or std.shape[1] != size[0]:
            raise TimmAdapterError(f"mean/std have {mean.shape[1]}/{std.shape[1]} entries for {size[0]} channels.")
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.register_buffer("resize_h", torch.empty(0), persistent=False)
        self.register_buffer("resize_w", torch.empty(0), persistent=False)
        self._hw: Optional[Tuple[int, int]] = None

    @property
    def data_config(self) -> Dict[str, Any]:
        return {"input_size": self.input_size, "interpolation": self.interpolation,
                "mean": tuple(self.mean.flatten().tolist()), "std": tuple(self.std.flatten().tolist()),
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def _plan(self, h: int, w: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(resized (H', W'), crop offsets (top, left)) as torchvision's Resize + CenterCrop compute them."""
        _, sh, sw = self.input_size
        if self.crop_mode == "squash":
            new = (math.floor(sh / self.crop_pct), math.floor(sw / self.crop_pct))
        else:
            scale = math.floor(sh / self.crop_pct)
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = scale, int(scale * long / short)
            new = (new_long, new_short) if w <= h else (new_short, new_long)
        if new[0] < sh or new[1] < sw:
            raise TimmInputError(f"Resizing {h}x{w} images gives {new[0]}x{new[1]}, smaller than the crop "
                                 f"{sh}x{sw} (crop_pct {self.crop_pct} > 1 pads, which is not supported).")
        return new, (int(round((new[0] - sh) / 2.0)), int(round((new[1] - sw) / 2.0)))

    @torch.no_grad()
    def set_input_size(self, h: int, w: int) -> "TimmPreprocess":
        """Precompute the resize / crop matrices for ``h x w`` inputs (done on first use; call it before tracing
        or exporting, so that the matrices are constants of the graph)."""
        (nh, nw), (top, left) = self._plan(int(h), int(w))
        _, sh, sw = self.input_size
        rh = _resize_matrix(int(h), nh, self.interpolation)[top:top + sh]
        rw = _resize_matrix(int(w), nw, self.interpolation)[left:left + sw]
        self.resize_h = rh.to(self.mean.device, self.mean.dtype)
        self.resize_w = rw.to(self.mean.device, self.mean.dtype)
        self._hw = (int(h), int(w))
        return self

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise TimmInputError(f"Expected images (N, C, H, W), got shape {tuple(x.shape)}.")
        c, c_model = int(x.shape[1]), self.input_size[0]
        if c not in (1, c_model):
            raise TimmInputError(
                f"The backbone takes {c_model}-channel images (or 1-channel, broadcast); got {c} channels (shape "
                f"{tuple(x.shape)}). For channels-last data use x.permute(0, 3, 1, 2).")

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # shapes were checked when the matrices were made; no checks in the graph
            if self._hw is None:
                raise RuntimeError("TimmPreprocess.set_input_size(h, w) must be called before tracing/exporting.")
        else:
            self._check(x)
            hw = (int(x.shape[-2]), int(x.shape[-1]))
            if self._hw != hw:
                self.set_input_size(*hw)
        y = torch.matmul(torch.matmul(self.resize_h.to(x.dtype), x), self.resize_w.to(x.dtype).t())
        return (y - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # (N, 1, S, S) broadcasts to C channels


def as_images(images: Any) -> Tensor:
    """``images`` (N, H, W) or (N, C, H, W), array or tensor, as a float32 tensor (N, C, H, W)."""
    x, _ = as_tensor(images)
    x = x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise TimmInputError(f"timm backbones take images (N, H, W) or (N, C, H, W); got shape {tuple(x.shape)}.")
    return x


def unit_range(x: Tensor, value_range: ValueRange) -> Tensor:
    """``x`` brought to [0, 1]: ``"auto"`` (DCSS's image scaling, :meth:`dcss_plugin.Normalize.fit`),
    ``(low, high)``, or ``None`` (already there)."""
    if value_range is None:
        return x
    if value_range == "auto":
        return Normalize.fit(x)(x)
    if isinstance(value_range, (tuple, list)) and len(value_range) == 2:
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise TimmAdapterError(f"value_range must be (low, high) with high > low, got {value_range}.")
        return (x - lo) / (hi - lo)
    raise TimmAdapterError(f"value_range must be 'auto', (low, high) or None, got {value_range!r}.")


def prepare_images(images: Any, data_config: Union[Mapping[str, Any], nn.Module],
                   value_range: ValueRange = "auto") -> Tensor:
    """Raw images -> the backbone's input, with timm's data config (see :class:`TimmPreprocess`).

    Args:
        images: (N, H, W) grayscale or (N, C, H, W), array or tensor.
        data_config: ``timm.data.resolve_model_data_config(model)``, a timm model, or a module with a
            ``preprocess`` (:class:`~dcss_plugin.adapters.timm.TimmEncoder`).
        value_range: ``"auto"`` (one scalar scale ``[min(lo, 0), hi] -> [0, 1]``, as DCSS does), ``(low, high)``
            (``(0, 16)`` for digits, ``(0, 255)`` for uint8), or ``None`` (already [0, 1]).

    Returns:
        (N, C, S, S) float32, normalised with the model's mean / std.

    Example:
        >>> x = prepare_images(load_digits().images, backbone, value_range=(0, 16))    # (1797, 3, 160, 160)
    """
    pre = getattr(data_config, "preprocess", None)
    if not isinstance(pre, TimmPreprocess):
        cfg = timm.data.resolve_model_data_config(data_config) if isinstance(data_config, nn.Module) else data_config
        pre = TimmPreprocess(cfg)
    x = as_images(images)
    with torch.no_grad():
        return pre(unit_range(x, value_range).to(pre.mean.device))
