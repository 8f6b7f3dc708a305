"""``dcss serve MODEL.onnx``: a small HTTP service around :class:`~dcss_plugin.export.runtime.OnnxClusterAssigner`.

A reference service (FastAPI + uvicorn), torch-free: its imports are numpy, onnxruntime (through the assigner),
FastAPI/Starlette and uvicorn, so a service image needs no torch (the ``auto``/``cuda`` providers import torch only
when it is installed, to load the CUDA libraries; ``--provider cpu`` never does).

Endpoints:

* ``GET /health`` -> ``{"status": "ok", "provider": "cpu"}``.
* ``GET /metadata`` -> the model's metadata (input name and shape, K, d, export kind, provider, in-domain
  threshold, version, digest, whether a signature was verified) and the batcher's settings and counters
  (``requests``, ``rows``, ``onnx_calls``).
* ``POST /v1/assign`` with JSON ``{"inputs": [[...], ...]}`` (N rows of the model's input shape) or an ``.npy``
  body (``Content-Type: application/x-npy``) -> ``{"label": [N], "confidence": [N], "q": [N][K],
  "in_domain": [N]}``. Rows with NaN/inf are answered by the graph itself: ``label`` -1, ``confidence`` 0,
  ``q`` zeros, ``in_domain`` false (a file exported before the graph did that refuses them with 400).
  Malformed input (bad JSON, no ``inputs``, an empty or ragged list, non-numbers, a wrong shape, a pickled or
  unreadable ``.npy``) is HTTP 400 ``{"error": "..."}``; a full queue is 503; a body over the size limit 413.

Micro-batching: each request is checked and converted on arrival, then put on a bounded asyncio queue. One worker
task takes the first waiting request, collects more for up to ``max_wait_ms`` or until ``max_batch_rows`` rows,
runs them as one onnxruntime call in a thread (the event loop keeps accepting requests meanwhile) and hands each
request its slice of the answer. Under load, requests that arrive while a call runs form the next batch.

Networking: uvicorn's defaults; asyncio sets ``TCP_NODELAY`` on every TCP connection, so no Nagle delays.
Stopping: uvicorn stops on SIGTERM/SIGINT (finishes open requests, then runs the app's shutdown, which cancels the
worker and fails whatever is still queued with 503); uvicorn then re-raises the signal, so the process ends as
killed by SIGTERM (status -15 / 143) after a clean shutdown, which is what supervisors expect.

Example:
    $ dcss serve runs/digits/assigner.onnx --port 8000 &
    $ curl -s localhost:8000/v1/assign -H 'Content-Type: application/json' -d '{"inputs": [[[0, 0, 5, ...]]]}'
    >>> app = create_app(OnnxClusterAssigner("assigner.onnx", provider="cpu"))   # in Python (e.g. TestClient)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
from typing import Any, AsyncIterator, Dict, List, NamedTuple, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from dcss_plugin.errors import DataError

log = logging.getLogger("dcss_plugin.serve")

__all__ = ["InputError", "MicroBatcher", "Overloaded", "create_app", "parse_inputs", "serve_from_cli"]

NPY_TYPES = ("application/x-npy", "application/octet-stream")
DEFAULT_QUEUE_SIZE = 1024
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024


class InputError(ValueError):
    """A request body the service cannot use: answered with HTTP 400 and this message."""


class Overloaded(RuntimeError):
    """The request queue is full (or the service is stopping): answered with HTTP 503."""


# ---------------------------------------------------------------------------------------------------- input
def _rows_from_json(body: bytes) -> np.ndarray:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the body is not valid JSON ({exc}); send {{\"inputs\": [[...], ...]}}.") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise InputError('the JSON body needs an "inputs" entry: {"inputs": [[...], ...]} (one row per sample).')
    rows = doc["inputs"]
    if not isinstance(rows, list):
        raise InputError('"inputs" must be a list of rows.')
    if not rows:
        raise InputError('"inputs" is empty; send at least one row.')
    try:
        return np.asarray(rows)
    except ValueError as exc:  # ragged nesting
        raise InputError(f'"inputs" is not a rectangular array of numbers ({exc}).') from None


def _rows_from_npy(body: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, EOFError, OSError... for bad files
        raise InputError(f"the body is not a readable .npy array without pickled objects ({exc}).") from None
    if not isinstance(arr, np.ndarray):
        if hasattr(arr, "close"):
            arr.close()
        raise InputError("the body is an .npz archive; send one array as .npy (np.save).")
    return arr


def parse_inputs(body: bytes, content_type: str, input_shape: tuple, input_name: str = "x") -> np.ndarray:
    """The request's rows as a float32 array (N, *input_shape), or :class:`InputError`.

    ``content_type`` ``application/x-npy`` (or ``application/octet-stream``): an ``.npy`` file; anything else is
    read as JSON ``{"inputs": [...]}``. For an image model with sample shape (1, H, W), rows of shape (H, W) get
    the channel axis. Rows with NaN/inf pass (the assigner decides about them).

    Example:
        >>> parse_inputs(b'{"inputs": [[1, 2], [3, 4]]}', "application/json", (2,)).shape
        (2, 2)
    """
    kind = content_type.split(";")[0].strip().lower()
    arr = _rows_from_npy(body) if kind in NPY_TYPES else _rows_from_json(body)
    if arr.dtype.kind not in "biuf":
        what = "complex" if arr.dtype.kind == "c" else f"not numbers (dtype {arr.dtype})"
        raise InputError(f"{input_name} must be real numbers; got values that are {what}.")
    want = tuple(input_shape)
    if arr.ndim == len(want) and len(want) == 3 and want[0] == 1 and arr.shape[1:] == want[1:]:
        arr = arr[:, None]  # (N, H, W) for a model of (1, H, W) samples
    if arr.ndim != len(want) + 1 or arr.shape[1:] != want:
        raise InputError(f"expected {input_name} rows of shape {list(want)} (an array (N, "
                         f"{', '.join(map(str, want))})); got an array of shape {list(arr.shape)}.")
    if len(arr) == 0:
        raise InputError("the input has no rows; send at least one.")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: a non-finite row
        return np.ascontiguousarray(arr, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- batching
class _Job(NamedTuple):
    x: np.ndarray
    future: "asyncio.Future[Any]"


class MicroBatcher:
    """Merge concurrent requests into one assigner call: a bounded queue and a single worker task.

    Args:
        assign: the function run on the merged rows (``OnnxClusterAssigner.assign``), in a worker thread.
        max_batch_rows: most rows per call (a single larger request runs alone; the assigner chunks it).
        max_wait_s: how long to wait for more requests after the first one.
        queue_size: requests that may wait; beyond that :meth:`submit` raises :class:`Overloaded`.

    Attributes:
        calls, requests, rows: counters of assigner calls, requests served and rows assigned.
    """

    def __init__(self, assign: Any, max_batch_rows: int = 65536, max_wait_s: float = 0.002,
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.assign = assign
        self.max_batch_rows = int(max_batch_rows)
        self.max_wait_s = float(max_wait_s)
        self.queue_size = int(queue_size)
        self.calls = self.requests = self.rows = 0
        self._queue: Optional["asyncio.Queue[_Job]"] = None
        self._task: Optional["asyncio.Task[None]"] = None

    def start(self) -> None:
        """Create the queue and the worker task (inside the running event loop)."""
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.get_running_loop().create_task(self._work(), name="dcss-batcher")

    async def stop(self) -> None:
        """Cancel the worker and fail every request still waiting with :class:`Overloaded`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Overloaded("the service is stopping; retry on another instance."))

    async def submit(self, x: np.ndarray) -> Any:
        """The assigner's answer for ``x`` (its own rows only), once the batch holding it has run."""
        if self._queue is None or self._task is None or self._task.done():
            raise Overloaded("the service is not running (starting or stopping); retry shortly.")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(x, future))
        except asyncio.QueueFull:
            raise Overloaded(f"the server is busy ({self.queue_size} requests waiting); retry shortly.") from None
        return await future

    async def _collect(self, first: _Job) -> tuple:
        """``first`` and the requests that follow within the wait or the row limit; also the one that did not fit."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        jobs, rows = [first], len(first.x)
        deadline = loop.time() + self.max_wait_s
        while rows < self.max_batch_rows:
            try:
                if self._queue.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    job = await asyncio.wait_for(self._queue.get(), left)
                else:
                    job = self._queue.get_nowait()
            except asyncio.TimeoutError:
                break
            if rows + len(job.x) > self.max_batch_rows:
                return jobs, job
            jobs.append(job)
            rows += len(job.x)
        return jobs, None

    async def _work(self) -> None:
        assert self._queue is not None
        carry: Optional[_Job] = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            jobs, carry = await self._collect(first)
            jobs = [j for j in jobs if not j.future.done()]  # a client that went away
            if not jobs:
                continue
            try:
                x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
                result = await asyncio.to_thread(self.assign, x)
            except Exception as exc:  # noqa: BLE001 - handed to the requests, which answer it
                log.error("assign failed on %d requests: %s", len(jobs), exc)
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            self.calls += 1
            self.requests += len(jobs)
            self.rows += len(x)
            start = 0
            for j in jobs:
                stop = start + len(j.x)
                if not j.future.done():
                    j.future.set_result(type(result)(*(None if a is None else a[start:stop] for a in result)))
                start = stop


# ---------------------------------------------------------------------------------------------------- the app
def _floats(a: np.ndarray) -> List[Any]:
    """A float array as JSON lists; a non-finite value (never expected) becomes null rather than invalid JSON."""
    if np.isfinite(a).all():
        return a.tolist()
    return np.where(np.isfinite(a), a, None).tolist()


def _answer(result: Any) -> Dict[str, Any]:
    return {"label": result.label.tolist(), "confidence": _floats(result.confidence), "q": _floats(result.q),
            "in_domain": None if result.in_domain is None else result.in_domain.tolist()}


def _metadata(assigner: Any, batcher: MicroBatcher) -> Dict[str, Any]:
    meta = assigner.metadata
    threshold = assigner.in_domain_threshold
    return {
        "input_name": assigner.input_name, "input_shape": list(assigner.input_shape),
        "sample_shape": list(assigner.sample_shape), "n_clusters": assigner.n_clusters,
        "latent_dim": assigner.latent_dim, "export_kind": assigner.export_kind, "fp16": assigner.fp16,
        "outputs": meta.get("outputs", "").split(","), "provider": assigner.provider,
        "in_domain_threshold": (threshold if threshold is None or math.isfinite(threshold) else str(threshold)),
        "nonfinite_rows": "label -1" if assigner.nonfinite == "flag" else "refused (HTTP 400)",
        "dcss_version": meta.get("dcss_version"), "digest": meta.get("digest"),
        "signature_verified": bool(getattr(assigner, "signature_verified", False)),
        "batching": {"max_batch_rows": batcher.max_batch_rows, "max_wait_ms": batcher.max_wait_s * 1000,
                     "queue_size": batcher.queue_size},
        "stats": {"requests": batcher.requests, "rows": batcher.rows, "onnx_calls": batcher.calls},
    }


async def _read_body(request: Request, limit: int) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise OverflowError
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise OverflowError
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(assigner: Any, *, max_batch_rows: int = 65536, max_wait_ms: float = 2.0,
               queue_size: int = DEFAULT_QUEUE_SIZE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Any:
    """The FastAPI app serving ``assigner`` (an :class:`OnnxClusterAssigner`); ``app.state.batcher`` holds the
    :class:`MicroBatcher` (its counters are also in ``GET /metadata``).

    Example:
        >>> from fastapi.testclient import TestClient
        >>> with TestClient(create_app(OnnxClusterAssigner("a.onnx", provider="cpu"))) as client:
        ...     client.post("/v1/assign", json={"inputs": x.tolist()}).json()["label"]
    """
    batcher = MicroBatcher(assigner.assign, max_batch_rows, max_wait_ms / 1000.0, queue_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        log.debug("dcss serve: %s (K=%d, input %s %s, provider %s); batching up to %d rows / %.1f ms",
                 assigner.path, assigner.n_clusters, assigner.input_name, list(assigner.input_shape),
                 assigner.provider, batcher.max_batch_rows, batcher.max_wait_s * 1000)
        try:
            yield
        finally:
            await batcher.stop()
            log.info("dcss serve: stopped after %d requests", batcher.requests)

    app = FastAPI(title="dcss cluster assigner", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.assigner = batcher, assigner

    def error(status: int, message: str) -> Any:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:  # 404, 405, ... in the same format
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:  # a bug: logged, answered in the same format
        log.exception("dcss serve: unexpected error on %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the server log.")

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "provider": assigner.provider}

    @app.get("/metadata")
    async def metadata() -> Any:
        return _metadata(assigner, batcher)

    @app.post("/v1/assign")
    async def assign(request: Request) -> Any:
        try:
            body = await _read_body(request, max_body_bytes)
        except OverflowError:
            return error(413, f"the body is larger than {max_body_bytes} bytes; send fewer rows per request.")
        try:
            x = parse_inputs(body, request.headers.get("content-type", ""), assigner.input_shape,
                             assigner.input_name)
            if assigner.nonfinite != "flag" and not np.isfinite(x.reshape(len(x), -1).sum(1)).all():
                raise InputError(f"{assigner.input_name} contains NaN or inf; this model (exported before the "
                                 "graph answered such rows) cannot assign them.")
            result = await batcher.submit(x)
        except (InputError, DataError) as exc:
            return error(400, str(exc))
        except Overloaded as exc:
            return error(503, str(exc))
        return JSONResponse(_answer(result))

    return app


# ---------------------------------------------------------------------------------------------------- CLI
def serve_from_cli(args: Any) -> int:
    """``dcss serve MODEL.onnx [--host H] [--port P] [--provider auto|cpu|cuda] [--verify-key KEY]
    [--max-batch-rows N] [--max-wait-ms MS]``: serve until SIGTERM/SIGINT (after a clean shutdown uvicorn re-raises
    the signal, so the process ends with it); returns 0 when uvicorn returns."""
    import uvicorn

    from dcss_plugin.export.runtime import PROVIDERS, OnnxClusterAssigner, ProviderUnavailableError

    try:
        assigner = OnnxClusterAssigner(args.model, provider=args.provider or "auto",
                                       batch_size=args.max_batch_rows, verify_key=args.verify_key)
    except ProviderUnavailableError as exc:  # a user choice that cannot be honoured here: exit status 2
        raise ValueError(str(exc)) from exc
    if assigner.has_in_domain:
        assigner.nonfinite = "flag"  # the graph answers NaN/inf rows itself (label -1)
    if args.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be 0 or more, got {args.max_wait_ms}.")
    app = create_app(assigner, max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms)
    log.setLevel(logging.INFO)  # the start line and errors, whatever --log-level says
    log.info("dcss serve: %s (K=%d, %s input %s %s, provider %s (%s)%s) on http://%s:%d; batching up to %d rows "
             "/ %.1f ms", args.model, assigner.n_clusters, assigner.export_kind, assigner.input_name,
             list(assigner.input_shape), assigner.provider, PROVIDERS[assigner.provider],
             ", signature verified" if assigner.signature_verified else "", args.host, args.port,
             args.max_batch_rows, args.max_wait_ms)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0
