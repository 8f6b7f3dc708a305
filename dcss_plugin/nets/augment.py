"""Label-free augmentations that make known-similar pairs (two views of one sample) for DCSS's pairwise loss.

Per-sample random affine warps of image batches. torchvision's ``RandomAffine`` draws one set of parameters
per call, so giving every image of a batch its own warp needs a Python loop (about 0.5 ms per 8x8 image on a
CPU core); here the per-sample matrices are drawn at once and applied with ``torch.nn.functional.affine_grid``
and ``grid_sample``, one call per batch. Vectors get feature-scaled Gaussian noise and random masking.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

__all__ = ["RandomAffineBatch", "FeatureNoise", "default_augmentation"]


class RandomAffineBatch(nn.Module):
    """Independent random rotation, scale, shear-free translation for each image of a batch (B, C, H, W).

    Args:
        degrees: rotation range +-degrees.
        translate: translation range as a fraction of the image size.
        scale: (min, max) scale factor.
    """

    def __init__(self, degrees: float = 12.0, translate: float = 0.1, scale: tuple = (0.9, 1.1)) -> None:
        super().__init__()
        self.degrees = float(degrees)
        self.translate = float(translate)
        self.scale = (float(scale[0]), float(scale[1]))

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"RandomAffineBatch expects images (B, C, H, W), got shape {tuple(x.shape)}.")
        b = x.shape[0]
        r = torch.rand(b, 4, generator=generator, device="cpu", dtype=torch.float32).to(x.device, x.dtype)
        angle = (2 * r[:, 0] - 1) * math.radians(self.degrees)
        sc = self.scale[0] + (self.scale[1] - self.scale[0]) * r[:, 1]
        tx = (2 * r[:, 2] - 1) * self.translate * 2  # affine_grid works on [-1, 1]
        ty = (2 * r[:, 3] - 1) * self.translate * 2
        cos, sin = torch.cos(angle) / sc, torch.sin(angle) / sc
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
        return nnf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class FeatureNoise(nn.Module):
    """Vectors (B, F): add Gaussian noise of ``sigma`` (in units of each feature's std) and zero a ``drop`` share."""

    def __init__(self, std: Tensor, sigma: float = 0.1, drop: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("std", std.detach().clone().float())
        self.sigma = float(sigma)
        self.drop = float(drop)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        keep = (torch.rand(x.shape, generator=generator, device="cpu") >= self.drop).to(x.device, x.dtype)
        return (x + self.sigma * self.std.to(x.dtype) * noise) * keep


def default_augmentation(example: Tensor, feature_std: Optional[Tensor] = None) -> nn.Module:
    """Images (C, H, W) get :class:`RandomAffineBatch`; vectors get :class:`FeatureNoise`."""
    if example.dim() == 3:
        return RandomAffineBatch()
    std = feature_std if feature_std is not None else torch.ones(example.numel())
    return FeatureNoise(std)
