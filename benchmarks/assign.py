"""Cluster-assignment speed, PyTorch eager versus onnxruntime, head-only and full graphs.

    .venv/bin/python benchmarks/assign.py [--seed 0] [--repeats 3] [--quick]

For batch sizes 1, 256 and 65536 it times, in one process and interleaved round by round (so that a noisy
machine hurts every engine alike):

* ``torch``: the fitted :class:`~dcss_plugin.DCSSModel` on CPU in eval mode under ``torch.no_grad()``, computing
  what the ONNX graph computes (``[normalise -> encode ->] head -> q, label = argmax q, confidence = max q``), numpy
  in and out.
* ``ort-cpu``: :class:`~dcss_plugin.export.runtime.OnnxClusterAssigner` on the CPU provider, as a user calls it
  (input checks included), one reused session, ``ORT_ENABLE_ALL``, with as many intra-op threads as torch uses.
* ``ort-cuda``: the same on the CUDA provider (numpy in and out, host/device copies included), only when
  onnxruntime's CUDA provider really runs.

Each cell reports rows/second (rows timed / time spent) and the p50/p99 latency of one call; ``ort/torch`` is the
ratio of rows/second. The bytes one row moves (input + ``q`` + ``label`` + ``confidence``) are printed as the
physical reference: at memory bandwidth B bytes/s no engine can exceed B / (bytes per row) rows/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from dcss_plugin import DCSS
from dcss_plugin.data import load_named_dataset

BATCH_SIZES = (1, 256, 65536)


@dataclass
class Timing:
    """Latencies (seconds) of calls of one engine at one batch size."""

    batch: int
    seconds: List[float] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.batch * len(self.seconds) / max(sum(self.seconds), 1e-12)

    def percentile_us(self, p: float) -> float:
        return float(np.percentile(self.seconds, p) * 1e6)


def time_calls(fn: Callable[[], Any], calls: int) -> List[float]:
    """Latency in seconds of each of ``calls`` calls of ``fn``.

    Example:
        >>> lat = time_calls(lambda: sum(range(100)), 10)     # 10 floats
    """
    out = []
    clock = time.perf_counter
    for _ in range(calls):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def bytes_per_row(input_shape: Sequence[int], n_clusters: int) -> Tuple[int, int]:
    """(input bytes, output bytes) of one row: float32 input; ``q`` float32 (K), ``label`` int64, ``confidence``."""
    return 4 * int(np.prod(input_shape)), 4 * n_clusters + 8 + 4


def _calls(batch: int, quick: bool) -> Tuple[int, int]:
    """(timed calls per round, warm-up calls) for a batch size, about the same time per cell."""
    calls = {1: 600, 256: 120}.get(batch, 3)
    if quick:
        calls = max(2, calls // 5)
    return calls, (20 if batch < 1024 else 1)


def _torch_engine(model: DCSS, full: bool) -> Callable[[np.ndarray], Tuple[np.ndarray, ...]]:
    net = model.model_.cpu().eval()
    step = net if full else net.head  # full: raw x -> normalise -> encoder -> head; else u -> head

    def run(inputs: np.ndarray) -> Tuple[np.ndarray, ...]:
        with torch.no_grad():
            q = step(torch.from_numpy(inputs))
            confidence, label = q.max(dim=1)
            return q.numpy(), label.numpy(), confidence.numpy()

    return run


def _fit_model(seed: int) -> Tuple[DCSS, np.ndarray]:
    x, _ = load_named_dataset("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few-second fit whose quality is irrelevant; one thread is robust on a busy machine
    try:
        model = DCSS(n_clusters=10, seed=seed, device="cpu", verbose=False, pretrain_epochs=1, phase1_epochs=2,
                     phase2_epochs=1, augment=False, neighbors=0).fit(x)
    finally:
        torch.set_num_threads(threads)
    return model, x.numpy()


def _inputs(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tiled = np.tile(x, (n // len(x) + 1, 1, 1, 1))[:n]
    return np.ascontiguousarray(tiled + rng.normal(0, 0.5, size=tiled.shape), dtype=np.float32)


def _fmt_rate(r: float) -> str:
    return f"{r / 1e6:.2f}M" if r >= 1e6 else (f"{r / 1e3:.1f}k" if r >= 1e3 else f"{r:.0f}")


def _fmt_us(us: float) -> str:
    return f"{us / 1e3:.1f}ms" if us >= 1e4 else f"{us:.0f}us"


def _engines(model: Any, path: str, full: bool, threads: int) -> Tuple[Dict[str, Callable[[np.ndarray], Any]], str]:
    """The engines to time for one graph, and why ort-cuda is missing (empty when it runs)."""
    from dcss_plugin.export.runtime import OnnxClusterAssigner

    big = max(BATCH_SIZES)
    engines: Dict[str, Callable[[np.ndarray], Any]] = {
        "torch": _torch_engine(model, full),
        "ort-cpu": OnnxClusterAssigner(path, provider="cpu", batch_size=big, intra_op_threads=threads),
    }
    if torch.cuda.is_available():
        engines["torch-cuda"] = _torch_cuda_engine(model, full)
    gpu = OnnxClusterAssigner(path, provider="auto", batch_size=big)
    if gpu.provider == "cuda":
        engines["ort-cuda"] = gpu
        engines["ort-cuda-bound"] = _bound_engine(gpu)
        return engines, ""
    return engines, gpu.fallback_reason or "onnxruntime has no CUDA provider"


class _OnDevice:
    """The CUDA copy of each input array, made once outside the timed calls (data already on the GPU)."""

    def __init__(self) -> None:
        self.cache: Dict[int, Any] = {}

    def __call__(self, inputs: np.ndarray) -> Any:
        key = id(inputs)
        if key not in self.cache:
            self.cache = {key: torch.from_numpy(inputs).cuda()}
        return self.cache[key]


def _torch_cuda_engine(model: DCSS, full: bool) -> Callable[[np.ndarray], Any]:
    """The model on the GPU, input already there, outputs left there (synchronised, so the time is complete)."""
    import copy

    net = copy.deepcopy(model.model_).cuda().eval()
    step = net if full else net.head
    on_device = _OnDevice()

    def run(inputs: np.ndarray) -> Any:
        with torch.no_grad():
            q = step(on_device(inputs))
            out = q.max(dim=1)
        torch.cuda.synchronize()
        return q, out

    return run


def _bound_engine(assigner: Any) -> Callable[[np.ndarray], Any]:
    """onnxruntime's CUDA provider through IOBinding: input and outputs stay in GPU memory."""
    on_device = _OnDevice()

    def run(inputs: np.ndarray) -> Any:
        out = assigner.assign(on_device(inputs))
        torch.cuda.synchronize()
        return out

    return run


