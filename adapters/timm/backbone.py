"""timm backbones for DCSS: model names, ``create_model`` with pooled features, local weights.

Weights come from a local file only (there is no network). Reading and loading are timm's own:
``timm.models.load_checkpoint`` reads ``.safetensors`` or a ``torch.load(weights_only=True)`` checkpoint (wrappers
such as ``{"state_dict": ...}``, EMA weights, DDP / ``torch.compile`` key prefixes) and calls our ``filter_fn``
before ``model.load_state_dict(strict=True)``. The filter adds only what timm lacks for a pooled-feature model
(``num_classes=0``): dropping the classifier the model has no place for, the architecture's own converter
(``checkpoint_filter_fn``, the one timm applies to its pretrained weights: original formats, ViT position
embeddings resampled to another ``img_size``) when the file does not fit as it is, and a key-by-key report
naming missing, unexpected and mis-shaped tensors (timm's pretrained path loads non-strictly once the classifier
is dropped, so a file of another model would go unnoticed).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import timm.models
from torch import Tensor, nn

from .errors import PretrainedWeightsError, TimmAdapterError, UnknownModelError

__all__ = ["suggest_model_names", "resolve_model_name", "create_backbone", "load_backbone_weights", "pooled_width",
           "classifier_roots"]

log = logging.getLogger("dcss_plugin")
PathLike = Union[str, os.PathLike]

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
    return close or [m for m in names if arch and arch in m][:n]


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
    name = name[len("timm:"):] if name.startswith("timm:") else name
    if name.startswith(("hf-hub:", "hf_hub:")):
        raise PretrainedWeightsError(
            f"{name!r} names a model on the Hugging Face hub; there is no network here. Use the timm architecture "
            "name (e.g. 'resnet50') and pass the downloaded weights file as pretrained_file.")
    if not timm.is_model(name):
        raise UnknownModelError(name, suggest_model_names(name))
    return name


# ---------------------------------------------------------------------------------------------------- weights
def classifier_roots(model: nn.Module) -> Tuple[str, ...]:
    """Module names of the classifier in timm's ``pretrained_cfg`` (``("fc",)``, ``("head",)``, ...)."""
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not cls:
        return ()
    return tuple(cls) if isinstance(cls, (tuple, list)) else (cls,)


def _diff(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> List[str]:
    """What keeps ``state`` from loading strictly into a model with state dict ``reference``, in words."""
    def listed(keys: Sequence[Any], limit: int = 6) -> str:
        return f"[{', '.join(map(str, keys[:limit]))}{', ...' if len(keys) > limit else ''}]"

    missing = [k for k in reference if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in reference]
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(reference[k].shape)}" for k in state
              if k in reference and tuple(state[k].shape) != tuple(reference[k].shape)]
    parts = [f"{len(missing)} missing key(s) {listed(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected key(s) {listed(unexpected)}"] if unexpected else []
    parts += [f"{len(shapes)} shape mismatch(es) {listed(shapes, 4)}"] if shapes else []
    return parts


def _file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class _Prepare:
    """timm's ``filter_fn``: the architecture's converter, classifier dropped, strict key/shape check, a report."""

    def __init__(self, path: str, convert: bool) -> None:
        self.path, self.convert = path, convert
        self.report: Dict[str, Any] = {"tensors": None, "ignored": [], "filtered": False}

    def _drop_classifier(self, state: Dict[str, Tensor], model: nn.Module, keys: Any) -> List[str]:
        roots = classifier_roots(model)
        dropped = [k for k in state if k not in keys and any(k == r or k.startswith(r + ".") for r in roots)]
        for k in dropped:
            del state[k]
        return dropped

    def __call__(self, raw: Mapping[str, Any], model: nn.Module) -> Dict[str, Tensor]:
        odd = [k for k, v in raw.items() if not isinstance(v, Tensor)]
        if not raw or odd:
            raise PretrainedWeightsError(
                f"{self.path!r} holds no state dict of tensors (non-tensor entries: {odd[:5]}); it looks like a "
                "training checkpoint, not model weights. Save model.state_dict() instead.")
        reference = model.state_dict()
        state = dict(raw)
        ignored = self._drop_classifier(state, model, reference)
        problems = _diff(state, reference)
        fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if problems and self.convert and callable(fn):
            try:
                try:
                    converted = dict(fn(dict(raw), model))
                except TypeError:  # converters of one argument
                    converted = dict(fn(dict(raw)))
                ignored2 = self._drop_classifier(converted, model, reference)
                if not _diff(converted, reference):
                    state, ignored, problems = converted, ignored2, []
                    self.report["filtered"] = True
            except Exception as exc:  # noqa: BLE001 - the converter is a best effort; report the file as it is
                log.info("timm checkpoint_filter_fn of %s failed: %s", type(model).__name__, exc)
        if problems:
            arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
            raise PretrainedWeightsError(
                f"The weights in {self.path!r} do not match timm model {arch!r}: {'; '.join(problems)}. Is the file "
                "for another architecture, width or image size? Pass the weights of exactly this model"
                + (" (timm's checkpoint converter for this architecture was tried too)." if callable(fn) else "."))
        self.report.update(ignored=ignored, tensors=len(state))
        return state


