"""dcss-plugin: DCSS deep clustering (Sadeghi & Armanfard, arXiv 2405.03590) as PyTorch plugin modules.

Pure functions live in :mod:`dcss_plugin.functional`; modules: :class:`ClusterCenters`, :class:`CenteringLoss`,
:class:`PairwiseSimilarityLoss`, :class:`DCSSHead`, the reference autoencoders, and the end-to-end :class:`DCSS`
estimator. Adapters (timm, Lightly) and ONNX export live in ``dcss_plugin.adapters`` and ``dcss_plugin.export``.
"""

__version__ = "0.1.0"

from .autoencoders import ConvAutoencoder, MLPAutoencoder
from .centers import ClusterCenters
from .config import DCSSConfig
from .data import DataError
from .estimator import DCSS
from .functional import (
    balance_penalty,
    phase1_size_prior,
    known_positive_loss,
    neighbor_embedding_loss,
    center_statistics,
    centering_loss,
    centers_from_statistics,
    fuzzy_memberships,
    pairwise_similarity,
    pairwise_similarity_loss,
    squared_distances,
)
from .heads import DCSSHead
from .losses import CenteringLoss, PairwiseSimilarityLoss
from .metrics import cluster_accuracy, evaluate

__all__ = [
    "__version__",
    "DCSS",
    "DCSSConfig",
    "DCSSHead",
    "DataError",
    "CenteringLoss",
    "ClusterCenters",
    "ConvAutoencoder",
    "MLPAutoencoder",
    "PairwiseSimilarityLoss",
    "balance_penalty",
    "phase1_size_prior",
    "known_positive_loss",
    "neighbor_embedding_loss",
    "center_statistics",
    "centering_loss",
    "centers_from_statistics",
    "cluster_accuracy",
    "evaluate",
    "fuzzy_memberships",
    "pairwise_similarity",
    "pairwise_similarity_loss",
    "squared_distances",
]