def _time_graph(engines: Dict[str, Callable[[np.ndarray], Any]], data: np.ndarray, repeats: int,
                quick: bool) -> Dict[Tuple[int, str], Timing]:
    """Time every engine at every batch size, the engines interleaved round by round."""
    out: Dict[Tuple[int, str], Timing] = {}
    for batch in BATCH_SIZES:
        inputs = np.ascontiguousarray(data[:batch])
        calls, warm = _calls(batch, quick)
        for name, fn in engines.items():
            out[batch, name] = Timing(batch)
            time_calls(lambda: fn(inputs), warm)
        for _ in range(repeats):
            for name, fn in engines.items():
                out[batch, name].seconds += time_calls(lambda: fn(inputs), calls)
    return out


def run(args: argparse.Namespace) -> int:
    """Print the table; returns the exit status."""
    import onnxruntime as ort

    from dcss_plugin import __version__
    from dcss_plugin.export.onnx import export_assigner

    seed = args.seed
    quick = args.quick
    repeats = max(1, args.repeats)
    repeats = min(repeats, 2) if quick else repeats
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model, digits = _fit_model(seed)
    fit_s = time.perf_counter() - t0
    threads = torch.get_num_threads()
    x_all = _inputs(digits, max(BATCH_SIZES), seed)
    data = {"full": x_all, "head": model.transform(x_all)}
    results: Dict[Tuple[str, int, str], Timing] = {}
    names: List[str] = []
    cuda_note = ""
    with tempfile.TemporaryDirectory(prefix="dcss-bench-") as tmp:
        for kind in ("head", "full"):
            path = export_assigner(model, os.path.join(tmp, f"{kind}.onnx"), full=kind == "full")
            engines, cuda_note = _engines(model, path, kind == "full", threads)
            names = list(engines)
            for (batch, name), timing in _time_graph(engines, data[kind], repeats, quick).items():
                results[kind, batch, name] = timing
    print(f"benchmarks/assign.py: digits model (K={model.config_.n_clusters}, d={model.config_.latent_dim}, "
          f"{fit_s:.1f} s quick fit), dcss-plugin {__version__}, torch {torch.__version__}, onnxruntime "
          f"{ort.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"threads: torch {threads}, onnxruntime intra-op {threads}; load average before the run {load:.2f}; "
          f"{repeats} interleaved round(s){' (quick)' if quick else ''}; rows/s = rows timed / time; p50/p99 per "
          "call")
    _print_table(results, names)
    _print_bytes(results, names, model)
    if cuda_note:
        print(f"ort-cuda: not run ({cuda_note[:200]})")
    return 0


def _print_table(results: Dict[Tuple[str, int, str], Timing], names: List[str]) -> None:
    header = f"{'graph':<6}{'batch':>7} "
    for e in names:
        header += f"{e + ' rows/s':>17}{'p50':>9}{'p99':>9}" + ("" if e == "torch" else f"{'ort/torch':>10}")
    print(header)
    print("-" * len(header))
    for kind in ("head", "full"):
        for batch in BATCH_SIZES:
            line = f"{kind:<6}{batch:>7} "
            base = results[kind, batch, "torch"].rows_per_s
            for e in names:
                t = results[kind, batch, e]
                line += f"{_fmt_rate(t.rows_per_s):>17}{_fmt_us(t.percentile_us(50)):>9}"
                line += f"{_fmt_us(t.percentile_us(99)):>9}" + ("" if e == "torch" else f"{t.rows_per_s / base:>9.2f}x")
            print(line)


def _print_bytes(results: Dict[Tuple[str, int, str], Timing], names: List[str], model: Any) -> None:
    shapes = {"head": (model.config_.latent_dim,), "full": tuple(model.input_shape_)}
    big = max(BATCH_SIZES)
    print("bytes moved per row (the physical reference; float32 input, q float32, label int64, confidence float32):")
    for kind in ("head", "full"):
        inp, out = bytes_per_row(shapes[kind], model.config_.n_clusters)
        gbs = max(results[kind, big, e].rows_per_s for e in names) * (inp + out) / 1e9
        verdict = ("far below memory bandwidth (~10 GB/s and more): the arithmetic bounds it, not data movement"
                   if gbs < 1.0 else "a sizeable share of memory bandwidth: data movement matters here")
        print(f"  {kind}: {inp} B in + {out} B out = {inp + out} B/row; the best {big}-row rate moves {gbs:.3f} GB/s, "
              f"{verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds (smoke run)")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
