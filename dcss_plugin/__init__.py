"""dcss-plugin: DCSS deep clustering (Sadeghi & Armanfard, arXiv 2405.03590) as PyTorch plugin modules.

* :class:`DCSSModel`: normalisation + encoder (+ decoder) + centers + MNet head(s); saved, loaded and exported.
* Losses (:mod:`dcss_plugin.losses`): :class:`PretrainLoss`, :class:`CenteringLoss`,
  :class:`PairwiseSimilarityLoss`, :class:`DCSSLoss` (the default Phase-2 objective); pure functions in
  :mod:`dcss_plugin.functional`.
* The recipe as steps a loop calls: :mod:`dcss_plugin.training`; reference networks: :mod:`dcss_plugin.nets`.
* :class:`DCSS`: the scikit-learn estimator running the whole recipe.

Adapters (timm, Lightly) and ONNX export live in ``dcss_plugin.adapters`` and ``dcss_plugin.export``.
"""

__version__ = "0.2.0"

from .centers import ClusterCenters
from .config import DCSSConfig
from .data import DataError
from .estimator import DCSS
from .functional import (
    balance_penalty,
    center_statistics,
    centering_loss,
    centers_from_statistics,
    fuzzy_memberships,
    known_positive_loss,
    neighbor_embedding_loss,
    pairwise_similarity,
    pairwise_similarity_loss,
    squared_distances,
    view_contrastive_loss,
)
from .heads import DCSSHead
from .losses import CenteringLoss, DCSSLoss, PairwiseSimilarityLoss, PretrainLoss
from .metrics import cluster_accuracy, evaluate
from .model import DCSSModel, Normalize
from .registry import register_network_kind

__all__ = [
    "__version__",
    "DCSS",
    "DCSSConfig",
    "DCSSHead",
    "DCSSModel",
    "DataError",
    "Normalize",
    "CenteringLoss",
    "ClusterCenters",
    "DCSSLoss",
    "PairwiseSimilarityLoss",
    "PretrainLoss",
    "balance_penalty",
    "center_statistics",
    "centering_loss",
    "centers_from_statistics",
    "cluster_accuracy",
    "evaluate",
    "fuzzy_memberships",
    "known_positive_loss",
    "neighbor_embedding_loss",
    "pairwise_similarity",
    "pairwise_similarity_loss",
    "register_network_kind",
    "squared_distances",
    "view_contrastive_loss",
]
