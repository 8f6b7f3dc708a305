"""Export a DCSS model to a single, self-contained ONNX cluster assigner.

What can be exported: a :class:`~dcss_plugin.DCSSModel` (however it was trained: the estimator, an adapter, or a
user's own loop), a fitted :class:`~dcss_plugin.DCSS` (its ``model_``), or a run directory / checkpoint written by
``dcss fit`` (read with :meth:`DCSS.load`). Only the model's public parts are read: ``normalize``, ``encoder``,
``head`` (the selected one), ``decoder`` and ``centers`` (for the default check samples), ``spec``.

Two graphs, both with a dynamic batch axis ``N`` and the same three outputs:

* ``head`` (default): input ``u`` (N, d) float32, ``u = model.encode(x)`` (the encoder on normalised input); the
  graph is MNet only.
* ``full``: input ``x`` (N, *sample_shape) float32; the graph applies ``model.normalize`` (``(x - offset) /
  scale``), the encoder and the selected head, so a service needs nothing but the file. The sample shape comes
  from ``input_shape=``, else the estimator's ``input_shape_``, else ``model.spec["input_shape"]``, else the shape
  of ``check_data``; with none of them a full export is refused.

Outputs: ``q`` (N, K) float32 (softmax, rows sum to 1), ``label`` (N,) int64 (``argmax q``, first index on
ties, as :meth:`DCSSModel.predict`) and ``confidence`` (N,) float32 (``max q``).

The file's ``metadata_props`` say everything a service needs (see :data:`METADATA_KEYS`): K, d, the input name
and shape, the normalisation (offset/scale as JSON), the package version, the preset and the config, the
export kind, the fp16 flag, and a SHA-256 digest of graph + metadata that
:class:`~dcss_plugin.export.runtime.OnnxClusterAssigner` checks, so that a corrupted file is refused.

Integrity versus authenticity: the ``digest`` entry is an integrity check against accidental corruption (a
truncated copy, a flipped bit, an edited metadata entry). It is not tamper protection: anyone can edit a weight and
recompute it. For that, sign the export with a secret key (``sign_key=KEY_FILE``, ``dcss export ... --sign-key
KEY_FILE``) and load it with the same key (``OnnxClusterAssigner(path, verify_key=KEY_FILE)``, ``dcss assign ...
--verify-key KEY_FILE``); see :func:`sign_model_bytes` for exactly what is signed.

Every export is run by onnxruntime before it is written and compared with the PyTorch model (float32: ``q`` within
1e-4). fp16 (``fp16=True``): weights and compute in float16, inputs and outputs stay float32 (the normalisation runs
in float32, then the normalised input is cast). The export is refused (``ValueError``) unless the fp16 graph,
run by onnxruntime (CPU, and CUDA where it runs), gives the same label as the float32 model for every row of
the check data: ``check_data`` when given, else the training data named in the run directory's ``report.json``,
else samples around the cluster centers (decoded to ``x`` for a full export; a weaker check, a warning says so).
Refusing rather than warning keeps the contract "the assigner's labels are the model's labels". What fp16 buys: a
file half the size, and float16 arithmetic on CUDA. On CPU it buys no speed: onnxruntime's CPU provider has no
float16 kernels for these ops and casts every weight back to float32 at load, so the CPU computes in float32 with
float16-rounded weights. Near-tie rows (two clusters with almost equal ``q``) are where labels flip.

Exporter: ``exporter="auto"`` uses torch's TorchScript-based exporter (``dynamo=False``, opset 17) while torch
ships it: about 0.1 s per export against seconds for the torch.export-based one, and the same graph for these
modules; when it is gone (or with ``exporter="dynamo"``) the torch.export-based exporter is used. Both give a
symbolic batch axis ``N`` and are checked against PyTorch by the tests.

Example:
    >>> from dcss_plugin.export.onnx import export_assigner
    >>> export_assigner("runs/digits", "runs/digits/assigner.onnx", full=True)
    'runs/digits/assigner.onnx'
    >>> export_assigner(my_model, "assigner.onnx", full=True, input_shape=(1, 8, 8))   # a DCSSModel of own loop
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import io
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from dcss_plugin import __version__
from dcss_plugin.estimator import DCSS
from dcss_plugin.io import atomic_write_bytes
from dcss_plugin.data import as_tensor
from dcss_plugin.model import DCSSModel, Normalize

__all__ = [
    "ASSIGNER_FORMAT",
    "METADATA_KEYS",
    "OUTPUT_NAMES",
    "AssignerGraph",
    "ExportSource",
    "build_graph",
    "export_assigner",
    "export_from_cli",
    "metadata_digest",
    "read_signing_key",
    "resolve_source",
    "sign_model_bytes",
    "signature_entry",
    "signature_of",
    "SigningKeyError",
]

log = logging.getLogger("dcss_plugin")

ASSIGNER_FORMAT = "dcss-plugin/onnx-assigner-v1"
OUTPUT_NAMES = ("q", "label", "confidence")
TORCHSCRIPT_OPSET = 17
DIGEST_KEY = "digest"
SIGNATURE_KEY = "signature"  # optional: present in signed exports only (not one of METADATA_KEYS)
SIGNATURE_SCHEME = "hmac-sha256"
MIN_KEY_BYTES = 16
_SIGNATURE_CONTEXT = b"dcss-plugin/onnx-assigner-signature-v1\0"  # HMAC input prefix: a key used elsewhere too
#                                                                      cannot be made to sign assigners by accident
NO_PRESET = "none"  # the metadata preset of a model trained outside the estimator

#: The ``metadata_props`` every exported assigner carries (all values are strings; JSON where structured).
METADATA_KEYS = {
    "format": f"always {ASSIGNER_FORMAT!r}",
    "export_kind": "'head' (input u) or 'full' (input x)",
    "input_name": "'u' or 'x'",
    "input_shape": "JSON list: the graph input's shape without the batch axis ([d] or the sample shape)",
    "sample_shape": "JSON list: the shape of one sample x ([] when unknown: a head export of a model whose input "
                    "shape was never given)",
    "n_clusters": "K",
    "latent_dim": "d",
    "outputs": "'q,label,confidence'",
    "normalization": "JSON {kind, formula, offset, scale, offset_shape, scale_shape}: x_norm = (x - offset) / scale; "
                     "kind 'image' (one offset/scale), 'vector' (per feature) or 'identity'",
    "u_definition": "how the graph input u is obtained (head export) or that the graph computes it (full)",
    "fp16": "'true' or 'false'",
    "dcss_version": "dcss_plugin.__version__ at export",
    "preset": f"the DCSSConfig preset ({NO_PRESET!r} for a model trained outside the estimator)",
    "config": "JSON: DCSSConfig.to_dict() (all hyperparameters), or DCSSModel.config() for a model trained outside "
              "the estimator",
    "exporter": "'torchscript' or 'dynamo' (which torch.onnx exporter wrote the graph)",
    "torch_version": "torch.__version__ at export",
    DIGEST_KEY: "sha256 over the serialized graph and every other metadata entry (but 'signature'): an integrity "
                "check against accidental corruption, not tamper protection (anyone can recompute it)",
}


# ---------------------------------------------------------------------------------------------------- the source
@dataclass
class ExportSource:
    """What is exported: the model and what is known about it besides its modules.

    Attributes:
        model: the :class:`DCSSModel`.
        input_shape: shape of one sample ``x`` (None when unknown).
        config: the training settings (``DCSSConfig.to_dict()``) or, for a model trained outside the estimator,
            ``model.config()``.
        preset: the DCSSConfig preset, or ``"none"``.
        run_dir: the run directory it was loaded from (its ``report.json`` may name the training data), or None.
    """

    model: DCSSModel
    input_shape: Optional[Tuple[int, ...]]
    config: Dict[str, Any]
    preset: str
    run_dir: Optional[str] = None


def _from_estimator(est: Any, run_dir: Optional[str] = None) -> ExportSource:
    model = getattr(est, "model_", None)
    if not isinstance(model, DCSSModel):
        raise ValueError("This DCSS estimator is not fitted yet; fit it (or DCSS.load a checkpoint) before export.")
    cfg = getattr(est, "config_", None)
    shape = getattr(est, "input_shape_", None)
    return ExportSource(model, tuple(int(s) for s in shape) if shape is not None else None,
                        cfg.to_dict() if cfg is not None else model.config(),
                        str(cfg.preset) if cfg is not None else NO_PRESET, run_dir)


def _from_model(model: DCSSModel, run_dir: Optional[str] = None) -> ExportSource:
    shape = model.spec.get("input_shape")
    return ExportSource(model, tuple(int(s) for s in shape) if shape is not None else None, model.config(),
                        NO_PRESET, run_dir)


def resolve_source(obj: Union[DCSSModel, DCSS, str, os.PathLike]) -> ExportSource:
    """The :class:`ExportSource` of a :class:`DCSSModel`, a fitted :class:`DCSS`, or a run directory/checkpoint.

    A path is read with :meth:`DCSS.load` (every checkpoint kind ``dcss fit`` writes); a plain model file that the
    estimator cannot read (one saved by :meth:`DCSSModel.save` without an input shape) with :meth:`DCSSModel.load`.
    """
    if isinstance(obj, DCSSModel):
        return _from_model(obj)
    if isinstance(obj, DCSS) or hasattr(obj, "model_"):
        return _from_estimator(obj)
    if not isinstance(obj, (str, os.PathLike)):
        raise TypeError(f"export_assigner takes a DCSSModel, a fitted DCSS or a run directory; got "
                        f"{type(obj).__name__}.")
    path = os.fspath(obj)
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        return _from_estimator(DCSS.load(path, device="cpu"), run_dir)
    except ValueError as exc:
        try:
            model = DCSSModel.load(path, device="cpu")
        except Exception:  # noqa: BLE001 - the estimator's message is the one that explains
            raise exc from None
        return _from_model(model, run_dir)


def _input_shape(src: ExportSource, input_shape: Optional[Sequence[int]], check_data: Any,
                 full: bool) -> Optional[Tuple[int, ...]]:
    """The sample shape: ``input_shape=``, else the source's, else ``check_data``'s; refused if a full export
    has none."""
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if src.input_shape is not None:
        return src.input_shape
    if check_data is not None and len(np.shape(check_data)) >= 2:
        return tuple(int(s) for s in np.shape(check_data)[1:])
    if full:
        raise ValueError("A full export needs the shape of one input sample x, and this model does not record it: "
                         "pass input_shape=(...) (e.g. (1, 28, 28) or (n_features,)), or check_data=real samples, "
                         "or put 'input_shape' into model.spec.")
    return None


# ---------------------------------------------------------------------------------------------------- the graph
class AssignerGraph(nn.Module):
    """The exported computation: ``[normalize -> encoder ->] head -> (q, label, confidence)``.

    Args:
        head: MNet (``u (N, d) -> q (N, K)``, softmax included).
        encoder: the encoder (normalised ``x`` -> ``u``); ``None`` for a head export.
        normalize: the input normalisation (a :class:`Normalize`; None: identity); full export only.
        fp16: run the encoder and head in float16; the normalisation and the I/O stay float32.

    All modules are copied to the CPU in eval mode; the originals are not touched.

    Shapes:
        input: ``u`` (N, d) for a head export, ``x`` (N, *sample_shape) for a full export, float32.
        output: ``q`` (N, K) float32, ``label`` (N,) int64, ``confidence`` (N,) float32.

    Example:
        >>> graph = AssignerGraph(model.head).eval()
        >>> q, label, confidence = graph(torch.randn(4, model.latent_dim))
    """

    def __init__(self, head: nn.Module, encoder: Optional[nn.Module] = None, normalize: Optional[nn.Module] = None,
                 fp16: bool = False) -> None:
        super().__init__()
        dtype = torch.float16 if fp16 else torch.float32
        self.fp16 = bool(fp16)
        self.head = copy.deepcopy(head).to("cpu", dtype).eval()
        self.encoder = copy.deepcopy(encoder).to("cpu", dtype).eval() if encoder is not None else None
        self.normalize = (copy.deepcopy(normalize if normalize is not None else Normalize()).to("cpu", torch.float32)
                          .eval() if encoder is not None else None)

    def forward(self, inputs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h = inputs
        if self.normalize is not None:
            h = self.normalize(h)  # float32, then cast: the normalisation never runs in fp16
        if self.fp16:
            h = h.half()
        if self.encoder is not None:
            h = self.encoder(h)
        q = self.head(h).float()
        confidence, label = q.max(dim=1)
        return q, label, confidence


def build_graph(model: DCSSModel, full: bool, fp16: bool) -> AssignerGraph:
    """The :class:`AssignerGraph` of ``model``'s selected head (and, ``full``, its normalisation and encoder).

    Example:
        >>> q, label, confidence = build_graph(model, full=True, fp16=False)(torch.rand(2, 1, 8, 8) * 16)
    """
    if not full:
        return AssignerGraph(model.head, fp16=fp16).eval()
    return AssignerGraph(model.head, model.encoder, model.normalize, fp16=fp16).eval()


def _reference(model: DCSSModel) -> DCSSModel:
    """A float32 CPU copy of ``model`` in eval mode: what the export is compared with (``model`` is not touched)."""
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


def _check_traceable(graph: nn.Module, example: Tensor) -> None:
    """Run the graph once in PyTorch, so that a wrong input shape fails with a clear message, not in the exporter."""
    try:
        with torch.no_grad():
            graph(example)
    except Exception as exc:  # noqa: BLE001 - whatever the user's encoder raises
        raise ValueError(f"The model does not run on a batch of shape {tuple(example.shape)} ({exc}); pass the "
                         "shape of one sample as input_shape=(...).") from exc


# ---------------------------------------------------------------------------------------------------- exporters
@contextlib.contextmanager
def _quiet_export():
    """Silence the exporters' deprecation notes and progress prints (they are not the user's business)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # not a UserWarning; timm's ViT shape arithmetic
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _export_torchscript(graph: nn.Module, example: Tensor, input_name: str):
    """The TorchScript-based exporter (``dynamo=False``): fast (~0.1 s) and proven on Conv/Gemm/BN/Softmax."""
    import onnx

    buf = io.BytesIO()
    axes = {name: {0: "N"} for name in (input_name, *OUTPUT_NAMES)}
    with _quiet_export():
        torch.onnx.export(graph, (example,), buf, input_names=[input_name], output_names=list(OUTPUT_NAMES),
                          dynamic_axes=axes, opset_version=TORCHSCRIPT_OPSET, do_constant_folding=True,
                          dynamo=False)
    return onnx.load_model_from_string(buf.getvalue())


