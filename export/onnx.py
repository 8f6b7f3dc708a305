"""Export a fitted DCSS model to a single, self-contained ONNX cluster assigner.

Two graphs, both with a dynamic batch axis ``N`` and the same three outputs:

* ``head`` (default): input ``u`` (N, d) float32, the encoder output on normalised input; the graph is MNet only.
* ``full``: input ``x`` (N, *sample_shape) float32; the graph applies ``(x - offset) / scale``, the encoder and
  MNet, so a service needs nothing but the file.

Outputs: ``q`` (N, K) float32 (softmax, rows sum to 1), ``label`` (N,) int64 (``argmax q``, first index on
ties, as :meth:`DCSS.predict`) and ``confidence`` (N,) float32 (``max q``).

The file's ``metadata_props`` say everything a service needs (see :data:`METADATA_KEYS`): K, d, the input name
and shape, the normalisation (offset/scale as JSON), the package version, the preset and the full config, the
export kind, the fp16 flag, and a SHA-256 digest of graph + metadata that
:class:`~dcss_plugin.export.runtime.OnnxClusterAssigner` checks, so that a corrupted or edited file is refused.

fp16 (``fp16=True``): weights and compute in float16, inputs and outputs stay float32 (the normalisation runs
in float32, then the normalised input is cast). The export is refused (``ValueError``) unless the fp16 graph,
run by onnxruntime (CPU, and CUDA where it runs), gives the same label as the float32 model for every row of
the check data: ``check_data`` when given, else the training data named in the run directory's ``report.json``,
else samples decoded from the cluster centers (a weaker check; a warning says so). Refusing rather than warning
keeps the contract "the assigner's labels are the model's labels". What fp16 buys: a file half the size, and
float16 arithmetic on CUDA. On CPU it buys no speed: onnxruntime 1.31's CPU provider has no float16 kernels for
these ops and casts every weight back to float32 at load (seen in its optimised graph), so the CPU computes in
float32 with float16-rounded weights, as fast as the float32 graph within noise. Near-tie rows (two clusters with
almost equal ``q``) are where labels flip.

Exporter: ``exporter="auto"`` uses torch's TorchScript-based exporter (``dynamo=False``, opset 17) while torch
ships it: about 0.1 s per export against seconds for the torch.export-based one, and the same graph for these
modules; when it is gone (or with ``exporter="dynamo"``) the torch.export-based exporter is used. Both give a
symbolic batch axis ``N`` and are checked against PyTorch by the tests.

Example:
    >>> from dcss_plugin.export.onnx import export_assigner
    >>> export_assigner("runs/digits", "runs/digits/assigner.onnx", full=True)
    'runs/digits/assigner.onnx'
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import sys
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from dcss_plugin import __version__
from dcss_plugin.estimator import DCSS
from dcss_plugin.io import atomic_write_bytes

__all__ = [
    "ASSIGNER_FORMAT",
    "METADATA_KEYS",
    "OUTPUT_NAMES",
    "AssignerGraph",
    "build_graph",
    "export_assigner",
    "export_from_cli",
    "metadata_digest",
]

log = logging.getLogger("dcss_plugin")

ASSIGNER_FORMAT = "dcss-plugin/onnx-assigner-v1"
OUTPUT_NAMES = ("q", "label", "confidence")
TORCHSCRIPT_OPSET = 17
DIGEST_KEY = "digest"

#: The ``metadata_props`` every exported assigner carries (all values are strings; JSON where structured).
METADATA_KEYS = {
    "format": f"always {ASSIGNER_FORMAT!r}",
    "export_kind": "'head' (input u) or 'full' (input x)",
    "input_name": "'u' or 'x'",
    "input_shape": "JSON list: the graph input's shape without the batch axis ([d] or the sample shape)",
    "sample_shape": "JSON list: the shape of one training sample x (for a head export too)",
    "n_clusters": "K",
    "latent_dim": "d",
    "outputs": "'q,label,confidence'",
    "normalization": "JSON {kind, formula, offset, scale, offset_shape, scale_shape}: x_norm = (x - offset) / scale",
    "u_definition": "how the graph input u is obtained (head export) or that the graph computes it (full)",
    "fp16": "'true' or 'false'",
    "dcss_version": "dcss_plugin.__version__ at export",
    "preset": "the DCSSConfig preset",
    "config": "JSON of DCSSConfig.to_dict() (all hyperparameters)",
    "exporter": "'torchscript' or 'dynamo' (which torch.onnx exporter wrote the graph)",
    "torch_version": "torch.__version__ at export",
    DIGEST_KEY: "sha256 over the serialized graph and every other metadata entry",
}


# ---------------------------------------------------------------------------------------------------- the graph
class AssignerGraph(nn.Module):
    """The exported computation: ``[normalise -> encode ->] head -> (q, label, confidence)``.

    Args:
        head: MNet (``u (N, d) -> q (N, K)``, softmax included).
        autoencoder: a module with ``encode``; ``None`` for a head export.
        offset, scale: the input normalisation (broadcastable to the sample shape); full export only.
        fp16: run the encoder and head in float16; the normalisation and the I/O stay float32.

    Shapes:
        input: ``u`` (N, d) for a head export, ``x`` (N, *sample_shape) for a full export, float32.
        output: ``q`` (N, K) float32, ``label`` (N,) int64, ``confidence`` (N,) float32.

    Example:
        >>> graph = AssignerGraph(model.head).eval()
        >>> q, label, confidence = graph(torch.randn(4, model.config.latent_dim))
    """

    def __init__(self, head: nn.Module, autoencoder: Optional[nn.Module] = None, offset: Optional[Tensor] = None,
                 scale: Optional[Tensor] = None, fp16: bool = False) -> None:
        super().__init__()
        dtype = torch.float16 if fp16 else torch.float32
        self.fp16 = bool(fp16)
        self.head = copy.deepcopy(head).to("cpu", dtype).eval()
        self.autoencoder = copy.deepcopy(autoencoder).to("cpu", dtype).eval() if autoencoder is not None else None
        if self.autoencoder is not None:
            if offset is None or scale is None:
                raise ValueError("A full export needs the input normalisation (offset and scale).")
            self.register_buffer("offset", offset.detach().to("cpu", torch.float32).clone())
            self.register_buffer("scale", scale.detach().to("cpu", torch.float32).clone())

    def forward(self, inputs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h = inputs
        if self.autoencoder is not None:
            h = (h - self.offset) / self.scale  # float32, then cast: the normalisation never runs in fp16
        if self.fp16:
            h = h.half()
        if self.autoencoder is not None:
            h = self.autoencoder.encode(h)
        q = self.head(h).float()
        confidence, label = q.max(dim=1)
        return q, label, confidence


def build_graph(model: DCSS, full: bool, fp16: bool) -> AssignerGraph:
    """The :class:`AssignerGraph` for a fitted ``model`` (copies on CPU in eval mode; ``model`` is not touched).

    Example:
        >>> q, label, confidence = build_graph(model, full=True, fp16=False)(torch.rand(2, 1, 8, 8) * 16)
    """
    if not full:
        return AssignerGraph(model.head, fp16=fp16).eval()  # type: ignore[arg-type]
    norm = model.normalizer
    assert norm is not None
    return AssignerGraph(model.head, model.autoencoder, norm.offset, norm.scale, fp16=fp16).eval()  # type: ignore


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
    """SHA-256 (hex) over the serialized graph and every metadata entry except the digest itself.

    Example:
        >>> metadata_digest(onnx.load("assigner.onnx")) == dict(...)["digest"]
    """
    h = hashlib.sha256()
    h.update(model_proto.graph.SerializeToString(deterministic=True))
    meta = sorted((p.key, p.value) for p in model_proto.metadata_props if p.key != DIGEST_KEY)
    h.update(b"\0")
    h.update(json.dumps(meta, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()


def _metadata(model: DCSS, full: bool, fp16: bool, exporter: str) -> Dict[str, str]:
    cfg, norm, shape = model.config, model.normalizer, tuple(int(s) for s in model.input_shape or ())
    assert norm is not None
    d, k = int(cfg.latent_dim), int(cfg.n_clusters)
    normalization = {
        "kind": norm.kind,
        "formula": "x_norm = (x - offset) / scale",
        "offset": norm.offset.detach().cpu().float().tolist(),
        "scale": norm.scale.detach().cpu().float().tolist(),
        "offset_shape": list(norm.offset.shape),
        "scale_shape": list(norm.scale.shape),
    }
    if full:
        u_def = "computed inside this graph: u = encoder((x - offset) / scale)"
    else:
        u_def = ("u is the DCSS encoder output on normalised input: u = model.autoencoder.encode((x - offset) / "
                 "scale), eval mode, as DCSS.transform(x) returns it; offset/scale are in 'normalization'")
    return {
        "format": ASSIGNER_FORMAT,
        "export_kind": "full" if full else "head",
        "input_name": "x" if full else "u",
        "input_shape": json.dumps(list(shape) if full else [d]),
        "sample_shape": json.dumps(list(shape)),
        "n_clusters": str(k),
        "latent_dim": str(d),
        "outputs": ",".join(OUTPUT_NAMES),
        "normalization": json.dumps(normalization),
        "u_definition": u_def,
        "fp16": "true" if fp16 else "false",
        "dcss_version": __version__,
        "preset": str(cfg.preset),
        "config": json.dumps(cfg.to_dict()),
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
def _decoded_probe(model: DCSS, per_center: int = 32, seed: int = 0) -> np.ndarray:
    """Samples ``x`` decoded from points around each cluster center (used when no real data is at hand)."""
    assert model.centers is not None and model.autoencoder is not None and model.normalizer is not None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = model.centers.centers.detach().cpu().float()
        spread = torch.pdist(c).median().item() / 4 if len(c) > 1 else 1.0
        noise = torch.randn(len(c) * per_center, c.shape[1], generator=g, dtype=torch.float32)
        u = c.repeat_interleave(per_center, 0) + spread / max(c.shape[1], 1) ** 0.5 * noise
        ae = copy.deepcopy(model.autoencoder).to("cpu", torch.float32).eval()
        x_norm = ae.decode(u)
        if x_norm.numel() != len(u) * int(np.prod(model.input_shape)):  # a decoder that does not give x back (a
            # timm backbone's features): uniform samples over the normalised training range instead
            x_norm = torch.rand((len(u), *model.input_shape), generator=g)  # type: ignore[misc]
        x_norm = x_norm.reshape(len(u), *model.input_shape)  # type: ignore[misc]
        norm = model.normalizer
        x = x_norm * norm.scale.float() + norm.offset.float()
    return x.numpy().astype(np.float32)


def _check_inputs(model: DCSS, run_dir: Optional[str], check_data: Any) -> Tuple[np.ndarray, str]:
    """Data ``x`` to verify the export on, and where it came from."""
    from dcss_plugin.data import load_array, load_named_dataset

    if check_data is not None:
        x = check_data.detach().cpu().numpy() if isinstance(check_data, Tensor) else np.asarray(check_data)
        return x.astype(np.float32, copy=False), "check_data"
    report = os.path.join(run_dir, "report.json") if run_dir and os.path.isdir(run_dir) else None
    if report and os.path.exists(report):
        try:
            with open(report, "r", encoding="utf-8") as fh:
                source = str(json.load(fh).get("source", ""))
            if source.startswith("file:") and os.path.exists(source[5:]):
                return np.asarray(load_array(source[5:]), dtype=np.float32), source
            if source == "dataset:digits":
                return load_named_dataset("digits")[0].numpy(), source
        except Exception as exc:  # noqa: BLE001 - fall back to the decoded probe
            log.info("could not read the training data named in %s (%s)", report, exc)
    return _decoded_probe(model), "samples decoded from the cluster centers"


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


def _verify(model: DCSS, data: bytes, full: bool, fp16: bool, x: np.ndarray, source: str) -> None:
    """Run the exported bytes with onnxruntime and compare with the PyTorch model (float32).

    float32: ``q`` within 1e-4 of ``predict_proba`` on up to 4096 rows (CPU provider).
    fp16: the same label for every row (up to 200,000), on the CPU provider and, where it runs, on CUDA (where
    float16 arithmetic really happens; onnxruntime's CPU provider computes most float16 ops in float32 after
    inserting casts, so there only the weight rounding shows). Else ``ValueError``.
    """
    x = x[:200_000 if fp16 else 4096]
    q_ref = model.predict_proba(x)
    ref = q_ref.argmax(1)
    graph_in = x if full else model.transform(x)
    if full and graph_in.ndim == len(model.input_shape or ()):  # (N, H, W) for (1, H, W)
        graph_in = graph_in[:, None]
    graph_in = np.ascontiguousarray(graph_in, dtype=np.float32)
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


# ---------------------------------------------------------------------------------------------------- public
def _resolve_model(model_or_run_dir: Union[DCSS, str, os.PathLike]) -> Tuple[DCSS, Optional[str]]:
    if isinstance(model_or_run_dir, DCSS):
        model = model_or_run_dir
        if model.head is None or model.autoencoder is None or model.normalizer is None or model.input_shape is None:
            raise ValueError("This DCSS model is not fitted yet; fit it (or DCSS.load a checkpoint) before export.")
        return model, None
    path = os.fspath(model_or_run_dir)
    from dcss_plugin.estimator import CHECKPOINT_FORMAT
    from dcss_plugin.io import load_checkpoint

    if (load_checkpoint(path, CHECKPOINT_FORMAT).get("autoencoder_spec") or {}).get("timm"):
        from dcss_plugin.adapters.timm import load_timm_dcss  # a timm backbone: rebuilt from the checkpoint's spec

        model = load_timm_dcss(path, device="cpu")
    else:
        model = DCSS.load(path, device="cpu")
    return model, (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))


def export_assigner(model_or_run_dir: Union[DCSS, str, os.PathLike], path: Union[str, os.PathLike],
                    full: bool = False, fp16: bool = False, *, check_data: Any = None, exporter: str = "auto",
                    verify: bool = True) -> str:
    """Write a fitted DCSS model as one self-contained ONNX file (atomically) and return its path.

    Args:
        model_or_run_dir: a fitted :class:`DCSS`, a run directory written by ``dcss fit`` or a checkpoint path.
        path: the ``.onnx`` file to write.
        full: encoder + head with input ``x`` (N, *sample_shape); else the head alone, input ``u`` (N, d).
        fp16: float16 weights and compute (float32 I/O); refused unless every label of the check data stays.
        check_data: samples ``x`` (N, *sample_shape) to verify the export on (fp16: label check). Default: the
            run's training data when ``report.json`` names it, else samples decoded from the cluster centers.
        exporter: ``"auto"`` (TorchScript exporter while torch ships it, else dynamo), ``"torchscript"`` or
            ``"dynamo"``.
        verify: run the exported graph with onnxruntime against PyTorch before writing (always on for fp16).

    Returns:
        ``path`` as a string.

    Example:
        >>> model = DCSS(n_clusters=10).fit(load_digits().images)
        >>> export_assigner(model, "assigner.onnx", full=True)
        >>> OnnxClusterAssigner("assigner.onnx")(load_digits().images).label[:5]
    """
    model, run_dir = _resolve_model(model_or_run_dir)
    out = os.fspath(path)
    if os.path.isdir(out):
        raise ValueError(f"{out!r} is a directory; give a file name such as {os.path.join(out, 'assigner.onnx')!r}.")
    shape = tuple(int(s) for s in model.input_shape)  # type: ignore[union-attr]
    d = int(model.config.latent_dim)
    graph = build_graph(model, full, fp16)
    example = torch.zeros((2, *shape) if full else (2, d), dtype=torch.float32)  # batch 2: no size-1 specialising
    input_name = "x" if full else "u"
    proto, used = _to_onnx(graph, example, input_name, exporter)
    data = _finalize(proto, _metadata(model, full, fp16, used), full, fp16)
    if verify or fp16:  # fp32 needs no real data to compare q; fp16 labels are checked on the best data at hand
        x, source = _check_inputs(model, run_dir if fp16 else None, check_data)
        _verify(model, data, full, fp16, x, source)
        if fp16 and source.startswith("samples decoded"):
            warnings.warn("fp16 labels were checked only on samples decoded from the cluster centers; pass "
                          "check_data (real samples) for a meaningful check.", stacklevel=2)
    atomic_write_bytes(out, data)
    log.info("wrote %s (%s export, %s, %d bytes, %s exporter)", out, "full" if full else "head",
             "fp16" if fp16 else "fp32", len(data), used)
    return out


def export_from_cli(args: Any) -> int:
    """``dcss export RUN_DIR [--full] [--fp16] --out FILE.onnx``: returns the exit status."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out = export_assigner(args.run_dir, args.out, full=bool(args.full), fp16=bool(args.fp16))
    for w in caught:
        print(f"dcss export: warning: {w.message}", file=sys.stderr)
    size = os.path.getsize(out)
    model_kind = "full (x -> q)" if args.full else "head (u -> q)"
    print(f"dcss export: {model_kind} assigner, {'fp16' if args.fp16 else 'fp32'}, {size / 1024:.0f} KiB; "
          f"wrote {out}")
    return 0
