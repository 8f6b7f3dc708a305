"""Pictures of a DCSS run, rendered headless with matplotlib's Agg canvas.

Every ``plot_*`` function draws one picture and returns it as PNG bytes; pass ``path=`` to also save it. No
pyplot state is touched (figures are built with :class:`matplotlib.figure.Figure` directly), so the functions are
safe in scripts, servers and notebooks alike. matplotlib and scikit-learn are imported only inside functions.

Example:
    >>> import numpy as np
    >>> from dcss_plugin.app.plots import plot_cluster_sizes
    >>> png = plot_cluster_sizes([320, 19, 215])
    >>> png[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

import io
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "cluster_colors",
    "embed_2d",
    "figure_to_png",
    "matched_confusion",
    "plot_cluster_grid",
    "plot_cluster_sizes",
    "plot_confusion",
    "plot_embedding",
    "plot_loss_curves",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

PHASE_TITLES: Dict[str, str] = {
    "pretrain": "Pretraining (autoencoder)",
    "phase1": "Phase 1 (centering)",
    "phase2": "Phase 2 (pairwise similarity)",
}
# Extra per-epoch statistics drawn on a second y axis, in a contrasting colour.
_SECONDARY: Dict[str, Tuple[str, str]] = {
    "phase1": ("min_center_distance", "min. center distance"),
    "phase2": ("positive_pair_share", "positive-pair share"),
}
_DPI = 100


# --------------------------------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float) -> "Figure":
    """A pyplot-free figure (Agg canvas, so no display is needed).

    Example:
        >>> fig = _new_figure(4, 3)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_to_png(fig: "Figure", path: Optional[PathLike] = None) -> bytes:
    """Render ``fig`` to PNG bytes; also write them to ``path`` (atomically) when given.

    Example:
        >>> fig = _new_figure(2, 2)
        >>> figure_to_png(fig)[:4]
        b'\\x89PNG'
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white")
    data = buf.getvalue()
    if path is not None:
        from dcss_plugin.io import atomic_write_bytes

        atomic_write_bytes(path, data)
    return data


def cluster_colors(n: int) -> List[Tuple[float, float, float, float]]:
    """``n`` distinct RGBA colours for cluster ids: ``tab10`` up to 10, ``tab20`` up to 20, evenly spaced hues beyond.

    Example:
        >>> len(cluster_colors(12))
        12
    """
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [tuple(cmap(i)) for i in range(n)]
    if n <= 20:
        # tab20 pairs a strong and a pale shade; take all strong shades first so that up to 10 stay very distinct.
        cmap = colormaps["tab20"]
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))
        return [tuple(cmap(order[i])) for i in range(n)]
    cmap = colormaps["hsv"]
    return [tuple(cmap(i / n)) for i in range(n)]


def _n_clusters(labels: np.ndarray, n_clusters: Optional[int]) -> int:
    top = int(labels.max()) + 1 if labels.size else 0
    return max(top, int(n_clusters or 0), 1)


def _add_cluster_key(fig: "Figure", ax: "Axes", k: int, colors: Sequence[Any]) -> None:
    """A legend with one entry per cluster (K <= 20) or a discrete colorbar (K > 20), right of ``ax``."""
    if k <= 20:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", markersize=7, color=colors[i], label=str(i))
                   for i in range(k)]
        ncol = 1 if k <= 12 else 2
        ax.legend(handles=handles, title="cluster", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize=8, title_fontsize=9, ncol=ncol, frameon=False, borderaxespad=0.0, handletextpad=0.2,
                  columnspacing=0.8)
        return
    from matplotlib import cm
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cmap = ListedColormap(list(colors))
    norm = BoundaryNorm(np.arange(k + 1) - 0.5, k)
    cbar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("cluster")


# --------------------------------------------------------------------------------------------------- loss curves


def _group_by_phase(records: Sequence[Mapping[str, Any]]) -> Dict[str, List[Mapping[str, Any]]]:
    """Split epoch records by phase (known phases first, in training order), sorted by epoch.

    An epoch logged twice (a resumed run re-does the interrupted epoch and appends to ``log.jsonl``) keeps its
    last record.
    """
    groups: Dict[str, Dict[Any, Mapping[str, Any]]] = {}
    for i, rec in enumerate(records):
        phase = rec.get("phase")
        if isinstance(phase, str) and "loss" in rec:
            epoch = rec.get("epoch")
            groups.setdefault(phase, {})[epoch if isinstance(epoch, int) else f"#{i}"] = rec
    known = [p for p in PHASE_TITLES if p in groups]
    ordered = known + [p for p in groups if p not in PHASE_TITLES]
    return {p: sorted(groups[p].values(), key=lambda r: r.get("epoch") if isinstance(r.get("epoch"), int) else 0)
            for p in ordered}


def _series(recs: Sequence[Mapping[str, Any]], key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of ``key`` over ``recs``, skipping records that lack it or hold a non-number."""
    xs, ys = [], []
    for i, rec in enumerate(recs):
        val = rec.get(key)
        if isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
            epoch = rec.get("epoch", i)
            xs.append(int(epoch) + 1 if isinstance(epoch, (int, float)) else i + 1)
            ys.append(float(val))
    return np.asarray(xs), np.asarray(ys)


