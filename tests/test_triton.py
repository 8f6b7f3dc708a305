"""`dcss export --triton REPO`: a Triton model repository whose config.pbtxt matches the ONNX graph (issue 19,
"Serving", item 2). Triton itself cannot run here; the configuration is parsed with Triton's own protobuf schema
(tritonclient's ``model_config_pb2``) and compared with the graph read by ``onnx``."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dcss_plugin.app.cli import main  # noqa: E402
from dcss_plugin.export.triton import triton_config, write_triton_repository  # noqa: E402
from helpers import tiny  # noqa: E402

FAST = ["--pretrain-epochs", "1", "--phase1-epochs", "2", "--phase2-epochs", "2", "--quiet", "--no-html"]
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64",
                  onnx.TensorProto.BOOL: "TYPE_BOOL"}


def parse_config(text):
    """config.pbtxt parsed with Triton's ModelConfig schema (a typo or unknown field fails here)."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def graph_tensors(values):
    """``{name: (Triton data type, shape without the batch axis)}`` of ONNX graph inputs or outputs."""
    out = {}
    for v in values:
        dims = v.type.tensor_type.shape.dim
        assert dims[0].dim_param, f"{v.name}: the batch axis must be dynamic"
        out[v.name] = (ONNX_TO_TRITON[v.type.tensor_type.elem_type], [d.dim_value for d in dims[1:]])
    return out


def check_against_graph(config, onnx_path, max_batch, kind):
    """Every input/output of the graph, and nothing else, with its data type and dims as Triton documents them:
    the batch axis left out; a batch-only (N,) tensor as dims [1] with reshape to []."""
    from tritonclient.grpc import model_config_pb2

    graph = onnx.load(onnx_path).graph
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == max_batch
    for entries, values in ((config.input, graph.input), (config.output, graph.output)):
        want = graph_tensors(values)
        assert [e.name for e in entries] == list(want)
        for e in entries:
            dtype, rest = want[e.name]
            assert model_config_pb2.DataType.Name(e.data_type) == dtype, e.name
            if rest:
                assert list(e.dims) == rest and not e.HasField("reshape"), e.name
            else:
                assert list(e.dims) == [1] and e.HasField("reshape") and list(e.reshape.shape) == [], e.name
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds > 0
    assert len(config.instance_group) == 1 and config.instance_group[0].count == 1
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == f"KIND_{kind.upper()}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("triton")
    data = tiny(base / "X.npy")
    out = base / "run"
    assert main(["fit", "--data", str(data), "--clusters", "3", "--seed", "0", "--out", str(out), *FAST]) == 0
    return base, out


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory, torch_float32_one_thread):
    """A full export of an image model (input x (N, 1, 8, 8))."""
    from sklearn.datasets import load_digits

    from dcss_plugin import DCSS
    from dcss_plugin.export.onnx import export_assigner

    x = load_digits().images[:400].astype(np.float32)
    est = DCSS(n_clusters=10, seed=0, verbose=False, pretrain_epochs=1, phase1_epochs=1, phase2_epochs=1,
               augment=False, neighbors=0).fit(x)
    path = tmp_path_factory.mktemp("digits") / "full.onnx"
    return export_assigner(est, path, full=True, check_data=x)


def test_cli_writes_the_repository_and_the_config_matches_the_graph(run, capsys):
    base, out = run
    repo = base / "models"
    assert main(["export", str(out), "--full", "--triton", str(repo), "--max-batch", "64", "--kind", "cpu"]) == 0
    assert "Triton" in capsys.readouterr().out
    assert sorted(os.listdir(repo)) == ["dcss"]  # no temporary folder left behind
    assert sorted(os.listdir(repo / "dcss")) == ["1", "config.pbtxt"]
    assert os.listdir(repo / "dcss" / "1") == ["model.onnx"]
    config = parse_config((repo / "dcss" / "config.pbtxt").read_text())
    assert config.name == "dcss"
    check_against_graph(config, str(repo / "dcss" / "1" / "model.onnx"), 64, "cpu")
    assert [e.name for e in config.input] == ["x"] and list(config.input[0].dims) == [5]  # vectors: [F]
    assert list(config.output[0].dims) == [3]  # q: [K]


def test_the_model_file_is_the_export_byte_for_byte_and_signed_when_asked(run, capsys):
    base, out = run
    key = base / "dcss.key"
    key.write_bytes(os.urandom(32))
    repo = base / "signed"
    assert main(["export", str(out), "--full", "--out", str(base / "m.onnx"), "--triton", str(repo), "--name",
                 "clusters", "--sign-key", str(key)]) == 0
    copied = repo / "clusters" / "1" / "model.onnx"
    assert copied.read_bytes() == (base / "m.onnx").read_bytes()
    from dcss_plugin.export.runtime import OnnxClusterAssigner

    assert OnnxClusterAssigner(copied, provider="cpu", verify_key=key).signature_verified
    config = parse_config((repo / "clusters" / "config.pbtxt").read_text())
    assert config.name == "clusters" and config.max_batch_size == 1024  # the default
    check_against_graph(config, str(copied), 1024, "gpu")  # the default kind


def test_an_existing_model_folder_is_refused_without_overwrite(run, capsys):
    base, out = run
    repo = base / "taken"
    (repo / "dcss" / "1").mkdir(parents=True)
    (repo / "dcss" / "config.pbtxt").write_text("old")
    (repo / "other").mkdir()
    assert main(["export", str(out), "--full", "--triton", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (repo / "dcss" / "config.pbtxt").read_text() == "old"
    assert main(["export", str(out), "--full", "--triton", str(repo), "--overwrite"]) == 0
    parse_config((repo / "dcss" / "config.pbtxt").read_text())
    assert sorted(os.listdir(repo)) == ["dcss", "other"]  # the other model untouched, nothing left over


def test_export_needs_out_or_triton(run, capsys):
    assert main(["export", str(run[1]), "--full"]) == 2
    assert "--triton" in capsys.readouterr().err


def test_image_model_dims_and_batch_only_outputs(digits_model, tmp_path):
    folder = write_triton_repository(digits_model, tmp_path / "repo", max_batch=256, kind="gpu")
    text = open(os.path.join(folder, "config.pbtxt")).read()
    config = parse_config(text)
    check_against_graph(config, os.path.join(folder, "1", "model.onnx"), 256, "gpu")
    assert list(config.input[0].dims) == [1, 8, 8]
    outs = {o.name: o for o in config.output}
    assert list(outs["q"].dims) == [10]
    for name in ("label", "confidence", "in_domain"):
        assert list(outs[name].dims) == [1] and list(outs[name].reshape.shape) == []


def test_writer_accepts_bytes_and_checks_its_arguments(digits_model, tmp_path):
    data = open(digits_model, "rb").read()
    folder = write_triton_repository(data, tmp_path / "r", name="m")
    assert open(os.path.join(folder, "1", "model.onnx"), "rb").read() == data
    with pytest.raises(FileExistsError, match="already exists"):
        write_triton_repository(data, tmp_path / "r", name="m")
    with pytest.raises(ValueError, match="kind"):
        write_triton_repository(data, tmp_path / "r2", kind="tpu")
    with pytest.raises(ValueError, match="max_batch"):
        write_triton_repository(data, tmp_path / "r2", max_batch=0)
    with pytest.raises(ValueError, match="name"):
        write_triton_repository(data, tmp_path / "r2", name="../x")
    assert not (tmp_path / "r2").exists()
    assert "KIND_CPU" in triton_config(onnx.load_from_string(data), kind="cpu")
