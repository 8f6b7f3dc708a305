"""timm backbones as DCSS encoders: offline weights, timm's own preprocessing, three training modes, ONNX export.

Imported as ``dcss_plugin.adapters.timm``; timm is imported here and nowhere in ``dcss_plugin`` itself.

Building blocks:

* :func:`create_backbone` / :class:`TimmEncoder`: ``timm.create_model(name, pretrained=False, num_classes=0)``
  (pooled features, width ``num_features``), optionally a Linear projection to ``latent_dim``. Weights come from a
  local file only (:func:`load_backbone_weights`: ``.safetensors`` or a ``torch.load(weights_only=True)``
  checkpoint, checked key by key and shape by shape). There is no network: ``pretrained=True`` without a file is
  refused with instructions. An unknown model name is refused with close names from ``timm.list_models()``.
* :class:`TimmPreprocess`: timm's evaluation transform (``timm.data.resolve_model_data_config`` +
  ``create_transform``: resize the shorter side to ``floor(S / crop_pct)``, center crop ``S``, normalise with the
  model's mean/std) written as two matrix products on tensors, so that it is batched, runs on the GPU, exports to
  ONNX, and equals ``create_transform(**data_config)`` applied to the same tensors (checked by the tests).
  Grayscale images (1 channel) are broadcast to the backbone's 3 channels. :func:`prepare_images` applies it to
  raw images such as scikit-learn's digits ``(N, 8, 8)`` in ``[0, 16]``.

Training modes (:func:`fit_timm` / :class:`TimmDCSS` hide them):

* ``"frozen"`` (the fast path): pooled features are extracted once (eval mode, ``no_grad``, batched) by
  :func:`extract_features`, kept in memory and optionally in a ``.npy`` cache, and DCSS runs on those vectors
  with its MLP autoencoder. Training never runs the backbone; prediction and export chain backbone -> feature
  standardisation -> DCSS encoder (:class:`FrozenFeaturePipeline`).
* ``"last"``: the last block group(s) of the backbone train (ResNet ``layer4``, ViT ``blocks[-1]`` + final norm;
  found with timm's ``group_matcher(coarse=True)``), everything else has ``requires_grad=False`` and stays in eval
  mode (frozen BatchNorm statistics).
* ``"full"``: every parameter trains; the backbone at a lower learning rate with timm's layer-wise decay
  (``timm.optim.param_groups_layer_decay``), applied as real per-group learning rates
  (:meth:`TimmFeatureAutoencoder.param_groups`).

For ``"last"`` and ``"full"`` the DCSS autoencoder is :class:`TimmFeatureAutoencoder`: ``u = proj(LN(backbone(x)))``
and it reconstructs backbone *features*, not pixels.

Example:
    >>> from sklearn.datasets import load_digits
    >>> from dcss_plugin.adapters.timm import fit_timm, export_timm_assigner
    >>> x = load_digits().images[:500]                                   # (500, 8, 8) in [0, 16]
    >>> model, extras = fit_timm(x, 10, "resnet18", mode="frozen", pretrained_file="resnet18.safetensors")
    >>> model.predict(x[:5]), extras["features"].shape                   # labels, (500, 512)
    >>> export_timm_assigner(model, "assigner.onnx", check_data=x[:64])   # x -> (q, label, confidence)
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import timm.data
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from timm.models import load_state_dict as _timm_load_state_dict
from torch import Tensor, nn

from dcss_plugin.autoencoders import MLPAutoencoder
from dcss_plugin.config import DCSSConfig
from dcss_plugin.data import DataError, InputNormalizer, as_tensor, validate_features
from dcss_plugin.estimator import CHECKPOINT_FORMAT, DCSS
from dcss_plugin.io import atomic_save_npy, atomic_write_json, load_checkpoint

__all__ = [
    "MODES",
    "TimmAdapterError",
    "UnknownModelError",
    "PretrainedWeightsError",
    "TimmInputError",
    "resolve_model_name",
    "suggest_model_names",
    "create_backbone",
    "read_weights",
    "load_backbone_weights",
    "TimmPreprocess",
    "prepare_images",
    "TimmEncoder",
    "extract_features",
    "block_groups",
    "last_block_parameter_names",
    "TimmFeatureAutoencoder",
    "FrozenFeaturePipeline",
    "fit_timm",
    "TimmDCSS",
    "load_timm_dcss",
    "export_timm_assigner",
    "fit_from_cli_args",
]

log = logging.getLogger("dcss_plugin")

MODES = ("frozen", "last", "full")
SPEC_VERSION = 1
_FEATURE_CACHE_FORMAT = "dcss-plugin/timm-features-v1"


# ---------------------------------------------------------------------------------------------------- errors
class TimmAdapterError(ValueError):
    """A timm backbone could not be set up as asked (the message says why and what to do)."""


class UnknownModelError(TimmAdapterError):
    """``model_name`` is not a timm model; :attr:`suggestions` holds close names from ``timm.list_models()``."""

    def __init__(self, name: str, suggestions: Sequence[str]) -> None:
        self.name = name
        self.suggestions = list(suggestions)
        hint = (f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions
                else " See timm.list_models('*pattern*') for the available names.")
        super().__init__(f"Unknown timm model {name!r}.{hint}")


class PretrainedWeightsError(TimmAdapterError):
    """Weights were asked from the hub (there is no network), or a weights file does not fit the model."""


class TimmInputError(DataError):
    """Images of the wrong rank, channel count or size for the backbone's data config."""


_NO_NETWORK = (
    "pretrained=True would download the weights of {name!r} from the Hugging Face hub, but this environment has "
    "no network access, so hub weights cannot be used. Fetch the weights on a machine with internet, e.g. "
    "`huggingface-cli download {hub_id} model.safetensors` or "
    "`torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), '{name}.pth')`, copy the file here and "
    "pass it as pretrained_file='...' (CLI: --pretrained-file FILE). Or leave pretrained=False for random weights."
)


# ---------------------------------------------------------------------------------------------------- names
def suggest_model_names(name: str, n: int = 5) -> List[str]:
    """Close timm model names for a misspelt ``name`` (``difflib`` over ``timm.list_models()``, then substrings).

    Example:
        >>> suggest_model_names("resnet5O")[:1]
        ['resnet50']
    """
    names = timm.list_models()
    arch = name.split(".", 1)[0].strip().lower()
    close = difflib.get_close_matches(arch, names, n=n, cutoff=0.6)
    if not close:
        close = [m for m in names if arch and arch in m][:n]
    return close


def resolve_model_name(model_name: str) -> str:
    """``model_name`` without a ``timm:`` prefix, checked against timm's registry.

    Raises:
        UnknownModelError: not a timm model (with suggestions).
        PretrainedWeightsError: a ``hf-hub:`` name, which needs the network.

    Example:
        >>> resolve_model_name("timm:resnet18")
        'resnet18'
    """
    if not isinstance(model_name, str) or not model_name.strip():
        raise TimmAdapterError(f"model_name must be a timm model name such as 'resnet18', got {model_name!r}.")
    name = model_name.strip()
    if name.startswith("timm:"):
        name = name[len("timm:"):]
    if name.startswith(("hf-hub:", "hf_hub:")):
        raise PretrainedWeightsError(
            f"{name!r} names a model on the Hugging Face hub; there is no network here. Use the timm architecture "
            "name (e.g. 'resnet50') and pass the downloaded weights file as pretrained_file.")
    if not timm.is_model(name):
        raise UnknownModelError(name, suggest_model_names(name))
    return name


