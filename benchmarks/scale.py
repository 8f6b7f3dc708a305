"""Cost curve: time and ACC/NMI of DCSS (default preset), k-means and UMAP+GMM on MNIST subsets, in one run.

    .venv/bin/python -m benchmarks.scale [--sizes 5000,10000,20000,70000] [--seed 0] [--skip umap] [--device cuda]

For each N (a fixed random subset of the 70,000 images of ``benchmarks.mnist_data``), prints one row per method:
seconds, ACC, NMI, peak RSS of the process so far, and for DCSS the per-phase split (pretraining, k-means start,
Phase 1, Phase 2, the threads it chose) and seconds per 1,000 rows (so the growth in N reads off one column).
UMAP+GMM (umap-learn, the ``bench`` extra) embeds the pixels in 10 dimensions and fits a 10-component Gaussian
mixture, the pipeline a user would otherwise pick. Labels are used only to score.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from benchmarks.mnist_data import load_mnist70k, subset
from dcss_plugin import DCSS, evaluate


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def run_dcss(x: np.ndarray, seed: int, device: str = "auto") -> Dict[str, object]:
    t0 = time.perf_counter()
    est = DCSS(10, seed=seed, verbose=False, device=device).fit(x)
    secs = time.perf_counter() - t0
    h = est.history_
    split = " ".join(f"{k}={v:.0f}s" for k, v in h["time_s"].items())
    return {"labels": est.labels_, "seconds": secs, "detail": f"{split} threads={h.get('threads')} on {h['device']}"}


def run_kmeans(x: np.ndarray, seed: int, device: str = "auto") -> Dict[str, object]:
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    labels = KMeans(10, n_init=10, random_state=seed).fit_predict(x.reshape(len(x), -1))
    return {"labels": labels, "seconds": time.perf_counter() - t0, "detail": "n_init=10 on pixels"}


def run_umap_gmm(x: np.ndarray, seed: int, device: str = "auto") -> Dict[str, object]:
    try:
        import umap
    except ImportError:
        raise SystemExit("UMAP+GMM needs umap-learn: pip install -e '.[bench]' (or pass --skip umap).") from None
    from sklearn.mixture import GaussianMixture

    t0 = time.perf_counter()
    emb = umap.UMAP(n_components=10, n_neighbors=15, min_dist=0.0, random_state=seed).fit_transform(
        x.reshape(len(x), -1))
    labels = GaussianMixture(10, covariance_type="full", random_state=seed).fit_predict(emb)
    return {"labels": labels, "seconds": time.perf_counter() - t0, "detail": "UMAP 10-d, min_dist=0, GMM full"}


METHODS = {"dcss": run_dcss, "kmeans": run_kmeans, "umap": run_umap_gmm}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,10000,20000,70000", help="comma-separated subset sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="DCSS's device: auto, cpu or cuda")
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out: dcss, kmeans, umap")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    x_all, y_all = load_mnist70k()
    print(f"{'N':>6} {'method':>7} {'seconds':>8} {'s/1k rows':>9} {'ACC':>6} {'NMI':>6} {'RSS GB':>6}  detail")
    for n in sizes:
        x, y = subset(x_all, y_all, n, seed=0)
        for name, fn in METHODS.items():
            if name in skip:
                continue
            r = fn(x, args.seed, args.device)
            m = evaluate(y, r["labels"])
            print(f"{n:>6} {name:>7} {r['seconds']:>8.1f} {r['seconds'] / n * 1000:>9.2f} {m['acc']:>6.3f} "
                  f"{m['nmi']:>6.3f} {_rss_gb():>6.2f}  {r['detail']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
