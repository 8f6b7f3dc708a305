"""timm backbones as DCSS encoders: offline weights, timm's own preprocessing, three training modes.

Imported as ``dcss_plugin.adapters.timm``; timm is imported here and nowhere in ``dcss_plugin`` itself. Importing
it registers the network kinds ``"timm-frozen"`` and ``"timm-finetune"``, so ``DCSS.load`` / ``DCSSModel.load``
rebuild timm-backed models from their checkpoints (the registry imports this package on demand).

* :mod:`.backbone`: model names (close-name suggestions), ``create_backbone`` (pooled features,
  ``num_classes=0``), local weights through ``timm.models.load_checkpoint`` with a strict key / shape report.
* :mod:`.preprocess`: :class:`TimmPreprocess`, timm's eval transform as two matrix products (batched, GPU,
  ONNX), equal to ``timm.data.create_transform``; :func:`prepare_images`.
* :mod:`.encoder`: :class:`TimmEncoder`, images in [0, 1] -> pooled features (B, F).
* :mod:`.features`: :func:`extract_features`, once, with a fingerprinted ``.npy`` cache.
* :mod:`.finetune`: :func:`timm_autoencoder`, the encoder / decoder pair for ``"last"`` / ``"full"`` (the decoder
  reconstructs backbone features; per-group learning rates with layer-wise decay); timm's coarse block groups.
* :mod:`.frozen`: :class:`FrozenFeatureEncoder` and :func:`frozen_model` (the frozen mode's model on images).
* :mod:`.specs`: the registered network kinds.
* :mod:`.fit`: :func:`fit_timm` and the CLI entry point.

Example:
    >>> from sklearn.datasets import load_digits
    >>> from dcss_plugin import DCSS
    >>> from dcss_plugin.adapters.timm import fit_timm
    >>> x = load_digits().images[:500]                                   # (500, 8, 8) in [0, 16]
    >>> est = fit_timm(x, 10, "resnet18", mode="frozen", pretrained_file="resnet18.safetensors")
    >>> est.labels_[:5], est.history_["timm"]["features"].shape           # labels, (500, 512)
    >>> est.save("model.pt"); DCSS.load("model.pt").predict(x[:5])        # the backbone is rebuilt from the file
"""

from .backbone import create_backbone, load_backbone_weights, resolve_model_name, suggest_model_names
from .encoder import TimmEncoder
from .errors import PretrainedWeightsError, TimmAdapterError, TimmInputError, UnknownModelError
from .features import extract_features
from .finetune import (FINETUNE_MODES, TimmFeatureDecoder, TimmFinetuneEncoder, block_groups,
                       last_block_parameter_names, timm_autoencoder)
from .fit import MODES, fit_from_cli_args, fit_timm
from .frozen import FrozenFeatureEncoder, frozen_model
from .preprocess import TimmPreprocess, prepare_images
from .specs import build_timm_finetune, build_timm_frozen  # registers "timm-frozen" and "timm-finetune"

__all__ = [
    "MODES",
    "FINETUNE_MODES",
    "TimmAdapterError",
    "UnknownModelError",
    "PretrainedWeightsError",
    "TimmInputError",
    "resolve_model_name",
    "suggest_model_names",
    "create_backbone",
    "load_backbone_weights",
    "block_groups",
    "last_block_parameter_names",
    "TimmPreprocess",
    "prepare_images",
    "TimmEncoder",
    "extract_features",
    "TimmFinetuneEncoder",
    "TimmFeatureDecoder",
    "timm_autoencoder",
    "FrozenFeatureEncoder",
    "frozen_model",
    "build_timm_frozen",
    "build_timm_finetune",
    "fit_timm",
    "fit_from_cli_args",
]