# ---------------------------------------------------------------------------------------------------- weights
def read_weights(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """A state dict from a local weights file: ``.safetensors``, or a torch checkpoint read with
    ``torch.load(weights_only=True)`` (no code is unpickled). Wrappers such as ``{"state_dict": ...}``,
    ``{"model": ...}``, EMA weights and DDP/``torch.compile`` key prefixes are handled by timm's
    ``timm.models.load_state_dict``.

    Example:
        >>> sd = read_weights("resnet18.safetensors"); len(sd)
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file not found: {path!r} (pretrained weights are read from a local file "
                                "only; nothing is downloaded).")
    if path.endswith(".safetensors"):
        try:
            import safetensors.torch  # noqa: F401
        except ImportError as exc:
            raise PretrainedWeightsError(f"{path!r} is a .safetensors file but the safetensors package is not "
                                         "installed: `pip install safetensors`, or save the weights with "
                                         "torch.save(state_dict, 'weights.pth').") from exc
    try:
        state = _timm_load_state_dict(path, use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise PretrainedWeightsError(
            f"{path!r} could not be read as a weights file ({type(exc).__name__}: {exc}). Accepted: .safetensors, "
            "or a torch.save'd state dict readable with torch.load(weights_only=True) (tensors only, no pickled "
            "objects).") from exc
    if not isinstance(state, Mapping) or not state:
        raise PretrainedWeightsError(f"{path!r} holds no state dict (found {type(state).__name__}).")
    odd = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if odd:
        raise PretrainedWeightsError(
            f"{path!r} holds non-tensor entries ({', '.join(map(str, odd[:5]))}{', ...' if len(odd) > 5 else ''}); "
            "it looks like a training checkpoint, not model weights. Save model.state_dict() instead.")
    return dict(state)


def _classifier_roots(model: nn.Module) -> Tuple[str, ...]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not cls:
        return ()
    return tuple(cls) if isinstance(cls, (tuple, list)) else (cls,)


def _drop_classifier(state: Dict[str, Tensor], model_keys: Sequence[str], model: nn.Module) -> List[str]:
    """Remove classifier weights the pooled-feature model (``num_classes=0``) has no place for; return their keys."""
    keys = set(model_keys)
    dropped = []
    for cls in _classifier_roots(model):
        for k in list(state):
            if (k == cls or k.startswith(cls + ".")) and k not in keys:
                dropped.append(k)
                del state[k]
    return dropped


def _compare(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Dict[str, list]:
    missing = [k for k in reference if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in reference]
    mismatched = [(k, tuple(state[k].shape), tuple(reference[k].shape)) for k in state
                  if k in reference and tuple(state[k].shape) != tuple(reference[k].shape)]
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def _n_issues(diff: Mapping[str, list]) -> int:
    return sum(len(v) for v in diff.values())


def _fmt_keys(keys: Sequence[Any], limit: int = 6) -> str:
    shown = ", ".join(str(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def _file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_backbone_weights(model: nn.Module, path: Union[str, os.PathLike],
                          checkpoint_filter: bool = True) -> Dict[str, Any]:
    """Load a local weights file into a timm ``model`` (created with ``num_classes=0``), strictly.

    Classifier weights (``pretrained_cfg["classifier"]``, e.g. ``fc.*`` or ``head.*``) are dropped, since the
    pooled-feature model has no classifier. Every other tensor must match by name and shape; when the file does
    not match as it is and ``checkpoint_filter`` is on, the architecture's own timm converter
    (``checkpoint_filter_fn`` of the model's module: original-format checkpoints, ViT position-embedding resampling
    for another ``img_size``) is tried before giving up.

    Returns:
        a report: ``file``, ``sha256``, ``tensors`` (loaded), ``ignored`` (dropped classifier keys), ``filtered``.

    Raises:
        PretrainedWeightsError: naming the missing and unexpected keys and the shape mismatches.

    Example:
        >>> model = timm.create_model("resnet18", num_classes=0)
        >>> load_backbone_weights(model, "resnet18.pth")["tensors"]
    """
    path = os.fspath(path)
    raw = read_weights(path)
    reference = model.state_dict()
    state = dict(raw)
    ignored = _drop_classifier(state, list(reference), model)
    diff = _compare(state, reference)
    filtered = tried = False
    if _n_issues(diff) and checkpoint_filter:
        fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if callable(fn):
            tried = True
            try:
                try:
                    converted = dict(fn(dict(raw), model))
                except TypeError:
                    converted = dict(fn(dict(raw)))
                ignored2 = _drop_classifier(converted, list(reference), model)
                diff2 = _compare(converted, reference)
                if _n_issues(diff2) == 0:
                    state, ignored, diff, filtered = converted, ignored2, diff2, True
            except Exception as exc:  # noqa: BLE001 - the converter is a best effort; report the raw mismatch
                log.info("timm checkpoint_filter_fn for %s failed: %s", type(model).__name__, exc)
    if _n_issues(diff):
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        parts = []
        if diff["missing"]:
            parts.append(f"{len(diff['missing'])} missing key(s) {_fmt_keys(diff['missing'])}")
        if diff["unexpected"]:
            parts.append(f"{len(diff['unexpected'])} unexpected key(s) {_fmt_keys(diff['unexpected'])}")
        if diff["mismatched"]:
            shapes = [f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in diff["mismatched"]]
            parts.append(f"{len(shapes)} shape mismatch(es) {_fmt_keys(shapes, 4)}")
        raise PretrainedWeightsError(
            f"The weights in {path!r} do not match timm model {name!r}: {'; '.join(parts)}. Is the file for "
            "another architecture, width or image size? Pass the weights of exactly this model"
            + (" (timm's checkpoint converter for this architecture was tried too)." if tried else "."))
    result = model.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if left or result.unexpected_keys:  # pragma: no cover - _compare found everything already
        raise PretrainedWeightsError(f"Loading {path!r} left missing {left} / unexpected {result.unexpected_keys}.")
    return {"file": path, "sha256": _file_sha256(path), "tensors": len(state), "ignored": ignored,
            "filtered": filtered}


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise TimmAdapterError(f"img_size must be an int or (H, W), got {size!r}.")
        return int(size[0]), int(size[1])
    return int(size), int(size)


def create_backbone(model_name: str, pretrained_file: Optional[Union[str, os.PathLike]] = None, *,
                    pretrained: bool = False, img_size: Optional[Union[int, Sequence[int]]] = None,
                    in_chans: int = 3, checkpoint_filter: bool = True, **timm_kwargs: Any) -> nn.Module:
    """A timm model that returns pooled features ``(B, num_features)``: ``create_model(name, num_classes=0)``.

    Args:
        model_name: a name from ``timm.list_models()`` (an optional ``timm:`` prefix is stripped).
        pretrained_file: local weights (``.safetensors`` / ``.pth``); see :func:`load_backbone_weights`.
        pretrained: hub weights; refused without ``pretrained_file`` (no network), ignored with it.
        img_size: input size override (int or (H, W)); the data config follows it. Fixed-size models (ViT)
            are built for it (``img_size=`` kwarg), others only get their data config changed.
        in_chans: input channels of the backbone.
        checkpoint_filter: let timm's converter for the architecture adapt a weights file that does not match.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Example:
        >>> backbone = create_backbone("test_vit", img_size=32)
        >>> backbone(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 64])
    """
    name = resolve_model_name(model_name)
    if pretrained and pretrained_file is None:
        try:
            hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or f"timm/{name}"
        except RuntimeError:
            hub_id = f"timm/{name}"
        raise PretrainedWeightsError(_NO_NETWORK.format(name=name, hub_id=hub_id))
    kwargs = dict(timm_kwargs)
    for bad in ("pretrained", "num_classes", "features_only"):
        if bad in kwargs:
            raise TimmAdapterError(f"{bad}= is set by the adapter; do not pass it in timm_kwargs.")
    if in_chans != 3:
        kwargs["in_chans"] = int(in_chans)
    if img_size is not None:
        hw = _pair(img_size)
        try:
            default = timm.models.get_pretrained_cfg(name)
        except RuntimeError as exc:
            raise TimmAdapterError(f"timm has no configuration for {name!r}: {exc}") from exc
        if default is not None and getattr(default, "fixed_input_size", False):
            kwargs.setdefault("img_size", hw)
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay["input_size"] = (int(in_chans), *hw)
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:
        raise TimmAdapterError(f"timm could not build {name!r} with {sorted(kwargs)}: {exc}") from exc
    except RuntimeError as exc:
        raise TimmAdapterError(f"timm could not build {name!r}: {exc}") from exc
    if pretrained_file is not None:
        report = load_backbone_weights(model, pretrained_file, checkpoint_filter=checkpoint_filter)
        model.dcss_weights_report = report  # type: ignore[attr-defined]
    return model


def _pooled_width(model: nn.Module) -> int:
    """Width of ``model(x)`` for ``num_classes=0``: ``head_hidden_size`` where timm has one (pre-logits layers such
    as MobileNetV3's conv head), else ``num_features``."""
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not width:
        raise TimmAdapterError(f"{type(model).__name__} has no num_features; is it a timm classification model?")
    return int(width)


# ---------------------------------------------------------------------------------------------------- preprocessing
_INTERPOLATIONS = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def _resize_matrix(n_in: int, n_out: int, mode: str) -> Tensor:
    """(n_out, n_in) float64 matrix of torchvision's 1-D resize (``F.interpolate``, antialias for
    bilinear/bicubic, as ``transforms.Resize`` does on tensors), obtained by resizing the identity."""
    # width 2, not 1: torch's antialiased kernels mishandle a width-1 input (every output row copies input row 0)
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1).repeat(1, 1, 1, 2)
    if mode == "nearest":
        out = F.interpolate(eye, size=(n_out, 2), mode="nearest")
    else:
        out = F.interpolate(eye, size=(n_out, 2), mode=mode, align_corners=False, antialias=True)
    return out[:, 0, :, 0].t().contiguous()


