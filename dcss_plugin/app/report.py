"""A self-contained HTML report of a ``dcss fit`` run directory.

:func:`write_report` reads ``report.json`` (required), ``log.jsonl`` and ``samples.npz`` (optional) from a run
directory and writes ``report.html`` beside them: the run summary, the metrics, the timings, the config and all
pictures from :mod:`dcss_plugin.app.plots`, embedded as base64 PNGs. The page loads no external resource, so it can be
mailed, archived or opened offline. Whatever a run did not record (no labels, vector data, no log) is left out.

Example:
    >>> from dcss_plugin.app.report import write_report
    >>> path = write_report("runs/digits")  # doctest: +SKIP
    >>> path  # doctest: +SKIP
    'runs/digits/report.html'
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["ReportFigure", "RunData", "load_run", "make_figures", "render_html", "write_report"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

REPORT_NAME = "report.html"
METRIC_ROWS: Tuple[Tuple[str, str], ...] = (
    ("metrics", "DCSS (this run)"),
    ("metrics_after_pretrain_kmeans", "after pretraining + k-means"),
    ("metrics_after_phase1", "after Phase 1"),
    ("kmeans_baseline", "k-means on the raw input"),
)
PHASES: Tuple[str, ...] = ("pretrain", "phase1", "phase2")


@dataclass
class RunData:
    """What a run directory holds: the parsed ``report.json``, the epoch log and the saved subsample."""

    run_dir: str
    report: Dict[str, Any]
    log_records: List[Dict[str, Any]] = field(default_factory=list)
    samples: Dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ReportFigure:
    """One rendered picture of the report."""

    key: str
    title: str
    caption: str
    png: bytes


# --------------------------------------------------------------------------------------------------- loading


def _read_report_json(run_dir: str) -> Dict[str, Any]:
    path = os.path.join(run_dir, "report.json")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"Run directory not found: {run_dir!r}. Pass the --out directory of `dcss fit`.")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No report.json in {run_dir!r}: this is not a finished `dcss fit` run directory. Create one with "
            f"`dcss fit --dataset digits --clusters 10 --out {run_dir}` (or --data X.npy) and report on that.")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path!r} could not be read as JSON ({exc}); re-run `dcss fit` to write it again.") from exc
    if not isinstance(report, dict):
        raise ValueError(f"{path!r} holds a {type(report).__name__}, not the JSON object written by `dcss fit`.")
    return report


def _read_log(run_dir: str) -> List[Dict[str, Any]]:
    """The epoch records of ``log.jsonl``; unreadable lines are skipped with a warning, a missing file gives []."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        log.info("No log.jsonl in %s; the report has no loss curves.", run_dir)
        return []
    records: List[Dict[str, Any]] = []
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("%s:%d is not valid JSON; skipped.", path, lineno)
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _read_samples(run_dir: str) -> Dict[str, np.ndarray]:
    """The arrays of ``samples.npz`` (``allow_pickle=False``); ``{}`` when absent or unreadable."""
    path = os.path.join(run_dir, "samples.npz")
    if not os.path.isfile(path):
        log.info("No samples.npz in %s; the report has no maps, image grid or confusion matrix.", run_dir)
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:  # noqa: BLE001 - a damaged optional file must not sink the whole report
        log.warning("Could not read %s (%s); pictures from it are left out.", path, exc)
        return {}


def load_run(run_dir: PathLike) -> RunData:
    """Read a run directory written by ``dcss fit``.

    Raises :class:`FileNotFoundError` when ``report.json`` is missing and :class:`ValueError` when it is corrupt.

    Example:
        >>> run = load_run("runs/digits")  # doctest: +SKIP
        >>> run.report["n_samples"], sorted(run.samples)  # doctest: +SKIP
        (1797, ['index', 'labels', 'q', 'u', 'x', 'y'])
    """
    run_dir = os.fspath(run_dir)
    report = _read_report_json(run_dir)
    return RunData(run_dir=run_dir, report=report, log_records=_read_log(run_dir), samples=_read_samples(run_dir))


# --------------------------------------------------------------------------------------------------- figures


