"""Cluster images with DCSS on a timm backbone in one call (:func:`fit_timm`), and the ``dcss fit --backbone``
entry point (:func:`fit_from_cli_args`). Both return a fitted :class:`~dcss_plugin.DCSS` on the raw images."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from sklearn.base import clone
from torch import Tensor

from dcss_plugin import DCSS, DCSSConfig, Normalize
from dcss_plugin.data import validate_features
from dcss_plugin.distributed import resolve_device

from .encoder import TimmEncoder
from .errors import TimmAdapterError, TimmInputError
from .features import extract_features
from .finetune import timm_autoencoder
from .frozen import frozen_model
from .preprocess import as_images
from .specs import SPEC_VERSION

__all__ = ["MODES", "fit_timm", "fit_from_cli_args"]

MODES = ("frozen", "last", "full")
Callback = Callable[[str, int, Dict[str, float]], None]
PathLike = Union[str, os.PathLike]


def _fit_frozen(images: Tensor, encoder: TimmEncoder, est: DCSS, feature_batch_size: int,
                cache_file: Optional[PathLike], fit_kwargs: Dict[str, Any], times: Dict[str, float]) -> DCSS:
    """Features once, DCSS on them, then the fitted estimator on images built from the parts (same labels)."""
    normalize = Normalize.fit(images)
    dev = resolve_device(est.device)
    t0 = time.perf_counter()
    feats = extract_features(encoder, normalize(images), batch_size=feature_batch_size, device=dev,
                             cache_file=cache_file)
    times["feature_extraction"] = time.perf_counter() - t0
    feature_est = clone(est)
    t0 = time.perf_counter()
    feature_est.fit(feats, **fit_kwargs)
    times["dcss_fit"] = time.perf_counter() - t0
    spec = {"kind": "timm-frozen", "version": SPEC_VERSION, "backbone": dict(encoder.spec),
            "features": dict(feature_est.model_.spec)}
    model = frozen_model(feature_est.model_, encoder, normalize, images.shape[1:], spec)
    with torch.no_grad():  # u and q of the training data from the cached features: no backbone pass
        u = model.encoder.from_features(feats.to(dev))
        q = model.head(u)
    est.model_, est.labels_, est.config_ = model, feature_est.labels_, feature_est.config_
    est.input_shape_ = tuple(int(s) for s in images.shape[1:])
    history = dict(feature_est.history_)
    history["time_s"] = {**history.get("time_s", {}), "feature_extraction": times["feature_extraction"]}
    history["timm"] = {"features": feats.numpy(), "u": u.cpu().numpy(), "q": q.cpu().numpy()}
    est.history_ = history
    return est


def _fit_finetuned(images: Tensor, encoder: TimmEncoder, est: DCSS, mode: str, latent_dim: int,
                   finetune_kwargs: Dict[str, Any], fit_kwargs: Dict[str, Any], times: Dict[str, float]) -> DCSS:
    """The timm encoder / decoder pair trained by the estimator's recipe (the backbone partly or wholly)."""
    enc, dec = timm_autoencoder(encoder, latent_dim, finetune=mode, **finetune_kwargs)
    est.set_params(encoder=enc, decoder=dec)
    t0 = time.perf_counter()
    est.fit(images, **fit_kwargs)
    times["dcss_fit"] = time.perf_counter() - t0
    dec.release_target()
    est.model_.spec = {**enc.model_spec, "input_shape": list(est.input_shape_)}
    est.history_["timm"] = {"trainable_backbone_parameters": list(enc.trainable_backbone_parameters)}
    return est


