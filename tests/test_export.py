"""ONNX export and the onnxruntime assigner: equivalence with PyTorch, the file contract, errors, the CLI."""

import json
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dcss_plugin import DCSS, DataError, DCSSModel, Normalize, PairwiseSimilarityLoss  # noqa: E402
from dcss_plugin.app.cli import main  # noqa: E402
from dcss_plugin.export.onnx import ASSIGNER_FORMAT, METADATA_KEYS, export_assigner  # noqa: E402
from dcss_plugin.export.runtime import (  # noqa: E402
    AssignerFileError,
    AssignResult,
    OnnxClusterAssigner,
    ProviderUnavailableError,
    read_assigner,
)
from helpers import QUICK_FIT  # noqa: E402

BATCHES = [1, 7, 4096]


@pytest.fixture(scope="module", autouse=True)
def _torch_settings(torch_float32_one_thread):
    """Every test here runs with float32 and one torch thread (see conftest.py)."""


@pytest.fixture(scope="module")
def digits_model(quick_digits_model):
    return quick_digits_model


@pytest.fixture(scope="module")
def vectors(_torch_settings):
    rng = np.random.default_rng(0)
    means = rng.normal(0, 4, size=(4, 20))
    return (means[rng.integers(0, 4, 400)] + rng.normal(size=(400, 20))).astype(np.float32)


@pytest.fixture(scope="module")
def vector_model(vectors):
    return DCSS(n_clusters=4, mlp_hidden_dims=(64, 64), **QUICK_FIT).fit(vectors)


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_model, vector_model):
    """One exported assigner per (model, kind), each in its own folder (to see that nothing else is written)."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, model in (("digits", digits_model), ("vector", vector_model)):
        for kind in ("head", "full"):
            folder = root / f"{name}-{kind}"
            folder.mkdir()
            out[name, kind] = export_assigner(model, folder / "assigner.onnx", full=kind == "full")
    return out


def digits_batch(digits, n, source, seed=0):
    """``n`` digits samples (tiled and jittered past 1797) or uniform noise over the pixel range."""
    rng = np.random.default_rng(seed)
    if source == "random":
        return rng.uniform(0, 16, size=(n, 8, 8)).astype(np.float32)
    x = np.tile(digits, (n // len(digits) + 1, 1, 1))[:n]
    if n > len(digits):
        x = x + rng.normal(0, 0.5, size=x.shape).astype(np.float32)
    return x.astype(np.float32)


def assert_matches(result, q_ref):
    assert result.q.dtype == np.float32 and result.label.dtype == np.int64 and result.confidence.dtype == np.float32
    assert result.q.shape == q_ref.shape and result.label.shape == result.confidence.shape == (len(q_ref),)
    np.testing.assert_allclose(result.q, q_ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(result.label, q_ref.argmax(1))
    np.testing.assert_array_equal(result.confidence, result.q.max(1))


# ---------------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("source", ["digits", "random"])
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("kind", ["head", "full"])
def test_digits_onnx_matches_pytorch(files, digits_model, digits, kind, n, source):
    x = digits_batch(digits, n, source)
    assigner = OnnxClusterAssigner(files["digits", kind], provider="cpu")
    inputs = x[:, None] if kind == "full" else digits_model.transform(x)
    assert_matches(assigner(inputs), digits_model.predict_proba(x))


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("kind", ["head", "full"])
def test_vector_onnx_matches_pytorch(files, vector_model, kind, n):
    x = np.random.default_rng(n).normal(0, 4, size=(n, 20)).astype(np.float32)
    assigner = OnnxClusterAssigner(files["vector", kind], provider="cpu")
    inputs = x if kind == "full" else vector_model.transform(x)
    assert_matches(assigner(inputs), vector_model.predict_proba(x))


def test_model_estimator_and_run_dir_give_the_same_assigner(tmp_path, files, digits_model, digits):
    """export_assigner takes the fitted DCSS, its DCSSModel (input shape from model.spec) or the run directory."""
    run_dir = tmp_path / "run"
    digits_model.save(run_dir / "checkpoint.pt")
    x = digits_batch(digits, 300, "digits")
    ref = digits_model.predict_proba(x)
    for source in (digits_model.model_, run_dir, run_dir / "checkpoint.pt"):
        path = export_assigner(source, tmp_path / "a.onnx", full=True)
        assigner = OnnxClusterAssigner(path, provider="cpu")
        assert assigner.sample_shape == (1, 8, 8)
        assert_matches(assigner(x), ref)
    meta = read_assigner(export_assigner(digits_model.model_, tmp_path / "m.onnx"))[1]
    assert meta["preset"] == "none" and json.loads(meta["config"]) == digits_model.model_.config()
    assert read_assigner(files["digits", "head"])[1]["preset"] == digits_model.config_.preset
    with pytest.raises(TypeError, match="DCSSModel, a fitted DCSS or a run directory"):
        export_assigner(42, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="not fitted"):
        export_assigner(DCSS(n_clusters=3), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="is a directory"):
        export_assigner(digits_model, tmp_path)


def test_input_forms_chunking_and_empty(files, digits_model, digits):
    x = digits_batch(digits, 4096, "digits")
    ref = digits_model.predict_proba(x)
    whole = OnnxClusterAssigner(files["digits", "full"], provider="cpu")
    chunked = OnnxClusterAssigner(files["digits", "full"], provider="cpu", batch_size=1000)
    for inputs in (x, x[:, None], torch.from_numpy(x), x.astype(np.float64)):  # (N,H,W), (N,1,H,W), tensor, f64
        assert_matches(whole(inputs), ref)
    assert_matches(chunked(x), ref)
    np.testing.assert_array_equal(whole.predict(np.rint(x).astype(np.int32)), digits_model.predict(np.rint(x)))
    empty = whole(np.zeros((0, 1, 8, 8), np.float32))
    assert empty.q.shape == (0, 10) and empty.label.dtype == np.int64


@pytest.mark.slow
def test_dynamo_exporter_matches_too(tmp_path, digits_model, digits):
    path = export_assigner(digits_model, tmp_path / "dynamo.onnx", full=True, exporter="dynamo")
    assigner = OnnxClusterAssigner(path, provider="cpu")
    assert assigner.metadata["exporter"] == "dynamo"
    for n in BATCHES:
        x = digits_batch(digits, n, "digits")
        assert_matches(assigner(x), digits_model.predict_proba(x))
    assert sorted(os.listdir(tmp_path)) == ["dynamo.onnx"]


# ---------------------------------------------------------------------------------------------------- own loop
class TinyEncoder(nn.Module):
    """(B, 1, 8, 8) -> u (B, 6): what a user might write."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 6))

    def forward(self, x):
        return self.net(x)


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 64), nn.Unflatten(1, (1, 8, 8)))

    def forward(self, u):
        return self.net(u)


