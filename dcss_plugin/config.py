"""DCSS settings: every option declared once (:data:`OPTIONS`), the presets as plain data (:data:`PRESETS`).

Each :class:`Option` gives a setting's name, type, default, allowed values and one-line meaning. The same
declarations build :class:`DCSSConfig` (a dataclass with one field per option), check its values, write its
docstring and make the ``dcss fit`` flags. ``None`` means "from the preset": ``preset="paper"`` is the published
recipe, ``preset="default"`` keeps the method and changes what the paper leaves fragile, with different values
for images and for vectors. Why each default is what it is: ``docs/decisions.md``.

Example:
    >>> cfg = DCSSConfig(n_clusters=3, lam=0.2)
    >>> cfg.resolved(images=False).m
    1.2
    >>> DCSSConfig(n_clusters=2.7)
    Traceback (most recent call last):
    ...
    TypeError: n_clusters must be an int >= 2, got 2.7 (float). n_clusters is the number of clusters K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

__all__ = ["Option", "OPTIONS", "PRESETS", "REMOVED_OPTIONS", "LARGE_IMAGE_SET", "DCSSConfig", "get_option",
           "preset_values", "data_kind",
           "describe_default", "config_signature"]


@dataclass(frozen=True)
class Option:
    """One setting: its name, type, default, meaning and allowed values.

    Attributes:
        name: the keyword (``DCSSConfig`` field, ``DCSS`` argument); the flag is ``--name-with-dashes``.
        type: ``int``, ``float``, ``bool``, ``str``, or ``tuple`` (a tuple of ints). ``bool`` is not an ``int``;
            an ``int`` is a ``float``; numpy scalars are accepted and stored as Python values.
        default: the value when not given; ``None`` means "decided at fit time": from the preset
            (:data:`PRESETS`), from a step budget (epochs) or by a rule (``kmeans_init``).
        help: what the option is, as a noun phrase (it ends error messages and ``--help`` lines).
        choices: for ``str``, the allowed values; for ``float``, strings accepted besides numbers.
        low, high: bounds of a number (of each element of a tuple); ``low_open``: ``low`` itself excluded.
        allow_none: ``None`` is a valid value.
        min_len: fewest elements of a tuple.
        experimental: not part of any preset's recipe; ``--help`` says so.
        cli: ``dcss fit`` gets a generated flag for it (``False`` where the command has its own flag).
        flag: the flag's spelling when it is not ``--`` + the name with dashes.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: Optional[Tuple[str, ...]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    allow_none: bool = False
    min_len: int = 0
    experimental: bool = False
    cli: bool = True
    flag: Optional[str] = None

    @property
    def cli_flag(self) -> str:
        """The ``dcss fit`` flag, e.g. ``--T2-min-steps``."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def annotation(self) -> Any:
        """The field's type annotation in :class:`DCSSConfig`."""
        base: Any = {tuple: Tuple[int, ...]}.get(self.type, self.type)
        if self.type is float and self.choices:
            base = Union[float, str]
        return Optional[base] if self.allow_none else base

    def expected(self) -> str:
        """What a valid value looks like, e.g. ``"an int >= 2"``, ``"one of 'mean', 'balanced'"``."""
        if self.type is str:
            text = "one of " + ", ".join(repr(c) for c in self.choices or ()) if self.choices else "a string"
        elif self.type is bool:
            text = "a bool (True or False)"
        elif self.type is tuple:
            text = ("a non-empty " if self.min_len else "a ") + "tuple of ints" + self._bounds()
        else:
            text = ("an int" if self.type is int else "a float") + self._bounds()
            if self.choices:
                text += " or " + " or ".join(repr(c) for c in self.choices)
        if self.allow_none:
            text += ", or None" + (" (from the preset)" if _in_presets(self.name) else "")
        return text

    def _bounds(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}]"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f" <= {_fmt(self.high)}"
        return ""

    def check(self, value: Any) -> Any:
        """``value`` as stored (Python scalars, tuples); raises ``TypeError``/``ValueError`` saying what is wrong.

        Example:
            >>> get_option("m").check(np.float32(1.25))
            1.25
        """
        if value is None:
            if self.allow_none:
                return None
            raise self._error(TypeError, value)
        if self.type is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise self._error(TypeError, value)
            return bool(value)
        if self.type is str:
            if not isinstance(value, str):
                raise self._error(TypeError, value)
            if self.choices and value not in self.choices:
                raise self._error(ValueError, value)
            return str(value)
        if self.type is tuple:
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, np.ndarray)):
                raise self._error(TypeError, value)
            items = list(value)
            bad = [v for v in items if not _is_int(v)]
            if bad:
                raise self._error(TypeError, value, f"{bad[0]!r} is not an int")
            items = [int(v) for v in items]
            if len(items) < self.min_len:
                raise self._error(ValueError, value, f"needs at least {self.min_len} element(s)")
            out_of_range = [v for v in items if not self._in_range(v)]
            if out_of_range:
                raise self._error(ValueError, value, f"{out_of_range[0]} is out of range")
            return tuple(items)
        if self.type is float and isinstance(value, str) and self.choices:
            if value not in self.choices:
                raise self._error(ValueError, value)
            return value
        if self.type is int:
            if not _is_int(value):
                raise self._error(TypeError, value)
            number: Any = int(value)
        else:
            if not (_is_int(value) or isinstance(value, (float, np.floating))):
                raise self._error(TypeError, value)
            number = float(value)
            if not math.isfinite(number):
                raise self._error(ValueError, value, "not a finite number")
        if not self._in_range(number):
            raise self._error(ValueError, value)
        return number

    def _in_range(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or v <= self.high

    def _error(self, kind: type, value: Any, detail: str = "") -> Exception:
        got = f"{value!r} ({type(value).__name__}{'; ' + detail if detail else ''})"
        return kind(f"{self.name} must be {self.expected()}, got {got}. {self.name} is {self.help}.")


def _in_presets(name: str) -> bool:
    return any(name in values for preset in PRESETS.values()
               for values in (preset.values() if "images" in preset else [preset]))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v) if isinstance(v, str) else str(v)


