"""One process versus several, and what the gathered pairwise loss costs in communication.

    .venv/bin/python benchmarks/ddp.py [--devices 2] [--clusters 10] [--seed 0] [--quick]

Three parts, printed side by side:

1. **Fit throughput**: the default recipe on digits for a few epochs per phase, in 1 process (1 and N threads) and
   in N gloo processes of 1 thread each (``dcss fit --devices N`` runs the same code). Seconds per epoch and
   samples per second for every phase.
2. **The gathered Phase-2 loss**: forward + backward of ``PairwiseSimilarityLoss`` on ``q`` (B_global, K) for
   several global batch sizes: pairs over the whole global batch (``gather_distributed=True``), pairs only within
   each rank's shard (``False``, the fallback), and one process holding the whole batch.
3. **Volumes** (computed from tensor sizes, per rank and step): the gather sends ``B_local x K`` floats per
   gathered tensor and receives ``(W-1) B_local x K``; the backward moves the same again (all-to-all on gloo,
   reduce-scatter on NCCL); each rank then holds a ``B_global x B_global`` pair matrix (several temporaries of it
   during forward/backward). Compare with DDP's gradient all-reduce, ``#parameters`` floats per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List

import torch

from dcss_plugin import DCSS, PairwiseSimilarityLoss
from dcss_plugin.data import load_named_dataset
from dcss_plugin.distributed import launch, rank, shard_bounds, world_size

_PHASES = ("pretrain", "phase1", "phase2")


def _fit_digits(out_file: str, epochs: Dict[str, int], seed: int) -> None:
    """The default recipe on digits (in this process, or as one rank of a process group); rank 0 writes timings."""
    x, _ = load_named_dataset("digits")
    model = DCSS(n_clusters=10, seed=seed, verbose=False, device="cpu", pretrain_epochs=epochs["pretrain"],
                 phase1_epochs=epochs["phase1"], phase2_epochs=epochs["phase2"])
    model.fit(x)
    if rank() == 0:
        h = model.history_
        n_params = sum(p.numel() for p in model.model_.parameters())
        with open(out_file, "w", encoding="utf-8") as fh:
            json.dump({"time_per_epoch_s": h["time_per_epoch_s"], "n": h["n_samples"], "params": n_params}, fh)


def _median_step_time(logits: torch.Tensor, criterion: torch.nn.Module, repeats: int) -> float:
    """Median seconds of forward + backward of ``criterion(softmax(logits))`` (one warm-up step not counted)."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        criterion(torch.softmax(logits, 1)).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _loss_worker(out_file: str, sizes: List[int], k: int, repeats: int) -> None:
    results = {}
    for b in sizes:
        lo, hi = shard_bounds(b, world_size(), rank())
        logits = torch.randn(b, k, generator=torch.Generator().manual_seed(b))[lo:hi].requires_grad_()
        results[b] = {
            name: _median_step_time(logits, PairwiseSimilarityLoss(reduction="balanced", exclude_self=True,
                                                                   gather_distributed=gathered), repeats)
            for name, gathered in (("gathered", True), ("local", False))
        }
    if rank() == 0:
        with open(out_file, "w", encoding="utf-8") as fh:
            json.dump(results, fh)


