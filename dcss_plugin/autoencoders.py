"""Reference autoencoders for DCSS: ``x -> u`` (``encode``), ``u -> x_hat`` (``decode``).

Any module with ``encode``/``decode`` works with the DCSS estimator; these two cover vectors (and backbone
features) and small images.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["MLPAutoencoder", "ConvAutoencoder"]


class MLPAutoencoder(nn.Module):
    """Fully connected autoencoder for vectors ``x`` (B, F) (paper: F-500-500-2000-d, mirrored decoder).

    With ``linear_path=True`` each side also has a bias-free linear map beside the MLP:
    ``u = x A + mlp_enc(x)`` and ``x_hat = u B + mlp_dec(u)``. :meth:`init_linear_path` sets ``A`` (F, d) to the
    top-d principal axes of the training data and ``B = A^T``, and zeroes the last layer of both MLPs, so that
    pretraining starts from PCA (the optimum of a linear autoencoder) and learns a non-linear correction on top.

    Args:
        in_features: F.
        latent_dim: d, width of ``u``.
        hidden_dims: encoder widths; the decoder mirrors them.
        batch_norm: put BatchNorm after each hidden Linear.
        linear_path: add the linear maps beside the MLPs (call :meth:`init_linear_path` before training).

    Example:
        >>> ae = MLPAutoencoder(64, latent_dim=10)
        >>> u = ae.encode(torch.randn(8, 64)); x_hat = ae.decode(u)   # (8, 10), (8, 64)
        >>> ae = MLPAutoencoder(64, latent_dim=10, linear_path=True)
        >>> ae.init_linear_path(torch.randn(500, 64))                 # u starts as the top-10 PCA scores
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int = 10,
        hidden_dims: Sequence[int] = (500, 500, 2000),
        batch_norm: bool = False,
        linear_path: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.latent_dim = int(latent_dim)
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.linear_path = bool(linear_path)
        self.encoder = self._mlp([self.in_features, *self.hidden_dims, self.latent_dim], batch_norm)
        self.decoder = self._mlp([self.latent_dim, *reversed(self.hidden_dims), self.in_features], batch_norm)
        if self.linear_path:
            self.encoder_linear = nn.Linear(self.in_features, self.latent_dim, bias=False)
            self.decoder_linear = nn.Linear(self.latent_dim, self.in_features, bias=False)

    @staticmethod
    def _mlp(widths: Sequence[int], batch_norm: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    @torch.no_grad()
    def init_linear_path(self, x: Tensor, max_rows: int = 20000) -> None:
        """Set the linear path to PCA of ``x`` (N, F) and zero the MLPs' last layers (``u`` = PCA scores).

        ``A``'s columns are the top ``min(d, F, N)`` right singular vectors of the centred ``x`` (columns beyond
        the rank stay zero); ``B = A^T``. More than ``max_rows`` rows: the PCA uses ``max_rows`` evenly spaced ones.
        Deterministic for a given ``x``; draws no random numbers.
        """
        if not self.linear_path:
            raise RuntimeError("init_linear_path needs MLPAutoencoder(..., linear_path=True).")
        x = x.detach().flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"Expected (N, {self.in_features}) data for the PCA of the linear path, "
                             f"got {tuple(x.shape)}.")
        if len(x) > max_rows:
            x = x[torch.linspace(0, len(x) - 1, max_rows).long()]
        x = x.double().cpu()
        _, _, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        r = min(self.latent_dim, vt.shape[0])
        axes = torch.zeros(self.latent_dim, self.in_features, dtype=torch.float64)
        axes[:r] = vt[:r]
        dev, dtype = self.encoder_linear.weight.device, self.encoder_linear.weight.dtype
        self.encoder_linear.weight.copy_(axes.to(dev, dtype))
        self.decoder_linear.weight.copy_(axes.t().to(dev, dtype))
        for mlp in (self.encoder, self.decoder):
            mlp[-1].weight.zero_()
            mlp[-1].bias.zero_()

    def encode(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        u = self.encoder(x)
        return u + self.encoder_linear(x) if self.linear_path else u

    def decode(self, u: Tensor) -> Tensor:
        x_hat = self.decoder(u)
        return x_hat + self.decoder_linear(u) if self.linear_path else x_hat

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Returns ``(u, x_hat)``."""
        u = self.encode(x)
        return u, self.decode(u).view_as(x)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder for small images ``x`` (B, C, H, W) (8x8 digits to 32x32 CIFAR).

    Encoder: stride-2 3x3 convolutions (Conv-BN-ReLU) halving the size each time, then a Linear to ``u``.
    Decoder: a Linear and transposed convolutions back to exactly (C, H, W).

    Args:
        image_shape: (C, H, W).
        latent_dim: d.
        channels: widths of the conv stages.

    Example:
        >>> ae = ConvAutoencoder((1, 8, 8), latent_dim=10)
        >>> u, x_hat = ae(torch.randn(4, 1, 8, 8))    # (4, 10), (4, 1, 8, 8)
    """

    def __init__(
        self, image_shape: Sequence[int], latent_dim: int = 10, channels: Sequence[int] = (32, 64, 128)
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}.")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_dim = int(latent_dim)
        self.channels = tuple(int(c) for c in channels)
        c, h, w = self.image_shape
        sizes = [(h, w)]
        enc: list[nn.Module] = []
        width = c
        for ch in self.channels:
            enc += [nn.Conv2d(width, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            width = ch
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
        self._bottom = (width, *sizes[-1])
        flat = width * sizes[-1][0] * sizes[-1][1]
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, self.latent_dim))
        dec: list[nn.Module] = [nn.Linear(self.latent_dim, flat), nn.ReLU(inplace=True), nn.Unflatten(1, self._bottom)]
        outs = list(reversed(self.channels[:-1])) + [c]
        for i, ch in enumerate(outs):
            src, dst = sizes[-1 - i], sizes[-2 - i]
            pad = (dst[0] - (2 * src[0] - 1), dst[1] - (2 * src[1] - 1))
            dec.append(nn.ConvTranspose2d(width, ch, 3, stride=2, padding=1, output_padding=pad))
            if i < len(outs) - 1:
                dec += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            width = ch
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, u: Tensor) -> Tensor:
        return self.decoder(u)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        u = self.encode(x)
        return u, self.decode(u)