class TimmPreprocess(nn.Module):
    """timm's evaluation transform for a data config, as batched tensor ops (two matrix products).

    ``timm.data.create_transform(**data_config)`` resizes the shorter side to ``floor(S / crop_pct)``
    (``crop_mode="center"``; ``"squash"``: both sides), center-crops ``S`` and normalises with ``mean``/``std``.
    The resize and crop are linear and separable, so they are precomputed per input size as ``R_h`` (S_h, h) and
    ``R_w`` (S_w, w) with torchvision's own resize (same interpolation, antialias) and applied as
    ``R_h @ x @ R_w^T``: one batched op, any device, exportable to ONNX (MatMul), equal to timm's transform.

    Args:
        data_config: ``timm.data.resolve_model_data_config(model)`` (``input_size``, ``interpolation``, ``mean``,
            ``std``, ``crop_pct``, ``crop_mode``).

    Shapes:
        input: ``x`` (N, c, h, w) float in [0, 1], ``c`` 1 (broadcast to all channels) or ``C``.
        output: (N, C, S_h, S_w), normalised.

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
        interp = str(data_config.get("interpolation") or "bilinear")
        if interp not in _INTERPOLATIONS:
            raise TimmAdapterError(f"Interpolation {interp!r} of the data config is not available for tensors; "
                                   "override it with one of 'bilinear', 'bicubic', 'nearest'.")
        self.interpolation = _INTERPOLATIONS[interp]
        self.crop_pct = float(data_config.get("crop_pct") or timm.data.DEFAULT_CROP_PCT)
        self.crop_mode = str(data_config.get("crop_mode") or "center")
        if self.crop_mode not in ("center", "squash"):
            raise TimmAdapterError(f"crop_mode {self.crop_mode!r} (padding) is not supported; use 'center' or "
                                   "'squash' in the data config.")
        if self.crop_mode == "center" and size[1] != size[2]:
            raise TimmAdapterError(f"Non-square input_size {size[1:]} with crop_mode 'center' is not supported; "
                                   "use crop_mode 'squash'.")
        c = size[0]
        mean = torch.tensor([float(v) for v in data_config["mean"]]).view(1, -1, 1, 1)
        std = torch.tensor([float(v) for v in data_config["std"]]).view(1, -1, 1, 1)
        if mean.shape[1] != c or std.shape[1] != c:
            raise TimmAdapterError(f"mean/std have {mean.shape[1]}/{std.shape[1]} entries for {c} channels.")
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.register_buffer("resize_h", torch.empty(0), persistent=False)
        self.register_buffer("resize_w", torch.empty(0), persistent=False)
        self._hw: Optional[Tuple[int, int]] = None

    @property
    def data_config(self) -> Dict[str, Any]:
        c, h, w = self.input_size
        return {"input_size": (c, h, w), "interpolation": self.interpolation,
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
        top = int(round((new[0] - sh) / 2.0))
        left = int(round((new[1] - sw) / 2.0))
        return new, (top, left)

    @torch.no_grad()
    def set_input_size(self, h: int, w: int) -> "TimmPreprocess":
        """Precompute the resize/crop matrices for ``h x w`` inputs (done on first use; call it before tracing or
        exporting so that the matrices are constants of the graph)."""
        (nh, nw), (top, left) = self._plan(int(h), int(w))
        _, sh, sw = self.input_size
        rh = _resize_matrix(int(h), nh, self.interpolation)[top:top + sh]
        rw = _resize_matrix(int(w), nw, self.interpolation)[left:left + sw]
        dev, dtype = self.mean.device, self.mean.dtype
        self.resize_h = rh.to(dev, dtype)
        self.resize_w = rw.to(dev, dtype)
        self._hw = (int(h), int(w))
        return self

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # shapes were checked when the matrices were made; keep the graph free of checks
            if self._hw is None:
                raise RuntimeError("TimmPreprocess.set_input_size(h, w) must be called before tracing/exporting.")
        else:
            c_model = self.input_size[0]
            if x.dim() != 4:
                raise TimmInputError(f"Expected images (N, C, H, W), got shape {tuple(x.shape)}.")
            c = int(x.shape[1])
            if c not in (1, c_model):
                raise TimmInputError(
                    f"The backbone takes {c_model}-channel images (or 1-channel, broadcast); got {c} channels (shape "
                    f"{tuple(x.shape)}). For channels-last data use x.permute(0, 3, 1, 2).")
            hw = (int(x.shape[-2]), int(x.shape[-1]))
            if self._hw != hw:
                self.set_input_size(*hw)
        y = torch.matmul(torch.matmul(self.resize_h.to(x.dtype), x), self.resize_w.to(x.dtype).t())
        return (y - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # (N, 1, S, S) broadcasts to C channels


def _unit_range(x: Tensor, value_range: Union[str, Tuple[float, float], None]) -> Tensor:
    if value_range is None:
        return x
    if value_range == "auto":
        return InputNormalizer.fit(x)(x)
    if isinstance(value_range, (tuple, list)) and len(value_range) == 2:
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise TimmAdapterError(f"value_range must be (low, high) with high > low, got {value_range}.")
        return (x - lo) / (hi - lo)
    raise TimmAdapterError(f"value_range must be 'auto', (low, high) or None, got {value_range!r}.")


def _as_images(images: Any) -> Tensor:
    x, _ = as_tensor(images)
    x = x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise TimmInputError(f"timm backbones take images (N, H, W) or (N, C, H, W); got shape {tuple(x.shape)}.")
    return x


def prepare_images(images: Any, data_config: Union[Mapping[str, Any], nn.Module],
                   value_range: Union[str, Tuple[float, float], None] = "auto") -> Tensor:
    """Raw images -> the backbone's input, with timm's data config (see :class:`TimmPreprocess`).

    Args:
        images: (N, H, W) grayscale or (N, C, H, W), array or tensor.
        data_config: ``timm.data.resolve_model_data_config(model)``, or the model / a :class:`TimmEncoder`.
        value_range: ``"auto"`` (one scalar scale: ``[min(lo, 0), hi]`` of the data to [0, 1], as DCSS does),
            ``(low, high)`` (e.g. ``(0, 16)`` for digits, ``(0, 255)`` for uint8), or ``None`` (already [0, 1]).

    Returns:
        (N, C, S, S) float32, normalised with the model's mean/std.

    Example:
        >>> x = prepare_images(load_digits().images, backbone, value_range=(0, 16))    # (1797, 3, 160, 160)
    """
    if isinstance(data_config, TimmEncoder):
        pre = data_config.preprocess
    else:
        cfg = timm.data.resolve_model_data_config(data_config) if isinstance(data_config, nn.Module) else data_config
        pre = TimmPreprocess(cfg)
    x = _as_images(images)
    with torch.no_grad():
        return pre(_unit_range(x, value_range).to(pre.mean.device))


# ---------------------------------------------------------------------------------------------------- encoder
class TimmEncoder(nn.Module):
    """A timm backbone as an encoder: pooled features ``(B, F)``, optionally projected to ``latent_dim``.

    Args:
        model_name: timm model name (see :func:`create_backbone`).
        pretrained_file: local weights file; ``None``: random weights.
        latent_dim: add ``Linear(F, latent_dim)``; ``None``: output the features.
        pretrained: hub weights (refused without ``pretrained_file``: no network).
        img_size: input size override (int or (H, W)).
        in_chans: backbone input channels.
        strict_input: :meth:`forward` refuses inputs whose (C, H, W) differ from the data config's input_size.
        **timm_kwargs: passed to ``timm.create_model``.

    Attributes:
        backbone, num_features (F), data_config, preprocess (:class:`TimmPreprocess`), proj.

    Shapes:
        forward: backbone-ready ``x`` (B, C, S, S) -> (B, latent_dim or F).
        encode_images: images in [0, 1] (B, 1 or C, h, w) -> the same (preprocessing included).

    Example:
        >>> enc = TimmEncoder("test_resnet", img_size=32)
        >>> enc.encode_images(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 96])
    """

    def __init__(self, model_name: str, pretrained_file: Optional[Union[str, os.PathLike]] = None,
                 latent_dim: Optional[int] = None, *, pretrained: bool = False,
                 img_size: Optional[Union[int, Sequence[int]]] = None, in_chans: int = 3, strict_input: bool = True,
                 checkpoint_filter: bool = True, **timm_kwargs: Any) -> None:
        super().__init__()
        self.model_name = resolve_model_name(model_name)
        self.backbone = create_backbone(self.model_name, pretrained_file, pretrained=pretrained, img_size=img_size,
                                        in_chans=in_chans, checkpoint_filter=checkpoint_filter, **timm_kwargs)
        self.weights_report: Optional[Dict[str, Any]] = getattr(self.backbone, "dcss_weights_report", None)
        self.num_features = _pooled_width(self.backbone)
        self.data_config: Dict[str, Any] = dict(timm.data.resolve_model_data_config(self.backbone))
        self.input_size: Tuple[int, int, int] = tuple(int(s) for s in self.data_config["input_size"])  # type: ignore
        self.preprocess = TimmPreprocess(self.data_config)
        self.strict_input = bool(strict_input)
        self.latent_dim = None if latent_dim is None else int(latent_dim)
        self.proj: nn.Module = nn.Linear(self.num_features, self.latent_dim) if self.latent_dim else nn.Identity()
        json_kwargs = {k: v for k, v in timm_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))}
        self.spec: Dict[str, Any] = {
            "model_name": self.model_name,
            "img_size": list(_pair(img_size)) if img_size is not None else None,
            "in_chans": int(in_chans),
            "timm_kwargs": json_kwargs,
            "pretrained_file": os.fspath(pretrained_file) if pretrained_file is not None else None,
            "weights_sha256": (self.weights_report or {}).get("sha256"),
            "num_features": self.num_features,
            "input_size": list(self.input_size),
        }

    def check_input(self, x: Tensor) -> None:
        """Raise :class:`TimmInputError` unless ``x`` is (B, C, H, W) with the data config's (C, H, W)."""
        if torch.jit.is_tracing():
            return
        if x.dim() != 4:
            raise TimmInputError(f"{self.model_name} takes images (B, C, H, W); got shape {tuple(x.shape)}.")
        if not self.strict_input:
            return
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
        """Pooled backbone features (B, F) of backbone-ready input."""
        self.check_input(x)
        f = self.backbone(x)
        if not torch.jit.is_tracing() and (f.dim() != 2 or int(f.shape[1]) != self.num_features):
            raise TimmAdapterError(f"{self.model_name} returned shape {tuple(f.shape)}, expected (B, "
                                   f"{self.num_features}) pooled features.")
        return f

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.features(x))

    def encode_images(self, images01: Tensor) -> Tensor:
        """Images in [0, 1] (B, 1 or C, h, w) -> preprocessing -> :meth:`forward`."""
        return self.forward(self.preprocess(images01))

    def prepare(self, images: Any, value_range: Union[str, Tuple[float, float], None] = "auto") -> Tensor:
        """Raw images -> backbone-ready input (:func:`prepare_images` with this model's data config)."""
        return prepare_images(images, self, value_range)

    def timm_transform(self) -> Callable:
        """timm's own eval transform for PIL images: ``timm.data.create_transform(**data_config)``."""
        return timm.data.create_transform(**self.data_config)