def plot_loss_curves(records: Sequence[Mapping[str, Any]], path: Optional[PathLike] = None) -> bytes:
    """Training loss per epoch, one panel per phase; Phase 1 / Phase 2 add their diagnostic on a second axis.

    ``records`` are the lines of ``log.jsonl``: ``{"phase", "epoch", "loss", ...}``.

    Example:
        >>> recs = [{"phase": "pretrain", "epoch": e, "loss": 1.0 / (e + 1)} for e in range(5)]
        >>> plot_loss_curves(recs)[:4]
        b'\\x89PNG'
    """
    groups = _group_by_phase(records)
    if not groups:
        raise ValueError("No epoch records with a 'loss' to plot (is log.jsonl empty?).")
    n = len(groups)
    fig = _new_figure(4.6 * n, 3.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (phase, recs) in zip(axes, groups.items()):
        x, y = _series(recs, "loss")
        lines = ax.plot(x, y, color="tab:blue", marker="o" if len(x) <= 30 else None, markersize=3.5,
                        label="loss")
        ax.set_title(PHASE_TITLES.get(phase, phase), fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        if len(x) and y.min() > 0 and y.max() / y.min() > 50:
            ax.set_yscale("log")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        extra = _SECONDARY.get(phase)
        if extra is not None:
            x2, y2 = _series(recs, extra[0])
            if len(x2):
                ax2 = ax.twinx()
                lines += ax2.plot(x2, y2, color="tab:orange", linestyle="--", marker="s" if len(x2) <= 30 else None,
                                  markersize=3, label=extra[1])
                ax2.set_ylabel(extra[1], color="tab:orange")
                ax2.tick_params(axis="y", colors="tab:orange")
        if len(lines) > 1:  # below the axes, so it never hides a curve
            ax.legend(handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(lines), fontsize=8,
                      frameon=False)
    fig.suptitle("Training loss per phase", fontsize=12)
    fig.tight_layout()
    return figure_to_png(fig, path)


# --------------------------------------------------------------------------------------------------- 2-D maps


def embed_2d(features: ArrayLike, seed: int = 0, max_points: int = 1000, max_iter: int = 500,
             ) -> Tuple[np.ndarray, np.ndarray]:
    """2-D coordinates of (a seeded subsample of) ``features``: t-SNE, or the features themselves if ``d <= 2``.

    Returns ``(coords, index)`` where ``index`` selects the rows that were embedded. Rows above ``max_points``
    are subsampled (seeded); inputs wider than 50 dims go through PCA to 50 first to keep t-SNE fast.

    Example:
        >>> xy, idx = embed_2d(np.random.default_rng(0).normal(size=(100, 5)), max_points=50)
        >>> xy.shape, idx.shape
        ((50, 2), (50,))
    """
    a = np.asarray(features, dtype=np.float64)
    if a.ndim != 2:
        a = a.reshape(len(a), -1)
    n, d = a.shape
    rng = np.random.default_rng(seed)
    index = np.arange(n) if n <= max_points else np.sort(rng.choice(n, size=max_points, replace=False))
    a = a[index]
    if d <= 2:
        return (np.hstack([a, np.zeros((len(a), 2 - d))]) if d < 2 else a), index
    if len(a) < 5:  # t-SNE needs perplexity < n; a tiny sample is shown on its first two PCs instead
        a = a - a.mean(0)
        vt = np.linalg.svd(a, full_matrices=False)[2]
        return a @ vt[:2].T, index
    from sklearn.manifold import TSNE

    if d > 50:
        from sklearn.decomposition import PCA

        a = PCA(n_components=50, random_state=seed).fit_transform(a)
    perplexity = float(min(30.0, (len(a) - 1) / 3.0))
    import inspect

    iters = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"  # scikit-learn < 1.5
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed,
                **{iters: max(250, max_iter)})
    with _single_thread():
        return tsne.fit_transform(a), index


def _single_thread() -> Any:
    """Limit OpenMP/BLAS to one thread: t-SNE's OpenMP barriers spin badly on a busy small machine (3x slower
    with 2 threads than with 1 on a loaded 2-core box), and one thread costs little on an idle one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def plot_embedding(features: ArrayLike, labels: ArrayLike, *, title: str = "t-SNE of the embeddings",
                   n_clusters: Optional[int] = None, seed: int = 0, max_points: int = 1000,
                   coords: Optional[np.ndarray] = None, path: Optional[PathLike] = None) -> bytes:
    """A 2-D map (t-SNE, or the raw axes if ``d == 2``) of ``features`` coloured by predicted cluster.

    Pass precomputed ``coords`` (aligned with ``labels``) to skip the embedding.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> png = plot_embedding(rng.normal(size=(60, 2)), rng.integers(0, 3, 60), title="u")
    """
    lab = np.asarray(labels).astype(np.int64).reshape(-1)
    if coords is None:
        feats = np.asarray(features)
        if len(feats) != len(lab):
            raise ValueError(f"features and labels differ in length: {len(feats)} vs {len(lab)}.")
        coords, index = embed_2d(feats, seed=seed, max_points=max_points)
        lab = lab[index]
        method = "t-SNE" if np.asarray(features).reshape(len(feats), -1).shape[1] > 2 else "raw"
    else:
        method = "given"
    k = _n_clusters(lab, n_clusters)
    colors = cluster_colors(k)
    fig = _new_figure(6.6, 5.4)
    ax = fig.add_subplot(1, 1, 1)
    size = float(np.clip(3000.0 / max(len(lab), 1), 4, 30))
    point_colors = np.asarray(colors)[lab] if len(lab) else np.zeros((0, 4))
    order = np.random.default_rng(seed).permutation(len(lab))  # no cluster is systematically painted on top
    ax.scatter(coords[order, 0], coords[order, 1], c=point_colors[order], s=size, linewidths=0, alpha=0.8)
    ax.set_title(f"{title}\n({len(lab)} points, coloured by predicted cluster)", fontsize=11)
    if method == "t-SNE":
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.set_xlabel("dim 1")
        ax.set_ylabel("dim 2")
    _add_cluster_key(fig, ax, k, colors)
    fig.tight_layout()
    return figure_to_png(fig, path)


# --------------------------------------------------------------------------------------------------- cluster sizes


def plot_cluster_sizes(sizes: Sequence[int], path: Optional[PathLike] = None, *,
                       title: str = "Cluster sizes (all samples)") -> bytes:
    """A bar chart of the number of samples per predicted cluster, with the counts written on the bars.

    Example:
        >>> plot_cluster_sizes([5, 3, 0])[:4]
        b'\\x89PNG'
    """
    counts = np.asarray(sizes, dtype=np.int64).reshape(-1)
    k = len(counts)
    if k == 0:
        raise ValueError("No cluster sizes to plot.")
    fig = _new_figure(max(5.0, min(14.0, 0.45 * k + 2.5)), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(np.arange(k), counts, color=cluster_colors(k), edgecolor="0.3", linewidth=0.5)
    if k <= 40:
        ax.bar_label(bars, labels=[str(c) for c in counts], fontsize=8 if k <= 24 else 6.5, padding=2)
    ax.set_xticks(np.arange(k) if k <= 40 else np.arange(0, k, max(1, k // 20)))
    ax.tick_params(axis="x", labelsize=9 if k <= 30 else 7)
    ax.set_xlabel("predicted cluster")
    ax.set_ylabel("samples")
    total = int(counts.sum())
    ax.set_title(f"{title}: N = {total}, K = {k}, empty = {int((counts == 0).sum())}", fontsize=11)
    ax.set_ylim(0, max(1, counts.max()) * 1.2)
    ax.set_xlim(-0.6, k - 0.4)
    if total:
        ax.axhline(total / k, color="0.4", linestyle=":", linewidth=1, label="uniform (N/K)")
        ax.legend(loc="best", fontsize=8, framealpha=0.9)  # "best" avoids the bars and their count labels
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return figure_to_png(fig, path)


# --------------------------------------------------------------------------------------------------- image grid


def _to_display(img: np.ndarray) -> Tuple[np.ndarray, Optional[str]]:
    """One (C, H, W) or (H, W) sample as an (H, W) gray or (H, W, 3) RGB array scaled to [0, 1]."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else (np.moveaxis(a[:3], 0, -1) if a.shape[0] >= 3 else a.mean(0))
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a, ("gray" if a.ndim == 2 else None)


def plot_cluster_grid(images: ArrayLike, labels: ArrayLike, *, n_clusters: Optional[int] = None,
                      per_cluster: int = 10, seed: int = 0, path: Optional[PathLike] = None) -> bytes:
    """Sample images per predicted cluster: one row per cluster, up to ``per_cluster`` seeded picks each.

    ``images`` are ``(N, C, H, W)`` (or ``(N, H, W)``); each is min-max scaled for display.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> png = plot_cluster_grid(rng.random((30, 1, 8, 8)), rng.integers(0, 3, 30), per_cluster=4)
    """
    x = np.asarray(images)
    lab = np.asarray(labels).astype(np.int64).reshape(-1)
    if x.ndim not in (3, 4) or len(x) != len(lab):
        raise ValueError(f"Expected images (N, C, H, W) or (N, H, W) matching {len(lab)} labels, got {x.shape}.")
    k = _n_clusters(lab, n_clusters)
    rng = np.random.default_rng(seed)
    h, w = x.shape[-2], x.shape[-1]
    gap = max(1, min(h, w) // 8)
    # One mosaic image (white background) instead of K x per_cluster axes: ~10x faster to draw.
    mosaic = np.ones((k * (h + gap) - gap, per_cluster * (w + gap) - gap, 3))
    counts = []
    for c in range(k):
        members = np.flatnonzero(lab == c)
        counts.append(len(members))
        picks = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
        for j, i in enumerate(picks):
            img = _to_display(x[i])[0]
            top, left = c * (h + gap), j * (w + gap)
            mosaic[top:top + h, left:left + w] = img[..., None] if img.ndim == 2 else img
    cell = 0.62 if max(h, w) < 32 else 0.9  # inches per image
    label_w, title_h = 1.15, 0.45
    width, height = label_w + cell * per_cluster, title_h + cell * k
    fig = _new_figure(width, height)
    ax = fig.add_axes((label_w / width, 0.0, 1.0 - label_w / width, 1.0 - title_h / height))
    ax.imshow(mosaic, interpolation="nearest" if max(h, w) < 64 else "antialiased", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks(np.arange(k) * (h + gap) + (h - 1) / 2.0,
                  [f"cluster {c}\n(n={n})" if n else f"cluster {c}\n(empty)" for c, n in enumerate(counts)],
                  fontsize=8)
    ax.tick_params(axis="y", length=0, pad=6)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"Samples per predicted cluster (up to {per_cluster} each; n = count in the saved subsample)",
                 fontsize=10, pad=8)
    return figure_to_png(fig, path)


# --------------------------------------------------------------------------------------------------- confusion


def matched_confusion(y_true: ArrayLike, y_pred: ArrayLike) -> Tuple[np.ndarray, List[int], List[int]]:
    """Confusion counts (rows: true classes, columns: predicted clusters) ordered by the Hungarian matching.

    Column ``i`` holds the cluster matched to the class in row ``i``, so the diagonal counts the samples that the
    matching labels right and ``trace(matrix) / N`` equals :func:`dcss_plugin.metrics.cluster_accuracy`.
    Unmatched classes / clusters (when their numbers differ) come last.

    Returns ``(matrix, row_labels, col_labels)``: ``matrix[i, j]`` counts samples of class ``row_labels[i]``
    predicted as cluster ``col_labels[j]``.

    Example:
        >>> m, rows, cols = matched_confusion([0, 0, 1, 1], [1, 1, 0, 0])
        >>> m.tolist(), rows, cols
        ([[2, 0], [0, 2]], [0, 1], [1, 0])
    """
    from dcss_plugin.metrics import match_clusters

    t = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}.")
    classes = [int(c) for c in np.unique(t)]
    clusters = [int(c) for c in np.unique(p)]
    class_set, cluster_set = set(classes), set(clusters)
    # Only pairs of a real cluster and a real class (match_clusters also pairs with labels absent on one side).
    pairs = {cls: clu for clu, cls in match_clusters(t, p).items() if clu in cluster_set and cls in class_set}
    rows = [c for c in classes if c in pairs] + [c for c in classes if c not in pairs]
    matched_cols = [pairs[c] for c in rows if c in pairs]
    cols = matched_cols + [c for c in clusters if c not in set(matched_cols)]
    r_index = {c: i for i, c in enumerate(rows)}
    c_index = {c: i for i, c in enumerate(cols)}
    matrix = np.zeros((len(rows), len(cols)), dtype=np.int64)
    np.add.at(matrix, (np.array([r_index[int(v)] for v in t], dtype=np.int64),
                       np.array([c_index[int(v)] for v in p], dtype=np.int64)), 1)
    return matrix, rows, cols


def plot_confusion(y_true: ArrayLike, y_pred: ArrayLike, path: Optional[PathLike] = None, *,
                   title: str = "Confusion matrix after Hungarian matching") -> bytes:
    """Heat map of :func:`matched_confusion` with every count written in its cell (diagonal = matched right).

    Example:
        >>> plot_confusion([0, 0, 1, 1, 2], [2, 2, 0, 1, 1])[:4]
        b'\\x89PNG'
    """
    matrix, rows, cols = matched_confusion(y_true, y_pred)
    n = int(matrix.sum())
    acc = float(np.trace(matrix)) / n if n else float("nan")
    side = max(len(rows), len(cols))
    cell = float(np.clip(11.0 / max(side, 1), 0.3, 0.6))  # inches per cell: readable counts up to ~20 x 20
    fig = _new_figure(max(4.5, cell * len(cols) + 2.6), max(3.5, cell * len(rows) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(matrix, cmap="Blues", interpolation="nearest", aspect="auto")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("samples")
    digits = len(str(int(matrix.max()))) if matrix.size else 1
    fs = float(np.clip(cell * 72 * 0.9 / max(digits * 0.62, 1.6), 5.5, 10.0))  # fit the widest count in a cell
    threshold = matrix.max() / 2.0 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            val = int(matrix[i, j])
            ax.text(j, i, str(val), ha="center", va="center", fontsize=fs,
                    color="white" if val > threshold else ("0.55" if val == 0 else "black"),
                    fontweight="bold" if i == j else "normal")
    ax.set_xticks(np.arange(len(cols)), [str(c) for c in cols], fontsize=fs)
    ax.set_yticks(np.arange(len(rows)), [str(r) for r in rows], fontsize=fs)
    ax.set_xlabel("predicted cluster (ordered by matched class)")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\nACC = trace / N = {int(np.trace(matrix))} / {n} = {acc:.4f}", fontsize=11)
    fig.tight_layout()
    return figure_to_png(fig, path)
