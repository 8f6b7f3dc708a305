"""A timm backbone that (partly) trains inside DCSS: an encoder / decoder pair for :class:`~dcss_plugin.DCSSModel`.

* :func:`block_groups`: timm's coarse layer groups of a backbone (what ``"last"`` trains).
* :class:`TimmFinetuneEncoder`: ``u = proj(LN(backbone(preprocess(x))))``. ``finetune="last"`` trains the last
  block group(s) of timm's coarse ``group_matcher`` (ResNet ``layer4``, ViT ``blocks[-n:]`` + final norm), the rest
  keeps ``requires_grad=False`` and stays in eval mode (frozen BatchNorm statistics); ``"full"`` trains everything,
  the backbone at ``backbone_lr_scale`` times the rate and with timm's layer-wise decay, as real per-group learning
  rates (:meth:`TimmFinetuneEncoder.param_groups`, which :func:`dcss_plugin.training.phase_optimizer` uses);
  ``"frozen"`` trains only the projection but runs the backbone every step (the slow way; ``fit_timm`` caches
  the features instead).
* :class:`TimmFeatureDecoder`: ``u -> `` backbone features (B, F). **It reconstructs features, not pixels**: its
  ``reconstruction_target(xn)`` (which ``DCSSModel.reconstruction_target`` calls) is ``LN(features)`` of the
  backbone as it was when the decoder was built (``target="initial"``: a frozen copy, the anchor that keeps
  fine-tuning from drifting away from the pretrained features or collapsing to a constant), or of the current
  backbone (``target="current"``, no copy). ``LN`` is a parameter-free LayerNorm over the F features.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import Tensor, nn

from .backbone import classifier_roots
from .encoder import TimmEncoder
from .errors import TimmAdapterError

__all__ = ["FINETUNE_MODES", "block_groups", "last_block_parameter_names", "TimmFinetuneEncoder",
           "TimmFeatureDecoder", "timm_autoencoder"]

FINETUNE_MODES = ("last", "full", "frozen")


def block_groups(backbone: nn.Module) -> Tuple[List[List[str]], List[str]]:
    """The backbone's parameter names in timm's coarse layer groups, first to last, and the head-side names.

    Uses ``backbone.group_matcher(coarse=True)`` (timm's grouping: stem, one group per stage / block, a final
    norm merged into the last block); without one, the top-level children with parameters. Trailing groups under
    the classifier's module (ConvNeXt's ``head.norm``) are returned separately as head-side names.

    Example:
        >>> groups, head = block_groups(timm.create_model("resnet18", num_classes=0))
        >>> groups[-1][0], len(groups)
        ('layer4.0.conv1.weight', 5)
    """
    if callable(getattr(backbone, "group_matcher", None)):
        grouped = group_parameters(backbone, backbone.group_matcher(coarse=True))
        groups = [list(grouped[k]) for k in sorted(grouped)]
    else:
        groups = [[n for n, _ in child.named_parameters(prefix=name)] for name, child in backbone.named_children()]
        groups = [g for g in groups if g]
    roots = {c.split(".")[0] for c in classifier_roots(backbone)}
    head: List[str] = []
    while groups and roots and all(n.split(".")[0] in roots for n in groups[-1]):
        head = groups.pop() + head
    return groups, head


def last_block_parameter_names(backbone: nn.Module, n: int = 1) -> List[str]:
    """Parameter names of the last ``n`` block groups of :func:`block_groups` (plus head-side ones): ResNet
    ``layer4`` for ``n=1``; ViT ``blocks[-n:]`` and the final norm.

    Example:
        >>> last_block_parameter_names(timm.create_model("vit_tiny_patch16_224", num_classes=0), 2)[0]
        'blocks.10.norm1.weight'
    """
    groups, head = block_groups(backbone)
    if n < 1:
        raise TimmAdapterError(f"train_blocks must be >= 1, got {n}.")
    if n >= len(groups):
        raise TimmAdapterError(f"train_blocks={n} but {type(backbone).__name__} has {len(groups)} block groups "
                               "(the first is the stem); use finetune='full' to train everything.")
    return [name for g in groups[-n:] for name in g] + head


class TimmFinetuneEncoder(nn.Module):
    """``x`` (B, 1 or C, h, w) in [0, 1] ``-> u = proj(LN(backbone(preprocess(x))))`` (B, d), the backbone
    training as ``finetune`` says.

    Args:
        encoder: a :class:`TimmEncoder` (or a model name; ``encoder_kwargs`` build it).
        latent_dim: d.
        finetune: ``"last"``, ``"full"`` or ``"frozen"`` (see the module docstring).
        train_blocks: block groups trained in ``"last"`` mode.
        backbone_lr_scale: backbone lr / base lr; default 1.0 for ``"last"``, 0.1 for ``"full"``.
        layer_decay: layer-wise lr decay in ``"full"`` mode (timm's ``param_groups_layer_decay``); None: off.

    Example:
        >>> enc = TimmFinetuneEncoder("test_vit", 10, finetune="last", img_size=32)
        >>> enc(torch.rand(4, 1, 8, 8)).shape, [g["name"] for g in enc.param_groups(1e-3)]
        (torch.Size([4, 10]), ['projection', 'backbone'])
    """

    def __init__(self, encoder: Union[TimmEncoder, str], latent_dim: int = 10, *, finetune: str = "last",
                 train_blocks: int = 1, backbone_lr_scale: Optional[float] = None,
                 layer_decay: Optional[float] = 0.75, **encoder_kwargs: Any) -> None:
        super().__init__()
        if finetune not in FINETUNE_MODES:
            raise TimmAdapterError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}.")
        if isinstance(encoder, str):
            encoder = TimmEncoder(encoder, **encoder_kwargs)
        elif encoder_kwargs:
            raise TimmAdapterError(f"encoder_kwargs {sorted(encoder_kwargs)} only apply when encoder is a name.")
        self.timm = encoder
        self.num_features = encoder.num_features
        self.latent_dim = int(latent_dim)
        self.finetune = finetune
        self.train_blocks = int(train_blocks)
        self.backbone_lr_scale = float(backbone_lr_scale if backbone_lr_scale is not None
                                       else (0.1 if finetune == "full" else 1.0))
        self.layer_decay = None if layer_decay is None else float(layer_decay)
        self.proj = nn.Linear(self.num_features, self.latent_dim)
        backbone = encoder.backbone
        if finetune == "full":
            trainable = {n for n, _ in backbone.named_parameters()}
        elif finetune == "last":
            trainable = set(last_block_parameter_names(backbone, self.train_blocks))
        else:
            trainable = set()
        for name, p in backbone.named_parameters():
            p.requires_grad_(name in trainable)
        self.trainable_backbone_parameters = [n for n, _ in backbone.named_parameters() if n in trainable]
        self.model_spec: Dict[str, Any] = {}  # set by timm_autoencoder: what rebuilds the pair from a checkpoint
        self.train(self.training)

    def train(self, mode: bool = True) -> "TimmFinetuneEncoder":
        """As ``nn.Module.train``, but backbone modules whose parameters are all frozen stay in eval mode (their
        BatchNorm statistics and dropout do not change)."""
        super().train(mode)
        if mode:
            for m in self.timm.backbone.modules():
                params = list(m.parameters())
                if params and not any(p.requires_grad for p in params):
                    m.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """``LN(backbone(preprocess(x)))`` (B, F), with gradients where backbone parameters train."""
        return F.layer_norm(self.timm(x), (self.num_features,))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.features(x))

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """Optimizer parameter groups with their own ``lr``: the projection at ``lr``; the trainable backbone at
        ``lr * backbone_lr_scale``, times timm's layer-decay ``lr_scale`` per layer in ``"full"`` mode. Every
        trainable parameter appears once; frozen ones are left out.

        Example:
            >>> opt = torch.optim.Adam(enc.param_groups(1e-3), lr=1e-3)
            >>> [(g["name"], g["lr"]) for g in opt.param_groups]
        """
        from timm.optim import param_groups_layer_decay

        groups: List[Dict[str, Any]] = [{"params": list(self.proj.parameters()), "lr": float(lr),
                                         "name": "projection", "lr_scale": 1.0}]
        backbone = self.timm.backbone
        trainable = [p for p in backbone.parameters() if p.requires_grad]
        if not trainable:
            return groups
        bb_lr = float(lr) * self.backbone_lr_scale
        if self.finetune != "full" or self.layer_decay is None:
            return groups + [{"params": trainable, "lr": bb_lr, "lr_scale": 1.0, "name": "backbone"}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layered = param_groups_layer_decay(backbone, weight_decay=0.0, layer_decay=self.layer_decay)
        by_scale: Dict[float, List[Tensor]] = {}
        for g in layered:  # timm splits decay / no-decay per layer; with weight_decay 0 only the scale matters
            by_scale.setdefault(float(g["lr_scale"]), []).extend(g["params"])
        return groups + [{"params": by_scale[s], "lr": bb_lr * s, "lr_scale": s, "name": f"backbone.layer_scale_{i}"}
                         for i, s in enumerate(sorted(by_scale))]


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU(inplace=True)] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


class TimmFeatureDecoder(nn.Module):
    """``u`` (B, d) ``->`` reconstructed backbone features (B, F); :meth:`reconstruction_target` gives what it is
    compared with.

    Args:
        encoder: the :class:`TimmFinetuneEncoder` it belongs to. Its preprocessing is shared (a submodule without
            saved state); its backbone is kept by reference, not as a submodule (saved once, under the model's
            encoder), and read only by ``target="current"``, so copy such a pair together (a whole DCSSModel).
        hidden_dims: hidden widths of the MLP d -> ... -> F.
        target: ``"initial"`` (a frozen copy of the backbone as it is now) or ``"current"``.

    Example:
        >>> dec = TimmFeatureDecoder(enc, hidden_dims=(256,))
        >>> dec(torch.randn(4, 10)).shape, dec.reconstruction_target(torch.rand(4, 1, 8, 8)).shape
        (torch.Size([4, 96]), torch.Size([4, 96]))
    """

    def __init__(self, encoder: TimmFinetuneEncoder, hidden_dims: Sequence[int] = (256,),
                 target: str = "initial") -> None:
        super().__init__()
        if target not in ("initial", "current"):
            raise TimmAdapterError(f"target must be 'initial' or 'current', got {target!r}.")
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.target = target
        self.num_features = encoder.num_features
        self.layers = _mlp([encoder.latent_dim, *self.hidden_dims, self.num_features])
        self.preprocess = encoder.timm.preprocess  # non-persistent buffers only: nothing saved twice
        object.__setattr__(self, "_encoder", encoder)  # not registered: not in state_dict, parameters, exports
        snapshot: Optional[nn.Module] = None
        if target == "initial" and encoder.finetune != "frozen":
            snapshot = copy.deepcopy(encoder.timm.backbone).eval()
            for p in snapshot.parameters():
                p.requires_grad_(False)
        object.__setattr__(self, "_snapshot", snapshot)

    def forward(self, u: Tensor) -> Tensor:
        return self.layers(u)

    @torch.no_grad()
    def reconstruction_target(self, xn: Tensor) -> Tensor:
        """``LN(features)`` (B, F) of the initial (or current) backbone on images ``xn`` in [0, 1], eval mode."""
        pre = self.preprocess(xn)
        snap = self._snapshot
        if snap is not None:
            ref = next(snap.parameters(), None)
            if ref is not None and (ref.device != pre.device or ref.dtype != pre.dtype):
                snap.to(pre.device, pre.dtype)
            return F.layer_norm(snap(pre), (self.num_features,))
        enc: TimmFinetuneEncoder = self._encoder  # type: ignore[assignment]
        backbone = enc.timm.backbone
        was = backbone.training
        backbone.eval()
        try:
            f = backbone(pre)
        finally:
            if was:
                enc.train(True)  # restores train mode, frozen parts staying in eval
        return F.layer_norm(f, (self.num_features,))

    def release_target(self) -> None:
        """Drop the frozen copy of the initial backbone (it is only needed by the loss while training)."""
        object.__setattr__(self, "_snapshot", None)


def timm_autoencoder(encoder: Union[TimmEncoder, str], latent_dim: int = 10, *, finetune: str = "last",
                     train_blocks: int = 1, backbone_lr_scale: Optional[float] = None,
                     layer_decay: Optional[float] = 0.75, decoder_hidden_dims: Sequence[int] = (256,),
                     target: str = "initial", **encoder_kwargs: Any
                     ) -> Tuple[TimmFinetuneEncoder, TimmFeatureDecoder]:
    """An encoder / decoder pair on a timm backbone for ``DCSS(encoder=..., decoder=...)`` or a DCSSModel.

    The encoder's ``model_spec`` describes both (``{"kind": "timm-finetune", ...}``): put it into the model's
    ``spec`` (``fit_timm`` does) and ``DCSS.load`` / ``DCSSModel.load`` rebuild the pair without a weights file.

    Example:
        >>> enc, dec = timm_autoencoder("test_vit", 10, finetune="full", img_size=32, layer_decay=0.75)
        >>> est = DCSS(n_clusters=10, encoder=enc, decoder=dec).fit(load_digits().images[:300])
    """
    enc = TimmFinetuneEncoder(encoder, latent_dim, finetune=finetune, train_blocks=train_blocks,
                              backbone_lr_scale=backbone_lr_scale, layer_decay=layer_decay, **encoder_kwargs)
    dec = TimmFeatureDecoder(enc, decoder_hidden_dims, target)
    enc.model_spec = {"kind": "timm-finetune", "version": 1, "backbone": dict(enc.timm.spec),
                      "latent_dim": enc.latent_dim, "finetune": finetune, "train_blocks": enc.train_blocks,
                      "backbone_lr_scale": enc.backbone_lr_scale, "layer_decay": enc.layer_decay,
                      "decoder_hidden_dims": list(dec.hidden_dims)}
    return enc, dec
