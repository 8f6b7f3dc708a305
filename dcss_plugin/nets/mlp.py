"""MLP encoder and decoder for vectors (the paper's F-500-500-2000-d autoencoder and its mirror)."""

from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor, nn

__all__ = ["MLPEncoder", "MLPDecoder", "mlp_autoencoder"]


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers between consecutive ``widths`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """``x`` (B, F) (or any (B, ...) flattened to F) ``-> u`` (B, d): Linear-ReLU over ``hidden_dims``, then Linear.

    Example:
        >>> enc = MLPEncoder(64, latent_dim=10)
        >>> enc(torch.randn(8, 64)).shape
        torch.Size([8, 10])
    """

    def __init__(self, in_features: int, latent_dim: int = 10, hidden_dims: Sequence[int] = (500, 500, 2000)) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.latent_dim = int(latent_dim)
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.layers = _mlp([self.in_features, *self.hidden_dims, self.latent_dim])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))

    def spec(self) -> dict:
        """Plain description that rebuilds this encoder and its mirrored decoder (see ``dcss_plugin.registry``)."""
        return {"kind": "mlp", "in_features": self.in_features, "latent_dim": self.latent_dim,
                "hidden_dims": list(self.hidden_dims)}


class MLPDecoder(nn.Module):
    """``u`` (B, d) ``-> x_hat`` (B, F): the mirror of :class:`MLPEncoder`.

    Example:
        >>> MLPDecoder(64, latent_dim=10)(torch.randn(8, 10)).shape
        torch.Size([8, 64])
    """

    def __init__(self, out_features: int, latent_dim: int = 10, hidden_dims: Sequence[int] = (500, 500, 2000)) -> None:
        super().__init__()
        self.out_features = int(out_features)
        self.latent_dim = int(latent_dim)
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.layers = _mlp([self.latent_dim, *reversed(self.hidden_dims), self.out_features])

    def forward(self, u: Tensor) -> Tensor:
        return self.layers(u)


def mlp_autoencoder(in_features: int, latent_dim: int = 10,
                    hidden_dims: Sequence[int] = (500, 500, 2000)) -> Tuple[MLPEncoder, MLPDecoder]:
    """An :class:`MLPEncoder` and its mirrored :class:`MLPDecoder` (built in that order)."""
    return MLPEncoder(in_features, latent_dim, hidden_dims), MLPDecoder(in_features, latent_dim, hidden_dims)
