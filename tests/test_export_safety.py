"""Safe answers inside the ONNX graph (label -1 for NaN/inf rows, ``in_domain``) and a runtime without torch
(issue 19, "Serving")."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dcss_plugin import DataError  # noqa: E402
from dcss_plugin.export.format import DIGEST_KEY, IN_DOMAIN_KEYS, metadata_digest  # noqa: E402
from dcss_plugin.export.onnx import (  # noqa: E402
    DOMAIN_MARGIN,
    DOMAIN_QUANTILE,
    export_assigner,
    nearest_center_distance,
)
from dcss_plugin.export.runtime import AssignResult, OnnxClusterAssigner  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _torch_settings(torch_float32_one_thread):
    """float32 and one torch thread (see conftest.py)."""


@pytest.fixture(scope="module")
def model(quick_digits_model):
    return quick_digits_model


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, digits):
    """Full and head exports whose in-domain threshold comes from the training rows (given as check_data)."""
    root = tmp_path_factory.mktemp("safety")
    return {kind: export_assigner(model, root / f"{kind}.onnx", full=kind == "full", check_data=digits)
            for kind in ("full", "head")}


def plain_session(path):
    """What a service without dcss-plugin does: onnxruntime alone."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: dict(zip([o.name for o in session.get_outputs()],
                              session.run(None, {session.get_inputs()[0].name: x})))


def with_bad_rows(x):
    """``x`` with a NaN in row 1 and an inf in row 3."""
    bad = np.array(x, dtype=np.float32, copy=True)
    bad.reshape(len(bad), -1)[1, 5] = np.nan
    bad.reshape(len(bad), -1)[3, 0] = -np.inf
    return bad


