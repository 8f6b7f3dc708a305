"""Signed ONNX assigners: the digest is an integrity check only; an HMAC-SHA256 signature refuses forged models."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dcss_plugin import DCSS, DCSSModel  # noqa: E402
from dcss_plugin.app.cli import main  # noqa: E402
from dcss_plugin.export.onnx import (  # noqa: E402
    DIGEST_KEY,
    SIGNATURE_KEY,
    SigningKeyError,
    export_assigner,
    metadata_digest,
    sign_model_bytes,
)
from dcss_plugin.export.runtime import AssignerFileError, AssignerSignatureError, OnnxClusterAssigner  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _torch_settings(torch_float32_one_thread):
    """float32 and one torch thread (see conftest.py)."""


def tiny_model(seed: int) -> DCSSModel:
    """An untrained DCSSModel: u (N, 4) -> q (N, 3); the head export needs nothing else."""
    torch.manual_seed(seed)
    return DCSSModel(nn.Linear(6, 4), n_clusters=3, latent_dim=4, head_hidden_dims=(8,))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name, data in (("right", os.urandom(32)), ("wrong", os.urandom(32)), ("short", b"0123456789"),
                       ("empty", b"")):
        (root / name).write_bytes(data)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("signed")
    model = tiny_model(0)
    return {
        "signed": export_assigner(model, root / "signed.onnx", sign_key=keys["right"]),
        "plain": export_assigner(model, root / "plain.onnx"),
        "foreign": export_assigner(tiny_model(1), root / "foreign.onnx"),
    }


@pytest.fixture(scope="module")
def u():
    return np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)


def _set_digest(proto) -> None:
    """What a forger does: recompute the plain SHA-256 digest after an edit."""
    for prop in proto.metadata_props:
        if prop.key == DIGEST_KEY:
            prop.value = metadata_digest(proto)


def forge_bias(src: str, dst, cluster: int = 1) -> str:
    """Raise one bias of the head's last layer (``cluster`` wins everywhere) and recompute the digest."""
    proto = onnx.load(src)
    biases = [t for t in proto.graph.initializer if t.name.endswith("bias")]
    assert biases
    last = biases[-1]
    values = onnx.numpy_helper.to_array(last).copy()
    values[cluster] += 100.0
    last.CopyFrom(onnx.numpy_helper.from_array(values, last.name))
    _set_digest(proto)
    onnx.save(proto, dst)
    return str(dst)


def forge_foreign(foreign: str, signed: str, dst) -> str:
    """Another model's graph with the signed file's metadata (signature included) copied over."""
    proto = onnx.load(foreign)
    del proto.metadata_props[:]
    for prop in onnx.load(signed).metadata_props:
        proto.metadata_props.add(key=prop.key, value=prop.value)
    _set_digest(proto)
    onnx.save(proto, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------------- the API
def test_signed_model_with_the_right_key_answers_as_the_unsigned_one(models, keys, u):
    signed = OnnxClusterAssigner(models["signed"], provider="cpu", verify_key=keys["right"])
    plain = OnnxClusterAssigner(models["plain"], provider="cpu")
    assert signed.signature_verified and not plain.signature_verified
    a, b = signed(u), plain(u)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.q, b.q)
    assert SIGNATURE_KEY in signed.metadata and SIGNATURE_KEY not in plain.metadata
    assert signed.metadata[SIGNATURE_KEY].startswith("hmac-sha256:")
    # the digest does not cover the signature: a reader without a key still accepts a signed file
    np.testing.assert_array_equal(OnnxClusterAssigner(models["signed"], provider="cpu")(u).label, b.label)
    # the key may also be given as bytes
    key = open(keys["right"], "rb").read()
    OnnxClusterAssigner(models["signed"], provider="cpu", verify_key=key)


def test_forged_bias_passes_the_integrity_check_but_not_the_signature(tmp_path, models, keys, u):
    honest = OnnxClusterAssigner(models["signed"], provider="cpu")(u).label
    forged = forge_bias(models["signed"], tmp_path / "forged.onnx", cluster=int(honest[0] + 1) % 3)
    # the plain digest is no protection: the forgery loads and answers differently
    assert not np.array_equal(OnnxClusterAssigner(forged, provider="cpu")(u).label, honest)
    with pytest.raises(AssignerSignatureError, match="signature"):
        OnnxClusterAssigner(forged, provider="cpu", verify_key=keys["right"])


def test_foreign_graph_with_copied_metadata_is_refused(tmp_path, models, keys):
    forged = forge_foreign(models["foreign"], models["signed"], tmp_path / "foreign.onnx")
    OnnxClusterAssigner(forged, provider="cpu")  # integrity only: accepted
    with pytest.raises(AssignerSignatureError, match="signature"):
        OnnxClusterAssigner(forged, provider="cpu", verify_key=keys["right"])


def test_wrong_key_and_unsigned_are_refused(models, keys):
    with pytest.raises(AssignerSignatureError, match="another key"):
        OnnxClusterAssigner(models["signed"], provider="cpu", verify_key=keys["wrong"])
    with pytest.raises(AssignerSignatureError, match="not signed"):
        OnnxClusterAssigner(models["plain"], provider="cpu", verify_key=keys["right"])
    assert issubclass(AssignerSignatureError, AssignerFileError) and issubclass(AssignerSignatureError, ValueError)