def _export_dynamo(graph: nn.Module, example: Tensor, input_name: str):
    """The torch.export-based exporter (``dynamo=True``, needs onnxscript): slower (seconds), the maintained one."""
    batch = torch.export.Dim("N")
    with _quiet_export():
        program = torch.onnx.export(graph, (example,), None, input_names=[input_name],
                                    output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch},), dynamo=True,
                                    external_data=False, optimize=True, verbose=False)
    return program.model_proto


def _to_onnx(graph: nn.Module, example: Tensor, input_name: str, exporter: str) -> Tuple[Any, str]:
    """ModelProto of ``graph`` with the chosen exporter; ``auto`` = TorchScript while torch ships it, else dynamo."""
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}.")
    first: Optional[Exception] = None
    if exporter in ("auto", "torchscript"):
        try:
            return _export_torchscript(graph, example, input_name), "torchscript"
        except Exception as exc:  # noqa: BLE001 - the legacy exporter is deprecated and may be gone
            if exporter == "torchscript":
                raise RuntimeError(f"The TorchScript ONNX exporter failed: {exc}") from exc
            log.info("TorchScript ONNX exporter unavailable (%s); using the dynamo exporter", exc)
            first = exc
    try:
        return _export_dynamo(graph, example, input_name), "dynamo"
    except Exception as exc:  # noqa: BLE001 - report both attempts
        tried = f"TorchScript exporter: {first}; " if first is not None else ""
        raise RuntimeError(f"ONNX export failed ({tried}dynamo exporter: {exc}).") from exc


