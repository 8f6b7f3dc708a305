"""Load on ``dcss serve``: requests/s, rows/s and latency over HTTP, next to the in-process assigner.

    .venv/bin/python -m benchmarks.serve_bench [--seconds 3] [--threads 1,8] [--batches 1,256] [--format json]

Trains a small digits model (a few epochs: speed, not accuracy, is measured), exports it (full graph, input
``x`` (N, 1, 8, 8)), starts ``dcss serve --provider cpu`` on a free loopback port in a subprocess, and for every
(client threads, rows per request) cell posts requests for ``--seconds`` seconds (at most ``--max-requests`` per
cell) over keep-alive connections (``http.client``, one per thread). Each cell reports requests/s, rows/s and the
p50/p99 latency of one request. The ``in-process`` line times ``OnnxClusterAssigner.assign`` on the same model and
batch sizes in this process (one thread, no HTTP, no JSON): the ceiling the service approaches as its batching
merges requests.

The client threads run in this (Python) process and share the machine's cores with the server: on a small machine
the numbers are a lower bound of what a separate client would see.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_and_export(folder: str) -> Tuple[str, np.ndarray]:
    """A quickly trained digits model exported as ``folder/full.onnx``; also the digits (N, 8, 8)."""
    import torch
    from sklearn.datasets import load_digits

    from dcss_plugin import DCSS
    from dcss_plugin.export.onnx import export_assigner

    torch.set_num_threads(1)
    x = load_digits().images.astype(np.float32)
    est = DCSS(n_clusters=10, seed=0, verbose=False, pretrain_epochs=2, phase1_epochs=1, phase2_epochs=1,
               augment=False, neighbors=0).fit(x)
    return export_assigner(est, os.path.join(folder, "full.onnx"), full=True, check_data=x), x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_wait_ms: float) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen([sys.executable, "-m", "dcss_plugin.app.cli", "serve", model, "--port", str(port),
                             "--provider", "cpu", "--max-wait-ms", str(max_wait_ms)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"dcss serve exited with status {proc.returncode}")
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("dcss serve did not answer /health within 120 s")


def encode(x: np.ndarray, fmt: str) -> Tuple[bytes, Dict[str, str]]:
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, x)
        return buf.getvalue(), {"Content-Type": "application/x-npy"}
    return json.dumps({"inputs": x.tolist()}).encode(), {"Content-Type": "application/json"}


def client(port: int, body: bytes, headers: Dict[str, str], rows: int, stop_at: float, budget: List[int],
           lock: threading.Lock, latencies: List[float], failures: List[str]) -> None:
    """One keep-alive connection posting ``body`` until ``stop_at`` or the shared request budget is used up."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.perf_counter() < stop_at:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        t0 = time.perf_counter()
        conn.request("POST", "/v1/assign", body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        latencies.append(time.perf_counter() - t0)
        if response.status != 200 or len(json.loads(data)["label"]) != rows:
            failures.append(f"HTTP {response.status}: {data[:200]!r}")
            break
    conn.close()


def run_cell(port: int, x: np.ndarray, threads: int, fmt: str, seconds: float, max_requests: int) -> Dict:
    body, headers = encode(x, fmt)
    latencies: List[float] = []
    failures: List[str] = []
    budget, lock = [max_requests], threading.Lock()
    t0 = time.perf_counter()
    workers = [threading.Thread(target=client, args=(port, body, headers, len(x), t0 + seconds, budget, lock,
                                                     latencies, failures)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    if failures:
        raise RuntimeError(failures[0])
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "req_s": len(lat) / wall, "rows_s": len(lat) * len(x) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def in_process(model: str, x: np.ndarray, seconds: float) -> Dict:
    from dcss_plugin.export.runtime import OnnxClusterAssigner

    assigner = OnnxClusterAssigner(model, provider="cpu", intra_op_threads=1)
    assigner.assign(x)  # warm-up
    lat: List[float] = []
    stop_at = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < stop_at:
        t = time.perf_counter()
        assigner.assign(x)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000
    return {"requests": len(ms), "req_s": len(ms) / wall, "rows_s": len(ms) * len(x) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="time per cell (default 3)")
    p.add_argument("--max-requests", type=int, default=20000, help="requests per cell at most")
    p.add_argument("--threads", default="1,8", help="client threads, comma-separated (default 1,8)")
    p.add_argument("--batches", default="1,256", help="rows per request, comma-separated (default 1,256)")
    p.add_argument("--format", choices=["json", "npy"], default="json", help="request body (default json)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms (default 2)")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as folder:
        model, digits = train_and_export(folder)
        rows = {b: np.ascontiguousarray(np.resize(digits, (b, 8, 8))[:, None]) for b in batches}
        port = free_port()
        proc = start_server(model, port, args.max_wait_ms)
        print(f"dcss serve on 127.0.0.1:{port}, provider cpu, {args.format} bodies, --max-wait-ms "
              f"{args.max_wait_ms}, {args.seconds:g} s per cell, {os.cpu_count()} CPUs")
        head = f"{'engine':<24}{'rows/req':>9}{'requests':>10}{'req/s':>10}{'rows/s':>12}{'p50 ms':>9}{'p99 ms':>9}"
        print(head + "\n" + "-" * len(head))
        try:
            for b in batches:
                for t in threads:
                    r = run_cell(port, rows[b], t, args.format, args.seconds, args.max_requests)
                    print(f"{f'http, {t} client thread(s)':<24}{b:>9}{r['requests']:>10}{r['req_s']:>10.0f}"
                          f"{r['rows_s']:>12.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}", flush=True)
                r = in_process(model, rows[b], args.seconds)
                print(f"{'in-process assign':<24}{b:>9}{r['requests']:>10}{r['req_s']:>10.0f}{r['rows_s']:>12.0f}"
                      f"{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}", flush=True)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/metadata")
            stats = json.loads(conn.getresponse().read())["stats"]
            print(f"server: {stats['requests']} requests in {stats['onnx_calls']} onnxruntime calls "
                  f"({stats['requests'] / max(stats['onnx_calls'], 1):.2f} requests per call)")
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