def test_any_changed_byte_is_refused(tmp_path, models, keys):
    data = open(models["signed"], "rb").read()
    entry_start = data.rfind(SIGNATURE_KEY.encode())
    cases = {
        "appended": data + b"\x00",
        "signature-hex": data[:-1] + (b"0" if data[-1:] != b"0" else b"1"),
        "doc-string": data.replace(b"DCSS cluster assigner", b"DCSS cluster assignes"),
        "resigned-tail": data + data[entry_start - 4:],  # a second signature entry
    }
    for name, blob in cases.items():
        assert blob != data, name
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(blob)
        with pytest.raises(AssignerFileError):
            OnnxClusterAssigner(path, provider="cpu", verify_key=keys["right"])
    # bytes that onnx re-saves differently (the signature entry moved) are refused too
    proto = onnx.load(models["signed"])
    proto.producer_version = proto.producer_version + "x"
    onnx.save(proto, tmp_path / "resaved.onnx")
    with pytest.raises(AssignerSignatureError):
        OnnxClusterAssigner(tmp_path / "resaved.onnx", provider="cpu", verify_key=keys["right"])


def test_short_empty_or_missing_keys_are_refused_before_any_work(tmp_path, models, keys):
    model = tiny_model(0)
    for name, pattern in (("short", "10 bytes, under the 16"), ("empty", "is empty")):
        with pytest.raises(SigningKeyError, match=pattern):
            export_assigner(model, tmp_path / "m.onnx", sign_key=keys[name])
        with pytest.raises(SigningKeyError, match=pattern):
            OnnxClusterAssigner(models["signed"], provider="cpu", verify_key=keys[name])
    with pytest.raises(FileNotFoundError, match="Key file not found"):
        export_assigner(model, tmp_path / "m.onnx", sign_key=tmp_path / "no-key")
    assert not os.path.exists(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="signed already"):
        sign_model_bytes(open(models["signed"], "rb").read(), b"k" * 32)


# ---------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 4, size=(3, 6))[rng.integers(0, 3, 90)] + rng.normal(size=(90, 6))).astype(np.float32)
    est = DCSS(n_clusters=3, latent_dim=4, mlp_hidden_dims=(16,), seed=0, verbose=False, pretrain_epochs=1,
               phase1_epochs=1, phase2_epochs=1, augment=False, neighbors=0).fit(x)
    root = tmp_path_factory.mktemp("cli")
    est.save(root / "run" / "checkpoint.pt")
    np.save(root / "X.npy", x)
    return root, est, x


def test_cli_sign_and_verify_roundtrip(run_dir, keys, capsys):
    root, est, x = run_dir
    model = str(root / "signed.onnx")
    assert main(["export", str(root / "run"), "--full", "--out", model, "--sign-key", keys["right"]]) == 0
    assert "signed" in capsys.readouterr().out
    assert main(["assign", model, "--data", str(root / "X.npy"), "--out", str(root / "labels.npy"),
                 "--verify-key", keys["right"]]) == 0
    assert "signature verified" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(root / "labels.npy"), est.predict(x))


def test_cli_refusals_exit_2_with_one_line(run_dir, keys, tmp_path, capsys):
    root, est, x = run_dir
    signed = str(tmp_path / "signed.onnx")
    plain = str(tmp_path / "plain.onnx")
    assert main(["export", str(root / "run"), "--full", "--out", signed, "--sign-key", keys["right"]]) == 0
    assert main(["export", str(root / "run"), "--full", "--out", plain]) == 0
    forged = forge_bias(signed, tmp_path / "forged.onnx")
    capsys.readouterr()
    cases = [
        (["assign", signed, "--verify-key", keys["wrong"]], "failed signature verification"),
        (["assign", plain, "--verify-key", keys["right"]], "is not signed"),
        (["assign", forged, "--verify-key", keys["right"]], "signature"),
        (["assign", signed, "--verify-key", keys["short"]], "under the 16 bytes"),
        (["assign", signed, "--verify-key", str(tmp_path / "nokey")], "Key file not found"),
        (["export", str(root / "run"), "--out", str(tmp_path / "e.onnx"), "--sign-key", keys["empty"]], "is empty"),
    ]
    for argv, message in cases:
        if argv[0] == "assign":
            argv = argv + ["--data", str(root / "X.npy"), "--out", str(tmp_path / "l.npy")]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "l.npy") and not os.path.exists(tmp_path / "e.onnx")


def test_cli_refusal_in_a_subprocess_has_no_traceback(run_dir, keys, tmp_path):
    root, est, x = run_dir
    plain = str(tmp_path / "plain.onnx")
    assert main(["export", str(root / "run"), "--full", "--out", plain]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "dcss_plugin.app.cli", "assign", plain, "--data",
                           str(root / "X.npy"), "--out", str(tmp_path / "l.npy"), "--verify-key", keys["right"]],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "is not signed" in done.stderr and "Traceback" not in done.stderr