def _data_fingerprint(x: Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def _module_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def extract_features(encoder: TimmEncoder, images: Any, batch_size: int = 256,
                     value_range: Union[str, Tuple[float, float], None] = None,
                     device: Union[str, torch.device, None] = None,
                     cache_file: Optional[Union[str, os.PathLike]] = None) -> Tensor:
    """Pooled backbone features of all images, once: eval mode, ``no_grad``, in batches.

    Args:
        encoder: a :class:`TimmEncoder` (its projection is not applied).
        images: (N, H, W) or (N, C, H, W).
        batch_size: images per forward pass.
        value_range: how to bring ``images`` to [0, 1] (see :func:`prepare_images`); ``None``: already there.
        device: where the backbone runs (default: where it is).
        cache_file: a ``.npy`` path. If it exists with a matching fingerprint (data, model name, weights,
            preprocessing) in ``<cache_file>.json``, it is read instead of running the backbone; otherwise the
            features are computed and written there (atomically).

    Returns:
        (N, F) float32 on the CPU.

    Example:
        >>> feats = extract_features(TimmEncoder("resnet18", "resnet18.pth"), x, value_range=(0, 16))
    """
    x = _unit_range(_as_images(images), value_range)
    meta: Dict[str, Any] = {}
    if cache_file is not None:
        meta = {"format": _FEATURE_CACHE_FORMAT, "model_name": encoder.model_name, "n": int(len(x)),
                "num_features": encoder.num_features, "data_sha256": _data_fingerprint(x),
                "weights_sha256": _module_fingerprint(encoder.backbone),
                "data_config": json.loads(json.dumps(encoder.preprocess.data_config))}
        cache_file = os.fspath(cache_file)
        sidecar = cache_file + ".json"
        if os.path.exists(cache_file) and os.path.exists(sidecar):
            try:
                with open(sidecar, "r", encoding="utf-8") as fh:
                    stored = json.load(fh)
                if stored == meta:
                    feats = np.load(cache_file, allow_pickle=False)
                    if feats.shape == (len(x), encoder.num_features):
                        log.info("features read from %s", cache_file)
                        return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
                log.info("feature cache %s is for other data or weights; recomputing", cache_file)
            except (OSError, ValueError) as exc:
                log.info("feature cache %s unreadable (%s); recomputing", cache_file, exc)
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
        atomic_write_json(cache_file + ".json", meta)
    return feats


# ---------------------------------------------------------------------------------------------------- block groups
def block_groups(backbone: nn.Module) -> Tuple[List[List[str]], List[str]]:
    """The backbone's parameter names in timm's coarse layer groups, first to last, and the head-side names.

    Uses ``backbone.group_matcher(coarse=True)`` (timm's own grouping: stem, then one group per stage/block, a
    final norm merged into the last block); without one, the top-level children with parameters. Trailing groups
    under the classifier's module (e.g. ConvNeXt's ``head.norm``) are returned separately as head-side names.

    Returns:
        (groups, head_names)

    Example:
        >>> groups, head = block_groups(timm.create_model("resnet18", num_classes=0))
        >>> groups[-1][0], len(groups)             # ('layer4.0.conv1.weight', 5)
    """
    if callable(getattr(backbone, "group_matcher", None)):
        grouped = group_parameters(backbone, backbone.group_matcher(coarse=True))
        groups = [list(grouped[k]) for k in sorted(grouped)]
    else:
        groups = [[n for n, _ in child.named_parameters(prefix=name)] for name, child in backbone.named_children()]
        groups = [g for g in groups if g]
    roots = {c.split(".")[0] for c in _classifier_roots(backbone)}
    head: List[str] = []
    while groups and roots and all(n.split(".")[0] in roots for n in groups[-1]):
        head = groups.pop() + head
    return groups, head


def last_block_parameter_names(backbone: nn.Module, n: int = 1) -> List[str]:
    """Names of the parameters in the last ``n`` block groups (plus head-side ones) of :func:`block_groups`:
    ResNet ``layer4`` for ``n=1``, ViT ``blocks[-n:]`` and the final norm.

    Example:
        >>> last_block_parameter_names(timm.create_model("vit_tiny_patch16_224", num_classes=0), 2)[0]
        'blocks.10.norm1.weight'
    """
    groups, head = block_groups(backbone)
    if n < 1:
        raise TimmAdapterError(f"train_blocks must be >= 1, got {n}.")
    if n >= len(groups):
        raise TimmAdapterError(f"train_blocks={n} but {type(backbone).__name__} has {len(groups)} block groups "
                               f"(the first is the stem); use finetune='full' to train everything.")
    return [name for g in groups[-n:] for name in g] + head


# ---------------------------------------------------------------------------------------------------- autoencoders
def _in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, size: int) -> Tensor:
    """``fn(x)``, in chunks of ``size`` rows when no gradient is recorded (inference: the estimator encodes up to
    4096 samples at once, too many images for a backbone's activations); one call while training or tracing."""
    if torch.is_grad_enabled() or torch.jit.is_tracing() or size <= 0 or len(x) <= size:
        return fn(x)
    return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), size)])


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class TimmFeatureAutoencoder(nn.Module):
    """DCSS autoencoder around a timm backbone that (partly) trains: ``u = proj(LN(backbone(preprocess(x))))``.

    **It reconstructs backbone features, not pixels**: ``decode(u)`` is an MLP back to the feature width F and
    :meth:`reconstruction_target` is ``LN(features)`` computed with ``no_grad`` by the backbone as it was when
    this module was built (``target="initial"``: a frozen copy, the anchor that keeps fine-tuning from drifting
    away from the pretrained features, or collapsing to a constant that is trivially reconstructed) or by the
    current backbone (``target="current"``, no copy). ``LN`` is a parameter-free LayerNorm over the F features,
    so that the reconstruction scale does not depend on the backbone.

    Training modes (``finetune``):

    * ``"last"``: only the last ``train_blocks`` block groups of timm's coarse ``group_matcher`` (ResNet
      ``layer4``; ViT ``blocks[-n:]`` + final norm) have ``requires_grad=True``; frozen parts stay in eval mode.
    * ``"full"``: every backbone parameter trains, at ``backbone_lr_scale`` (default 0.1) times the estimator's
      learning rate, and with timm's layer-wise decay ``layer_decay`` (0.75; ``None`` turns it off).
    * ``"frozen"``: no backbone parameter trains but features are recomputed every step (the slow way to run a
      frozen backbone; :func:`fit_timm` caches them instead; kept for comparison).

    The estimator builds its Adam optimizers from :meth:`param_groups` (per-group learning rates, e.g. the
    layer-decay ``lr_scale`` multiplied in) when the estimator supports it.

    Args:
        encoder: a :class:`TimmEncoder` without ``latent_dim``, or a model name (``encoder_kwargs`` build it).
        latent_dim: d, must equal the DCSS config's ``latent_dim``.
        finetune: ``"last"``, ``"full"`` or ``"frozen"``.
        train_blocks: block groups trained in ``"last"`` mode.
        decoder_hidden_dims: hidden widths of the decoder MLP (d -> ... -> F).
        backbone_lr_scale: backbone lr / estimator lr; default 1.0 for ``"last"``, 0.1 for ``"full"``.
        layer_decay: layer-wise lr decay for ``"full"`` (timm's ``param_groups_layer_decay``).
        target: ``"initial"`` or ``"current"`` (see above).

    Shapes:
        encode: ``x`` (B, 1 or C, h, w) in [0, 1] -> ``u`` (B, d); decode: ``u`` -> (B, F);
        reconstruction_target: ``x`` -> (B, F).

    Example:
        >>> ae = TimmFeatureAutoencoder("test_vit", latent_dim=10, finetune="last", img_size=32)
        >>> model = DCSS(n_clusters=10, autoencoder_module=ae, latent_dim=10).fit(load_digits().images[:300])
    """

    def __init__(self, encoder: Union[TimmEncoder, str], latent_dim: int = 10, *, finetune: str = "last",
                 train_blocks: int = 1, decoder_hidden_dims: Sequence[int] = (256,),
                 backbone_lr_scale: Optional[float] = None, layer_decay: Optional[float] = 0.75,
                 target: str = "initial", **encoder_kwargs: Any) -> None:
        super().__init__()
        if finetune not in ("last", "full", "frozen"):
            raise TimmAdapterError(f"finetune must be 'last', 'full' or 'frozen', got {finetune!r}.")
        if target not in ("initial", "current"):
            raise TimmAdapterError(f"target must be 'initial' or 'current', got {target!r}.")
        if isinstance(encoder, str):
            encoder = TimmEncoder(encoder, **encoder_kwargs)
        elif encoder_kwargs:
            raise TimmAdapterError(f"encoder_kwargs {sorted(encoder_kwargs)} only apply when encoder is a name.")
        if encoder.latent_dim is not None:
            raise TimmAdapterError("Pass a TimmEncoder without latent_dim: TimmFeatureAutoencoder owns the projection.")
        self.encoder = encoder
        self.latent_dim = int(latent_dim)
        self.num_features = encoder.num_features
        self.finetune = finetune
        self.train_blocks = int(train_blocks)
        self.backbone_lr_scale = float(backbone_lr_scale if backbone_lr_scale is not None
                                       else (0.1 if finetune == "full" else 1.0))
        self.layer_decay = None if layer_decay is None else float(layer_decay)
        self.target = target
        self.decoder_hidden_dims = tuple(int(h) for h in decoder_hidden_dims)
        self.feature_norm = nn.LayerNorm(self.num_features, elementwise_affine=False)
        self.proj = nn.Linear(self.num_features, self.latent_dim)
        self.decoder = _mlp([self.latent_dim, *self.decoder_hidden_dims, self.num_features])
        backbone = self.encoder.backbone
        if finetune == "full":
            trainable = {n for n, _ in backbone.named_parameters()}
        elif finetune == "last":
            trainable = set(last_block_parameter_names(backbone, self.train_blocks))
        else:
            trainable = set()
        for name, p in backbone.named_parameters():
            p.requires_grad_(name in trainable)
        self.trainable_backbone_parameters: List[str] = [n for n, _ in backbone.named_parameters() if n in trainable]
        self.param_group_calls = 0
        self.inference_batch_size = 256  # images per backbone pass when encoding without gradients
        self._target_backbone: Optional[nn.Module] = None  # not registered: not in state_dict, parameters, exports
        if target == "initial" and finetune != "frozen":
            snap = copy.deepcopy(backbone).eval()
            for p in snap.parameters():
                p.requires_grad_(False)
            object.__setattr__(self, "_target_backbone", snap)
        self.train(self.training)

    # ---- modes
    def train(self, mode: bool = True) -> "TimmFeatureAutoencoder":
        """As ``nn.Module.train``, but backbone modules whose parameters are all frozen stay in eval mode (their
        BatchNorm statistics and dropout do not change)."""
        super().train(mode)
        if mode:
            for _, m in self.encoder.backbone.named_modules():
                params = list(m.parameters())
                if params and not any(p.requires_grad for p in params):
                    m.eval()
        return self

    def release_target(self) -> None:
        """Drop the frozen copy of the initial backbone (after training; it is only needed for the loss)."""
        object.__setattr__(self, "_target_backbone", None)

    # ---- the autoencoder interface
    def features(self, x: Tensor) -> Tensor:
        """``LN(backbone(preprocess(x)))`` (B, F) with gradients where parameters train."""
        return self.feature_norm(self.encoder.features(self.encoder.preprocess(x)))

    def encode(self, x: Tensor) -> Tensor:
        return _in_chunks(lambda xb: self.proj(self.features(xb)), x, self.inference_batch_size)

    def decode(self, u: Tensor) -> Tensor:
        return self.decoder(u)

    @torch.no_grad()
    def reconstruction_target(self, x: Tensor) -> Tensor:
        """``LN(features)`` (B, F) of the initial (or current) backbone, eval mode, no gradient."""
        pre = self.encoder.preprocess(x)
        snap = self._target_backbone
        if snap is not None:
            ref = next(snap.parameters(), None)
            if ref is not None and (ref.device != pre.device or ref.dtype != pre.dtype):
                snap.to(pre.device, pre.dtype)
            f = snap(pre)
        else:
            bb = self.encoder.backbone
            was = bb.training
            bb.eval()
            try:
                f = bb(pre)
            finally:
                if was:
                    bb.train(True)
                    self.train(True)
        return self.feature_norm(f)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Returns ``(u, features_hat)``."""
        u = self.encode(x)
        return u, self.decode(u)

    # ---- optimizer groups
    def param_groups(self, base_lr: float) -> List[Dict[str, Any]]:
        """torch optimizer parameter groups with their own ``lr``: projection + decoder at ``base_lr``; the trainable
        backbone at ``base_lr * backbone_lr_scale``, times timm's layer-decay ``lr_scale`` per layer in ``"full"``
        mode. Every trainable parameter appears exactly once; frozen ones are left out.

        Example:
            >>> opt = torch.optim.Adam(ae.param_groups(1e-3), lr=1e-3)
            >>> [(g["name"], g["lr"]) for g in opt.param_groups]
        """
        from timm.optim import param_groups_layer_decay

        self.param_group_calls += 1
        own = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
        own += [p for p in self.encoder.proj.parameters() if p.requires_grad]
        groups: List[Dict[str, Any]] = [{"params": own, "lr": float(base_lr), "name": "projection+decoder",
                                         "lr_scale": 1.0}]
        backbone = self.encoder.backbone
        trainable = [p for p in backbone.parameters() if p.requires_grad]
        if not trainable:
            return groups
        bb_lr = float(base_lr) * self.backbone_lr_scale
        if self.finetune == "full" and self.layer_decay is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layered = param_groups_layer_decay(backbone, weight_decay=0.0, layer_decay=self.layer_decay)
            by_scale: Dict[float, List[Tensor]] = {}
            for g in layered:  # timm splits decay / no-decay per layer; with weight_decay 0 only the scale matters
                by_scale.setdefault(float(g["lr_scale"]), []).extend(g["params"])
            for i, scale in enumerate(sorted(by_scale)):
                groups.append({"params": by_scale[scale], "lr": bb_lr * scale, "lr_scale": scale,
                               "name": f"backbone.layer_scale_{i}"})
        else:
            groups.append({"params": trainable, "lr": bb_lr, "lr_scale": 1.0, "name": "backbone"})
        return groups


class FrozenFeaturePipeline(nn.Module):
    """The frozen mode's encoder for prediction and export: images -> timm preprocessing -> backbone (eval) ->
    the feature standardisation DCSS learnt -> DCSS's MLP encoder. ``decode`` is the MLP decoder (standardised
    features). Nothing here trains.

    Args:
        encoder: the :class:`TimmEncoder` the features came from.
        autoencoder: the DCSS model's autoencoder over features (``encode``/``decode``).
        feature_offset, feature_scale: the DCSS feature normaliser (F,).

    Shapes:
        encode: ``x`` (B, 1 or C, h, w) in [0, 1] -> ``u`` (B, d).

    Example:
        >>> pipe = FrozenFeaturePipeline(enc, feat_model.autoencoder, feat_model.normalizer.offset,
        ...                              feat_model.normalizer.scale)
        >>> pipe.encode(torch.rand(4, 1, 8, 8)).shape               # (4, d)
    """

    def __init__(self, encoder: TimmEncoder, autoencoder: nn.Module, feature_offset: Tensor,
                 feature_scale: Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.autoencoder = autoencoder
        self.register_buffer("feature_offset", feature_offset.detach().clone().float().reshape(-1))
        self.register_buffer("feature_scale", feature_scale.detach().clone().float().reshape(-1))
        self.inference_batch_size = 256  # images per backbone pass (the estimator encodes up to 4096 at once)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenFeaturePipeline":
        return super().train(False)  # always inference

    def features(self, x: Tensor) -> Tensor:
        return self.encoder.features(self.encoder.preprocess(x))

    def encode(self, x: Tensor) -> Tensor:
        return _in_chunks(lambda xb: self.autoencoder.encode((self.features(xb) - self.feature_offset)
                                                             / self.feature_scale), x, self.inference_batch_size)

    def decode(self, u: Tensor) -> Tensor:
        return self.autoencoder.decode(u)


# ---------------------------------------------------------------------------------------------------- fitting
def _dcss_kwargs(cfg: DCSSConfig) -> Dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in ("n_clusters", "preset")}


def _compose_frozen(feat_model: DCSS, encoder: TimmEncoder, x: Tensor, spec: Dict[str, Any]) -> DCSS:
    """A DCSS model on raw images whose encoder is backbone -> feature normaliser -> the feature model's encoder."""
    assert feat_model.autoencoder is not None and feat_model.normalizer is not None
    pipe = FrozenFeaturePipeline(encoder, feat_model.autoencoder, feat_model.normalizer.offset,
                                 feat_model.normalizer.scale)
    cfg = feat_model.config
    model = DCSS(n_clusters=cfg.n_clusters, preset=cfg.preset, device=feat_model.device, verbose=feat_model.verbose,
                 autoencoder_module=pipe, **_dcss_kwargs(cfg))
    model.config = cfg
    model.autoencoder = pipe
    model.centers = feat_model.centers
    model.head = feat_model.head
    model.normalizer = InputNormalizer.fit(x)
    model.input_shape = tuple(x.shape[1:])
    model._ae_spec = {"kind": "custom", "class": type(pipe).__qualname__, "latent_dim": cfg.latent_dim,
                      "timm": spec}
    model.history_ = dict(feat_model.history_)
    model.labels_ = feat_model.labels_
    dev = next(feat_model.head.parameters()).device  # type: ignore[union-attr]
    pipe.to(dev)
    pipe.encoder.preprocess.set_input_size(*model.input_shape[-2:])
    return model


