"""Reference networks for DCSS: encoders ``x -> u``, decoders ``u -> x_hat``, and the views of a batch."""

from .augment import FeatureNoise, RandomAffineBatch, default_augmentation
from .conv import ConvDecoder, ConvEncoder, conv_autoencoder
from .mlp import MLPDecoder, MLPEncoder, mlp_autoencoder

__all__ = ["ConvEncoder", "ConvDecoder", "conv_autoencoder", "MLPEncoder", "MLPDecoder", "mlp_autoencoder",
           "RandomAffineBatch", "FeatureNoise", "default_augmentation"]
