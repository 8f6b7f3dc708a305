"""DCSSModel: input normalisation, encoder (+ decoder), cluster centers and MNet head(s) as one ``nn.Module``.

This is what is trained (by the :class:`~dcss_plugin.DCSS` estimator, the adapters, or a user's own loop), saved,
loaded and exported to ONNX. The training pieces in :mod:`dcss_plugin.training` take batches already normalised
by :meth:`DCSSModel.normalize`; :meth:`DCSSModel.forward` and :meth:`DCSSModel.encode` take raw inputs.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .centers import ClusterCenters
from .heads import DCSSHead

__all__ = ["DCSSModel", "Normalize", "MODEL_FORMAT", "READABLE_FORMATS"]

MODEL_FORMAT = "dcss-plugin/model-v1"
_OLD_FORMAT = "dcss-plugin/checkpoint-v1"  # written by the estimator before the model object existed
READABLE_FORMATS = (MODEL_FORMAT, _OLD_FORMAT)  # what DCSSModel.load and DCSS.load read


class Normalize(nn.Module):
    """``(x - offset) / scale`` with ``offset``/``scale`` buffers broadcast to the sample shape (identity if None).

    ``offset`` and ``scale`` are saved with the model and written into the ONNX graph of a full export, so that a
    service applies exactly the normalisation training used.

    Example:
        >>> norm = Normalize(torch.zeros(1, 1, 1), torch.full((1, 1, 1), 16.0))   # digits pixels 0..16 -> 0..1
        >>> norm(torch.full((2, 1, 8, 8), 16.0)).max()
        tensor(1.)
    """

    offset: Tensor
    scale: Tensor

    def __init__(self, offset: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> None:
        super().__init__()
        if (offset is None) != (scale is None):
            raise ValueError("Give both offset and scale, or neither (identity).")
        self.register_buffer("offset", torch.zeros(()) if offset is None else torch.as_tensor(offset).float().clone())
        self.register_buffer("scale", torch.ones(()) if scale is None else torch.as_tensor(scale).float().clone())
        if not bool((self.scale > 0).all()):
            raise ValueError("Every entry of scale must be > 0.")

    @classmethod
    def fit(cls, x: Tensor) -> "Normalize":
        """Statistics of training data ``x``: vectors (N, F) are standardised per feature (a constant feature is
        left unscaled; a tiny but real spread, below 1e-8, is scaled up like any other); images (N, C, H, W) share
        one offset ``min(x.min(), 0)`` and one scale (the range, however small; 1e-8 for all-zero images)."""
        if x.dim() == 2:
            scale = x.std(0, unbiased=False)
            keep = scale > 1e-8
            if not bool(keep.all()):  # a spread <= 1e-8 is real when the feature's values differ (float32 data)
                keep |= (scale > 0) & (x.amax(0) > x.amin(0))
            return cls(x.mean(0), torch.where(keep, scale, torch.ones_like(scale)))
        lo, hi = float(x.min()), float(x.max())
        shape = (1,) * (x.dim() - 1)
        span = hi - min(lo, 0.0)
        return cls(torch.full(shape, min(lo, 0.0)), torch.full(shape, span if span > 1e-30 else 1e-8))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.offset.to(x.dtype)) / self.scale.to(x.dtype)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        # the buffers' shapes depend on the data: take the saved ones
        for name in ("offset", "scale"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)


class DCSSModel(nn.Module):
    """The DCSS model: ``x -> normalize -> encoder -> u -> head -> q``, with centers ``mu`` in u-space.

    Args:
        encoder: any module mapping a normalised batch (B, ...) to ``u`` (B, d): the reference
            :mod:`dcss_plugin.nets`, a timm backbone, a user's network.
        n_clusters: K.
        latent_dim: d, the width of ``u``.
        decoder: optional module ``u -> x_hat`` (pretraining and Phase 1 need it; Phase 2 and inference do not).
        normalize: a :class:`Normalize` (or None for the identity); ``Normalize.fit(x)`` gives the estimator's.
        m: fuzzifier of the memberships ``p`` (paper 1.5).
        num_heads: MNet heads (Phase 2 may train several and keep one: :meth:`select_head`).
        head_hidden_dims: MNet hidden widths (paper 128, 128).
        input_shape: shape of one raw sample (recorded in ``spec``; a full ONNX export needs it).
        spec: plain, JSON-like description that rebuilds ``encoder``/``decoder`` on :meth:`load` (set by the
            estimator and adapters; a custom encoder is passed again to ``load``).

    Shapes:
        ``x`` (B, *input_shape) raw; ``u`` (B, d); ``p``, ``q`` (B, K).

    Example:
        >>> from dcss_plugin.nets import conv_autoencoder
        >>> enc, dec = conv_autoencoder((1, 8, 8), latent_dim=10)
        >>> model = DCSSModel(enc, n_clusters=10, latent_dim=10, decoder=dec, normalize=Normalize.fit(x))
        >>> q = model(x)                     # (N, 10) soft assignments
        >>> labels = model.predict(x)        # (N,) argmax q
        >>> model.save("model.pt"); same = DCSSModel.load("model.pt")
    """

    head_index: Tensor

    def __init__(self, encoder: nn.Module, n_clusters: int, latent_dim: int, *, decoder: Optional[nn.Module] = None,
                 normalize: Optional[Normalize] = None, m: float = 1.5, num_heads: int = 1,
                 head_hidden_dims: Sequence[int] = (128, 128), input_shape: Optional[Sequence[int]] = None,
                 spec: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module mapping x to u, got {type(encoder).__name__}.")
        if decoder is not None and not isinstance(decoder, nn.Module):
            raise TypeError(f"decoder must be an nn.Module mapping u to x_hat (or None), got {type(decoder).__name__}.")
        if int(num_heads) < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads}.")
        self.n_clusters = int(n_clusters)
        self.latent_dim = int(latent_dim)
        self.head_hidden_dims = tuple(int(h) for h in head_hidden_dims)
        self.normalize = normalize if normalize is not None else Normalize()
        self.encoder = encoder
        self.decoder = decoder
        self.centers = ClusterCenters(self.n_clusters, self.latent_dim, m=m)
        self.heads = nn.ModuleList(self._new_head() for _ in range(int(num_heads)))
        self.register_buffer("head_index", torch.zeros((), dtype=torch.long))
        self.spec: Dict[str, Any] = dict(spec or self.default_spec(encoder, decoder))
        if input_shape is not None:
            self.spec["input_shape"] = [int(s) for s in input_shape]

    @property
    def input_shape(self) -> Optional[tuple]:
        """Shape of one raw sample, when known (``input_shape=`` or the spec): what a full ONNX export takes."""
        shape = self.spec.get("input_shape")
        return tuple(int(s) for s in shape) if shape is not None else None

    @staticmethod
    def default_spec(encoder: nn.Module, decoder: Optional[nn.Module]) -> Dict[str, Any]:
        """The reference networks describe themselves (``encoder.spec()``); anything else is "custom"."""
        from .nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

        pairs = ((MLPEncoder, MLPDecoder), (ConvEncoder, ConvDecoder))
        if any(type(encoder) is e and (decoder is None or type(decoder) is d) for e, d in pairs):
            return encoder.spec()  # type: ignore[operator]
        return {"kind": "custom", "class": type(encoder).__qualname__}

    def _new_head(self) -> DCSSHead:
        return DCSSHead(self.latent_dim, self.n_clusters, self.head_hidden_dims)

    # ------------------------------------------------------------------ the forward paths
    def encode(self, x: Tensor) -> Tensor:
        """``u`` (B, d) of raw ``x``."""
        return self.encoder(self.normalize(x))

    def memberships(self, x: Tensor) -> Tensor:
        """Fuzzy memberships ``p`` (B, K) of raw ``x`` to the centers."""
        return self.centers(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        """Soft assignments ``q`` (B, K) of raw ``x`` by the selected head."""
        return self.head(self.encode(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        """Cluster ``argmax q`` (N,) of raw ``x``, in eval mode and in chunks of ``batch_size`` rows."""
        was = self.training
        self.eval()
        try:
            return torch.cat([self(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
        finally:
            self.train(was)

    def reconstruction_target(self, xn: Tensor) -> Tensor:
        """What the decoder reconstructs from a normalised batch: ``xn`` (flattened to the decoder's output shape by
        the losses), or the decoder's own ``reconstruction_target(xn)`` when it defines one (timm features)."""
        fn = getattr(self.decoder, "reconstruction_target", None)
        return fn(xn) if callable(fn) else xn

    # ------------------------------------------------------------------ heads
    @property
    def head(self) -> DCSSHead:
        """The selected MNet head."""
        return self.heads[int(self.head_index)]  # type: ignore[return-value]

    def select_head(self, index: int) -> None:
        """Make head ``index`` the one :meth:`forward` uses."""
        if not 0 <= int(index) < len(self.heads):
            raise ValueError(f"head index must be in [0, {len(self.heads)}), got {index}.")
        self.head_index.fill_(int(index))

    def reset_heads(self, num_heads: Optional[int] = None) -> None:
        """Fresh heads (``num_heads`` of them, default as many as now), initialised from torch's global RNG."""
        device = self.head_index.device
        n = len(self.heads) if num_heads is None else int(num_heads)
        if n < 1:
            raise ValueError(f"num_heads must be at least 1, got {n}.")
        self.heads = nn.ModuleList(self._new_head() for _ in range(n)).to(device)
        self.head_index.zero_()

    def keep_selected_head(self) -> None:
        """Drop every head but the selected one (what is saved and exported after training)."""
        self.heads = nn.ModuleList([self.head])
        self.head_index.zero_()

    # ------------------------------------------------------------------ persistence
    def config(self) -> Dict[str, Any]:
        """Plain description of the model (no tensors): enough, with the state dict, to rebuild it."""
        return {"n_clusters": self.n_clusters, "latent_dim": self.latent_dim, "m": self.centers.m,
                "num_heads": len(self.heads), "head_hidden_dims": list(self.head_hidden_dims),
                "has_decoder": self.decoder is not None, "spec": self.spec}

    def checkpoint(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The dict :meth:`save` writes: format tag, version, :meth:`config`, CPU state dict, and ``extra``."""
        from . import __version__

        return {"format": MODEL_FORMAT, "version": __version__, "model": self.config(),
                "state": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}, **(extra or {})}

    def save(self, path: str | os.PathLike, extra: Optional[Dict[str, Any]] = None) -> None:
        """Write tensors and plain config atomically to ``path`` (read back by :meth:`load`, never unpickled)."""
        from .io import atomic_torch_save

        atomic_torch_save(self.checkpoint(extra), path)

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: Optional[nn.Module] = None, decoder: Optional[nn.Module] = None,
             device: str | torch.device = "cpu") -> "DCSSModel":
        """A model from :meth:`save` (or an estimator checkpoint, old or new), in eval mode on ``device``.

        The reference networks (``spec`` kinds ``"mlp"``, ``"conv"``) and the adapters' registered kinds are
        rebuilt from the file; a model with a custom encoder needs an instance of the same architecture passed
        as ``encoder`` (and ``decoder``), whose weights are then loaded from the file.
        """
        from .io import load_checkpoint_any

        state = load_checkpoint_any(path, READABLE_FORMATS)
        return cls.from_checkpoint(state, encoder=encoder, decoder=decoder, source=os.fspath(path)).to(device).eval()

    @classmethod
    def from_checkpoint(cls, state: Dict[str, Any], encoder: Optional[nn.Module] = None,
                        decoder: Optional[nn.Module] = None, source: str = "checkpoint") -> "DCSSModel":
        """Rebuild from a checkpoint dict (see :meth:`load`)."""
        if state.get("format") == _OLD_FORMAT:
            state = _from_old_checkpoint(state)
        try:
            cfg = state["model"]
            spec = dict(cfg["spec"])
            if encoder is None and spec.get("kind") == "custom":
                raise ValueError(f"it was trained with a custom encoder ({spec.get('class')}); pass an instance "
                                 "of the same architecture as encoder= (and decoder=).")
            sd = state["state"]
            _check_config_against_tensors(cls, cfg, spec, sd, encoder, decoder)
            normalize = Normalize(sd["normalize.offset"], sd["normalize.scale"]) if "normalize.offset" in sd else None
            model = _assemble(cls, cfg, spec, encoder, decoder, normalize)
            if model.decoder is None:
                sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
            model.load_state_dict(sd)
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"{source!r} is not a usable DCSS model: {exc}") from exc
        return model


def _assemble(cls: type, cfg: Dict[str, Any], spec: Dict[str, Any], encoder: Optional[nn.Module],
              decoder: Optional[nn.Module], normalize: Optional[Normalize]) -> "DCSSModel":
    """The model a checkpoint's config describes (networks rebuilt from ``spec`` unless given), untrained."""
    from .registry import build_networks

    if encoder is None:
        encoder, built = build_networks(spec)
        decoder = decoder if decoder is not None else (built if cfg.get("has_decoder") else None)
    return cls(encoder, int(cfg["n_clusters"]), int(cfg["latent_dim"]), decoder=decoder, normalize=normalize,
               m=float(cfg["m"]), num_heads=int(cfg["num_heads"]), head_hidden_dims=tuple(cfg["head_hidden_dims"]),
               spec=spec)


def _check_config_against_tensors(cls: type, cfg: Dict[str, Any], spec: Dict[str, Any], sd: Dict[str, Any],
                                  encoder: Optional[nn.Module], decoder: Optional[nn.Module]) -> None:
    """Refuse a config that does not describe the saved tensors, before any real module is built: a forged or
    damaged file (e.g. ``hidden_dims=[20000, 20000]`` beside small tensors) must not make the loader allocate
    gigabytes. The model the config describes is built on the ``meta`` device (shapes only, no memory) and its
    parameter shapes are compared with the file's; a builder that cannot run on ``meta`` is only bounded by size."""
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError("its 'state' is not a dict of tensors.")
    limit = len(sd) + 8  # a network has at most about one saved tensor per configured layer or head
    lists = {f"spec.{k}": v for k, v in spec.items() if isinstance(v, (list, tuple))}
    lists["head_hidden_dims"] = cfg["head_hidden_dims"]
    for name, value in list(lists.items()) + [("num_heads", [None] * int(cfg["num_heads"]))]:
        if len(value) > limit:
            raise ValueError(f"its config lists {len(value)} entries in {name}, more than its {len(sd)} tensors "
                             "can describe (a damaged or forged file).")
    keep_decoder = decoder is not None or (encoder is None and bool(cfg.get("has_decoder")))
    saved = {k: tuple(v.shape) for k, v in sd.items()
             if not k.startswith("normalize.") and (keep_decoder or not k.startswith("decoder."))}
    try:
        identity = Normalize()
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            meta = _assemble(cls, cfg, spec, encoder, decoder, identity)
        expected = {k: tuple(v.shape) for k, v in meta.state_dict().items() if not k.startswith("normalize.")}
    except Exception:  # noqa: BLE001 - a builder that needs real tensors: the real build and strict load check it
        return
    wrong = [f"{k} is {tuple(expected[k])} by the config but {saved[k]} in the file"
             for k in expected if k in saved and expected[k] != saved[k]]
    if wrong:
        raise ValueError(f"its config does not match its tensors ({'; '.join(wrong[:3])}"
                         f"{'; ...' if len(wrong) > 3 else ''}); refused before building the networks.")
    numel = lambda shapes: sum(math.prod(s) for s in shapes.values())  # noqa: E731
    want, have = numel(expected), numel(saved)
    if want > 2 * have + 1_000_000:
        missing = [k for k in expected if k not in saved][:3]
        raise ValueError(f"its config describes {want:,} parameters but the file holds {have:,} (missing e.g. "
                         f"{', '.join(missing)}); refused before building the networks.")


def _from_old_checkpoint(old: Dict[str, Any]) -> Dict[str, Any]:
    """An estimator checkpoint of format checkpoint-v1 as a model checkpoint (same tensors, new key names)."""
    spec = dict(old["autoencoder_spec"])
    if spec.get("linear_path"):
        raise ValueError("it uses the MLP linear path, an option removed in this version; load it with "
                         "dcss-plugin 0.1.0.")
    cfg = old["config"]
    sd: Dict[str, Tensor] = {}
    inner = "layers." if spec.get("kind") == "mlp" else ""
    for key, value in old["autoencoder"].items():
        part, rest = key.split(".", 1)
        sd[f"{part}.{inner}{rest}" if part in ("encoder", "decoder") else key] = value
    for key, value in old["centers"].items():
        sd[f"centers.{key}"] = value
    for key, value in old["head"].items():
        sd[f"heads.0.{key}"] = value
    shape = [int(s) for s in old["input_shape"]]
    offset, scale = old["normalizer"]["offset"], old["normalizer"]["scale"]
    sd["normalize.offset"], sd["normalize.scale"] = offset, scale
    sd["head_index"] = torch.zeros((), dtype=torch.long)
    spec.setdefault("input_shape", shape)
    model_cfg = {"n_clusters": int(cfg["n_clusters"]), "latent_dim": int(cfg["latent_dim"]), "m": float(cfg["m"] or 1.5),
                 "num_heads": 1, "head_hidden_dims": list(cfg["head_hidden_dims"]), "has_decoder": True, "spec": spec}
    return {"format": MODEL_FORMAT, "version": old.get("version"), "model": model_cfg, "state": sd,
            "config": cfg, "input_shape": shape}
