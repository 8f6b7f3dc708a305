"""Clustering metrics: ACC (best one-to-one matching by the Hungarian method), NMI and ARI (scikit-learn)."""

from __future__ import annotations

from typing import Dict

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["cluster_accuracy", "match_clusters", "evaluate"]


def _as_labels(y: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {a.shape}.")
    return a


def match_clusters(y_true: ArrayLike, y_pred: ArrayLike) -> Dict[int, int]:
    """The one-to-one map predicted cluster -> true class that maximises agreement (Hungarian method)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import confusion_matrix

    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}.")
    classes, clusters = np.unique(t), np.unique(p)
    labels = np.union1d(classes, clusters)
    cm = confusion_matrix(t, p, labels=labels)  # rows: true, cols: predicted
    rows, cols = linear_sum_assignment(cm, maximize=True)
    return {int(labels[c]): int(labels[r]) for r, c in zip(rows, cols)}


def cluster_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """ACC: the fraction of samples labelled right after the best one-to-one cluster-to-class matching."""
    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    mapping = match_clusters(t, p)
    mapped = np.array([mapping.get(int(c), -10**9) for c in p])
    return float((mapped == t).mean())


def evaluate(y_true: ArrayLike, y_pred: ArrayLike) -> Dict[str, float]:
    """``{"acc", "nmi", "ari"}`` of a clustering against known classes."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    return {
        "acc": cluster_accuracy(t, p),
        "nmi": float(normalized_mutual_info_score(t, p)),
        "ari": float(adjusted_rand_score(t, p)),
    }