# Image sets of at least this many samples take the default preset's "images_large" values: an MLP trained with
# the neighbour-embedding term instead of the conv net with NT-Xent (docs/decisions.md, "Large image sets").
LARGE_IMAGE_SET = 4000

# The values of the None-valued options (and of autoencoder="auto"), per preset; a preset whose values differ
# between images (N, C, H, W) and vectors (N, F) holds {"images": {...}, "images_large": {...}, "vectors": {...}}.
# ``kmeans_init`` is derived afterwards (see DCSSConfig.resolved); the epoch counts come from a step budget at fit
# time.
_DEFAULT_IMAGES: Dict[str, Any] = {
    "m": 1.2, "augment": True, "neighbors": 5, "T2_min_steps": 0, "balance_weight": 5.0,
    "balance_tolerance": 0.0, "exclude_self": True, "pair_reduction": "balanced", "contrastive_weight": 1.0,
    "neighbor_refresh": 50, "phase2_encoder_lr_factor": 0.1, "num_heads": 3,
    "neighbor_embedding_weight": 0.0, "autoencoder": "conv", "mlp_hidden_dims": (500, 500, 2000),
    "lr": 1e-3, "pretrain_min_epochs": 10,
}

PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {
        "images": _DEFAULT_IMAGES,
        # large image sets: the small-image values, with an MLP trained with the neighbour-embedding term
        "images_large": {
            **_DEFAULT_IMAGES, "contrastive_weight": 0.0, "neighbor_embedding_weight": 1.0, "num_heads": 1,
            "autoencoder": "mlp", "mlp_hidden_dims": (256, 256, 1024), "lr": 3e-3, "pretrain_min_epochs": 20,
        },
        "vectors": {
            "m": 1.2, "augment": True, "neighbors": 5, "T2_min_steps": 400, "balance_weight": 5.0,
            "balance_tolerance": "phase1", "exclude_self": True, "pair_reduction": "balanced",
            "contrastive_weight": 0.0, "neighbor_refresh": 50, "phase2_encoder_lr_factor": 0.1, "num_heads": 1,
            "neighbor_embedding_weight": 1.0, "autoencoder": "mlp", "mlp_hidden_dims": (500, 500, 2000),
            "lr": 1e-3, "pretrain_min_epochs": 10,
        },
    },
    "paper": {
        "m": 1.5, "augment": False, "neighbors": 0, "T2_min_steps": 0, "balance_weight": 0.0,
        "balance_tolerance": 0.0, "exclude_self": False, "pair_reduction": "mean", "contrastive_weight": 0.0,
        "neighbor_refresh": 0, "phase2_encoder_lr_factor": 1.0, "num_heads": 1, "neighbor_embedding_weight": 0.0,
        "autoencoder": "mlp", "mlp_hidden_dims": (500, 500, 2000), "lr": 1e-3, "pretrain_min_epochs": 10,
    },
}

