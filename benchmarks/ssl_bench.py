"""Does SimCLR (via Lightly) + DCSS beat DCSS on its own autoencoder? Digits, per seed, honest timings.

Both methods get the same images and seed and never see the labels; the labels only score the final clusters.

* ``dcss``: ``dcss_plugin.DCSS(n_clusters=10, seed=s)`` (the default preset: conv autoencoder pretrained with
  denoising reconstruction + NT-Xent on u, k-means, Phase 1, Phase 2).
* ``simclr+dcss``: ``dcss_plugin.adapters.lightly.fit_lightly(x, 10, "simclr", seed=s)`` (SimCLR warm-up with
  Lightly's projection head and NT-Xent loss, k-means on u, then SimCLR + ``DCSSLoss``, the estimator's Phase-2
  objective with the two views of each image as known positives, jointly).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ssl_bench.py --seeds 0 1 2 [--threads 1] [--json out.json]
        [--ssl-epochs WARMUP JOINT]      # SimCLR recipe epochs (default 100 100; the adapter test uses 40 20)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["dcss", "simclr+dcss"], choices=["dcss", "simclr+dcss"])
    parser.add_argument("--ssl-epochs", type=int, nargs=2, metavar=("WARMUP", "JOINT"), default=[100, 100],
                        help="SimCLR warm-up and joint epochs of simclr+dcss (default 100 100)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sklearn.datasets import load_digits

    from dcss_plugin import DCSS
    from dcss_plugin.adapters.lightly import fit_lightly
    from dcss_plugin.metrics import evaluate

    d = load_digits()
    x, y = d.images.astype(np.float32), d.target
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            t0 = time.perf_counter()
            if method == "dcss":
                model = DCSS(n_clusters=10, seed=seed, device="cpu", verbose=False).fit(x)
            else:
                warmup, joint = args.ssl_epochs
                model = fit_lightly(x, 10, "simclr", seed=seed, device="cpu", pretrain_epochs=warmup,
                                    phase2_epochs=joint)
            wall = time.perf_counter() - t0
            m = evaluate(y, model.labels_)
            init = evaluate(y, model.history_["labels_after_pretrain"])
            row = {"seed": seed, "method": method, "acc": m["acc"], "nmi": m["nmi"], "ari": m["ari"],
                   "acc_after_pretrain_kmeans": init["acc"], "fit_s": wall, "epochs": model.history_["epochs"]}
            rows.append(row)
            print(f"seed {seed}  {method:<12} ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  "
                  f"(pretrain+k-means ACC {init['acc']:.4f})  {wall:6.1f} s", flush=True)
    print()
    print(f"{'method':<12} {'median ACC':>10} {'median NMI':>10} {'median s':>9}  (seeds {args.seeds})")
    for method in args.methods:
        sel = [r for r in rows if r["method"] == method]
        print(f"{method:<12} {statistics.median(r['acc'] for r in sel):>10.4f} "
              f"{statistics.median(r['nmi'] for r in sel):>10.4f} {statistics.median(r['fit_s'] for r in sel):>9.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