def _n_clusters(run: RunData) -> Optional[int]:
    cfg = run.report.get("config")
    k = cfg.get("n_clusters") if isinstance(cfg, dict) else None
    if isinstance(k, int) and k > 0:
        return k
    sizes = run.report.get("cluster_sizes")
    return len(sizes) if isinstance(sizes, list) and sizes else None


def _seed(run: RunData) -> int:
    seed = run.report.get("seed")
    return int(seed) if isinstance(seed, int) else 0


def _try_figure(key: str, title: str, caption: str, draw: Callable[[], bytes]) -> Optional[ReportFigure]:
    """Draw one picture; a failure is logged and the picture left out rather than losing the whole report."""
    t0 = time.perf_counter()
    try:
        png = draw()
    except Exception as exc:  # noqa: BLE001
        log.warning("Picture %r left out of the report: %s", key, exc)
        return None
    log.debug("Picture %r drawn in %.2f s.", key, time.perf_counter() - t0)
    return ReportFigure(key=key, title=title, caption=caption, png=png)


def make_figures(run: RunData, max_points: int = 1000) -> List[ReportFigure]:
    """All pictures that ``run`` has the data for, in report order.

    ``max_points`` caps the points embedded by t-SNE (the slowest step).

    Example:
        >>> figs = make_figures(load_run("runs/digits"))  # doctest: +SKIP
        >>> [f.key for f in figs]  # doctest: +SKIP
        ['loss', 'sizes', 'tsne_u', 'tsne_q', 'confusion', 'grid']
    """
    from . import plots

    k, seed, s = _n_clusters(run), _seed(run), run.samples
    figures: List[Optional[ReportFigure]] = []
    if run.log_records:
        figures.append(_try_figure("loss", "Loss curves", "Mean training loss per epoch in each phase (from "
                                   "log.jsonl).", lambda: plots.plot_loss_curves(run.log_records)))
    sizes = run.report.get("cluster_sizes")
    if isinstance(sizes, list) and sizes:
        figures.append(_try_figure("sizes", "Cluster sizes", "Samples per predicted cluster over the whole "
                                   "input.", lambda: plots.plot_cluster_sizes(sizes)))
    labels = s.get("labels")
    if labels is not None:
        for key, name, what in (("u", "embeddings u", "encoder embeddings u"),
                                ("q", "soft assignments q", "soft cluster assignments q")):
            if key in s and len(s[key]) == len(labels):
                feats = s[key]
                method = "t-SNE" if feats.reshape(len(feats), -1).shape[1] > 2 else "the two coordinates"
                figures.append(_try_figure(
                    f"map_{key}", f"2-D map of the {name}",
                    f"{method} of the {what} on a seeded subsample, coloured by predicted cluster.",
                    lambda f=feats, n=name: plots.plot_embedding(f, labels, title=f"2-D map of the {n}",
                                                                 n_clusters=k, seed=seed, max_points=max_points)))
        if "y" in s and len(s["y"]) == len(labels):
            figures.append(_try_figure(
                "confusion", "Confusion matrix", "True class against predicted cluster on the saved subsample, "
                "columns reordered by the Hungarian matching; the diagonal counts the samples labelled right.",
                lambda: plots.plot_confusion(s["y"], labels)))
        if "x" in s and len(s["x"]) == len(labels):
            figures.append(_try_figure(
                "grid", "Samples per cluster", "Up to 10 seeded images per predicted cluster (min-max scaled).",
                lambda: plots.plot_cluster_grid(s["x"], labels, n_clusters=k, seed=seed)))
    return [f for f in figures if f is not None]