def _single_loss(sizes: List[int], k: int, repeats: int) -> Dict[int, float]:
    out = {}
    crit = PairwiseSimilarityLoss(reduction="balanced", exclude_self=True)
    for b in sizes:
        logits = torch.randn(b, k, generator=torch.Generator().manual_seed(b)).requires_grad_()
        out[b] = _median_step_time(logits, crit, repeats)
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def run(args: argparse.Namespace) -> int:
    world = max(2, args.devices)
    quick = args.quick
    epochs = {"pretrain": 2, "phase1": 4, "phase2": 11} if quick else {"pretrain": 6, "phase1": 6, "phase2": 16}
    sizes = [256, 1024] if quick else [256, 1024, 4096]
    repeats = 3
    cores = os.cpu_count() or 1
    print(f"benchmarks/ddp.py: {world} processes vs 1 on {cores} CPU cores (gloo); digits, epochs {epochs}")
    with tempfile.TemporaryDirectory(prefix="dcss-bench-ddp-") as tmp:
        runs: Dict[str, Dict[str, Any]] = {}
        threads0 = torch.get_num_threads()
        for label, threads in (("1 process, 1 thread", 1), (f"1 process, {world} threads", world)):
            torch.set_num_threads(threads)
            path = os.path.join(tmp, f"single-{threads}.json")
            _fit_digits(path, epochs, args.seed)
            with open(path, encoding="utf-8") as fh:
                runs[label] = json.load(fh)
        torch.set_num_threads(threads0)
        path = os.path.join(tmp, "ddp.json")
        launch(_fit_digits, world, args=(path, epochs, args.seed), threads_per_process=1)
        with open(path, encoding="utf-8") as fh:
            runs[f"{world} processes x 1 thread"] = json.load(fh)

        print("\n1. fit throughput (samples/s per phase; s/epoch in brackets)")
        print(f"{'setup':<28}" + "".join(f"{p:>22}" for p in _PHASES))
        base = runs["1 process, 1 thread"]
        for label, r in runs.items():
            cells = []
            for p in _PHASES:
                t = r["time_per_epoch_s"][p]
                cells.append(f"{r['n'] / t:>9.0f} ({t:.3f}) x{base['time_per_epoch_s'][p] / t:.2f}")
            print(f"{label:<28}" + "".join(f"{c:>22}" for c in cells))

        path = os.path.join(tmp, "loss.json")
        k = int(args.clusters)
        launch(_loss_worker, world, args=(path, sizes, k, repeats), threads_per_process=1)
        with open(path, encoding="utf-8") as fh:
            dist_times = {int(b): v for b, v in json.load(fh).items()}
        torch.set_num_threads(1)
        single = _single_loss(sizes, k, repeats)
        torch.set_num_threads(threads0)

    print(f"\n2. Phase-2 pairwise loss, forward + backward, K={k} (ms per step; {world} processes of 1 thread)")
    print(f"{'B global':>9}{'gathered pairs':>16}{'local pairs':>13}{'1 process, all pairs':>22}")
    for b in sizes:
        print(f"{b:>9}{dist_times[b]['gathered'] * 1e3:>16.2f}{dist_times[b]['local'] * 1e3:>13.2f}"
              f"{single[b] * 1e3:>22.2f}")

    params = runs["1 process, 1 thread"]["params"]
    print(f"\n3. volume per rank and step, float32, W={world} (one gathered tensor q; Phase 2 of the estimator gathers "
          "q per head and, in the u-space stage, p: about 2-3 such tensors)")
    print(f"{'B global':>9}{'K':>6}{'sent':>11}{'received':>11}{'backward':>11}{'pair matrix':>13}"
          f"{'DDP grads':>11}")
    for b in (256, 4096, 16384, 65536):
        for kk in (10, 100, 1000):
            local = b / world
            sent = local * kk * 4
            recv = (world - 1) * local * kk * 4
            print(f"{b:>9}{kk:>6}{_fmt_bytes(sent):>11}{_fmt_bytes(recv):>11}{_fmt_bytes(sent + recv):>11}"
                  f"{_fmt_bytes(b * b * 4):>13}{_fmt_bytes(params * 4):>11}")
    print("\nThe gathered floats grow as B x K: a few MB per step up to B=16384 at K=100, comparable to DDP's gradient "
          "all-reduce. What stops scaling first is the (B_global x B_global) pair matrix that every rank builds "
          "(about five live copies in forward + backward: ~1.3 GB at B=8192, ~5 GB at 16384) and its B^2 K compute, "
          "done on every rank. Beyond a few thousand rows per global batch use gather_distributed=False (pairs "
          "within each rank's shard, no pair communication), as Lightly does for its own losses.")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="processes to compare with one (default 2)")
    parser.add_argument("--clusters", "-k", type=int, default=10, help="K of the pairwise-loss timings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and batch sizes (smoke run)")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