@pytest.fixture(scope="module")
def own_loop_model(digits):
    """A DCSSModel trained by a plain loop (no estimator): reconstruction, k-means centers, pairwise head steps."""
    torch.manual_seed(0)
    x = torch.from_numpy(digits[:, None])
    model = DCSSModel(TinyEncoder(), n_clusters=10, latent_dim=6, decoder=TinyDecoder(), normalize=Normalize.fit(x))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(10):
        xn = model.normalize(x[step * 128:(step + 1) * 128])
        loss = torch.nn.functional.mse_loss(model.decoder(model.encoder(xn)), xn)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.centers.init_kmeans(model.encode(x), seed=0, n_init=1)
    pairs = PairwiseSimilarityLoss()
    for step in range(5):
        xb = x[step * 128:(step + 1) * 128]
        u = model.encode(xb)
        loss = pairs(model.head(u), target=model.centers(u.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.training and "input_shape" not in model.spec
    return model


def test_own_loop_model_exports_full_with_the_loops_labels(tmp_path, own_loop_model, digits):
    model = own_loop_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_assigner(model, tmp_path / "own.onnx", full=True, input_shape=(1, 8, 8))
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assigner = OnnxClusterAssigner(path, provider="cpu")
    assert assigner.input_name == "x" and assigner.input_shape == (1, 8, 8) and assigner.n_clusters == 10
    assert assigner.metadata["preset"] == "none" and json.loads(assigner.metadata["config"])["latent_dim"] == 6
    x = torch.from_numpy(digits[:, None])
    labels = model.predict(x).numpy()
    assert len(np.unique(labels)) > 1
    np.testing.assert_array_equal(assigner(digits).label, labels)
    model.eval()
    with torch.no_grad():
        q = model(x).numpy()
    model.train()
    assert_matches(assigner(digits), q)
    # the sample shape may come from check_data as well
    path = export_assigner(model, tmp_path / "own2.onnx", full=True, check_data=digits[:64, None])
    np.testing.assert_array_equal(OnnxClusterAssigner(path, provider="cpu")(digits).label, labels)


def test_own_loop_model_without_a_known_shape(tmp_path, own_loop_model, digits):
    """A full export needs the sample shape; a head export does not (input u (N, d))."""
    with pytest.raises(ValueError, match="A full export needs the shape of one input sample x.*input_shape="):
        export_assigner(own_loop_model, tmp_path / "full.onnx", full=True)
    assert not os.path.exists(tmp_path / "full.onnx")
    with pytest.raises(ValueError, match=r"does not run on a batch of shape \(2, 8, 8\).*input_shape="):
        export_assigner(own_loop_model, tmp_path / "full.onnx", full=True, input_shape=(8, 8))
    path = export_assigner(own_loop_model, tmp_path / "head.onnx")
    assigner = OnnxClusterAssigner(path, provider="cpu")
    assert assigner.sample_shape == () and assigner.input_shape == (6,)
    x = torch.from_numpy(digits[:, None])
    with torch.no_grad():
        u = own_loop_model.eval().encode(x)
    own_loop_model.train()
    np.testing.assert_array_equal(assigner(u.numpy()).label, own_loop_model.predict(x).numpy())
    # a model file of a custom encoder cannot be rebuilt from a path: export the model object instead
    own_loop_model.save(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="custom encoder"):
        export_assigner(tmp_path / "model.pt", tmp_path / "p.onnx")


# ---------------------------------------------------------------------------------------------------- the file
@pytest.mark.parametrize("key", [("digits", "head"), ("digits", "full"), ("vector", "full")])
def test_file_is_checked_self_contained_with_dynamic_batch(files, key):
    path = files[key]
    onnx.checker.check_model(path, full_check=True)
    assert os.listdir(os.path.dirname(path)) == ["assigner.onnx"]  # no .onnx.data sidecar, no temporary files
    proto = onnx.load(path, load_external_data=False)
    assert not any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
                   for t in proto.graph.initializer)
    (inp,) = proto.graph.input
    assert inp.name == ("u" if key[1] == "head" else "x") and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in proto.graph.output] == ["q", "label", "confidence", "in_domain"]
    elem = {o.name: o.type.tensor_type.elem_type for o in proto.graph.output}
    assert elem == {"q": onnx.TensorProto.FLOAT, "label": onnx.TensorProto.INT64, "confidence": onnx.TensorProto.FLOAT,
                    "in_domain": onnx.TensorProto.BOOL}
    for value in [inp, *proto.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.HasField("dim_value")  # symbolic batch axis


def test_metadata_contents(files, digits_model, vector_model):
    for (name, kind), path in files.items():
        model = digits_model if name == "digits" else vector_model
        meta = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        assert read_assigner(path)[1] == meta
        assert set(meta) == set(METADATA_KEYS)
        assert meta["format"] == ASSIGNER_FORMAT and meta["export_kind"] == kind and meta["fp16"] == "false"
        assert int(meta["n_clusters"]) == model.config_.n_clusters
        assert int(meta["latent_dim"]) == model.config_.latent_dim == model.model_.latent_dim
        assert meta["input_name"] == ("x" if kind == "full" else "u")
        assert json.loads(meta["sample_shape"]) == list(model.input_shape_)
        assert json.loads(meta["input_shape"]) == (list(model.input_shape_) if kind == "full" else [10])
        assert meta["dcss_version"] == __import__("dcss_plugin").__version__
        assert meta["preset"] == model.config_.preset and json.loads(meta["config"]) == model.config_.to_dict()
        norm = json.loads(meta["normalization"])
        assert norm["kind"] == ("image" if name == "digits" else "vector")
        offset, scale = model.model_.normalize.offset, model.model_.normalize.scale
        assert norm["offset_shape"] == list(offset.shape) and norm["scale_shape"] == list(scale.shape)
        np.testing.assert_array_equal(np.asarray(norm["offset"], np.float32), offset.numpy())
        np.testing.assert_array_equal(np.asarray(norm["scale"], np.float32), scale.numpy())
        assert ("encode" in meta["u_definition"]) and ("offset" in meta["u_definition"])


def test_head_input_u_is_the_encoder_output_on_normalised_input(files, digits_model, digits):
    """What the metadata promises a service: u = encode((x - offset) / scale), with offset/scale from the file."""
    assigner = OnnxClusterAssigner(files["digits", "head"], provider="cpu")
    norm = assigner.normalization
    x = digits[:50, None]
    with torch.no_grad():
        u = digits_model.model_.encoder.eval()(torch.from_numpy((x - norm["offset"]) / norm["scale"])).numpy()
    np.testing.assert_array_equal(assigner(u).label, digits_model.predict(digits[:50]))


# ---------------------------------------------------------------------------------------------------- fp16
def test_fp16_on_digits_keeps_every_label_or_is_refused(tmp_path, digits_model, digits):
    """The documented rule: an fp16 file exists only if it gives every digits row its float32 label."""
    try:
        path = export_assigner(digits_model, tmp_path / "fp16.onnx", full=True, fp16=True, check_data=digits)
    except ValueError as exc:
        assert "fp16 export refused: float16 changes the label of" in str(exc)
        assert not os.path.exists(tmp_path / "fp16.onnx")
    else:
        np.testing.assert_array_equal(OnnxClusterAssigner(path, provider="cpu")(digits).label,
                                      digits_model.predict(digits))


@pytest.mark.parametrize("kind", ["head", "full"])
def test_fp16_export_where_labels_hold(tmp_path, files, digits_model, digits, kind):
    q32 = digits_model.predict_proba(digits)
    top2 = np.sort(q32, axis=1)[:, -2:]
    clear = digits[top2[:, 1] - top2[:, 0] > 0.05]  # rows whose label no rounding can flip
    assert len(clear) > 100
    path = export_assigner(digits_model, tmp_path / "fp16.onnx", full=kind == "full", fp16=True, check_data=clear)
    assigner = OnnxClusterAssigner(path, provider="cpu")
    assert assigner.fp16 and assigner.metadata["fp16"] == "true"
    result = assigner(clear[:, None] if kind == "full" else digits_model.transform(clear))
    assert result.q.dtype == np.float32 and result.confidence.dtype == np.float32
    np.testing.assert_array_equal(result.label, digits_model.predict(clear))
    np.testing.assert_allclose(result.q, digits_model.predict_proba(clear), atol=5e-3)
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert os.path.getsize(path) < 0.6 * os.path.getsize(files["digits", kind])


def test_fp16_default_check_data(tmp_path, digits_model, digits):
    """Without check_data: the training file named in the run's report.json, else decoded samples (with a warning)."""
    q32 = digits_model.predict_proba(digits)
    top2 = np.sort(q32, axis=1)[:, -2:]
    clear = digits[top2[:, 1] - top2[:, 0] > 0.05]
    run_dir = tmp_path / "run"
    digits_model.save(run_dir / "checkpoint.pt")
    np.save(tmp_path / "train.npy", clear)
    (run_dir / "report.json").write_text(json.dumps({"source": f"file:{tmp_path / 'train.npy'}"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "decoded samples" warning: the training file was used
        export_assigner(run_dir, tmp_path / "a.onnx", fp16=True)
    (run_dir / "report.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            export_assigner(run_dir, tmp_path / "b.onnx", full=True, fp16=True)
        except ValueError as exc:
            assert "samples decoded from the cluster centers" in str(exc)
        else:
            assert any("decoded from the cluster centers" in str(w.message) for w in caught)


def test_fp16_is_refused_when_labels_change(tmp_path, digits_model, digits):
    """Points bisected onto decision boundaries: float16 rounding flips some labels, so the export is refused."""
    labels = digits_model.predict(digits)
    a = digits[:32]
    b = np.stack([digits[np.flatnonzero(labels != labels[i])[0]] for i in range(32)])
    lo, hi = np.zeros(32), np.ones(32)
    la = digits_model.predict(a)
    for _ in range(24):  # the label changes between lo and hi, 2**-24 of the segment apart
        mid = (lo + hi) / 2
        same = digits_model.predict(a + mid[:, None, None] * (b - a)) == la
        lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
    boundary = (a + lo[:, None, None] * (b - a)).astype(np.float32)
    with pytest.raises(ValueError, match="fp16 export refused: float16 changes the label"):
        export_assigner(digits_model, tmp_path / "fp16.onnx", full=False, fp16=True, check_data=boundary)
    assert not os.path.exists(tmp_path / "fp16.onnx")


# ---------------------------------------------------------------------------------------------------- bad files
def test_corrupted_bytes_are_refused(tmp_path, files, digits_model):
    data = bytearray(open(files["digits", "full"], "rb").read())
    weight = digits_model.model_.head.net[0].weight.detach().numpy().astype(np.float32).tobytes()[:64]
    at = bytes(data).find(weight)
    assert at > 0
    flipped = bytearray(data)
    flipped[at + 8:at + 12] = b"\x00\x00\x80\x7f"  # one weight becomes inf: still parses as ONNX
    middle = bytearray(data)
    middle[len(data) // 2:len(data) // 2 + 64] = os.urandom(64)
    for name, blob in (("flipped", flipped), ("middle", middle), ("truncated", data[: len(data) // 3])):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(bytes(blob))
        with pytest.raises(AssignerFileError, match="corrupt"):
            OnnxClusterAssigner(path, provider="cpu")


def test_edited_metadata_is_refused(tmp_path, files):
    proto = onnx.load(files["digits", "head"])
    for prop in proto.metadata_props:
        if prop.key == "n_clusters":
            prop.value = "11"
    onnx.save(proto, tmp_path / "edited.onnx")
    with pytest.raises(AssignerFileError, match="integrity check"):
        OnnxClusterAssigner(tmp_path / "edited.onnx")


def test_not_onnx_and_foreign_onnx_are_refused(tmp_path):
    (tmp_path / "notes.onnx").write_text("this is not a model\n" * 20)
    np.save(tmp_path / "array.npy", np.arange(100.0))
    for path in (tmp_path / "notes.onnx", tmp_path / "array.npy"):
        with pytest.raises(ValueError, match="not (a readable ONNX model|an ONNX model)"):
            OnnxClusterAssigner(path, provider="cpu")
    plain = tmp_path / "plain.onnx"  # a valid ONNX model without dcss metadata
    h = onnx.helper
    graph = h.make_graph([h.make_node("Softmax", ["u"], ["q"], axis=1)], "plain",
                         [h.make_tensor_value_info("u", onnx.TensorProto.FLOAT, ["N", 10])],
                         [h.make_tensor_value_info("q", onnx.TensorProto.FLOAT, ["N", 10])])
    onnx.save(h.make_model(graph), plain)
    with pytest.raises(AssignerFileError, match="not a dcss-plugin cluster assigner"):
        OnnxClusterAssigner(plain, provider="cpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        OnnxClusterAssigner(tmp_path / "missing.onnx")


# ---------------------------------------------------------------------------------------------------- bad input
def test_input_validation_errors(files, digits):
    vec = OnnxClusterAssigner(files["vector", "full"], provider="cpu")
    head = OnnxClusterAssigner(files["digits", "head"], provider="cpu")
    img = OnnxClusterAssigner(files["digits", "full"], provider="cpu")
    with pytest.raises(DataError, match="x must have 20 features per row .* got 19"):
        vec(np.zeros((5, 19), np.float32))
    with pytest.raises(DataError, match="u must have d=10 columns .* got 12"):
        head(np.zeros((5, 12), np.float32))
    with pytest.raises(DataError, match=r"x samples must have shape \(1, 8, 8\)"):
        img(np.zeros((5, 1, 8, 9), np.float32))
    with pytest.raises(DataError, match=r"u of shape \(N, 10\): 2 dimensions; got 1 .* add a batch axis"):
        head(np.zeros(10, np.float32))
    with pytest.raises(DataError, match="4 dimensions; got 2"):
        img(digits.reshape(len(digits), -1))
    bad = np.zeros((6, 20), np.float32)
    bad[2, 3], bad[4, 0] = np.nan, np.inf
    with pytest.raises(DataError, match=r"NaN or inf in 2 row\(s\) \(first: \[2, 4\]\)"):
        vec(bad)
    with pytest.raises(DataError, match="NaN or inf"):
        vec(np.full((2, 20), 1e300))  # finite float64, but inf in float32
    with pytest.raises(DataError, match="must be numeric"):
        vec(np.array([["a"] * 20]))
    with pytest.raises(DataError, match="complex"):
        vec(np.zeros((2, 20), np.complex64))


# ---------------------------------------------------------------------------------------------------- providers
def _cuda_runs(path) -> bool:
    return OnnxClusterAssigner(path, provider="auto").provider == "cuda"


def test_provider_auto_reports_what_runs(files):
    assigner = OnnxClusterAssigner(files["digits", "head"], provider="auto")
    assert assigner.provider in ("cpu", "cuda")
    assert assigner._session.get_providers()[0] == {"cpu": "CPUExecutionProvider",
                                                    "cuda": "CUDAExecutionProvider"}[assigner.provider]
    assert OnnxClusterAssigner(files["digits", "head"], provider="cpu").provider == "cpu"
    with pytest.raises(ValueError, match="provider must be"):
        OnnxClusterAssigner(files["digits", "head"], provider="tpu")


def test_provider_cuda_raises_where_cuda_cannot_run(files):
    if _cuda_runs(files["digits", "head"]):
        pytest.skip("CUDA really runs here")
    with pytest.raises(ProviderUnavailableError, match="provider='cuda' cannot run here: .*provider='cpu'"):
        OnnxClusterAssigner(files["digits", "head"], provider="cuda")


def test_iobinding_path_on_cpu_memory(files, digits_model, digits):
    """The pointer-binding code that CUDA tensors use, exercised with CPU tensors (the only memory here)."""
    assigner = OnnxClusterAssigner(files["digits", "full"], provider="cpu", batch_size=1000)
    x = torch.from_numpy(digits_batch(digits, 4096, "digits")[:, None])
    result = assigner._run_bound(x, "cpu", 0)  # 5 chunks, outputs written in place into torch tensors
    assert isinstance(result.q, torch.Tensor) and result.label.dtype == torch.int64
    assert_matches(AssignResult(*(t.numpy() for t in result)), digits_model.predict_proba(x.numpy()))


def test_concurrent_calls_from_threads(files, digits_model, digits):
    """One assigner shared by several threads (as a web service does) gives each caller its own right answer."""
    assigner = OnnxClusterAssigner(files["digits", "full"], provider="cpu", batch_size=256)
    inputs = [digits_batch(digits, 300 + 97 * i, "random", seed=i) for i in range(6)]
    expected = [digits_model.predict(x) for x in inputs]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = assigner(inputs[i]).label
                np.testing.assert_array_equal(results[i], expected[i])
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == len(inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_go_through_iobinding(files, digits_model, digits):
    if not _cuda_runs(files["digits", "full"]):
        pytest.skip("onnxruntime's CUDA provider does not run here")
    assigner = OnnxClusterAssigner(files["digits", "full"], provider="cuda", batch_size=1000)
    x = torch.from_numpy(digits_batch(digits, 4096, "digits")).cuda()
    result = assigner(x)
    assert result.q.is_cuda and result.label.is_cuda and result.label.dtype == torch.int64
    ref = digits_model.predict_proba(x.cpu().numpy())
    np.testing.assert_allclose(result.q.cpu().numpy(), ref, atol=1e-5)
    np.testing.assert_array_equal(result.label.cpu().numpy(), ref.argmax(1))
    np.testing.assert_array_equal(result.confidence.cpu().numpy(), result.q.max(1).values.cpu().numpy())
    with pytest.raises(DataError, match="NaN"):
        assigner(torch.full((3, 1, 8, 8), float("nan"), device="cuda"))


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_export_then_assign_gives_predict_labels(tmp_path, digits_model, digits):
    run_dir = tmp_path / "run"
    digits_model.save(run_dir / "checkpoint.pt")
    np.save(tmp_path / "X.npy", digits)
    np.save(tmp_path / "U.npy", digits_model.transform(digits))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "dcss_plugin.app.cli"]
    done = subprocess.run(cli + ["export", str(run_dir), "--out", str(tmp_path / "F.onnx")], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(cli + ["assign", str(tmp_path / "F.onnx"), "--data", str(tmp_path / "U.npy"), "--out",
                                 str(tmp_path / "labels.npy")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "provider cpu" in done.stdout or "provider cuda" in done.stdout
    labels = np.load(tmp_path / "labels.npy", allow_pickle=False)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, digits_model.predict(digits))
    # the full graph, in-process: raw x in, same labels out
    assert main(["export", str(run_dir), "--full", "--out", str(tmp_path / "full.onnx")]) == 0
    assert main(["assign", str(tmp_path / "full.onnx"), "--data", str(tmp_path / "X.npy"), "--out",
                 str(tmp_path / "labels_full.npy"), "--batch-size", "500"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "labels_full.npy"), digits_model.predict(digits))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_cli_user_errors_exit_2(tmp_path, files, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), np.float32))
    assert main(["assign", files["digits", "head"], "--data", str(tmp_path / "bad.npy"), "--out",
                 str(tmp_path / "l.npy")]) == 2
    assert "u must have d=10 columns" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "a.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
    if not _cuda_runs(files["digits", "head"]):
        np.save(tmp_path / "u.npy", np.zeros((3, 10), np.float32))
        assert main(["assign", files["digits", "head"], "--data", str(tmp_path / "u.npy"), "--out",
                     str(tmp_path / "l.npy"), "--provider", "cuda"]) == 2
        assert "cannot run here" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "l.npy")