def fit_timm(x: Any, n_clusters: int, model_name: str, mode: str = "frozen",
             pretrained_file: Optional[Union[str, os.PathLike]] = None, *, pretrained: bool = False,
             img_size: Optional[Union[int, Sequence[int]]] = None, train_blocks: int = 1,
             backbone_lr_scale: Optional[float] = None, layer_decay: Optional[float] = 0.75,
             decoder_hidden_dims: Sequence[int] = (256,), target: str = "initial", feature_batch_size: int = 256,
             cache_file: Optional[Union[str, os.PathLike]] = None, preset: str = "default", device: str = "auto",
             verbose: bool = False, callback: Optional[Callable[[str, int, Dict[str, float]], None]] = None,
             checkpoint_path: Optional[Union[str, os.PathLike]] = None, resume: bool = False,
             timm_kwargs: Optional[Dict[str, Any]] = None, **dcss_kwargs: Any) -> Tuple[DCSS, Dict[str, Any]]:
    """Cluster images with DCSS on a timm backbone, in one of three modes.

    Args:
        x: images (N, H, W) or (N, C, H, W), any value range (scaled by one scalar to [0, 1], as DCSS does).
        n_clusters: K.
        model_name: a timm model name (``timm:`` prefix allowed).
        mode: ``"frozen"`` (features once, DCSS on vectors), ``"last"`` (last block group(s) train) or ``"full"``.
        pretrained_file: local weights for the backbone; ``pretrained=True`` without it is refused (no network).
        img_size: backbone input size override (default: the model's data config).
        train_blocks, backbone_lr_scale, layer_decay, decoder_hidden_dims, target: see
            :class:`TimmFeatureAutoencoder` (``"last"``/``"full"``).
        feature_batch_size: images per backbone pass when extracting features (``"frozen"``).
        cache_file: ``.npy`` feature cache (``"frozen"``), see :func:`extract_features`.
        preset, device, verbose, callback, checkpoint_path, resume: as :class:`DCSS` / :meth:`DCSS.fit`.
        timm_kwargs: extra ``timm.create_model`` arguments.
        **dcss_kwargs: DCSS config fields (``latent_dim``, epochs, ``batch_size``, ``lr``, ``seed``, ...).

    Returns:
        ``(model, extras)``: ``model`` is a fitted :class:`DCSS` on the raw images (``predict``, ``save``,
        :func:`export_timm_assigner` work on images; the backbone is inside its encoder); ``extras`` holds
        ``mode``, ``encoder``, ``time_s`` and, for ``"frozen"``, ``features`` (N, F) and ``feature_model`` (the
        DCSS on features), for ``"last"``/``"full"`` ``autoencoder`` and ``lr_groups_applied``.

    Example:
        >>> x = load_digits().images[:300]
        >>> model, extras = fit_timm(x, 10, "test_resnet", mode="frozen", img_size=32, seed=0)   # fast path
        >>> model, extras = fit_timm(x, 10, "test_resnet", mode="last", img_size=32, phase2_epochs=5)
        >>> model, extras = fit_timm(x, 10, "test_vit", mode="full", img_size=32, layer_decay=0.75)
    """
    if mode not in MODES:
        raise TimmAdapterError(f"mode must be one of {MODES}, got {mode!r}.")
    images = _as_images(x)
    cfg = DCSSConfig(n_clusters=n_clusters, preset=preset, **dcss_kwargs)
    validate_features(images, cfg.n_clusters, "images")  # before any backbone work
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    encoder = TimmEncoder(model_name, pretrained_file, pretrained=pretrained, img_size=img_size,
                          **(timm_kwargs or {}))
    c = int(images.shape[1])
    if c not in (1, encoder.input_size[0]):
        raise TimmInputError(f"{encoder.model_name} takes {encoder.input_size[0]}-channel images (1-channel images are "
                             f"broadcast); got {c} channels (shape {tuple(images.shape)}).")
    encoder.preprocess.set_input_size(*images.shape[-2:])
    spec: Dict[str, Any] = {"version": SPEC_VERSION, "mode": mode, **encoder.spec, "latent_dim": cfg.latent_dim}
    times = {"build_backbone": time.perf_counter() - t0}
    extras: Dict[str, Any] = {"mode": mode, "encoder": encoder, "time_s": times}
    if mode == "frozen":
        from dcss_plugin.estimator import _resolve_device

        dev = _resolve_device(device)
        unit = InputNormalizer.fit(images)(images)
        t0 = time.perf_counter()
        feats = extract_features(encoder, unit, batch_size=feature_batch_size, device=dev, cache_file=cache_file)
        times["feature_extraction"] = time.perf_counter() - t0
        feat_model = DCSS(n_clusters=n_clusters, preset=preset, device=device, verbose=verbose, **dcss_kwargs)
        t0 = time.perf_counter()
        feat_model.fit(feats, callback=callback, checkpoint_path=checkpoint_path, resume=resume)
        times["dcss_fit"] = time.perf_counter() - t0
        spec["mlp_hidden_dims"] = list(feat_model.config.mlp_hidden_dims)
        spec["mlp_linear_path"] = bool(feat_model.config.mlp_linear_path)
        model = _compose_frozen(feat_model, encoder, images, spec)
        model.history_.setdefault("time_s", {})
        model.history_["time_s"] = {**model.history_["time_s"], "feature_extraction": times["feature_extraction"]}
        extras.update(features=feats, feature_model=feat_model)
    else:
        ae = TimmFeatureAutoencoder(encoder, cfg.latent_dim, finetune=mode, train_blocks=train_blocks,
                                    decoder_hidden_dims=decoder_hidden_dims, backbone_lr_scale=backbone_lr_scale,
                                    layer_decay=layer_decay, target=target)
        spec.update(train_blocks=ae.train_blocks, decoder_hidden_dims=list(ae.decoder_hidden_dims),
                    backbone_lr_scale=ae.backbone_lr_scale, layer_decay=ae.layer_decay, target=target)
        model = DCSS(n_clusters=n_clusters, preset=preset, device=device, verbose=verbose, autoencoder_module=ae,
                     **dcss_kwargs)
        t0 = time.perf_counter()
        model.fit(images, callback=callback, checkpoint_path=checkpoint_path, resume=resume)
        times["dcss_fit"] = time.perf_counter() - t0
        ae.release_target()
        applied = ae.param_group_calls > 0
        if not applied and (ae.backbone_lr_scale != 1.0 or (mode == "full" and ae.layer_decay is not None)):
            warnings.warn("This DCSS estimator builds its optimizers from autoencoder_module.parameters() and ignores "
                          "TimmFeatureAutoencoder.param_groups(): the backbone trained at the full learning rate "
                          f"(backbone_lr_scale={ae.backbone_lr_scale}, layer_decay={ae.layer_decay} not applied).",
                          RuntimeWarning, stacklevel=2)
        model._ae_spec = {**model._ae_spec, "timm": spec}
        extras.update(autoencoder=ae, lr_groups_applied=applied)
    model.history_["timm"] = {k: v for k, v in spec.items()}
    return model, extras