def legacy_copy(src, dst):
    """A file in the three-output format (before in_domain): output and metadata entries dropped, digest redone."""
    proto = onnx.load(src)
    keep = [o for o in proto.graph.output if o.name != "in_domain"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    props = [(p.key, p.value) for p in proto.metadata_props if p.key not in (*IN_DOMAIN_KEYS, DIGEST_KEY)]
    del proto.metadata_props[:]
    for key, value in props:
        proto.metadata_props.add(key=key, value="q,label,confidence" if key == "outputs" else value)
    proto.metadata_props.add(key=DIGEST_KEY, value=metadata_digest(proto))
    onnx.save(proto, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------------- the graph
@pytest.mark.parametrize("kind", ["full", "head"])
def test_plain_onnxruntime_answers_nan_and_inf_rows_safely(files, model, digits, kind):
    x = digits[:8, None]
    inputs = with_bad_rows(x if kind == "full" else model.transform(digits[:8]))
    out = plain_session(files[kind])(inputs)
    assert list(out) == ["q", "label", "confidence", "in_domain"]
    assert out["label"].dtype == np.int64 and out["in_domain"].dtype == np.bool_
    bad, good = [1, 3], [0, 2, 4, 5, 6, 7]
    np.testing.assert_array_equal(out["label"][bad], [-1, -1])
    np.testing.assert_array_equal(out["confidence"][bad], [0.0, 0.0])
    np.testing.assert_array_equal(out["q"][bad], 0.0)
    assert not out["in_domain"][bad].any()
    ref = model.predict_proba(digits[:8])[good]  # the other rows are exactly the model's answers
    np.testing.assert_allclose(out["q"][good], ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out["label"][good], ref.argmax(1))
    np.testing.assert_array_equal(out["confidence"][good], out["q"][good].max(1))
    assert out["in_domain"][good].all()


def test_in_domain_holds_the_training_rows_and_not_far_away_inputs(files, model, digits):
    for kind, path in files.items():
        run = plain_session(path)
        train = digits[:, None] if kind == "full" else model.transform(digits)
        far = digits[:, None] * 16 if kind == "full" else model.transform(digits * 16)
        assert run(train)["in_domain"].mean() >= 0.99, kind
        assert run(far)["in_domain"].mean() <= 0.10, kind
        np.testing.assert_array_equal(run(far)["label"], model.predict(digits * 16))  # still answered


def test_metadata_records_the_threshold_and_its_source(tmp_path, files, model, digits):
    meta = OnnxClusterAssigner(files["full"], provider="cpu").metadata
    assert meta["outputs"] == "q,label,confidence,in_domain"
    assert meta["in_domain_threshold_source"].startswith("check_data (1797 rows)")
    u = torch.from_numpy(model.transform(digits))
    dist = nearest_center_distance(u, model.model_.centers.centers).numpy()
    expected = np.float32(DOMAIN_MARGIN * np.quantile(dist.astype(np.float64), DOMAIN_QUANTILE))
    assert float(meta["in_domain_threshold"]) == pytest.approx(float(expected), rel=1e-5)
    # in_domain is exactly the rule on the model's own u (but for rows within rounding of the threshold)
    got = OnnxClusterAssigner(files["full"], provider="cpu")(digits).in_domain
    edge = np.abs(dist - float(meta["in_domain_threshold"])) < 1e-3
    np.testing.assert_array_equal(got[~edge], (dist <= float(meta["in_domain_threshold"]))[~edge])
    # no data at hand: the threshold is inf, said so, and in_domain marks the answered rows only
    path = export_assigner(model, tmp_path / "nodata.onnx", full=True)
    meta = OnnxClusterAssigner(path, provider="cpu").metadata
    assert meta["in_domain_threshold"] == "inf" and meta["in_domain_threshold_source"].startswith("none:")
    out = plain_session(path)(with_bad_rows(digits[:6, None] * 16))
    np.testing.assert_array_equal(out["in_domain"], [True, False, True, False, True, True])


def test_run_directory_export_takes_the_threshold_from_the_training_file(tmp_path, model, digits):
    run_dir = tmp_path / "run"
    model.save(run_dir / "checkpoint.pt")
    np.save(tmp_path / "train.npy", digits)
    (run_dir / "report.json").write_text(json.dumps({"source": f"file:{tmp_path / 'train.npy'}"}))
    path = export_assigner(run_dir, tmp_path / "a.onnx", full=True, check_data=digits[:20])
    assigner = OnnxClusterAssigner(path, provider="cpu")
    assert assigner.metadata["in_domain_threshold_source"].startswith(f"file:{tmp_path / 'train.npy'} (1797 rows)")
    assert assigner(digits).in_domain.mean() >= 0.99


def test_fp16_export_answers_a_nan_row_with_minus_one(tmp_path, model, digits):
    q32 = model.predict_proba(digits)
    top2 = np.sort(q32, axis=1)[:, -2:]
    clear = digits[top2[:, 1] - top2[:, 0] > 0.05]  # rows whose label no rounding can flip
    path = export_assigner(model, tmp_path / "fp16.onnx", full=True, fp16=True, check_data=clear)
    out = plain_session(path)(with_bad_rows(clear[:8, None]))
    np.testing.assert_array_equal(out["label"][[1, 3]], [-1, -1])
    np.testing.assert_array_equal(out["confidence"][[1, 3]], [0.0, 0.0])
    assert not out["in_domain"][[1, 3]].any()
    np.testing.assert_array_equal(np.delete(out["label"], [1, 3]), np.delete(model.predict(clear[:8]), [1, 3]))
    assert out["q"].dtype == np.float32 and out["in_domain"].dtype == np.bool_


# ---------------------------------------------------------------------------------------------------- the runtime
def test_assign_result_has_in_domain_and_the_numpy_api_still_refuses_nan(files, model, digits):
    assigner = OnnxClusterAssigner(files["full"], provider="cpu", batch_size=500)  # chunked
    result = assigner(digits)
    assert isinstance(result, AssignResult) and result._fields == ("q", "label", "confidence", "in_domain")
    q, label, confidence = result[:3]
    np.testing.assert_array_equal(label, model.predict(digits))
    assert result.in_domain.dtype == np.bool_ and result.in_domain.shape == (len(digits),)
    assert assigner.has_in_domain and assigner.in_domain_threshold == float(assigner.metadata["in_domain_threshold"])
    empty = assigner(np.zeros((0, 8, 8), np.float32))
    assert empty.in_domain.shape == (0,) and empty.in_domain.dtype == np.bool_
    with pytest.raises(DataError, match=r"NaN or inf in 2 row\(s\) \(first: \[1, 3\]\).*nonfinite='flag'"):
        assigner(with_bad_rows(digits[:8]))
    flag = OnnxClusterAssigner(files["full"], provider="cpu", nonfinite="flag")
    flagged = flag(with_bad_rows(digits[:8]))
    np.testing.assert_array_equal(flagged.label[[1, 3]], [-1, -1])
    assert not flagged.in_domain[[1, 3]].any()
    np.testing.assert_array_equal(flag(np.full((2, 8, 8), 1e300)).label, [-1, -1])  # float64 beyond float32: inf
    with pytest.raises(ValueError, match="nonfinite must be"):
        OnnxClusterAssigner(files["full"], provider="cpu", nonfinite="drop")


def test_iobinding_path_writes_in_domain(files, model, digits):
    """The pointer-binding code that CUDA tensors use, with CPU tensors: a bool output tensor is written too."""
    assigner = OnnxClusterAssigner(files["full"], provider="cpu", batch_size=300, nonfinite="flag")
    x = torch.from_numpy(with_bad_rows(digits[:1000, None]))
    result = assigner._run_bound(x, "cpu", 0)
    assert result.in_domain.dtype == torch.bool and result.label.dtype == torch.int64
    np.testing.assert_array_equal(result.label.numpy(), assigner(x.numpy()).label)
    np.testing.assert_array_equal(result.in_domain.numpy(), assigner(x.numpy()).in_domain)


def test_file_of_the_three_output_format_still_loads(tmp_path, files, digits):
    path = legacy_copy(files["full"], tmp_path / "old.onnx")
    old = OnnxClusterAssigner(path, provider="cpu")
    assert not old.has_in_domain and old.in_domain_threshold is None
    result = old(digits)
    assert result.in_domain is None
    np.testing.assert_array_equal(result.label, OnnxClusterAssigner(files["full"], provider="cpu")(digits).label)
    assert old(np.zeros((0, 8, 8), np.float32)).in_domain is None
    with pytest.raises(ValueError, match="nonfinite='flag' needs"):
        OnnxClusterAssigner(path, provider="cpu", nonfinite="flag")


# ---------------------------------------------------------------------------------------------------- no torch
NO_TORCH = '''
import sys
class _NoTorch:
    """Plays an environment without torch: any import of torch or torch.* fails."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _NoTorch())
'''

ASSIGN = NO_TORCH + '''
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was not blocked")
import numpy as np
from dcss_plugin.export.runtime import OnnxClusterAssigner
model, data, out = sys.argv[1:4]
result = OnnxClusterAssigner(model, provider="cpu", nonfinite="flag")(np.load(data))
np.savez(out, label=result.label, in_domain=result.in_domain, q=result.q)
auto = OnnxClusterAssigner(model, provider="auto")  # the CUDA path's torch pre-import must not be required
assert auto.provider in ("cpu", "cuda"), auto.provider
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
print("ok", auto.provider)
'''


def test_runtime_works_where_torch_cannot_be_imported(tmp_path, files, digits):
    x = with_bad_rows(digits[:300])
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", ASSIGN, files["full"], str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
    got = np.load(tmp_path / "out.npz")
    here = OnnxClusterAssigner(files["full"], provider="cpu", nonfinite="flag")(x)
    np.testing.assert_array_equal(got["label"], here.label)
    np.testing.assert_array_equal(got["in_domain"], here.in_domain)
    np.testing.assert_array_equal(got["q"], here.q)


ASSIGN_CLI = NO_TORCH + '''
from dcss_plugin.app.cli import main
code = main(["assign", sys.argv[1], "--data", sys.argv[2], "--out", sys.argv[3], "--provider", "cpu"])
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")], "torch was imported"
raise SystemExit(code)
'''


@pytest.mark.parametrize("kind, ext", [("full", ".npy"), ("head", ".csv")])
def test_dcss_assign_command_works_where_torch_cannot_be_imported(tmp_path, files, model, digits, kind, ext):
    x = digits[:200] if kind == "full" else np.asarray(model.transform(digits[:200]), dtype=np.float32)
    data = tmp_path / f"x{ext}"
    if ext == ".npy":
        np.save(data, x)
    else:
        np.savetxt(data, x, delimiter=",", fmt="%.9g")  # float32 values survive 9 significant digits
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", ASSIGN_CLI, files[kind], str(data), str(tmp_path / "labels.npy")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = OnnxClusterAssigner(files[kind], provider="cpu")(x).label
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), expected)