OPTIONS: Tuple[Option, ...] = (
    Option("n_clusters", int, 10, "the number of clusters K", low=2, cli=False),
    Option("preset", str, "default", "the recipe the None-valued options come from: 'default' (robust) or 'paper' "
           "(the published one)", choices=tuple(PRESETS), cli=False),
    Option("latent_dim", int, 10, "d, the width of the latent embedding u", low=1),
    Option("m", float, None, "the fuzzifier of the memberships p", low=1, low_open=True, allow_none=True),
    Option("lam", float, 0.1, "the weight of the centering term ||u - mu_k||^2 in Phase 1", low=0),
    Option("zeta", float, 0.8, "the similarity above which Phase 2 pulls a pair together", low=0, high=1),
    Option("gamma", float, 0.2, "the similarity below which Phase 2 pushes a pair apart (<= zeta)", low=0, high=1),
    Option("T1", int, 2, "the number of Phase-1 epochs between center updates", low=1),
    Option("T2", int, 5, "the number of Phase-2 epochs with u-space targets p p^T before q-space targets q q^T",
           low=0),
    Option("T2_min_steps", int, None, "the fewest optimizer steps of the u-space stage of Phase 2 (more epochs than "
           "T2 on small data; at most half of Phase 2)", low=0, allow_none=True),
    Option("pretrain_epochs", int, None, "the number of pretraining epochs (None: from a step budget)", low=0,
           allow_none=True),
    Option("pretrain_min_epochs", int, None, "the fewest pretraining epochs when pretrain_epochs comes from the step "
           "budget", low=1, allow_none=True),
    Option("phase1_epochs", int, None, "the number of Phase-1 epochs (None: from a step budget)", low=0,
           allow_none=True),
    Option("phase2_epochs", int, None, "the number of Phase-2 epochs (None: from a step budget)", low=0,
           allow_none=True),
    Option("batch_size", int, 256, "the number of samples per batch (pairs are formed within a batch)", low=2),
    Option("lr", float, None, "the Adam learning rate of pretraining and Phase 2", low=0, low_open=True,
           allow_none=True),
    Option("phase1_lr_factor", float, 0.1, "the Phase-1 learning rate relative to lr", low=0, low_open=True),
    Option("autoencoder", str, "auto", "the reference autoencoder: 'auto' (from the preset: conv for images of "
           f"fewer than {LARGE_IMAGE_SET} samples under the default preset, MLP otherwise), 'mlp' or 'conv'",
           choices=("auto", "mlp", "conv")),
    Option("mlp_hidden_dims", tuple, None, "the hidden widths of the MLP encoder (the decoder mirrors them)", low=1,
           allow_none=True),
    Option("head_hidden_dims", tuple, (128, 128), "the hidden widths of the MNet head", low=1),
    Option("augment", bool, None, "whether to make augmented views in pretraining and Phase 2", allow_none=True),
    Option("neighbors", int, None, "k of the nearest-neighbour positive pairs in Phase 2 (0: none)", low=0,
           allow_none=True),
    Option("balance_weight", float, None, "the weight of the cluster-size guard max(0, KL(mean q || uniform) - "
           "balance_tolerance) in Phase 2 (0: off)", low=0, allow_none=True),
    Option("balance_tolerance", float, None, "the divergence from even cluster sizes (nats) the guard lets pass, or "
           "'phase1' for that of the Phase-1 partition", low=0, choices=("phase1",), allow_none=True),
    Option("exclude_self", bool, None, "whether to leave the pairs (i, i) out of the pairwise loss", allow_none=True),
    Option("pair_reduction", str, None, "how the pairwise loss is averaged: 'mean' over selected pairs, "
           "'balanced' (pulled and pushed pairs weighted equally) or 'sum'", choices=("mean", "balanced", "sum"),
           allow_none=True),
    Option("neighbor_refresh", int, None, "the number of Phase-2 epochs between re-minings of the neighbours in u "
           "(0: mine once)", low=0, allow_none=True),
    Option("num_heads", int, None, "the number of MNet heads trained side by side in Phase 2; the one with the "
           "lowest loss is kept", low=1, allow_none=True),
    Option("contrastive_weight", float, None, "the weight of an NT-Xent term between two views' u in pretraining "
           "(0: off)", low=0, allow_none=True),
    Option("neighbor_embedding_weight", float, None, "the weight of the neighbour-embedding pretraining term "
           "(input-space k-NN pairs, Cauchy kernel; 0: off)", low=0, flag="--neighbor-embedding", allow_none=True),
    Option("neighbor_embedding_k", int, 10, "the number of input-space neighbours per sample in the "
           "neighbour-embedding term", low=1),
    Option("kmeans_init", str, None, "how k-means starts Phase 1: 'euclidean' (on u) or 'cosine' (on u / ||u||); "
           "None: 'cosine' when contrastive_weight > 0, else 'euclidean'", choices=("euclidean", "cosine"),
           allow_none=True),
    Option("conv_channels", tuple, (32, 64, 128), "the channel widths of the conv autoencoder's stages", low=1,
           min_len=1),
    Option("phase2_encoder_lr_factor", float, None, "the encoder's Phase-2 learning rate relative to lr", low=0,
           allow_none=True),
    Option("seed", int, 0, "the seed of every random choice (runs on CPU are reproducible)", low=0,
           high=2 ** 32 - 1, cli=False),
)

_BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}


# Options of earlier versions, now gone, and the values they may still hold in an old file's config: that value is
# what this version does anyway, so the key is dropped; any other value is refused.
REMOVED_OPTIONS: Dict[str, Tuple[Any, ...]] = {
    "mlp_linear_path": (False, None),
    "neighbor_space": ("u",),
    "positive_loss": ("log",),
    "balance_prior": (None, "uniform"),
}


def get_option(name: str) -> Option:
    """The declaration of option ``name`` (``KeyError`` names the known options)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no DCSS option {name!r}; known: {sorted(_BY_NAME)}") from None


def data_kind(images: bool, n_samples: Optional[int] = None) -> str:
    """``"vectors"``, ``"images"`` or ``"images_large"`` (images, at least :data:`LARGE_IMAGE_SET` samples)."""
    if not images:
        return "vectors"
    return "images_large" if n_samples is not None and n_samples >= LARGE_IMAGE_SET else "images"


def preset_values(preset: str, images: bool, n_samples: Optional[int] = None) -> Dict[str, Any]:
    """The values ``preset`` gives the None-valued options, for vectors or images (of ``n_samples``; None: a small
    set), as a new dict.

    Example:
        >>> preset_values("default", images=False)["balance_tolerance"]
        'phase1'
        >>> preset_values("default", images=True, n_samples=70000)["autoencoder"]
        'mlp'
    """
    get_option("preset").check(preset)
    values = PRESETS[preset]
    if "images" in values:
        values = values[data_kind(images, n_samples)]
    return dict(values)


def describe_default(option: Option) -> str:
    """The default in words, from the presets where it is ``None``, e.g. ``"default preset 1.2; paper 1.5"``."""
    if option.default is not None:
        return f"default {_value_text(option.default)}"
    parts = []
    for name in PRESETS:
        small, large, vectors = (preset_values(name, i, n).get(option.name)
                                 for i, n in ((True, None), (True, LARGE_IMAGE_SET), (False, None)))
        if small is None and vectors is None:
            continue
        if small == large == vectors:
            parts.append(f"{name} preset {_value_text(small)}")
        elif small == large:
            parts.append(f"{name} preset {_value_text(small)} for images, {_value_text(vectors)} for vectors")
        else:
            parts.append(f"{name} preset {_value_text(small)} for images of fewer than {LARGE_IMAGE_SET} samples, "
                         f"{_value_text(large)} for more, {_value_text(vectors)} for vectors")
    return "; ".join(parts)


def _value_text(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(str(e) for e in v)
    if isinstance(v, bool):
        return "on" if v else "off"
    return _fmt(v)


def config_signature() -> List[Tuple[str, Any]]:
    """``[(name, default), ...]`` of every option but ``n_clusters`` and ``preset``, in declaration order: the
    keyword arguments :class:`~dcss_plugin.DCSS` takes after those two.
    """
    return [(o.name, o.default) for o in OPTIONS if o.name not in ("n_clusters", "preset")]


class _ConfigMethods:
    """The methods of :class:`DCSSConfig` (its fields come from :data:`OPTIONS`)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "DCSSConfig":
        """Check every value against its declaration and the cross-field rules; store the normalised values.

        Raises ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of range, each naming the
        option, what it must be and what it is. Returns ``self``.
        """
        for o in OPTIONS:
            object.__setattr__(self, o.name, o.check(getattr(self, o.name)))
        gamma, zeta = getattr(self, "gamma"), getattr(self, "zeta")
        if gamma > zeta:
            raise ValueError(f"gamma must be <= zeta (pairs above zeta are pulled together, pairs below gamma pushed "
                             f"apart), got gamma={gamma}, zeta={zeta}; lower gamma or raise zeta.")
        return self  # type: ignore[return-value]

    def resolved(self, images: bool = True, n_samples: Optional[int] = None) -> "DCSSConfig":
        """A copy with every preset-dependent ``None`` (and ``autoencoder="auto"``) filled in.

        ``images``: whether the samples are images (N, C, H, W); ``n_samples``: how many (None: a small set). The
        default preset differs between small image sets, large ones and vectors (:data:`PRESETS`). ``kmeans_init`` is resolved last: ``"cosine"`` when ``contrastive_weight > 0``
        (that term shapes only the directions of ``u``), else ``"euclidean"``. The epoch counts stay ``None``.
        """
        values = {o.name: getattr(self, o.name) for o in OPTIONS}
        for key, value in preset_values(values["preset"], images, n_samples).items():
            if values[key] is None or (key == "autoencoder" and values[key] == "auto"):
                values[key] = value
        if values["kmeans_init"] is None:
            values["kmeans_init"] = "cosine" if values["contrastive_weight"] > 0 else "euclidean"
        return DCSSConfig(**values)

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (tuples as lists), e.g. for ``report.json``; :meth:`from_dict` reads it back."""
        return {o.name: (list(v) if isinstance(v, tuple) else v)
                for o in OPTIONS for v in (getattr(self, o.name),)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DCSSConfig":
        """Read :meth:`to_dict`'s output, also from older versions.

        A removed option (:data:`REMOVED_OPTIONS`) holding the value this version implies is dropped; any other
        value of it, and any unknown key, raises ``ValueError``.
        """
        values = dict(d)
        for key, implied in REMOVED_OPTIONS.items():
            if key in values:
                value = values.pop(key)
                if value not in implied:
                    raise ValueError(f"{key}={value!r}: the option {key} was removed in this version of dcss-plugin "
                                     f"(it now always behaves as {key}={implied[0]!r}); this config comes from an "
                                     f"older version. Refit with this version, or use the version that wrote it.")
        unknown = sorted(set(values) - set(_BY_NAME))
        if unknown:
            raise ValueError(f"Unknown DCSS config keys {unknown}; the file was written by another version "
                             f"(known keys: {sorted(_BY_NAME)}).")
        return DCSSConfig(**values)


def _config_doc() -> str:
    lines = ["All DCSS settings, one field per :data:`OPTIONS` entry; ``None`` means \"from the preset\" and is "
             "filled in by :meth:`resolved`.", "", "Attributes:"]
    for o in OPTIONS:
        default = describe_default(o)
        lines.append(f"    {o.name}: {o.help}; {o.expected()}{'; ' + default if default else ''}.")
    return "\n".join(lines)


DCSSConfig = make_dataclass("DCSSConfig", [(o.name, o.annotation, field(default=o.default)) for o in OPTIONS],
                            bases=(_ConfigMethods,))
DCSSConfig.__module__ = __name__
DCSSConfig.__doc__ = _config_doc()