# ---------------------------------------------------------------------------------------------------- persistence
def _module_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """An untrained module of the architecture recorded in a checkpoint's ``autoencoder_spec["timm"]``."""
    if int(spec.get("version", 0)) != SPEC_VERSION:
        raise TimmAdapterError(f"timm spec version {spec.get('version')} is not supported (expected {SPEC_VERSION}).")
    encoder = TimmEncoder(spec["model_name"], None, img_size=spec.get("img_size"),
                          in_chans=int(spec.get("in_chans", 3)), **dict(spec.get("timm_kwargs") or {}))
    d = int(spec["latent_dim"])
    if spec["mode"] == "frozen":
        f = encoder.num_features
        mlp = MLPAutoencoder(f, latent_dim=d, hidden_dims=tuple(spec["mlp_hidden_dims"]),
                             linear_path=bool(spec.get("mlp_linear_path", False)))
        return FrozenFeaturePipeline(encoder, mlp, torch.zeros(f), torch.ones(f))
    return TimmFeatureAutoencoder(encoder, d, finetune=spec["mode"], train_blocks=int(spec.get("train_blocks", 1)),
                                  decoder_hidden_dims=tuple(spec.get("decoder_hidden_dims", (256,))),
                                  backbone_lr_scale=spec.get("backbone_lr_scale"),
                                  layer_decay=spec.get("layer_decay"), target="current")


