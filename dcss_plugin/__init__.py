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

# Names are imported on first use (PEP 562), so that ``import dcss_plugin`` and the torch-free parts
# (``dcss_plugin.export.runtime``, the ``dcss`` command's option parsing) do not load torch.
_EXPORTS = {
    "ClusterCenters": "centers", "DCSSConfig": "config", "DataError": "data", "DCSS": "estimator",
    "DCSSHead": "heads", "CenteringLoss": "losses", "DCSSLoss": "losses", "PairwiseSimilarityLoss": "losses",
    "PretrainLoss": "losses", "cluster_accuracy": "metrics", "evaluate": "metrics", "DCSSModel": "model",
    "Normalize": "model", "register_network_kind": "registry",
    **{name: "functional" for name in (
        "balance_penalty", "center_statistics", "centering_loss", "centers_from_statistics", "fuzzy_memberships",
        "known_positive_loss", "neighbor_embedding_loss", "pairwise_similarity", "pairwise_similarity_loss",
        "squared_distances", "view_contrastive_loss")},
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dcss_plugin' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


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
