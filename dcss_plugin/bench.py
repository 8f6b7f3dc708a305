"""``dcss bench fit``: per-phase timings and quality, and the one-pass Phase-1 loss versus the official schedule.

The official DCSS code runs Phase 1 as K forward/backward/optimizer steps per batch (one per cluster-specific loss
``L_k``); :func:`~dcss_plugin.functional.centering_loss` takes the sum of the K losses in one pass. Both are timed
here on the same network, data and batches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import numpy as np
import torch

from .autoencoders import ConvAutoencoder, MLPAutoencoder
from .centers import ClusterCenters
from .data import InputNormalizer, load_named_dataset
from .estimator import DCSS
from .functional import centering_loss
from .metrics import evaluate

__all__ = ["run_bench", "phase1_epoch_one_pass", "phase1_epoch_per_cluster"]


def _batches(n: int, batch_size: int, gen: torch.Generator) -> List[torch.Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch_size))


def phase1_epoch_one_pass(ae, centers: ClusterCenters, xn, opt, batch_size: int, gen, m: float, lam: float) -> None:
    """One Phase-1 epoch with the K losses summed: one forward, one backward, one step per batch."""
    ae.train()
    for idx in _batches(len(xn), batch_size, gen):
        xb = xn[idx]
        u = ae.encode(xb)
        x_hat = ae.decode(u).view_as(xb)
        loss = centering_loss(xb, x_hat, u, centers.centers, centers(u.detach()), m=m, lam=lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def phase1_epoch_per_cluster(ae, centers: ClusterCenters, xn, opt, batch_size: int, gen, m: float,
                             lam: float) -> None:
    """One Phase-1 epoch as the official code runs it: per batch, K forward/backward/optimizer steps."""
    ae.train()
    k_total = centers.num_clusters
    for idx in _batches(len(xn), batch_size, gen):
        xb = xn[idx]
        for k in range(k_total):
            u = ae.encode(xb)
            x_hat = ae.decode(u).view_as(xb)
            p = centers(u.detach())
            loss_k = centering_loss(xb, x_hat, u, centers.centers[k:k + 1], p[:, k:k + 1], m=m, lam=lam)
            opt.zero_grad(set_to_none=True)
            loss_k.backward()
            opt.step()


def _fmt(m: Dict[str, float]) -> str:
    return f"{m['acc']:.4f}  {m['nmi']:.4f}  {m['ari']:.4f}"


def run_bench(args: argparse.Namespace) -> int:
    if args.what == "assign":
        from dcss_plugin.export.bench import run_assign_bench  # optional part, lives in export/

        return run_assign_bench(args)
    x, y = load_named_dataset(args.dataset, args.data_root)
    k = args.clusters
    y_np = y.numpy()
    print(f"dcss bench fit: dataset={args.dataset} N={len(x)} K={k} seed={args.seed} "
          f"torch threads={torch.get_num_threads()}")

    # --- quality and time per phase of the default recipe, next to k-means on the raw input
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=10, random_state=args.seed).fit_predict(x.reshape(len(x), -1).numpy())
    km_s = time.perf_counter() - t0
    extra = dict(pretrain_epochs=20, phase1_epochs=4, phase2_epochs=20) if args.quick else {}
    model = DCSS(n_clusters=k, seed=args.seed, verbose=False, **extra).fit(x)
    h = model.history_
    rows = [
        ("k-means on raw input", evaluate(y_np, km), "-", km_s),
        ("pretrain + k-means", evaluate(y_np, h["labels_after_pretrain"]), h["epochs"]["pretrain"],
         h["time_per_epoch_s"]["pretrain"]),
        ("after phase 1", evaluate(y_np, h["labels_after_phase1"]), h["epochs"]["phase1"],
         h["time_per_epoch_s"]["phase1"]),
        ("after phase 2 (DCSS)", evaluate(y_np, model.labels_), h["epochs"]["phase2"],
         h["time_per_epoch_s"]["phase2"]),
    ]
    print("\nquality and time per phase (default preset)")
    print(f"{'stage':<24}{'ACC     NMI     ARI':>24}{'epochs':>8}{'s/epoch':>10}")
    for name, metrics, epochs, spe in rows:
        spe_txt = f"{spe:.3f}" if name != "k-means on raw input" else f"{spe:.2f} (total)"
        print(f"{name:<24}{_fmt(metrics):>24}{str(epochs):>8}{spe_txt:>10}")
    print(f"total fit time: {sum(h['time_s'].values()):.1f} s on {h['device']}")

    # --- Phase 1: one-pass summed loss vs the official K-step schedule, same network and data
    cfg = model.config
    norm = InputNormalizer.fit(x if x.dim() != 3 else x.unsqueeze(1))
    xn = norm(x if x.dim() != 3 else x.unsqueeze(1))
    torch.manual_seed(args.seed)
    ae = (ConvAutoencoder(tuple(xn.shape[1:]), cfg.latent_dim) if xn.dim() == 4
          else MLPAutoencoder(xn.shape[1], cfg.latent_dim, cfg.mlp_hidden_dims))
    centers = ClusterCenters(k, cfg.latent_dim, m=cfg.m or 1.5)
    with torch.no_grad():
        ae.eval()
        centers.init_kmeans(ae.encode(xn), seed=args.seed, n_init=1)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-4)
    timings: Dict[str, List[float]] = {"one-pass (sum of K losses)": [], "official (K steps per batch)": []}
    fns = {"one-pass (sum of K losses)": phase1_epoch_one_pass, "official (K steps per batch)": phase1_epoch_per_cluster}
    gen = torch.Generator().manual_seed(args.seed)
    for name, fn in fns.items():  # warm-up
        fn(ae, centers, xn, opt, cfg.batch_size, gen, cfg.m or 1.5, cfg.lam)
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(ae, centers, xn, opt, cfg.batch_size, gen, cfg.m or 1.5, cfg.lam)
            timings[name].append(time.perf_counter() - t0)
    one = statistics.median(timings["one-pass (sum of K losses)"])
    official = statistics.median(timings["official (K steps per batch)"])
    print(f"\nphase 1 time per epoch, same {type(ae).__name__}, N={len(xn)}, batch {cfg.batch_size}, K={k} "
          f"(median of {args.repeats})")
    print(f"{'schedule':<32}{'s/epoch':>10}")
    for name in fns:
        print(f"{name:<32}{statistics.median(timings[name]):>10.3f}")
    print(f"speed-up of one-pass: {official / one:.1f}x (expected about K = {k})")
    return 0
