"""Per-phase time and quality of the default recipe, and the one-pass Phase-1 loss versus the official schedule.

    .venv/bin/python benchmarks/phases.py [--dataset digits] [--clusters 10] [--seed 0] [--repeats 3] [--quick]

Two parts:

1. Quality and seconds per epoch of each phase of ``DCSS(...).fit(x)`` (from ``history_``), next to k-means on
   the raw input. Needs labels: a named dataset (``dcss_plugin.data.load_named_dataset``).
2. Phase 1 as the official DCSS code runs it (per batch, K forward/backward/optimizer steps, one per
   cluster-specific loss ``L_k``) against :func:`~dcss_plugin.functional.centering_loss` (the sum of the K losses
   in one pass), timed on copies of the fitted encoder, decoder and centers, same data and batches.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import Tensor, nn

from dcss_plugin import DCSS, ClusterCenters, centering_loss, evaluate
from dcss_plugin.data import load_named_dataset

Phase1Epoch = Callable[[nn.Module, nn.Module, ClusterCenters, Tensor, Tensor, torch.optim.Optimizer, int,
                        torch.Generator, float, float], None]


def _batches(n: int, batch_size: int, gen: torch.Generator) -> List[Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch_size))


def phase1_epoch_one_pass(encoder: nn.Module, decoder: nn.Module, centers: ClusterCenters, xn: Tensor,
                          target: Tensor, opt: torch.optim.Optimizer, batch_size: int, gen: torch.Generator,
                          m: float, lam: float) -> None:
    """One Phase-1 epoch with the K losses summed: one forward, one backward, one step per batch."""
    encoder.train()
    decoder.train()
    for idx in _batches(len(xn), batch_size, gen):
        u = encoder(xn[idx])
        x_hat = decoder(u).view_as(target[idx])
        loss = centering_loss(target[idx], x_hat, u, centers.centers, centers(u.detach()), m=m, lam=lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def phase1_epoch_per_cluster(encoder: nn.Module, decoder: nn.Module, centers: ClusterCenters, xn: Tensor,
                             target: Tensor, opt: torch.optim.Optimizer, batch_size: int, gen: torch.Generator,
                             m: float, lam: float) -> None:
    """One Phase-1 epoch as the official code runs it: per batch, K forward/backward/optimizer steps."""
    encoder.train()
    decoder.train()
    for idx in _batches(len(xn), batch_size, gen):
        for k in range(centers.num_clusters):
            u = encoder(xn[idx])
            x_hat = decoder(u).view_as(target[idx])
            p = centers(u.detach())
            loss_k = centering_loss(target[idx], x_hat, u, centers.centers[k:k + 1], p[:, k:k + 1], m=m, lam=lam)
            opt.zero_grad(set_to_none=True)
            loss_k.backward()
            opt.step()


def _fmt(m: Dict[str, float]) -> str:
    return f"{m['acc']:.4f}  {m['nmi']:.4f}  {m['ari']:.4f}"


def run(args: argparse.Namespace) -> int:
    from sklearn.cluster import KMeans

    x, y = load_named_dataset(args.dataset, args.data_root)
    k, y_np = args.clusters, y.numpy()
    print(f"benchmarks/phases.py: dataset={args.dataset} N={len(x)} K={k} seed={args.seed} "
          f"torch threads={torch.get_num_threads()}")

    t0 = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=10, random_state=args.seed).fit_predict(x.reshape(len(x), -1).numpy())
    km_s = time.perf_counter() - t0
    epochs = dict(pretrain_epochs=20, phase1_epochs=4, phase2_epochs=20) if args.quick else {}
    model = DCSS(n_clusters=k, seed=args.seed, verbose=False, **epochs).fit(x)
    h = model.history_
    rows = [
        ("pretrain + k-means", evaluate(y_np, h["labels_after_pretrain"]), "pretrain"),
        ("after phase 1", evaluate(y_np, h["labels_after_phase1"]), "phase1"),
        ("after phase 2 (DCSS)", evaluate(y_np, model.labels_), "phase2"),
    ]
    print("\nquality and time per phase (default preset)")
    print(f"{'stage':<24}{'ACC     NMI     ARI':>24}{'epochs':>8}{'s/epoch':>10}")
    print(f"{'k-means on raw input':<24}{_fmt(evaluate(y_np, km)):>24}{'-':>8}{km_s:>10.3f} (in all)")
    for name, metrics, phase in rows:
        print(f"{name:<24}{_fmt(metrics):>24}{h['epochs'][phase]:>8}{h['time_per_epoch_s'][phase]:>10.3f}")
    print(f"total fit time: {sum(h['time_s'].values()):.1f} s on {h['device']}")

    cfg, net = model.config_, model.model_.cpu()
    with torch.no_grad():
        xn = net.normalize(x.reshape(len(x), *model.input_shape_))
        target = net.reconstruction_target(xn)
    encoder, decoder = copy.deepcopy(net.encoder), copy.deepcopy(net.decoder)
    centers = copy.deepcopy(net.centers)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=cfg.lr * cfg.phase1_lr_factor)
    fns: Dict[str, Phase1Epoch] = {"one-pass (sum of K losses)": phase1_epoch_one_pass,
                                   "official (K steps per batch)": phase1_epoch_per_cluster}
    timings: Dict[str, List[float]] = {name: [] for name in fns}
    gen = torch.Generator().manual_seed(args.seed)
    step_args = (centers, xn, target, opt, cfg.batch_size, gen, cfg.m, cfg.lam)
    for fn in fns.values():  # warm-up
        fn(encoder, decoder, *step_args)
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(encoder, decoder, *step_args)
            timings[name].append(time.perf_counter() - t0)
    one = statistics.median(timings["one-pass (sum of K losses)"])
    official = statistics.median(timings["official (K steps per batch)"])
    print(f"\nphase 1 time per epoch, same {type(encoder).__name__}, N={len(xn)}, batch {cfg.batch_size}, K={k} "
          f"(median of {args.repeats})")
    print(f"{'schedule':<32}{'s/epoch':>10}")
    for name in fns:
        print(f"{name:<32}{statistics.median(timings[name]):>10.3f}")
    print(f"speed-up of one-pass: {official / one:.1f}x (expected about K = {k})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits", help="a named dataset with labels (default digits)")
    parser.add_argument("--data-root", help="folder with torchvision dataset files (nothing is downloaded)")
    parser.add_argument("--clusters", "-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed Phase-1 epochs per schedule")
    parser.add_argument("--quick", action="store_true", help="fewer epochs (smoke run)")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
