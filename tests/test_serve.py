"""`dcss serve`: the reference HTTP service (issue 19, "Serving", item 3): answers equal to the assigner's,
400 for malformed input, micro-batching of concurrent requests, a clean stop on SIGTERM, no torch."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient

from fastapi.testclient import TestClient  # noqa: E402

from dcss_plugin.export.serve import create_app  # noqa: E402
from dcss_plugin.export.runtime import OnnxClusterAssigner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.float32)[:400]  # (400, 8, 8)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, digits, torch_float32_one_thread):
    """A full export (input x (N, 1, 8, 8)) of a quickly trained digits model."""
    from dcss_plugin import DCSS
    from dcss_plugin.export.onnx import export_assigner

    est = DCSS(n_clusters=10, seed=0, verbose=False, pretrain_epochs=1, phase1_epochs=1, phase2_epochs=1,
               augment=False, neighbors=0).fit(digits)
    return export_assigner(est, tmp_path_factory.mktemp("serve") / "full.onnx", full=True, check_data=digits)


@pytest.fixture(scope="module")
def assigner(model_path):
    return OnnxClusterAssigner(model_path, provider="cpu", nonfinite="flag")


@pytest.fixture(scope="module")
def client(assigner):
    with TestClient(create_app(assigner, max_wait_ms=1.0)) as c:
        yield c


def npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def check_equal(answer, expected):
    np.testing.assert_array_equal(answer["label"], expected.label)
    np.testing.assert_allclose(answer["q"], expected.q, rtol=0, atol=1e-6)
    np.testing.assert_allclose(answer["confidence"], expected.confidence, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(answer["in_domain"], expected.in_domain)


# ---------------------------------------------------------------------------------------------------- endpoints
def test_health_and_metadata(client, assigner):
    assert client.get("/health").json() == {"status": "ok", "provider": "cpu"}
    meta = client.get("/metadata").json()
    assert meta["input_name"] == "x" and meta["input_shape"] == [1, 8, 8] and meta["n_clusters"] == 10
    assert meta["provider"] == "cpu" and meta["export_kind"] == "full"
    assert meta["digest"] == assigner.metadata["digest"] and meta["dcss_version"]
    assert meta["in_domain_threshold"] == pytest.approx(assigner.in_domain_threshold)
    assert meta["outputs"] == ["q", "label", "confidence", "in_domain"]
    assert {"requests", "rows", "onnx_calls"} <= set(meta["stats"])


def test_json_assign_equals_the_assigner(client, assigner, digits):
    x = digits[:37]
    response = client.post("/v1/assign", json={"inputs": x.tolist()})  # (N, 8, 8): the channel axis is added
    assert response.status_code == 200
    check_equal(response.json(), assigner.assign(x))
    one = client.post("/v1/assign", json={"inputs": x[:1, None].tolist()}).json()  # (1, 1, 8, 8)
    check_equal(one, assigner.assign(x[:1]))


def test_npy_assign_equals_the_assigner(client, assigner, digits):
    x = digits[50:90, None].astype(np.float64)
    response = client.post("/v1/assign", content=npy(x), headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 200
    check_equal(response.json(), assigner.assign(x))


def test_nan_rows_are_answered_by_the_graph_with_label_minus_one(client, digits):
    x = digits[:4].copy()
    x[1, 2, 3] = np.nan
    x[3, 0, 0] = np.inf
    answer = client.post("/v1/assign", content=npy(x), headers={"Content-Type": "application/x-npy"}).json()
    assert answer["label"][1] == -1 and answer["label"][3] == -1 and min(answer["label"][::2]) >= 0
    assert answer["confidence"][1] == 0 and not answer["in_domain"][1]


@pytest.mark.parametrize("body, content_type, words", [
    (b'{"inputs": [[1, 2', "application/json", "not valid JSON"),
    (b'{"rows": []}', "application/json", '"inputs"'),
    (b'[1, 2, 3]', "application/json", '"inputs"'),
    (b'{"inputs": []}', "application/json", "empty"),
    (b'{"inputs": 5}', "application/json", "list"),
    (json.dumps({"inputs": [[["a"] * 8] * 8]}).encode(), "application/json", "real numbers"),
    (json.dumps({"inputs": [[[None] * 8] * 8]}).encode(), "application/json", "real numbers"),
    (json.dumps({"inputs": [[0] * 64, [0] * 63]}).encode(), "application/json", "rectangular"),
    (json.dumps({"inputs": [[0.0] * 64]}).encode(), "application/json", "shape [1, 8, 8]"),
    (json.dumps({"inputs": [[[0.0] * 7] * 8]}).encode(), "application/json", "shape [1, 8, 8]"),
    (b"", "application/json", "not valid JSON"),
    (npy(np.zeros((2, 8, 8), dtype=object)), "application/x-npy", "pickled"),
    (npy(np.zeros((2, 3))), "application/x-npy", "shape"),
    (npy(np.zeros((0, 1, 8, 8))), "application/x-npy", "no rows"),
    (npy(np.zeros((2, 8, 8), dtype=np.complex64)), "application/x-npy", "complex"),
    (b"not an npy file", "application/x-npy", ".npy"),
    (b"", "application/x-npy", ".npy"),
])
def test_malformed_input_is_a_400_with_an_error(client, body, content_type, words):
    response = client.post("/v1/assign", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error and "\n" not in error


def test_unknown_paths_and_methods_answer_in_the_error_format(client):
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").json()
    assert client.get("/v1/assign").status_code == 405


def test_body_over_the_limit_is_413(assigner, digits):
    with TestClient(create_app(assigner, max_body_bytes=1000)) as c:
        response = c.post("/v1/assign", json={"inputs": digits[:10].tolist()})
    assert response.status_code == 413 and "larger" in response.json()["error"]


# ---------------------------------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(assigner, digits):
    n_threads = 16
    app = create_app(assigner, max_wait_ms=200.0)  # a long wait: the 16 requests surely meet in the queue
    answers, errors = {}, []
    barrier = threading.Barrier(n_threads)

    def post(client, i):
        x = digits[i * 10:i * 10 + 1 + i]  # 1 to 16 rows, different per request
        try:
            barrier.wait()
            answers[i] = (x, client.post("/v1/assign", json={"inputs": x.tolist()}).json())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with TestClient(app) as c:
        threads = [threading.Thread(target=post, args=(c, i)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = c.get("/metadata").json()["stats"]
    assert not errors and len(answers) == n_threads
    for x, answer in answers.values():
        check_equal(answer, assigner.assign(x))
    assert stats["requests"] == n_threads and stats["rows"] == sum(len(x) for x, _ in answers.values())
    assert stats["onnx_calls"] < n_threads  # some requests were merged into one onnxruntime call
    assert app.state.batcher.calls == stats["onnx_calls"]


def test_row_limit_splits_batches(assigner, digits):
    app = create_app(assigner, max_wait_ms=100.0, max_batch_rows=5)
    with TestClient(app) as c:
        answer = c.post("/v1/assign", json={"inputs": digits[:12].tolist()}).json()  # one request over the limit
    check_equal(answer, assigner.assign(digits[:12]))


def test_dcss_serve_does_not_import_torch(model_path):
    """The whole `dcss serve` path up to uvicorn.run (stubbed out here) stays torch-free."""
    code = ("import sys, uvicorn; uvicorn.run = lambda app, **kw: None; from dcss_plugin.app.cli import main; "
            f"assert main(['serve', {str(model_path)!r}, '--provider', 'cpu']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------------------------------- a real server
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dcss_serve_answers_and_stops_cleanly_on_sigterm(model_path, digits, assigner):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dcss_plugin.app.cli", "serve", str(model_path), "--port",
                             str(port), "--provider", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    assert json.loads(r.read()) == {"status": "ok", "provider": "cpu"}
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "dcss serve did not come up"
                time.sleep(0.2)
        request = urllib.request.Request(base + "/v1/assign", data=npy(digits[:5]),
                                         headers={"Content-Type": "application/x-npy"})
        with urllib.request.urlopen(request, timeout=10) as r:
            check_equal(json.loads(r.read()), assigner.assign(digits[:5]))
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        output = proc.stdout.read()
        # uvicorn shuts down (lifespan end: the batcher is stopped), then re-raises the signal it caught, so the
        # exit status says "ended by SIGTERM" as for any process that honours it
        assert rc in (0, -signal.SIGTERM), output
        assert f"on http://127.0.0.1:{port}" in output and "stopped after 1 requests" in output
        assert "Traceback" not in output and "ERROR" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dcss_serve_refuses_a_missing_model(tmp_path, capsys):
    from dcss_plugin.app.cli import main

    assert main(["serve", str(tmp_path / "none.onnx")]) == 2
    assert "error" in capsys.readouterr().err
