"""timm backbones in DCSS on this machine: feature extraction and training throughput per mode, peak memory.

    .venv/bin/python benchmarks/timm_bench.py [--model test_resnet] [--img-size 64] [--n 200] [--threads 1]

Cases (each in a fresh process, so that its peak resident memory, ``ru_maxrss``, is its own):

* ``extract``: pooled features of ``n`` digits (8x8, upsampled by timm's preprocessing to the backbone's input),
  eval mode, ``no_grad``, batches of ``--batch-size``: images/second.
* ``frozen``: :func:`fit_timm` ``mode="frozen"``: features once, then DCSS on the cached vectors.
* ``frozen, no cache``: the same frozen backbone inside the encoder (``timm_autoencoder(..., finetune="frozen")``
  passed to ``DCSS(encoder=..., decoder=...)``), so that every training step runs it: what the cache saves,
  Phase-2 epoch time with vs without backbone passes.
* ``last`` / ``full``: :func:`fit_timm` fine-tuning the last block group / everything (per-layer learning rates
  from the encoder's ``param_groups``).

Training throughput is samples per second of each phase's epochs (``DCSS.history_["time_per_epoch_s"]``); a
pretraining step encodes two augmented views and the reconstruction target, a Phase-1 step one view and the
target, a Phase-2 step two views. Weights are random (no network); speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _digits(n: int):
    import numpy as np
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32)
    return x[np.arange(n) % len(x)]


def _case(name: str, opts: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a child process; returns the figures of one case."""
    import torch

    torch.set_num_threads(opts["threads"])
    from dcss_plugin import DCSS
    from dcss_plugin.adapters.timm import TimmEncoder, extract_features, fit_timm, timm_autoencoder

    x = _digits(opts["n"])
    base = _rss_mib()
    epochs = dict(pretrain_epochs=opts["epochs"][0], phase1_epochs=opts["epochs"][1], phase2_epochs=opts["epochs"][2],
                  batch_size=opts["batch_size"], seed=0, device="cpu")
    out: Dict[str, Any] = {"case": name, "rss_after_imports_mib": base}
    t0 = time.perf_counter()
    if name == "extract":
        enc = TimmEncoder(opts["model"], img_size=opts["img_size"])
        unit = torch.from_numpy(x / 16.0)
        extract_features(enc, unit[: opts["batch_size"]], batch_size=opts["batch_size"])  # warm-up
        times = []
        for _ in range(opts["repeats"]):
            t = time.perf_counter()
            extract_features(enc, unit, batch_size=opts["batch_size"])
            times.append(time.perf_counter() - t)
        out["extract_img_s"] = len(x) / min(times)
    elif name == "frozen, no cache":
        enc, dec = timm_autoencoder(TimmEncoder(opts["model"], img_size=opts["img_size"]), 10, finetune="frozen")
        est = DCSS(10, encoder=enc, decoder=dec, verbose=False, **epochs).fit(x)
        out["history"] = est.history_
    else:
        est = fit_timm(x, 10, opts["model"], name, img_size=opts["img_size"], **epochs)
        out["history"] = est.history_
        out["extract_s"] = est.history_["timm"]["time_s"].get("feature_extraction")
        if name in ("last", "full"):
            bb = est.model_.encoder.timm.backbone
            out["trainable"] = (sum(p.numel() for p in bb.parameters() if p.requires_grad),
                                sum(p.numel() for p in bb.parameters()))
            out["lr_groups"] = len(est.model_.encoder.param_groups(1.0))
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = _rss_mib()
    if "history" in out:
        h = out.pop("history")
        out["per_epoch_s"] = dict(h["time_per_epoch_s"])
        out["epochs"] = dict(h["epochs"])
    return out


def _run(name: str, opts: Dict[str, Any]) -> Dict[str, Any]:
    """``_case`` in a fresh interpreter (its own ``ru_maxrss``); the result comes back as JSON on stdout."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps({"case": name, "opts": opts})]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {name!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        job = json.loads(sys.argv[2])
        print(json.dumps(_case(job["case"], job["opts"])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="test_resnet", help="timm model (random weights)")
    parser.add_argument("--img-size", type=int, default=64, help="backbone input size (digits are upsampled)")
    parser.add_argument("--n", type=int, default=200, help="number of digits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, nargs=3, default=(1, 1, 2), metavar=("PRE", "P1", "P2"))
    parser.add_argument("--repeats", type=int, default=3, help="feature extraction repeats (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case")
    parser.add_argument("--cases", nargs="*", default=["extract", "frozen", "frozen, no cache", "last", "full"])
    args = parser.parse_args()
    opts = {"model": args.model, "img_size": args.img_size, "n": args.n, "batch_size": args.batch_size,
            "epochs": tuple(args.epochs), "repeats": args.repeats, "threads": args.threads}
    import platform

    import torch

    print(f"timm DCSS benchmark: {args.model} at {args.img_size}x{args.img_size}, {args.n} digits, batch "
          f"{args.batch_size}, epochs (pretrain, phase 1, phase 2) = {tuple(args.epochs)}, {args.threads} torch "
          f"thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}")
    rows = [_run(c, opts) for c in args.cases]
    n = args.n
    head = (f"{'case':<18}{'extract img/s':>14}{'pretrain img/s':>15}{'phase1 img/s':>13}{'phase2 img/s':>13}"
            f"{'phase2 s/epoch':>15}{'fit s':>8}{'peak RSS MiB':>14}{'(imports)':>11}")
    print(head)
    print("-" * len(head))

    def rate(row, phase):
        s = row.get("per_epoch_s", {}).get(phase)
        return f"{n / s:.0f}" if s else "-"

    for r in rows:
        ext = r.get("extract_img_s") or (n / r["extract_s"] if r.get("extract_s") else None)
        p2 = r.get("per_epoch_s", {}).get("phase2")
        print(f"{r['case']:<18}{(f'{ext:.0f}' if ext else '-'):>14}{rate(r, 'pretrain'):>15}{rate(r, 'phase1'):>13}"
              f"{rate(r, 'phase2'):>13}{(f'{p2:.3f}' if p2 else '-'):>15}{r['wall_s']:>8.1f}"
              f"{r['peak_rss_mib']:>14.0f}{r['rss_after_imports_mib']:>11.0f}")
    by = {r["case"]: r for r in rows}
    if "frozen" in by and "frozen, no cache" in by:
        a, b = by["frozen"]["per_epoch_s"]["phase2"], by["frozen, no cache"]["per_epoch_s"]["phase2"]
        print(f"\nPhase-2 epoch, frozen backbone: {a:.3f} s on cached features (no backbone pass) vs {b:.3f} s running "
              f"the backbone every step: {b / a:.0f}x.")
    for m in ("last", "full"):
        if m in by:
            t, tot = by[m]["trainable"]
            print(f"{m}: {t}/{tot} backbone parameters train, in {by[m]['lr_groups']} learning-rate groups "
                  "(projection, then backbone layers)")


if __name__ == "__main__":
    main()