def load_backbone_weights(model: nn.Module, path: PathLike, checkpoint_filter: bool = True) -> Dict[str, Any]:
    """Load a local weights file into a timm ``model`` (created with ``num_classes=0``), strictly.

    Classifier weights (``pretrained_cfg["classifier"]``, e.g. ``fc.*``, ``head.*``) are dropped; every other
    tensor must match by name and shape. When the file does not match as it is and ``checkpoint_filter`` is on,
    the architecture's own timm converter is tried first.

    Returns:
        a report: ``file``, ``sha256``, ``tensors`` (loaded; None for a ``.npz`` of original JAX weights, which
        timm hands to the model's own ``load_pretrained``), ``ignored`` (dropped classifier keys), ``filtered``
        (timm's converter was needed).

    Raises:
        FileNotFoundError: no such file.
        PretrainedWeightsError: unreadable, pickled objects, or keys / shapes that do not fit (all named).

    Example:
        >>> model = timm.create_model("resnet18", num_classes=0)
        >>> load_backbone_weights(model, "resnet18.safetensors")["tensors"]     # fc.* dropped
        120
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file not found: {path!r} (pretrained weights are read from a local file "
                                "only; nothing is downloaded).")
    prepare = _Prepare(path, checkpoint_filter)
    try:
        timm.models.load_checkpoint(model, path, use_ema=True, strict=True, filter_fn=prepare, weights_only=True)
    except PretrainedWeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise PretrainedWeightsError(
            f"{path!r} could not be read as a weights file ({type(exc).__name__}: {exc}). Accepted: .safetensors "
            "(with the safetensors package), or a torch.save'd state dict readable with torch.load(weights_only=True) "
            "(tensors only, no pickled objects).") from exc
    return {"file": path, "sha256": _file_sha256(path), **prepare.report}


# ---------------------------------------------------------------------------------------------------- models
def as_pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise TimmAdapterError(f"img_size must be an int or (H, W), got {size!r}.")
        return int(size[0]), int(size[1])
    return int(size), int(size)


def create_backbone(model_name: str, pretrained_file: Optional[PathLike] = None, *, pretrained: bool = False,
                    img_size: Optional[Union[int, Sequence[int]]] = None, in_chans: int = 3,
                    checkpoint_filter: bool = True, **timm_kwargs: Any) -> nn.Module:
    """A timm model returning pooled features ``(B, F)``: ``timm.create_model(name, num_classes=0)``.

    Args:
        model_name: a name from ``timm.list_models()`` (an optional ``timm:`` prefix is stripped).
        pretrained_file: local weights (``.safetensors`` / ``.pth``), see :func:`load_backbone_weights`; the
            report is kept as ``model.dcss_weights_report``.
        pretrained: hub weights; refused without ``pretrained_file`` (no network), ignored with it.
        img_size: input size override (int or (H, W)); the data config follows it. Fixed-size models (ViT) are
            built for it (``img_size=``), others only get their data config changed.
        in_chans: input channels of the backbone.
        checkpoint_filter: let timm's converter for the architecture adapt a weights file that does not match.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Example:
        >>> create_backbone("test_vit", img_size=32)(torch.randn(2, 3, 32, 32)).shape
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
        hw = as_pair(img_size)
        default = timm.models.get_pretrained_cfg(name)
        if default is not None and getattr(default, "fixed_input_size", False):
            kwargs.setdefault("img_size", hw)
        kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}),
                                            "input_size": (int(in_chans), *hw)}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, RuntimeError) as exc:
        raise TimmAdapterError(f"timm could not build {name!r} with {sorted(kwargs)}: {exc}") from exc
    if pretrained_file is not None:
        model.dcss_weights_report = load_backbone_weights(model, pretrained_file, checkpoint_filter)
    return model


def pooled_width(model: nn.Module) -> int:
    """F, the width of ``model(x)`` for ``num_classes=0``: ``head_hidden_size`` where timm has one (pre-logits
    layers such as MobileNetV3's conv head), else ``num_features``.

    Example:
        >>> pooled_width(create_backbone("test_resnet"))
        96
    """
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not width:
        raise TimmAdapterError(f"{type(model).__name__} has no num_features; is it a timm classification model?")
    return int(width)
