"""The frozen mode's model on raw images: backbone -> feature standardisation -> the feature model's encoder.

DCSS trains on cached backbone features (vectors); :func:`frozen_model` then composes a
:class:`~dcss_plugin.DCSSModel` for raw images from the pieces: the image scaling, a :class:`FrozenFeatureEncoder`
``Sequential(TimmEncoder, Normalize, feature encoder)``, and the feature model's centers and head. Its ``q`` on
images equals the feature model's ``q`` on the features; ``predict``, ``save``/``load`` and the full ONNX export
work on images. Nothing in it trains.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import Tensor, nn

from dcss_plugin import DCSSModel, Normalize

from .encoder import TimmEncoder

__all__ = ["FrozenFeatureEncoder", "frozen_model"]


class FrozenFeatureEncoder(nn.Sequential):
    """``Sequential(timm_encoder, feature_normalize, feature_encoder)``, always in eval mode, no gradients.

    Args:
        timm_encoder: the :class:`TimmEncoder` the features came from (images in [0, 1] -> (B, F)).
        feature_normalize: the feature model's :class:`~dcss_plugin.Normalize` (per-feature standardisation).
        feature_encoder: the feature model's encoder ((B, F) -> u (B, d)).

    Shapes:
        ``x`` (B, 1 or C, h, w) in [0, 1] -> ``u`` (B, d); :meth:`from_features`: (B, F) -> (B, d).

    Example:
        >>> enc = FrozenFeatureEncoder(timm_enc, feature_est.model_.normalize, feature_est.model_.encoder)
        >>> enc(torch.rand(4, 1, 8, 8)).shape                   # (4, d)
    """

    def __init__(self, timm_encoder: TimmEncoder, feature_normalize: Normalize, feature_encoder: nn.Module) -> None:
        super().__init__(timm_encoder, feature_normalize, feature_encoder)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenFeatureEncoder":
        return super().train(False)  # the backbone's BatchNorm statistics and the MLP never change here

    @property
    def timm(self) -> TimmEncoder:
        return self[0]  # type: ignore[return-value]

    def from_features(self, features: Tensor) -> Tensor:
        """``u`` (B, d) of pooled backbone features (B, F): the part after the backbone."""
        return self[2](self[1](features))


def frozen_model(feature_model: DCSSModel, timm_encoder: TimmEncoder, normalize: Normalize,
                 input_shape: Sequence[int], spec: Dict[str, Any]) -> DCSSModel:
    """A :class:`~dcss_plugin.DCSSModel` on raw images from a model trained on the backbone's features.

    Args:
        feature_model: the trained model on features (its normalisation, encoder, centers and selected head).
        timm_encoder: the backbone the features came from.
        normalize: the image scaling the features were computed after (raw images -> [0, 1]).
        input_shape: one raw sample's shape (C, H, W); the preprocessing matrices are made for it (for export).
        spec: the model's ``spec`` (``{"kind": "timm-frozen", ...}``).

    Example:
        >>> model = frozen_model(feature_est.model_, timm_enc, Normalize.fit(x), x.shape[1:], spec)
        >>> model.predict(x[:5])
    """
    timm_encoder.preprocess.set_input_size(*[int(s) for s in input_shape[-2:]])
    encoder = FrozenFeatureEncoder(timm_encoder, feature_model.normalize, feature_model.encoder)
    with torch.random.fork_rng(devices=[]):  # the model's fresh heads are overwritten: leave the global RNG alone
        model = DCSSModel(encoder, feature_model.n_clusters, feature_model.latent_dim, normalize=normalize,
                          m=feature_model.centers.m, num_heads=1, head_hidden_dims=feature_model.head_hidden_dims,
                          spec={**spec, "input_shape": [int(s) for s in input_shape]})
    model.centers.load_state_dict(feature_model.centers.state_dict())
    model.heads[0].load_state_dict(feature_model.head.state_dict())
    return model.to(feature_model.head_index.device).eval()
