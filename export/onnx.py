"""Export a DCSS model to a single, self-contained ONNX cluster assigner.

What can be exported: a :class:`~dcss_plugin.DCSSModel` (however it was trained: the estimator, an adapter, or a
user's own loop), a fitted :class:`~dcss_plugin.DCSS` (its ``model_``), or a run directory / checkpoint written by
``dcss fit`` (read with :meth:`DCSS.load`). Only the model's public parts are read: ``normalize``, ``encoder``,
``head`` (the selected one), ``decoder`` and ``centers`` (for the default check samples), ``spec``.

Two graphs, both with a dynamic batch axis ``N`` and the same four outputs:

* ``head`` (default): input ``u`` (N, d) float32, ``u = model.encode(x)`` (the encoder on normalised input); the
  graph is MNet only.
* ``full``: input ``x`` (N, *sample_shape) float32; the graph applies ``model.normalize`` (``(x - offset) /
  scale``), the encoder and the selected head, so a service needs nothing but the file. The sample shape comes
  from ``input_shape=``, else the estimator's ``input_shape_``, else ``model.spec["input_shape"]``, else the shape
  of ``check_data``; with none of them a full export is refused.

Outputs: ``q`` (N, K) float32 (softmax, rows sum to 1), ``label`` (N,) int64 (``argmax q``, first index on
ties, as :meth:`DCSSModel.predict`), ``confidence`` (N,) float32 (``max q``) and ``in_domain`` (N,) bool.

Safe answers inside the graph (plain onnxruntime gives them, no wrapper needed): a row with any NaN or inf value
(or one so large that the network's ``q`` overflows) gets ``q`` all zeros, ``label`` -1, ``confidence`` 0 and
``in_domain`` False; every other row gets exactly the model's answer. ``in_domain`` says whether a row looks like
the training data: ``min_k ||u - mu_k||^2 <= threshold`` in u-space (``u`` the graph input of a head export, the
encoder output of a full one; ``mu`` the model's cluster centers). The threshold is fixed at export time:
:data:`DOMAIN_MARGIN` (1.5) times the :data:`DOMAIN_QUANTILE` (99.5th) percentile of that distance over the
training rows (the data the run directory's ``report.json`` names, else ``check_data``); with neither it is inf
(``in_domain`` then only marks the rows the graph answers). The metadata records the value
(``in_domain_threshold``) and where it came from (``in_domain_threshold_source``).

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
1e-4 and the same ``in_domain``). fp16 (``fp16=True``): weights and compute in float16, inputs and outputs stay
float32 (the normalisation runs in float32, then the normalised input is cast). The export is refused
(``ValueError``) unless the fp16 graph, run by onnxruntime (CPU, and CUDA where it runs), gives the same label as
the float32 model for every row of the check data: ``check_data`` when given, else the training data named in the
run directory's ``report.json``, else samples around the cluster centers (decoded to ``x`` for a full export; a
weaker check, a warning says so). Refusing rather than warning keeps the contract "the assigner's labels are the
model's labels". What fp16 buys: a file half the size, and float16 arithmetic on CUDA. On CPU it buys no speed:
onnxruntime's CPU provider has no float16 kernels for these ops and casts every weight back to float32 at load, so
the CPU computes in float32 with float16-rounded weights. Near-tie rows (two clusters with almost equal ``q``) are
where labels flip.

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

from .format import (  # noqa: F401 - re-exported: the file format's names have always been importable from here
    ASSIGNER_FORMAT,
    DIGEST_KEY,
    IN_DOMAIN_KEYS,
    LEGACY_OUTPUT_NAMES,
    METADATA_KEYS,
    MIN_KEY_BYTES,
    NO_PRESET,
    OUTPUT_NAMES,
    SIGNATURE_KEY,
    SIGNATURE_SCHEME,
    SigningKeyError,
    metadata_digest,
    read_signing_key,
    sign_model_bytes,
    signature_entry,
    signature_of,
)

__all__ = [
    "ASSIGNER_FORMAT",
    "METADATA_KEYS",
    "OUTPUT_NAMES",
    "AssignerGraph",
    "DOMAIN_MARGIN",
    "DOMAIN_QUANTILE",
    "ExportSource",
    "build_graph",
    "nearest_center_distance",
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

TORCHSCRIPT_OPSET = 17
DOMAIN_QUANTILE = 0.995  # in_domain: this quantile of the training rows' squared distance to their nearest center ...
DOMAIN_MARGIN = 1.5  # ... times this margin is the threshold (so >= 99.5 % of the training rows are in_domain)
DOMAIN_ROWS = 100_000  # at most this many training rows (a fixed random subset) set the threshold


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
def nearest_center_distance(u: Tensor, centers: Tensor) -> Tensor:
    """Squared Euclidean distance from each row of ``u`` to its nearest center, ``min_k ||u_i - mu_k||^2``.

    Computed as ``||u||^2 - 2 u mu^T + ||mu||^2`` (clamped at 0), which needs (N, K) memory rather than the
    (N, K, d) of the direct difference, and exports to plain ONNX ops (MatMul, ReduceSum, ReduceMin). The export
    computes the in-domain threshold with this same function, so the graph and the threshold agree.

    Args:
        u: (N, d) float32 embeddings.
        centers: (K, d) float32 cluster centers.

    Returns:
        (N,) float32; NaN where a row of ``u`` is not finite.

    Example:
        >>> nearest_center_distance(torch.tensor([[3.0, 4.0]]), torch.zeros(2, 2))
        tensor([25.])
    """
    d2 = (u * u).sum(dim=1, keepdim=True) - 2.0 * (u @ centers.t()) + (centers * centers).sum(dim=1)
    return d2.clamp_min(0.0).amin(dim=1)


class AssignerGraph(nn.Module):
    """The exported computation: ``[normalize -> encoder ->] head -> (q, label, confidence, in_domain)``.

    Args:
        head: MNet (``u (N, d) -> q (N, K)``, softmax included).
        encoder: the encoder (normalised ``x`` -> ``u``); ``None`` for a head export.
        normalize: the input normalisation (a :class:`Normalize`; None: identity); full export only.
        fp16: run the encoder and head in float16; the normalisation, the distances and the I/O stay float32.
        centers: (K, d) cluster centers in u-space for ``in_domain``; None: ``in_domain`` only marks answered rows.
        threshold: the squared distance to the nearest center up to which a row is ``in_domain`` (inf: any).

    All modules are copied to the CPU in eval mode; the originals are not touched.

    Safe answers, computed inside the graph (so plain onnxruntime gives them too): a row with any NaN or inf
    value is replaced by zeros before it reaches the network and answered with ``q`` all zeros, ``label`` -1,
    ``confidence`` 0 and ``in_domain`` False; so is a finite row whose ``q`` is not finite (an input so large that
    the encoder overflows). Every other row gets exactly the model's ``q``, ``argmax q`` and ``max q``.

    Shapes:
        input: ``u`` (N, d) for a head export, ``x`` (N, *sample_shape) for a full export, float32.
        output: ``q`` (N, K) float32, ``label`` (N,) int64, ``confidence`` (N,) float32, ``in_domain`` (N,) bool
        (``label >= 0`` and ``nearest_center_distance(u, centers) <= threshold``).

    Example:
        >>> graph = AssignerGraph(model.head, centers=model.centers.centers, threshold=4.0).eval()
        >>> q, label, confidence, in_domain = graph(torch.randn(4, model.latent_dim))
    """

    def __init__(self, head: nn.Module, encoder: Optional[nn.Module] = None, normalize: Optional[nn.Module] = None,
                 fp16: bool = False, centers: Optional[Tensor] = None, threshold: float = float("inf")) -> None:
        super().__init__()
        dtype = torch.float16 if fp16 else torch.float32
        self.fp16 = bool(fp16)
        self.head = copy.deepcopy(head).to("cpu", dtype).eval()
        self.encoder = copy.deepcopy(encoder).to("cpu", dtype).eval() if encoder is not None else None
        self.normalize = (copy.deepcopy(normalize if normalize is not None else Normalize()).to("cpu", torch.float32)
                          .eval() if encoder is not None else None)
        self.register_buffer("centers", centers.detach().to("cpu", torch.float32).clone()
                             if centers is not None else None)
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))

    def forward(self, inputs: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        finite = torch.isfinite(inputs.flatten(1)).all(dim=1)  # (N,)
        row = finite.reshape((-1,) + (1,) * (inputs.dim() - 1))
        h = torch.where(row, inputs, torch.zeros_like(inputs))  # NaN/inf never reach the network
        if self.normalize is not None:
            h = self.normalize(h)  # float32, then cast: the normalisation never runs in fp16
        if self.fp16:
            h = h.half()
        if self.encoder is not None:
            h = self.encoder(h)
        q = self.head(h).float()
        answered = finite & torch.isfinite(q).all(dim=1)
        q = torch.where(answered.unsqueeze(1), q, torch.zeros_like(q))
        confidence, label = q.max(dim=1)
        label = torch.where(answered, label, torch.full_like(label, -1))
        in_domain = answered
        if self.centers is not None:
            in_domain = in_domain & (nearest_center_distance(h.float(), self.centers) <= self.threshold)
        return q, label, confidence, in_domain


def build_graph(model: DCSSModel, full: bool, fp16: bool, threshold: float = float("inf")) -> AssignerGraph:
    """The :class:`AssignerGraph` of ``model``'s selected head (and, ``full``, its normalisation and encoder), with
    its cluster centers and the in-domain ``threshold``.

    Example:
        >>> q, label, confidence, in_domain = build_graph(model, True, False, 4.0)(torch.rand(2, 1, 8, 8) * 16)
    """
    centers = model.centers.centers
    if not full:
        return AssignerGraph(model.head, fp16=fp16, centers=centers, threshold=threshold).eval()
    return AssignerGraph(model.head, model.encoder, model.normalize, fp16=fp16, centers=centers,
                         threshold=threshold).eval()


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


def _metadata(src: ExportSource, shape: Optional[Tuple[int, ...]], full: bool, fp16: bool, exporter: str,
              domain: "DomainThreshold") -> Dict[str, str]:
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
        "in_domain_threshold": domain.text,
        "in_domain_threshold_source": domain.source,
    }


def _finalize(proto: Any, meta: Dict[str, str], full: bool, fp16: bool) -> bytes:
    """Attach metadata and digest, run the checker, make sure nothing is stored outside the file, serialize."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.metadata_props.add(key=DIGEST_KEY, value=metadata_digest(proto))
    proto.doc_string = (f"DCSS cluster assigner ({'full: x' if full else 'head: u'} -> q, label, confidence, "
                        f"in_domain; {'fp16' if fp16 else 'fp32'}), dcss-plugin {__version__}")
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


