"""Convolutional encoder and decoder for small images (8x8 digits to 32x32 CIFAR)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import nn

__all__ = ["ConvEncoder", "ConvDecoder", "conv_autoencoder"]


def _stage_sizes(image_shape: Sequence[int], n_stages: int) -> List[Tuple[int, int]]:
    """(H, W) before each stride-2 stage and after the last one."""
    sizes = [(int(image_shape[1]), int(image_shape[2]))]
    for _ in range(n_stages):
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    return sizes


def _check_shape(image_shape: Sequence[int]) -> Tuple[int, int, int]:
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}.")
    c, h, w = (int(s) for s in image_shape)
    return c, h, w


class ConvEncoder(nn.Sequential):
    """``x`` (B, C, H, W) ``-> u`` (B, d): stride-2 3x3 Conv-BN-ReLU stages (each halves H and W), then a Linear.

    Example:
        >>> ConvEncoder((1, 8, 8), latent_dim=10)(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, image_shape: Sequence[int], latent_dim: int = 10,
                 channels: Sequence[int] = (32, 64, 128)) -> None:
        c, _, _ = _check_shape(image_shape)
        channels = tuple(int(ch) for ch in channels)
        sizes = _stage_sizes(image_shape, len(channels))
        layers: list[nn.Module] = []
        width = c
        for ch in channels:
            layers += [nn.Conv2d(width, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            width = ch
        flat = width * sizes[-1][0] * sizes[-1][1]
        super().__init__(*layers, nn.Flatten(), nn.Linear(flat, int(latent_dim)))
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_dim = int(latent_dim)
        self.channels = channels

    def spec(self) -> dict:
        """Plain description that rebuilds this encoder and its decoder (see ``dcss_plugin.registry``)."""
        return {"kind": "conv", "image_shape": list(self.image_shape), "latent_dim": self.latent_dim,
                "channels": list(self.channels)}


class ConvDecoder(nn.Sequential):
    """``u`` (B, d) ``-> x_hat`` (B, C, H, W): a Linear, then transposed convolutions back to exactly (C, H, W).

    Example:
        >>> ConvDecoder((1, 8, 8), latent_dim=10)(torch.randn(4, 10)).shape
        torch.Size([4, 1, 8, 8])
    """

    def __init__(self, image_shape: Sequence[int], latent_dim: int = 10,
                 channels: Sequence[int] = (32, 64, 128)) -> None:
        c, _, _ = _check_shape(image_shape)
        channels = tuple(int(ch) for ch in channels)
        sizes = _stage_sizes(image_shape, len(channels))
        width = channels[-1]
        bottom = (width, *sizes[-1])
        flat = width * sizes[-1][0] * sizes[-1][1]
        layers: list[nn.Module] = [nn.Linear(int(latent_dim), flat), nn.ReLU(inplace=True), nn.Unflatten(1, bottom)]
        outs = list(reversed(channels[:-1])) + [c]
        for i, ch in enumerate(outs):
            src, dst = sizes[-1 - i], sizes[-2 - i]
            pad = (dst[0] - (2 * src[0] - 1), dst[1] - (2 * src[1] - 1))
            layers.append(nn.ConvTranspose2d(width, ch, 3, stride=2, padding=1, output_padding=pad))
            if i < len(outs) - 1:
                layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            width = ch
        super().__init__(*layers)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_dim = int(latent_dim)
        self.channels = channels


def conv_autoencoder(image_shape: Sequence[int], latent_dim: int = 10,
                     channels: Sequence[int] = (32, 64, 128)) -> Tuple[ConvEncoder, ConvDecoder]:
    """A :class:`ConvEncoder` and its :class:`ConvDecoder` (built in that order)."""
    return ConvEncoder(image_shape, latent_dim, channels), ConvDecoder(image_shape, latent_dim, channels)