def fit_timm(x: Any, n_clusters: int, model_name: str, mode: str = "frozen",
             pretrained_file: Optional[PathLike] = None, *, pretrained: bool = False,
             img_size: Optional[Union[int, Sequence[int]]] = None, train_blocks: int = 1,
             backbone_lr_scale: Optional[float] = None, layer_decay: Optional[float] = 0.75,
             decoder_hidden_dims: Sequence[int] = (256,), target: str = "initial", feature_batch_size: int = 256,
             cache_file: Optional[PathLike] = None, preset: str = "default", device: str = "auto",
             verbose: bool = False, callback: Optional[Callback] = None, checkpoint_path: Optional[PathLike] = None,
             resume: bool = False, timm_kwargs: Optional[Dict[str, Any]] = None, **options: Any) -> DCSS:
    """Cluster images with DCSS on a timm backbone, in one of three modes.

    Args:
        x: images (N, H, W) or (N, C, H, W), any value range (scaled by one scalar to [0, 1], as DCSS does).
        n_clusters: K.
        model_name: a timm model name (``timm:`` prefix allowed).
        mode: ``"frozen"`` (features once, DCSS on the vectors), ``"last"`` (the last block group(s) train) or
            ``"full"`` (everything trains, layer-wise decay).
        pretrained_file: local weights for the backbone; ``pretrained=True`` without it is refused (no network).
        img_size: backbone input size override (default: the model's data config).
        train_blocks, backbone_lr_scale, layer_decay, decoder_hidden_dims, target: ``"last"``/``"full"``, see
            :func:`~dcss_plugin.adapters.timm.timm_autoencoder`.
        feature_batch_size: images per backbone pass when extracting features (``"frozen"``).
        cache_file: ``.npy`` feature cache (``"frozen"``), see :func:`extract_features`.
        preset, device, verbose, callback, checkpoint_path, resume: as :class:`DCSS` / :meth:`DCSS.fit`.
        timm_kwargs: extra ``timm.create_model`` arguments.
        **options: DCSS options (``latent_dim``, epochs, ``batch_size``, ``lr``, ``seed``, ...).

    Returns:
        a fitted :class:`DCSS` on the raw images (``predict``, ``save``, ``DCSS.load``, the full ONNX export; the
        backbone is inside ``model_.encoder``). ``history_["timm"]`` holds, for ``"frozen"``, the cached
        ``features`` (N, F) and the training data's ``u`` (N, d) and ``q`` (N, K) computed from them (``labels_``
        come from the fit on the features: ``q.argmax(1)``), so nothing needs the backbone again.

    Example:
        >>> x = load_digits().images[:300]
        >>> est = fit_timm(x, 10, "test_resnet", mode="frozen", img_size=32, seed=0)          # the fast path
        >>> est = fit_timm(x, 10, "test_vit", mode="full", img_size=32, layer_decay=0.75)
        >>> est.predict(x[:5]); est.save("model.pt"); DCSS.load("model.pt").predict(x[:5])
    """
    if mode not in MODES:
        raise TimmAdapterError(f"mode must be one of {MODES}, got {mode!r}.")
    images = as_images(x)
    est = DCSS(n_clusters, preset, device=device, verbose=verbose, **options)  # unknown options: TypeError
    cfg = DCSSConfig(n_clusters=n_clusters, preset=preset, **options)  # wrong types / ranges: before any work
    validate_features(images, cfg.n_clusters, "images")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    encoder = TimmEncoder(model_name, pretrained_file, pretrained=pretrained, img_size=img_size,
                          **(timm_kwargs or {}))
    c = int(images.shape[1])
    if c not in (1, encoder.input_size[0]):
        raise TimmInputError(f"{encoder.model_name} takes {encoder.input_size[0]}-channel images (1-channel images "
                             f"are broadcast); got {c} channels (shape {tuple(images.shape)}).")
    encoder.preprocess.set_input_size(*images.shape[-2:])
    times = {"build_backbone": time.perf_counter() - t0}
    fit_kwargs = {"callback": callback, "checkpoint_path": checkpoint_path, "resume": resume}
    if mode == "frozen":
        est = _fit_frozen(images, encoder, est, feature_batch_size, cache_file, fit_kwargs, times)
    else:
        finetune_kwargs = {"train_blocks": train_blocks, "backbone_lr_scale": backbone_lr_scale,
                           "layer_decay": layer_decay, "decoder_hidden_dims": decoder_hidden_dims, "target": target}
        est = _fit_finetuned(images, encoder, est, mode, cfg.resolved(images=True).latent_dim, finetune_kwargs,
                             fit_kwargs, times)
    est.history_["timm"].update(mode=mode, spec=dict(est.model_.spec), time_s=times,
                                weights_report=encoder.weights_report)
    return est


def fit_from_cli_args(args: Any, x: Any, overrides: Optional[Dict[str, Any]] = None,
                      callback: Optional[Callback] = None, checkpoint_path: Optional[PathLike] = None,
                      resume: bool = False) -> DCSS:
    """``dcss fit ... --backbone timm:NAME [--pretrained-file W] [--finetune frozen|last|full]``: a fitted DCSS.

    Reads ``args.backbone``, ``pretrained_file``, ``pretrained``, ``finetune``, ``img_size``, ``train_blocks``,
    ``backbone_lr_scale``, ``layer_decay``, ``feature_batch_size`` (missing ones take their defaults) and the
    usual ``clusters``, ``preset``, ``device``, ``quiet``, ``seed``, ``out``; ``overrides`` are the DCSS options
    the command collected. In frozen mode the features are cached in ``<out>/features.npy``.

    Example:
        >>> est = fit_from_cli_args(argparse.Namespace(backbone="timm:resnet18", clusters=10, out="runs/r18"), x)
    """
    backbone = str(getattr(args, "backbone"))
    if not backbone.startswith("timm:"):
        raise TimmAdapterError(f"--backbone must be timm:MODEL_NAME (e.g. timm:resnet18), got {backbone!r}.")
    mode = getattr(args, "finetune", None) or "frozen"
    out = getattr(args, "out", None)
    kwargs = dict(overrides or {})
    kwargs.setdefault("seed", getattr(args, "seed", 0))
    for key in ("img_size", "train_blocks", "backbone_lr_scale", "layer_decay", "feature_batch_size"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    return fit_timm(x, int(args.clusters), backbone, mode, getattr(args, "pretrained_file", None),
                    pretrained=bool(getattr(args, "pretrained", False)), preset=getattr(args, "preset", "default"),
                    device=getattr(args, "device", "auto"), verbose=not bool(getattr(args, "quiet", False)),
                    callback=callback, checkpoint_path=checkpoint_path, resume=resume,
                    cache_file=os.path.join(out, "features.npy") if (out and mode == "frozen") else None, **kwargs)