# --------------------------------------------------------------------------------------------------- HTML


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: Optional[int] = 4) -> str:
    """A JSON value as escaped text: floats rounded (``digits=None``: shortest exact form), containers as compact
    JSON, None as an em dash."""
    if value is None:
        return "&mdash;"
    if isinstance(value, bool):
        return _esc(str(value).lower())
    if isinstance(value, float):
        if digits is None or not math.isfinite(value):
            return _esc(repr(value))
        return _esc(f"{value:.{digits}f}")
    if isinstance(value, (list, tuple, dict)):
        return _esc(json.dumps(value))
    return _esc(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table; ``header`` is escaped here, ``rows`` cells must already be escaped HTML."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cls_attr = f' class="{_esc(cls)}"' if cls else ""
    return f"<table{cls_attr}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _summary_section(run: RunData) -> str:
    r = run.report
    shape = r.get("sample_shape")
    rows = [
        ("source", _fmt(r.get("source"))),
        ("samples (N)", _fmt(r.get("n_samples"))),
        ("sample shape", _esc(" × ".join(str(v) for v in shape)) if isinstance(shape, list) and shape else _fmt(shape)),
        ("clusters (K)", _fmt(_n_clusters(run))),
        ("seed", _fmt(r.get("seed"))),
        ("device", _fmt(r.get("device"))),
        ("dcss-plugin version", _fmt(r.get("version"))),
        ("Python", _fmt(r.get("python"))),
        ("run directory", _esc(os.path.abspath(run.run_dir))),
    ]
    rows = [(name, val) for name, val in rows if val != "&mdash;"]
    cells = "\n".join(f"<tr><th scope=\"row\">{_esc(n)}</th><td>{v}</td></tr>" for n, v in rows)
    return f'<section id="summary">\n<h2>Run summary</h2>\n<table class="kv">\n{cells}\n</table>\n</section>'


def _metrics_section(run: RunData) -> str:
    rows = []
    for key, name in METRIC_ROWS:
        m = run.report.get(key)
        if isinstance(m, dict):
            rows.append([_esc(name)] + [_fmt(m.get(metric)) for metric in ("acc", "nmi", "ari")])
    if not rows:
        return ""
    note = ("<p class=\"note\">ACC: accuracy after the best one-to-one cluster-to-class matching (Hungarian); "
            "NMI: normalised mutual information; ARI: adjusted Rand index. Computed on all "
            f"{_fmt(run.report.get('n_samples'))} samples.</p>")
    return (f'<section id="metrics">\n<h2>Metrics</h2>\n'
            f'{_table(["method", "ACC", "NMI", "ARI"], rows, "num")}\n{note}\n</section>')


def _timings_section(run: RunData) -> str:
    r = run.report
    timings = r.get("timings_s") if isinstance(r.get("timings_s"), dict) else {}
    per_epoch = r.get("time_per_epoch_s") if isinstance(r.get("time_per_epoch_s"), dict) else {}
    epochs = r.get("epochs") if isinstance(r.get("epochs"), dict) else {}
    final = r.get("final_loss") if isinstance(r.get("final_loss"), dict) else {}
    if not (timings or per_epoch or epochs):
        return ""
    phases = [p for p in PHASES if p in timings or p in per_epoch or p in epochs]
    phases += [p for p in list(per_epoch) + list(epochs) if p not in phases]
    rows = [[_esc(p), _fmt(epochs.get(p)), _fmt(timings.get(p), 3), _fmt(per_epoch.get(p), 3),
             _fmt(final.get(p))] for p in dict.fromkeys(phases)]
    other = [[_esc(k), _fmt(v, 3)] for k, v in timings.items() if k not in phases]
    parts = ['<section id="timings">\n<h2>Timings</h2>',
             _table(["phase", "epochs", "total (s)", "per epoch (s)", "final loss"], rows, "num")]
    if other:
        parts.append("<h3>Other steps</h3>")
        parts.append(_table(["step", "time (s)"], other, "num"))
    parts.append("</section>")
    return "\n".join(parts)


def _config_section(run: RunData) -> str:
    cfg = run.report.get("config")
    if not isinstance(cfg, dict) or not cfg:
        return ""
    rows = [[f"<code>{_esc(k)}</code>", _fmt(v, None)] for k, v in cfg.items()]
    return f'<section id="config">\n<h2>Configuration</h2>\n{_table(["parameter", "value"], rows, "kv2")}\n</section>'


def _figures_section(figures: Sequence[ReportFigure]) -> str:
    if not figures:
        return ""
    items: List[str] = []
    maps: List[str] = []
    for fig in figures:
        data = base64.b64encode(fig.png).decode("ascii")
        item = (f'<figure id="fig-{_esc(fig.key)}">\n<h3>{_esc(fig.title)}</h3>\n'
                f'<img src="data:image/png;base64,{data}" alt="{_esc(fig.title)}">\n'
                f'<figcaption>{_esc(fig.caption)}</figcaption>\n</figure>')
        if fig.key.startswith("map_"):  # the 2-D maps of u and q sit side by side
            if not maps:
                items.append("")  # placeholder, filled below
            maps.append(item)
        else:
            items.append(item)
    if maps:
        items[items.index("")] = '<div class="row">\n' + "\n".join(maps) + "\n</div>"
    return '<section id="pictures">\n<h2>Pictures</h2>\n' + "\n".join(items) + "\n</section>"


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;background:#f6f7f9;
color:#1d2330;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.25em;margin:28px 0 10px;border-bottom:2px solid #d9dde5;padding-bottom:4px}
h3{font-size:1.05em;margin:6px 0 8px}
.sub{color:#5a6273;margin:0 0 8px}
nav a{margin-right:14px;color:#2458c6;text-decoration:none}
section{background:#fff;border:1px solid #e2e5eb;border-radius:8px;padding:4px 18px 14px;margin-top:18px}
table{border-collapse:collapse;margin:6px 0;font-size:0.93em}
th,td{border:1px solid #dde1e8;padding:4px 10px;text-align:left;vertical-align:top}
thead th{background:#eef1f6}
table.num td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
table.kv th{background:#f3f5f9;font-weight:600;white-space:nowrap}
td{word-break:break-word}
code{font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:0.95em}
figure{margin:14px 0 22px}
figure img{max-width:100%;height:auto;border:1px solid #eceef2;border-radius:4px;background:#fff}
figcaption{color:#5a6273;font-size:0.9em;margin-top:4px}
.row{display:flex;flex-wrap:wrap;gap:18px}
.row figure{flex:1 1 480px;min-width:0}
.note{color:#5a6273;font-size:0.88em}
footer{color:#8a91a0;font-size:0.85em;margin-top:24px}
"""


def render_html(run: RunData, figures: Sequence[ReportFigure]) -> str:
    """The report page as one HTML string (inline CSS, images as data URIs, every JSON string escaped).

    Example:
        >>> run = RunData(run_dir=".", report={"source": "demo", "n_samples": 3})
        >>> "<h1>" in render_html(run, [])
        True
    """
    r = run.report
    source = r.get("source", os.path.basename(os.path.abspath(run.run_dir)))
    sections = [_summary_section(run), _metrics_section(run), _timings_section(run), _figures_section(figures),
                _config_section(run)]
    anchors = [("summary", "Summary"), ("metrics", "Metrics"), ("timings", "Timings"), ("pictures", "Pictures"),
               ("config", "Configuration")]
    nav = " ".join(f'<a href="#{a}">{_esc(t)}</a>' for (a, t), sec in zip(anchors, sections) if sec)
    body = "\n".join(sec for sec in sections if sec)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>DCSS run report: {_esc(source)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>DCSS run report</h1>\n<p class=\"sub\">{_esc(source)} &middot; N = {_fmt(r.get('n_samples'))} "
        f"&middot; K = {_fmt(_n_clusters(run))} &middot; seed {_fmt(r.get('seed'))}</p>\n<nav>{nav}</nav>\n"
        f"{body}\n<footer>Written by dcss-plugin {_fmt(r.get('version'))} from report.json, log.jsonl and "
        "samples.npz. Self-contained: no external resources.</footer>\n</main>\n</body>\n</html>\n"
    )


def write_report(run_dir: PathLike, out: Optional[PathLike] = None, max_points: int = 1000) -> str:
    """Write ``report.html`` (or ``out``) for a ``dcss fit`` run directory, atomically, and return its path.

    Raises :class:`FileNotFoundError` if ``run_dir`` has no ``report.json`` and :class:`ValueError` if it is not
    valid JSON. Missing optional inputs (labels, images, ``log.jsonl``, ``samples.npz``) only drop their parts.

    Example:
        >>> write_report("runs/digits")  # doctest: +SKIP
        'runs/digits/report.html'
    """
    from dcss_plugin.io import atomic_write_bytes

    t0 = time.perf_counter()
    run = load_run(run_dir)
    figures = make_figures(run, max_points=max_points)
    path = os.fspath(out) if out is not None else os.path.join(run.run_dir, REPORT_NAME)
    atomic_write_bytes(path, render_html(run, figures).encode("utf-8"))
    log.info("Wrote %s (%d pictures) in %.1f s.", path, len(figures), time.perf_counter() - t0)
    return path