# ---------------------------------------------------------------------------------------------------- metadata
def metadata_digest(model_proto: Any) -> str:
    """SHA-256 (hex) over the serialized graph and every metadata entry except the digest and the signature.

    An integrity check against accidental corruption only: it has no secret, so whoever edits the file can
    recompute it. Tamper protection is the HMAC signature (:func:`sign_model_bytes`).

    Example:
        >>> metadata_digest(onnx.load("assigner.onnx")) == dict(...)["digest"]
    """
    h = hashlib.sha256()
    h.update(model_proto.graph.SerializeToString(deterministic=True))
    meta = sorted((p.key, p.value) for p in model_proto.metadata_props if p.key not in (DIGEST_KEY, SIGNATURE_KEY))
    h.update(b"\0")
    h.update(json.dumps(meta, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- signing
class SigningKeyError(ValueError):
    """A signing or verification key that cannot be used: empty or shorter than :data:`MIN_KEY_BYTES` bytes."""


def read_signing_key(key: Union[str, os.PathLike, bytes]) -> bytes:
    """The secret key: the bytes of the file ``key`` (or ``key`` itself when given as bytes).

    The file's bytes are the key exactly as stored (a trailing newline included), so the signer and the verifier
    must use the same file contents. Make one with e.g. ``head -c 32 /dev/urandom > dcss.key``.

    Raises:
        FileNotFoundError: no such file.
        SigningKeyError: an empty key or one under 16 bytes (too easy to guess).
    """
    if isinstance(key, (bytes, bytearray)):
        data, what = bytes(key), "The signing key"
    else:
        path = os.fspath(key)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Key file not found: {path!r}. Create one with e.g. `head -c 32 /dev/urandom "
                                    "> dcss.key` and keep it secret.")
        with open(path, "rb") as fh:
            data = fh.read()
        what = f"The key file {path!r}"
    if not data:
        raise SigningKeyError(f"{what} is empty; a key needs at least {MIN_KEY_BYTES} bytes (e.g. `head -c 32 "
                              "/dev/urandom > dcss.key`).")
    if len(data) < MIN_KEY_BYTES:
        raise SigningKeyError(f"{what} has {len(data)} bytes, under the {MIN_KEY_BYTES} bytes a key needs to resist "
                              "guessing (e.g. `head -c 32 /dev/urandom > dcss.key`).")
    return data


def signature_of(unsigned: bytes, key: bytes) -> str:
    """The ``signature`` metadata value of the unsigned model bytes: ``"hmac-sha256:" + hex``."""
    mac = hmac.new(key, _SIGNATURE_CONTEXT + unsigned, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_SCHEME}:{mac}"


def signature_entry(value: str) -> bytes:
    """The serialized ``metadata_props`` entry ``signature=value``, as it ends a signed file (field 14 of
    ``ModelProto``: a tag, a length and the ``StringStringEntryProto``)."""
    import onnx

    holder = onnx.ModelProto()
    holder.metadata_props.add(key=SIGNATURE_KEY, value=value)
    return holder.SerializeToString()


def sign_model_bytes(data: bytes, key: bytes) -> bytes:
    """Sign a serialized assigner with HMAC-SHA256: returns ``data + signature_entry(signature_of(data, key))``.

    What is signed: the exact bytes of the unsigned file (behind a fixed context prefix). The signature is
    appended as one more ``metadata_props`` entry after them; protobuf merges a repeated field that appears again
    at the end, so the result is the same model with one more metadata entry, and the signed bytes stay exactly
    the file minus its last ``len(signature_entry(...))`` bytes. Verification
    (:func:`~dcss_plugin.export.runtime.read_assigner` with ``verify_key``) parses the file, takes its single
    ``signature`` entry, checks that the file ends with exactly that entry's bytes, and recomputes the HMAC over
    everything before them. No re-serialization is involved, so nothing depends on protobuf serializing the same
    way on both machines, and any changed, added or removed byte is refused. A sidecar ``.sig`` file would also
    leave the model bytes alone, but it gets lost when the model is copied; this keeps the export one file.
    Tools that re-save the model (``onnx.save``) move the entry and so break the signature, as any edit should.
    The integrity digest does not cover the signature entry, so an unsigned reader still accepts a signed file.

    Raises:
        ValueError: ``data`` already carries a signature.
    """
    import onnx

    proto = onnx.ModelProto.FromString(data)
    if any(p.key == SIGNATURE_KEY for p in proto.metadata_props):
        raise ValueError("This model is signed already; sign the unsigned export.")
    return data + signature_entry(signature_of(data, key))


def _normalization(norm: nn.Module, shape: Optional[Tuple[int, ...]]) -> Dict[str, Any]:
    """The ``normalization`` metadata entry of a :class:`Normalize` (``offset``/``scale`` buffers)."""
    offset = norm.offset.detach().cpu().float()
    scale = norm.scale.detach().cpu().float()
    if offset.dim() == 0 and scale.dim() == 0 and float(offset) == 0.0 and float(scale) == 1.0:
        kind = "identity"
    elif (shape is not None and len(shape) == 1) or (shape is None and offset.dim() == 1):
        kind = "vector"
    else:
        kind = "image"
    return {"kind": kind, "formula": "x_norm = (x - offset) / scale", "offset": offset.tolist(),
            "scale": scale.tolist(), "offset_shape": list(offset.shape), "scale_shape": list(scale.shape)}


def _metadata(src: ExportSource, shape: Optional[Tuple[int, ...]], full: bool, fp16: bool,
              exporter: str) -> Dict[str, str]:
    model = src.model
    d, k = int(model.latent_dim), int(model.n_clusters)
    if full:
        u_def = "computed inside this graph: u = encoder((x - offset) / scale)"
    else:
        u_def = ("u is the DCSS encoder output on normalised input: u = model.encode(x) = encoder((x - offset) / "
                 "scale), eval mode, as DCSS.transform(x) returns it; offset/scale are in 'normalization'")
    return {
        "format": ASSIGNER_FORMAT,
        "export_kind": "full" if full else "head",
        "input_name": "x" if full else "u",
        "input_shape": json.dumps(list(shape or ()) if full else [d]),
        "sample_shape": json.dumps(list(shape or ())),
        "n_clusters": str(k),
        "latent_dim": str(d),
        "outputs": ",".join(OUTPUT_NAMES),
        "normalization": json.dumps(_normalization(model.normalize, shape)),
        "u_definition": u_def,
        "fp16": "true" if fp16 else "false",
        "dcss_version": __version__,
        "preset": str(src.preset),
        "config": json.dumps(src.config, default=str),
        "exporter": exporter,
        "torch_version": torch.__version__,
    }


def _finalize(proto: Any, meta: Dict[str, str], full: bool, fp16: bool) -> bytes:
    """Attach metadata and digest, run the checker, make sure nothing is stored outside the file, serialize."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.metadata_props.add(key=DIGEST_KEY, value=metadata_digest(proto))
    proto.doc_string = (f"DCSS cluster assigner ({'full: x' if full else 'head: u'} -> q, label, confidence; "
                        f"{'fp16' if fp16 else 'fp32'}), dcss-plugin {__version__}")
    proto.producer_name = "dcss-plugin"
    proto.producer_version = __version__
    external = [t.name for t in proto.graph.initializer if uses_external_data(t)]
    if external:
        raise RuntimeError(f"The exported graph keeps {len(external)} tensor(s) in external data; expected a single "
                           "self-contained file.")
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    if len(data) >= 2 ** 31 - 1:  # protobuf's hard limit; DCSS models are far below
        raise RuntimeError(f"The model is {len(data)} bytes, over ONNX's 2 GiB single-file limit.")
    return data


# ---------------------------------------------------------------------------------------------------- checks
def _probe(ref: DCSSModel, shape: Optional[Tuple[int, ...]], full: bool, per_center: int = 32,
           seed: int = 0) -> Tuple[Tensor, str]:
    """Points around each cluster center when no real data is at hand: ``u`` for a head export, else ``x``
    decoded from them (uniform/normal samples in normalised space where the decoder does not give ``x`` back)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = ref.centers.centers.detach().cpu().float()
        spread = torch.pdist(c).median().item() / 4 if len(c) > 1 else 1.0
        spread = spread if np.isfinite(spread) and spread > 0 else 1.0  # centers never initialised: all equal
        noise = torch.randn(len(c) * per_center, c.shape[1], generator=g, dtype=torch.float32)
        u = c.repeat_interleave(per_center, 0) + spread / max(c.shape[1], 1) ** 0.5 * noise
        if not full:
            return u, "u sampled around the cluster centers"
        assert shape is not None
        xn: Optional[Tensor] = None
        if ref.decoder is not None:
            try:
                xn = ref.decoder(u)
            except Exception as exc:  # noqa: BLE001 - a decoder of another kind of target: fall back below
                log.info("decoder does not map the probe u back to x (%s)", exc)
        if xn is None or xn.numel() != len(u) * int(np.prod(shape)):  # no decoder, or one that reconstructs
            # something else (a timm backbone's features): random samples in the normalised space instead
            draw = torch.randn if len(shape) == 1 else torch.rand
            xn = draw((len(u), *shape), generator=g)
        x = xn.reshape(len(u), *shape) * ref.normalize.scale.float() + ref.normalize.offset.float()
    return x, "samples decoded from the cluster centers"


def _training_data(run_dir: Optional[str]) -> Tuple[Optional[Tensor], str]:
    """The training data named in ``run_dir/report.json`` (a file, or the digits set), if it can be read."""
    from dcss_plugin.data import load_array, load_named_dataset

    report = os.path.join(run_dir, "report.json") if run_dir and os.path.isdir(run_dir) else None
    if report and os.path.exists(report):
        try:
            with open(report, "r", encoding="utf-8") as fh:
                source = str(json.load(fh).get("source", ""))
            if source.startswith("file:") and os.path.exists(source[5:]):
                return torch.as_tensor(np.asarray(load_array(source[5:]), dtype=np.float32)), source
            if source == "dataset:digits":
                return load_named_dataset("digits")[0].float(), source
        except Exception as exc:  # noqa: BLE001 - fall back to the probe
            log.info("could not read the training data named in %s (%s)", report, exc)
    return None, ""


def _reference_outputs(ref: DCSSModel, full: bool, shape: Optional[Tuple[int, ...]], x: Optional[Tensor] = None,
                       u: Optional[Tensor] = None, chunk: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """The graph input (``x`` for a full export, ``u = encode(x)`` for a head export) and PyTorch's ``q``."""
    with torch.no_grad():
        if x is not None:
            if shape is not None and len(shape) == 3 and shape[0] == 1 and tuple(x.shape[1:]) == shape[1:]:
                x = x.unsqueeze(1)  # (N, H, W) for samples (1, H, W)
            if full and tuple(x.shape[1:]) != shape:
                raise ValueError(f"The check data has samples of shape {tuple(x.shape[1:])}; this export's input "
                                 f"x has samples of shape {shape}.")
            u = torch.cat([ref.encode(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else None
        assert u is not None
        q = torch.cat([ref.head(u[i:i + chunk]) for i in range(0, len(u), chunk)])
    graph_in = x if full else u
    assert graph_in is not None
    return np.ascontiguousarray(graph_in.numpy(), dtype=np.float32), q.float().numpy()


def _ort_outputs(data: bytes, inputs: np.ndarray, provider: str = "cpu",
                 chunk: int = 65536) -> Tuple[np.ndarray, np.ndarray]:
    """``q`` and ``label`` of the serialized graph on ``inputs``, run by onnxruntime on ``provider``."""
    import onnxruntime as ort

    from .runtime import create_session

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session, _, _ = create_session(data, provider, options=opts)
    name = session.get_inputs()[0].name
    outs = [session.run(["q", "label"], {name: inputs[i:i + chunk]}) for i in range(0, len(inputs), chunk)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def _cuda_runs() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def _compare(data: bytes, graph_in: np.ndarray, q_ref: np.ndarray, fp16: bool, source: str) -> None:
    """Run the exported bytes with onnxruntime and compare with PyTorch's (float32) ``q_ref``.

    float32: ``q`` within 1e-4 (CPU provider). fp16: the same label for every row, on the CPU provider and, where
    it runs, on CUDA (where float16 arithmetic really happens; onnxruntime's CPU provider computes most float16 ops
    in float32 after inserting casts, so there only the weight rounding shows). Else ``ValueError``.
    """
    ref = q_ref.argmax(1)
    if not fp16:
        q, _ = _ort_outputs(data, graph_in)
        err = float(np.abs(q - q_ref).max()) if len(q) else 0.0
        if err > 1e-4:
            raise RuntimeError(f"The exported graph disagrees with the PyTorch model (max |q diff| = {err:.2e} on "
                               f"{source}); please report this with your torch and onnx versions.")
        return
    for provider in ("cpu", "cuda") if _cuda_runs() else ("cpu",):
        try:
            q, label = _ort_outputs(data, graph_in, provider)
        except RuntimeError as exc:  # CUDA listed but not running after all: the CPU check stands
            log.info("fp16 check skipped on %s: %s", provider, exc)
            continue
        changed = np.flatnonzero(label != ref)
        if changed.size:
            raise ValueError(
                f"fp16 export refused: float16 changes the label of {changed.size} of {len(ref)} row(s) "
                f"(first rows: {changed[:5].tolist()}; onnxruntime {provider}, checked on {source}). Export in "
                "float32 (drop --fp16): it is exact, and these small models gain little from fp16.")
        log.info("fp16 export keeps all %d labels of %s on %s; max |q - q_fp32| = %.2e", len(ref), source, provider,
                 float(np.abs(q - q_ref).max()) if len(q) else 0.0)


def _verify(src: ExportSource, data: bytes, shape: Optional[Tuple[int, ...]], full: bool, fp16: bool,
            check_data: Any) -> None:
    """Compare the exported graph with a float32 CPU copy of the model on the best data at hand.

    Data: ``check_data``; for fp16 else the training data the run's ``report.json`` names; else points around the
    cluster centers (with a warning for fp16, where the check decides whether the file is written).
    Rows: up to 4096 (float32, ``q`` compared) or 200,000 (fp16, labels compared).
    """
    ref = _reference(src.model)
    limit = 200_000 if fp16 else 4096
    x, source = (as_tensor(check_data)[0], "check_data") if check_data is not None else (None, "")
    if x is None and fp16:
        x, source = _training_data(src.run_dir)
    if x is not None:
        graph_in, q_ref = _reference_outputs(ref, full, shape, x=x[:limit])
    else:
        probe, source = _probe(ref, shape, full)
        graph_in, q_ref = _reference_outputs(ref, full, shape, **{"x" if full else "u": probe})
    if len(graph_in) == 0:
        raise ValueError("check_data is empty; give at least one sample.")
    _compare(data, graph_in, q_ref, fp16, source)
    if fp16 and x is None:
        warnings.warn(f"fp16 labels were checked only on {source}; pass check_data (real samples) for a meaningful "
                      "check.", stacklevel=3)


# ---------------------------------------------------------------------------------------------------- public
def export_assigner(model: Union[DCSSModel, DCSS, str, os.PathLike], path: Union[str, os.PathLike], *,
                    full: bool = False, fp16: bool = False, input_shape: Optional[Sequence[int]] = None,
                    check_data: Any = None, exporter: str = "auto", verify: bool = True,
                    sign_key: Union[str, os.PathLike, bytes, None] = None) -> str:
    """Write a DCSS model as one self-contained ONNX file (atomically) and return its path.

    Args:
        model: a :class:`DCSSModel` (from any training loop), a fitted :class:`DCSS`, or a run directory written
            by ``dcss fit`` (or a checkpoint path).
        path: the ``.onnx`` file to write.
        full: normalisation + encoder + selected head with input ``x`` (N, *sample_shape); else the head alone,
            input ``u`` (N, d).
        fp16: float16 weights and compute (float32 I/O); refused unless every label of the check data stays.
        input_shape: the shape of one sample ``x`` (without the batch axis); default: the estimator's
            ``input_shape_``, ``model.spec["input_shape"]``, or the shape of ``check_data``. A full export
            needs one of them.
        check_data: samples ``x`` (N, *sample_shape) to verify the export on. Default: points around the cluster
            centers (decoded to ``x`` for a full export); for fp16 the run's training data first, when its
            ``report.json`` names it.
        exporter: ``"auto"`` (TorchScript exporter while torch ships it, else dynamo), ``"torchscript"`` or
            ``"dynamo"``.
        verify: run the exported graph with onnxruntime against PyTorch before writing (always on for fp16).
        sign_key: a secret key file (or the key as bytes, at least 16 bytes): sign the file with HMAC-SHA256 (see
            :func:`sign_model_bytes`), so that ``OnnxClusterAssigner(path, verify_key=...)`` with the same key
            refuses any edited or foreign model. Without it the file carries only the integrity digest.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: a full export without a known input shape, an fp16 export that changes a label, an unfitted
            estimator, ``path`` a directory, an empty or short key (:class:`SigningKeyError`).
        FileNotFoundError: ``sign_key`` names no file.

    Example:
        >>> model = DCSSModel(encoder, n_clusters=10, latent_dim=10, normalize=Normalize.fit(x))   # own loop ...
        >>> export_assigner(model, "assigner.onnx", full=True, input_shape=(1, 8, 8))
        >>> OnnxClusterAssigner("assigner.onnx")(x).label[:5]
    """
    key = read_signing_key(sign_key) if sign_key is not None else None  # before any work: a bad key fails at once
    src = resolve_source(model)
    out = os.fspath(path)
    if os.path.isdir(out):
        raise ValueError(f"{out!r} is a directory; give a file name such as {os.path.join(out, 'assigner.onnx')!r}.")
    shape = _input_shape(src, input_shape, check_data, full)
    graph = build_graph(src.model, full, fp16)
    example = torch.zeros((2, *shape) if full else (2, src.model.latent_dim))  # type: ignore[misc]
    _check_traceable(graph, example)  # batch 2: no size-1 specialising
    proto, used = _to_onnx(graph, example, "x" if full else "u", exporter)
    data = _finalize(proto, _metadata(src, shape, full, fp16, used), full, fp16)
    if key is not None:
        data = sign_model_bytes(data, key)
    if verify or fp16:
        _verify(src, data, shape, full, fp16, check_data)
    atomic_write_bytes(out, data)
    log.info("wrote %s (%s export, %s, %d bytes, %s exporter%s)", out, "full" if full else "head",
             "fp16" if fp16 else "fp32", len(data), used, ", signed" if key is not None else "")
    return out


def export_from_cli(args: Any) -> int:
    """``dcss export RUN_DIR [--full] [--fp16] [--sign-key KEY] --out FILE.onnx``: returns the exit status."""
    sign_key = getattr(args, "sign_key", None)
    if sign_key and os.path.abspath(os.fspath(args.out)) == os.path.abspath(os.fspath(sign_key)):
        raise ValueError(f"--out {args.out!r} is the --sign-key file; writing there would destroy the key.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out = export_assigner(args.run_dir, args.out, full=bool(args.full), fp16=bool(args.fp16), sign_key=sign_key)
    for w in caught:
        print(f"dcss export: warning: {w.message}", file=sys.stderr)
    size = os.path.getsize(out)
    model_kind = "full (x -> q)" if args.full else "head (u -> q)"
    signed = ", signed (HMAC-SHA256)" if sign_key else ""
    print(f"dcss export: {model_kind} assigner, {'fp16' if args.fp16 else 'fp32'}{signed}, {size / 1024:.0f} KiB; "
          f"wrote {out}")
    return 0
