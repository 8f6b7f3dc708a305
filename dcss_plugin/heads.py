"""DCSSHead: the paper's MNet, mapping embeddings ``u`` to soft cluster assignments ``q``."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = ["DCSSHead"]


class DCSSHead(nn.Module):
    """MNet: ``u (B, d) -> q (B, K)``, (Linear-BN-ReLU) x len(hidden_dims), Linear, softmax over K.

    Args:
        in_dim: d, width of ``u``.
        num_clusters: K.
        hidden_dims: widths of the hidden layers (paper: 128, 128).

    Example:
        >>> head = DCSSHead(in_dim=10, num_clusters=4)
        >>> q = head(torch.randn(32, 10))        # (32, 4), rows sum to 1
        >>> labels = q.argmax(1)
    """

    def __init__(self, in_dim: int, num_clusters: int, hidden_dims: Sequence[int] = (128, 128)) -> None:
        super().__init__()
        if int(num_clusters) < 2:
            raise ValueError(f"num_clusters (K) must be at least 2, got {num_clusters}.")
        self.in_dim = int(in_dim)
        self.num_clusters = int(num_clusters)
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        layers: list[nn.Module] = []
        width = self.in_dim
        for h in self.hidden_dims:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, self.num_clusters))
        self.net = nn.Sequential(*layers)

    def forward_logits(self, u: Tensor) -> Tensor:
        """Pre-softmax scores (B, K)."""
        return self.net(u)

    def forward(self, u: Tensor) -> Tensor:
        """Soft assignments ``q`` (B, K); the softmax subtracts the row max, so it never overflows."""
        return self.net(u).softmax(dim=1)