def timm_spec_of(path: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The timm spec of a DCSS checkpoint (run directory or file), or ``None`` for a checkpoint without a backbone."""
    state = load_checkpoint(path, CHECKPOINT_FORMAT)
    spec = (state.get("autoencoder_spec") or {}).get("timm")
    return dict(spec) if spec else None


def load_timm_dcss(path: Union[str, os.PathLike], device: str = "cpu") -> DCSS:
    """Load a DCSS checkpoint written by a timm-backed model (:func:`fit_timm` + ``model.save``): the backbone
    architecture is rebuilt from the checkpoint's spec (no weights file needed; the weights are in the checkpoint).

    Example:
        >>> model.save("runs/timm/checkpoint.pt")
        >>> load_timm_dcss("runs/timm").predict(x[:5])
    """
    spec = timm_spec_of(path)
    if spec is None:
        raise TimmAdapterError(f"{os.fspath(path)!r} has no timm backbone; load it with DCSS.load().")
    module = _module_from_spec(spec)
    model = DCSS.load(path, device=device, autoencoder_module=module)
    if isinstance(module, TimmFeatureAutoencoder):
        module.release_target()
    module.encoder.preprocess.set_input_size(*model.input_shape[-2:])  # type: ignore[index]
    return model


# ---------------------------------------------------------------------------------------------------- export
def export_timm_assigner(model: Union[DCSS, "TimmDCSS", str, os.PathLike], path: Union[str, os.PathLike],
                         check_data: Any = None, fp16: bool = False, **export_kwargs: Any) -> str:
    """One ONNX file ``x -> (q, label, confidence)`` with the backbone inside (frozen or fine-tuned models).

    The graph is :func:`dcss_plugin.export.onnx.export_assigner`'s full graph, unchanged: ``(x - offset) / scale``
    (the image scaling learnt at fit), the model's encoder (timm preprocessing -> backbone -> [feature
    standardisation ->] DCSS encoder), MNet. The export is verified with onnxruntime against PyTorch (``q`` within
    1e-4) on ``check_data``, by default 64 seeded random images in the training value range.

    Args:
        model: a fitted model from :func:`fit_timm`, a :class:`TimmDCSS`, or a checkpoint / run directory.
        path: the ``.onnx`` file.
        check_data: images to verify on (needed for ``fp16``).
        fp16: float16 weights (refused unless every label of ``check_data`` stays).

    Example:
        >>> export_timm_assigner(model, "assigner.onnx", check_data=x[:64])
        >>> OnnxClusterAssigner("assigner.onnx")(x[:5]).label
    """
    from dcss_plugin.export.onnx import export_assigner

    if isinstance(model, TimmDCSS):
        dcss = model.model_
        if dcss is None:
            raise RuntimeError("This TimmDCSS is not fitted yet.")
    elif isinstance(model, DCSS):
        dcss = model
    else:
        dcss = load_timm_dcss(model)
    ae = dcss.autoencoder
    if not isinstance(ae, (TimmFeatureAutoencoder, FrozenFeaturePipeline)) or dcss.input_shape is None:
        raise TimmAdapterError("export_timm_assigner needs a fitted timm-backed DCSS model (from fit_timm); use "
                               "dcss_plugin.export.onnx.export_assigner for other models.")
    shape = tuple(int(s) for s in dcss.input_shape)
    ae.encoder.preprocess.set_input_size(*shape[-2:])
    if check_data is None:
        if fp16:
            raise TimmAdapterError("fp16 export needs check_data (real images) to verify that no label changes.")
        assert dcss.normalizer is not None
        g = torch.Generator().manual_seed(0)
        unit = torch.rand((64, *shape), generator=g)
        check_data = (unit * dcss.normalizer.scale + dcss.normalizer.offset).numpy().astype(np.float32)
    else:
        check_data = _as_images(check_data).numpy()
    with warnings.catch_warnings():  # the tracer's notes on timm's shape arithmetic are not the user's business
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return export_assigner(dcss, path, full=True, fp16=fp16, check_data=check_data, **export_kwargs)


# ---------------------------------------------------------------------------------------------------- estimator
class TimmDCSS:
    """scikit-learn-style DCSS on a timm backbone; hides the three modes of :func:`fit_timm`.

    Args:
        n_clusters: K.
        model_name: timm model name.
        mode: ``"frozen"``, ``"last"`` or ``"full"``.
        pretrained_file: local weights file (no network: hub weights cannot be fetched).
        **kwargs: anything :func:`fit_timm` takes (``img_size``, ``train_blocks``, ``layer_decay``, DCSS config
            fields such as ``latent_dim``, epochs, ``seed``).

    Attributes (after ``fit``):
        model_: the fitted :class:`DCSS` on images; labels_; extras_ (see :func:`fit_timm`).

    Example:
        >>> est = TimmDCSS(10, "resnet18", mode="last", pretrained_file="resnet18.pth").fit(x)
        >>> est.predict(x[:5]); est.export_onnx("assigner.onnx", check_data=x[:64])
    """

    def __init__(self, n_clusters: int = 10, model_name: str = "resnet18", mode: str = "frozen",
                 pretrained_file: Optional[Union[str, os.PathLike]] = None, **kwargs: Any) -> None:
        if mode not in MODES:
            raise TimmAdapterError(f"mode must be one of {MODES}, got {mode!r}.")
        self.n_clusters = n_clusters
        self.model_name = model_name
        self.mode = mode
        self.pretrained_file = pretrained_file
        self.kwargs = kwargs
        self.model_: Optional[DCSS] = None
        self.extras_: Dict[str, Any] = {}
        self.labels_: Optional[np.ndarray] = None

    def fit(self, X: Any, y: Any = None, **fit_kwargs: Any) -> "TimmDCSS":
        """Fit on images ``X``; ``y`` is ignored."""
        self.model_, self.extras_ = fit_timm(X, self.n_clusters, self.model_name, self.mode, self.pretrained_file,
                                             **{**self.kwargs, **fit_kwargs})
        self.labels_ = self.model_.labels_
        return self

    def _fitted(self) -> DCSS:
        if self.model_ is None:
            raise RuntimeError("This TimmDCSS is not fitted yet; call fit() or TimmDCSS.load() first.")
        return self.model_

    def predict(self, X: Any) -> np.ndarray:
        return self._fitted().predict(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        return self._fitted().predict_proba(X)

    def transform(self, X: Any) -> np.ndarray:
        return self._fitted().transform(X)

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        return self.fit(X).labels_  # type: ignore[return-value]

    def save(self, path: Union[str, os.PathLike]) -> None:
        self._fitted().save(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: str = "cpu") -> "TimmDCSS":
        model = load_timm_dcss(path, device=device)
        spec = model._ae_spec["timm"]
        est = cls(model.config.n_clusters, spec["model_name"], spec["mode"])
        est.model_ = model
        return est

    def export_onnx(self, path: Union[str, os.PathLike], check_data: Any = None, **kwargs: Any) -> str:
        return export_timm_assigner(self, path, check_data=check_data, **kwargs)


# ---------------------------------------------------------------------------------------------------- CLI
def fit_from_cli_args(args: Any, x: Any, overrides: Optional[Dict[str, Any]] = None,
                      callback: Optional[Callable[[str, int, Dict[str, float]], None]] = None,
                      checkpoint_path: Optional[Union[str, os.PathLike]] = None, resume: bool = False) -> DCSS:
    """``dcss fit ... --backbone timm:NAME [--pretrained-file W] [--finetune frozen|last|full]``: the fitted model.

    Reads ``args.backbone``, ``args.pretrained_file``, ``args.pretrained``, ``args.finetune``, ``args.img_size``,
    ``args.train_blocks``, ``args.backbone_lr_scale``, ``args.layer_decay``, ``args.feature_batch_size`` (missing
    ones take their defaults) and the usual ``clusters``, ``preset``, ``device``, ``quiet``, ``seed``, ``out``;
    ``overrides`` are the DCSS config fields ``cmd_fit`` collected. In frozen mode the features are cached in
    ``<out>/features.npy``.
    """
    backbone = str(getattr(args, "backbone"))
    if not backbone.startswith("timm:"):
        raise TimmAdapterError(f"--backbone must be timm:MODEL_NAME (e.g. timm:resnet18), got {backbone!r}.")
    mode = getattr(args, "finetune", None) or "frozen"
    out = getattr(args, "out", None)
    kwargs = dict(overrides or {})
    kwargs.setdefault("seed", getattr(args, "seed", 0))
    optional = {"img_size": "img_size", "train_blocks": "train_blocks", "backbone_lr_scale": "backbone_lr_scale",
                "layer_decay": "layer_decay", "feature_batch_size": "feature_batch_size"}
    for attr, key in optional.items():
        val = getattr(args, attr, None)
        if val is not None:
            kwargs[key] = val
    model, _ = fit_timm(x, int(args.clusters), backbone, mode, getattr(args, "pretrained_file", None),
                        pretrained=bool(getattr(args, "pretrained", False)),
                        preset=getattr(args, "preset", "default"), device=getattr(args, "device", "auto"),
                        verbose=not bool(getattr(args, "quiet", False)), callback=callback,
                        checkpoint_path=checkpoint_path, resume=resume,
                        cache_file=os.path.join(out, "features.npy") if (out and mode == "frozen") else None,
                        **kwargs)
    return model