# ---------------------------------------------------------------------------------------------------- data at hand
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


def _encode(ref: DCSSModel, full: bool, shape: Optional[Tuple[int, ...]], x: Tensor,
            chunk: int = 4096) -> Tuple[Tensor, Tensor]:
    """``x`` brought to the export's sample shape ((N, H, W) gains its channel axis) and ``u = ref.encode(x)``.

    Returns ``(x, u)``: (N, *sample_shape) and (N, d) float32. Raises ``ValueError`` when a full export's
    samples have another shape.
    """
    if shape is not None and len(shape) == 3 and shape[0] == 1 and tuple(x.shape[1:]) == shape[1:]:
        x = x.unsqueeze(1)  # (N, H, W) for samples (1, H, W)
    if full and tuple(x.shape[1:]) != shape:
        raise ValueError(f"The check data has samples of shape {tuple(x.shape[1:])}; this export's input x has "
                         f"samples of shape {shape}.")
    with torch.no_grad():
        u = torch.cat([ref.encode(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    return x, u.float()


# ---------------------------------------------------------------------------------------------------- in-domain
@dataclass
class DomainThreshold:
    """The in-domain threshold (a float32 value; inf when no data was at hand) and where it came from."""

    value: float
    source: str

    @property
    def text(self) -> str:
        """The metadata form: 9 significant digits (a float32 reads back exactly), ``'inf'`` for infinity."""
        return format(self.value, ".9g")


NO_DOMAIN_DATA = ("none: no training data at hand (export from a run directory whose report.json names its data, "
                  "or pass check_data=training samples), so the threshold is inf and in_domain only marks the rows "
                  "the graph answers (finite input, finite q)")


def _domain_threshold(ref: DCSSModel, full: bool, shape: Optional[Tuple[int, ...]], x: Optional[Tensor],
                      name: str) -> DomainThreshold:
    """The in-domain threshold from training samples ``x`` (N, ...): :data:`DOMAIN_MARGIN` times the
    :data:`DOMAIN_QUANTILE` quantile of ``nearest_center_distance(encode(x), centers)`` over up to
    :data:`DOMAIN_ROWS` rows (a fixed random subset beyond that). Without ``x`` (or with no finite embedding):
    inf, with the reason as its source.

    Example:
        >>> _domain_threshold(ref, True, (1, 8, 8), digits, "dataset:digits").text
        '41.7210045'
    """
    if x is None or len(x) == 0:
        return DomainThreshold(float("inf"), NO_DOMAIN_DATA)
    if len(x) > DOMAIN_ROWS:
        keep = np.sort(np.random.default_rng(0).choice(len(x), DOMAIN_ROWS, replace=False))
        x = x[torch.from_numpy(keep)]
    _, u = _encode(ref, full, shape, x)
    with torch.no_grad():
        dist = nearest_center_distance(u, ref.centers.centers.detach().float()).numpy().astype(np.float64)
    dist = dist[np.isfinite(dist)]
    if dist.size == 0:
        return DomainThreshold(float("inf"), f"none: {name} has no row with a finite embedding u; the threshold is "
                                             "inf and in_domain only marks the rows the graph answers")
    value = float(np.float32(DOMAIN_MARGIN * np.quantile(dist, DOMAIN_QUANTILE)))
    return DomainThreshold(value, f"{name} ({dist.size} rows): {DOMAIN_MARGIN:g} x the {100 * DOMAIN_QUANTILE:g}th "
                                  "percentile of the rows' squared u-space distance to their nearest center")


def _domain_data(training: Tuple[Optional[Tensor], str],
                 checks: Tuple[Optional[Tensor], str]) -> Tuple[Optional[Tensor], str]:
    """The samples that set the threshold: the run's training data, else ``check_data``, else none."""
    return training if training[0] is not None else checks


# ---------------------------------------------------------------------------------------------------- checks
def _reference_outputs(ref: DCSSModel, full: bool, shape: Optional[Tuple[int, ...]], x: Optional[Tensor] = None,
                       u: Optional[Tensor] = None, chunk: int = 4096) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph input (``x`` for a full export, ``u = encode(x)`` for a head export), PyTorch's ``q`` (N, K) and
    the nearest-center distance of ``u`` (N,)."""
    if x is not None:
        x, u = _encode(ref, full, shape, x, chunk)
    assert u is not None
    with torch.no_grad():
        q = torch.cat([ref.head(u[i:i + chunk]) for i in range(0, len(u), chunk)])
        dist = nearest_center_distance(u, ref.centers.centers.detach().float())
    graph_in = x if full else u
    assert graph_in is not None
    return np.ascontiguousarray(graph_in.numpy(), dtype=np.float32), q.float().numpy(), dist.numpy()


def _ort_outputs(data: bytes, inputs: np.ndarray, provider: str = "cpu",
                 chunk: int = 65536) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``q``, ``label`` and ``in_domain`` of the serialized graph on ``inputs``, run by onnxruntime on ``provider``."""
    import onnxruntime as ort

    from .runtime import create_session

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session, _, _ = create_session(data, provider, options=opts)
    name = session.get_inputs()[0].name
    outs = [session.run(["q", "label", "in_domain"], {name: inputs[i:i + chunk]})
            for i in range(0, len(inputs), chunk)]
    return tuple(np.concatenate([o[j] for o in outs]) for j in range(3))  # type: ignore[return-value]


def _cuda_runs() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def _in_domain_changes(in_domain: np.ndarray, dist_ref: np.ndarray, threshold: float) -> np.ndarray:
    """Rows whose ``in_domain`` differs from PyTorch's ``dist_ref <= threshold``, but for rows within rounding
    (relative 1e-4) of the threshold, which may fall either way."""
    want = dist_ref <= threshold
    edge = np.abs(dist_ref - threshold) <= 1e-4 * (abs(threshold) + 1.0) if np.isfinite(threshold) else False
    return np.flatnonzero((in_domain != want) & ~edge)


def _compare(data: bytes, graph_in: np.ndarray, q_ref: np.ndarray, dist_ref: np.ndarray, threshold: float,
             fp16: bool, source: str) -> None:
    """Run the exported bytes with onnxruntime and compare with PyTorch's (float32) ``q_ref`` and ``dist_ref``.

    float32: ``q`` within 1e-4 and the same ``in_domain`` (but for rows within rounding of the threshold) on the
    CPU provider, else ``RuntimeError``. fp16: the same label for every row, on the CPU provider and, where it
    runs, on CUDA (where float16 arithmetic really happens; onnxruntime's CPU provider computes most float16 ops
    in float32 after inserting casts, so there only the weight rounding shows), else ``ValueError``; ``in_domain``
    changes are logged, not refused (the labels are the contract, in_domain a heuristic).
    """
    ref = q_ref.argmax(1)
    if not fp16:
        q, _, in_domain = _ort_outputs(data, graph_in)
        err = float(np.abs(q - q_ref).max()) if len(q) else 0.0
        changed = _in_domain_changes(in_domain, dist_ref, threshold)
        if err > 1e-4 or changed.size:
            raise RuntimeError(f"The exported graph disagrees with the PyTorch model (max |q diff| = {err:.2e}, "
                               f"in_domain differs on {changed.size} row(s), on {source}); please report this with "
                               "your torch and onnx versions.")
        return
    for provider in ("cpu", "cuda") if _cuda_runs() else ("cpu",):
        try:
            q, label, in_domain = _ort_outputs(data, graph_in, provider)
        except RuntimeError as exc:  # CUDA listed but not running after all: the CPU check stands
            log.info("fp16 check skipped on %s: %s", provider, exc)
            continue
        changed = np.flatnonzero(label != ref)
        if changed.size:
            raise ValueError(
                f"fp16 export refused: float16 changes the label of {changed.size} of {len(ref)} row(s) "
                f"(first rows: {changed[:5].tolist()}; onnxruntime {provider}, checked on {source}). Export in "
                "float32 (drop --fp16): it is exact, and these small models gain little from fp16.")
        log.info("fp16 export keeps all %d labels of %s on %s; max |q - q_fp32| = %.2e; in_domain differs on %d "
                 "row(s)", len(ref), source, provider, float(np.abs(q - q_ref).max()) if len(q) else 0.0,
                 _in_domain_changes(in_domain, dist_ref, threshold).size)


def _verify(ref: DCSSModel, data: bytes, shape: Optional[Tuple[int, ...]], full: bool, fp16: bool,
            checks: Tuple[Optional[Tensor], str], training: Tuple[Optional[Tensor], str], threshold: float) -> None:
    """Compare the exported graph with ``ref`` (a float32 CPU copy of the model) on the best data at hand.

    Data: ``check_data`` (``checks``); for fp16 else the training data the run's ``report.json`` names
    (``training``); else points around the cluster centers (with a warning for fp16, where the check decides
    whether the file is written). Rows: up to 4096 (float32, ``q`` and ``in_domain`` compared) or 200,000 (fp16,
    labels compared).
    """
    limit = 200_000 if fp16 else 4096
    x, source = checks
    if x is None and fp16:
        x, source = training
    if x is not None:
        if len(x) == 0:
            raise ValueError("check_data is empty; give at least one sample.")
        graph_in, q_ref, dist_ref = _reference_outputs(ref, full, shape, x=x[:limit])
    else:
        probe, source = _probe(ref, shape, full)
        graph_in, q_ref, dist_ref = _reference_outputs(ref, full, shape, **{"x" if full else "u": probe})
    _compare(data, graph_in, q_ref, dist_ref, threshold, fp16, source)
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
            ``report.json`` names it. Without such training data, ``check_data`` also sets the in-domain threshold
            (pass the training samples to get a meaningful ``in_domain``).
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
    ref = _reference(src.model)
    checks = (as_tensor(check_data)[0], "check_data") if check_data is not None else (None, "")
    training = _training_data(src.run_dir)
    domain = _domain_threshold(ref, full, shape, *_domain_data(training, checks))
    graph = build_graph(src.model, full, fp16, domain.value)
    example = torch.zeros((2, *shape) if full else (2, src.model.latent_dim))  # type: ignore[misc]
    _check_traceable(graph, example)  # batch 2: no size-1 specialising
    proto, used = _to_onnx(graph, example, "x" if full else "u", exporter)
    data = _finalize(proto, _metadata(src, shape, full, fp16, used, domain), full, fp16)
    if key is not None:
        data = sign_model_bytes(data, key)
    if verify or fp16:
        _verify(ref, data, shape, full, fp16, checks, training, domain.value)
    atomic_write_bytes(out, data)
    log.info("wrote %s (%s export, %s, %d bytes, %s exporter%s)", out, "full" if full else "head",
             "fp16" if fp16 else "fp32", len(data), used, ", signed" if key is not None else "")
    return out


def export_from_cli(args: Any) -> int:
    """``dcss export RUN_DIR [--full] [--fp16] [--sign-key KEY] [--out FILE.onnx] [--triton REPO [--name NAME]
    [--max-batch N] [--kind gpu|cpu]]``: returns the exit status.

    With ``--triton`` the exported bytes also go into a Triton model repository
    (:func:`~dcss_plugin.export.triton.write_triton_repository`); ``--out`` may then be left out.
    """
    import tempfile

    from .triton import DEFAULT_MAX_BATCH, DEFAULT_NAME, check_target, write_triton_repository

    sign_key = getattr(args, "sign_key", None)
    out_arg = getattr(args, "out", None)
    triton = getattr(args, "triton", None)
    name = getattr(args, "name", None) or DEFAULT_NAME
    if out_arg is None and not triton:
        raise ValueError("give --out FILE.onnx, --triton REPO, or both.")
    if out_arg and sign_key and os.path.abspath(os.fspath(out_arg)) == os.path.abspath(os.fspath(sign_key)):
        raise ValueError(f"--out {out_arg!r} is the --sign-key file; writing there would destroy the key.")
    if triton:  # refuse before the work, as for --out
        try:
            check_target(triton, name, bool(getattr(args, "overwrite", False)))
        except FileExistsError as exc:
            raise ValueError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="dcss-export-") as scratch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        path = out_arg if out_arg else os.path.join(scratch, "model.onnx")
        out = export_assigner(args.run_dir, path, full=bool(args.full), fp16=bool(args.fp16), sign_key=sign_key)
        folder = None
        if triton:
            folder = write_triton_repository(out, triton, name, getattr(args, "max_batch", None) or DEFAULT_MAX_BATCH,
                                             getattr(args, "kind", None) or "gpu",
                                             overwrite=bool(getattr(args, "overwrite", False)))
        size = os.path.getsize(out)
    for w in caught:
        print(f"dcss export: warning: {w.message}", file=sys.stderr)
    model_kind = "full (x -> q)" if args.full else "head (u -> q)"
    signed = ", signed (HMAC-SHA256)" if sign_key else ""
    wrote = ", ".join(([out] if out_arg else [])
                      + ([f"{folder}/config.pbtxt + {folder}/1/model.onnx (Triton)"] if folder else []))
    print(f"dcss export: {model_kind} assigner, {'fp16' if args.fp16 else 'fp32'}{signed}, {size / 1024:.0f} KiB; "
          f"wrote {wrote}")
    return 0
