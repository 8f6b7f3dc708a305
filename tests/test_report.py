"""The run report: each picture is a real PNG, the HTML page is self-contained and complete, and it renders."""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from html.parser import HTMLParser

import numpy as np
import pytest

from dcss_plugin.app import plots
from dcss_plugin.app.cli import main
from dcss_plugin.metrics import cluster_accuracy
from dcss_plugin.app.report import load_run, write_report

FAST = ["--pretrain-epochs", "2", "--phase1-epochs", "1", "--phase2-epochs", "2", "--quiet", "--seed", "0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = "data:image/png;base64,"


def _skip_html_flag():
    """``["--no-html"]`` when `dcss fit` has it (the fixture writes the pages itself), else ``[]``."""
    import contextlib
    import io

    from dcss_plugin.app.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["fit", "--data", "x", "--clusters", "2", "--out", "o", "--no-html"])
    except SystemExit:
        return []
    return ["--no-html"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny `dcss fit` runs: 8x8 digit images with labels, and unlabelled vectors."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("report")
    flags = FAST + _skip_html_flag()
    d = load_digits()
    keep = np.random.default_rng(0).choice(len(d.target), size=150, replace=False)
    np.save(root / "img.npy", d.images[keep].astype(np.float32))  # (N, H, W) images
    np.save(root / "y.npy", d.target[keep].astype(np.int64))
    assert main(["fit", "--data", str(root / "img.npy"), "--labels", str(root / "y.npy"), "--clusters", "10",
                 "--out", str(root / "images"), *flags]) == 0
    rng = np.random.default_rng(0)
    vec = np.concatenate([rng.normal(m, 1.0, size=(30, 6)) for m in (-5.0, 0.0, 5.0)]).astype(np.float32)
    np.save(root / "vec.npy", vec)
    assert main(["fit", "--data", str(root / "vec.npy"), "--clusters", "3", "--out", str(root / "vectors"),
                 *flags]) == 0
    return {"images": root / "images", "vectors": root / "vectors"}


@pytest.fixture(scope="module")
def pages(runs):
    """``write_report`` on both runs, once: {name: (path, html text)}."""
    out = {}
    for name, run_dir in runs.items():
        path = write_report(run_dir)
        out[name] = (path, open(path, encoding="utf-8").read())
    return out


def png_size(data: bytes):
    """(width, height) from the IHDR chunk of a PNG."""
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def check_png(data: bytes) -> None:
    assert isinstance(data, bytes) and data.startswith(b"\x89PNG")
    w, h = png_size(data)
    assert 150 <= w <= 4000 and 150 <= h <= 4000, (w, h)
    assert 2_000 < len(data) < 5_000_000


class StrictParser(HTMLParser):
    """Collects tags and checks that every non-void element is closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.attrs, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
        else:
            self.stack.pop()


def parse(page: str) -> StrictParser:
    p = StrictParser()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def test_each_plot_returns_a_png(runs, tmp_path):
    run = load_run(runs["images"])
    s, k = run.samples, run.report["config"]["n_clusters"]
    check_png(plots.plot_loss_curves(run.log_records))
    check_png(plots.plot_cluster_sizes(run.report["cluster_sizes"]))
    check_png(plots.plot_embedding(s["u"], s["labels"], n_clusters=k, title="u"))
    check_png(plots.plot_embedding(s["q"], s["labels"], n_clusters=k, title="q"))
    check_png(plots.plot_embedding(s["u"][:, :2], s["labels"], n_clusters=k, title="d == 2, no t-SNE"))
    check_png(plots.plot_cluster_grid(s["x"], s["labels"], n_clusters=k))
    data = plots.plot_confusion(s["y"], s["labels"], path=tmp_path / "confusion.png")
    check_png(data)
    assert (tmp_path / "confusion.png").read_bytes() == data


def test_plots_handle_many_clusters_and_bad_input():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 25, 300)  # beyond 20 clusters: colorbar instead of a legend
    check_png(plots.plot_embedding(rng.normal(size=(300, 5)), labels, max_points=200))
    assert len(set(plots.cluster_colors(20))) == 20
    with pytest.raises(ValueError, match="log.jsonl"):
        plots.plot_loss_curves([])
    with pytest.raises(ValueError, match="images"):
        plots.plot_cluster_grid(rng.normal(size=(10, 5)), labels[:10])


@pytest.mark.parametrize("k_pred", [3, 5, 8])
def test_matched_confusion_trace_is_acc(k_pred):
    rng = np.random.default_rng(k_pred)
    y = rng.integers(0, 5, 400)
    pred = np.where(rng.random(400) < 0.6, (y * 7 + 1) % k_pred, rng.integers(0, k_pred, 400))
    m, rows, cols = plots.matched_confusion(y, pred)
    assert m.shape == (5, k_pred) and m.sum() == 400
    assert sorted(rows) == list(range(5)) and sorted(cols) == sorted(np.unique(pred).tolist())
    assert np.trace(m) / m.sum() == pytest.approx(cluster_accuracy(y, pred), abs=1e-12)
    for i, r in enumerate(rows):  # cells are what they say they are
        for j, c in enumerate(cols):
            assert m[i, j] == np.sum((y == r) & (pred == c))


def test_confusion_diagonal_matches_report_acc(runs):
    run = load_run(runs["images"])
    y, labels = np.load(runs["images"].parent / "y.npy"), np.load(runs["images"] / "labels.npy")
    m, _, _ = plots.matched_confusion(y, labels)  # the saved subsample is the whole (small) input here
    assert np.trace(m) / len(y) == pytest.approx(run.report["metrics"]["acc"], abs=1e-12)
    s = run.samples
    m_s, _, _ = plots.matched_confusion(s["y"], s["labels"])
    assert np.trace(m_s) / len(s["y"]) == pytest.approx(cluster_accuracy(s["y"], s["labels"]), abs=1e-12)


def test_report_with_labels_and_images(runs, pages):
    path, page = pages["images"]
    assert path == os.path.join(str(runs["images"]), "report.html") and os.path.isfile(path)
    assert not [f for f in os.listdir(runs["images"]) if f.startswith(".tmp-")]
    report = json.loads((runs["images"] / "report.json").read_text())
    for key in ("metrics", "metrics_after_pretrain_kmeans", "metrics_after_phase1", "kmeans_baseline"):
        for metric in ("acc", "nmi", "ari"):
            assert f"{report[key][metric]:.4f}" in page
    for text in ("Confusion matrix", "Samples per cluster", "2-D map of the embeddings u", "soft assignments q",
                 "Loss curves", "Cluster sizes", "pair_reduction",
                 str(report["n_samples"]), report["device"], f"{report['timings_s']['phase2']:.3f}"):
        assert text in page, text
    assert page.count(DATA_URI) == 6
    parsed = parse(page)
    for name, value in parsed.attrs:
        if name in ("src", "href"):
            assert value.startswith((DATA_URI, "#")), (name, value[:60])
    assert 'src="http' not in page and "<link" not in page and "<script" not in page and "url(" not in page
    assert sum(t == "img" for t in parsed.tags) == 6


def test_report_without_labels_or_images(pages):
    page = pages["vectors"][1]
    parse(page)
    assert page.count(DATA_URI) == 4  # loss, sizes, map of u, map of q
    assert "Confusion matrix" not in page and "Samples per cluster" not in page
    assert 'id="metrics"' not in page


def test_report_escapes_json_and_skips_missing_parts(runs, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report = json.loads((runs["vectors"] / "report.json").read_text())
    report["source"] = 'file:/tmp/<script>alert("x")</script>&.npy'
    report["config"]["note"] = "<b>bold</b>"
    (run_dir / "report.json").write_text(json.dumps(report))
    (run_dir / "log.jsonl").write_text('{"phase": "pretrain", "epoch": 0, "loss": 2.0}\nnot json\n'
                                       '{"phase": "pretrain", "epoch": 1, "loss": 1.0}\n')
    page = open(write_report(run_dir), encoding="utf-8").read()
    parse(page)
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;.npy" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count(DATA_URI) == 2  # loss curves and cluster sizes only: no samples.npz


def test_missing_or_corrupt_report_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"report\.json.*dcss fit"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        write_report(tmp_path / "nope")
    (tmp_path / "report.json").write_text("{truncated")
    with pytest.raises(ValueError, match="report.json"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_import_stays_light():
    code = ("import sys, dcss_plugin, dcss_plugin.app.plots, dcss_plugin.app.report; "
            "heavy = [m for m in ('matplotlib', 'sklearn.manifold') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(pages, tmp_path):
    path = pages["images"][0]
    shot = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", f"--screenshot={shot}", "--window-size=1280,3000",
           "file://" + os.path.abspath(path)]
    subprocess.run(cmd, check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import matplotlib.image as mpimg

    img = mpimg.imread(str(shot))
    assert img.shape[0] >= 2000 and img.shape[1] >= 1000
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std(axis=0).max() > 0.05  # not a blank page
    colors = np.unique((rgb[::7] * 255).astype(np.uint8), axis=0)
    assert len(colors) > 100  # text, tables and pictures, not a single colour
