"""OnnxClusterAssigner: cluster assignment with onnxruntime from a file written by :func:`export_assigner`.

The assigner needs only the file: it never rebuilds a :class:`~dcss_plugin.DCSSModel` (the model may come from a
user's own loop, whose encoder class is unknown here); everything it checks is in the file's metadata.

* The file is checked before anything runs: readable ONNX, dcss-plugin metadata present, the SHA-256 digest of
  graph + metadata unchanged since export, graph I/O as the metadata says. The digest is an integrity check
  against accidental corruption only (anyone who edits the file can recompute it).
* Authenticity: with ``verify_key=KEY_FILE`` the file must carry an HMAC-SHA256 signature made with that key
  (``export_assigner(..., sign_key=KEY_FILE)``, see :func:`~dcss_plugin.export.onnx.sign_model_bytes`); a missing
  signature, a wrong key or any changed byte raises :class:`AssignerSignatureError`.
* Provider: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when it really runs, else CPU). onnxruntime silently falls
  back to CPU when the CUDA provider cannot start (missing driver or libraries), so the choice is read back from
  the session (``session.get_providers()``), not from ``get_available_providers()``. :attr:`provider` is the one
  that actually runs. ``"cuda"`` raises :class:`ProviderUnavailableError` (a ``RuntimeError``) with the reason.
* Inputs: numpy arrays or torch tensors (N, ...) of any numeric dtype (cast to float32); rank, sample shape
  and dtype are checked first, each with its own error. NaN/inf: refused with a :class:`DataError` by default
  (``nonfinite="raise"``); with ``nonfinite="flag"`` such rows go to the graph, which answers them itself
  (``label`` -1, ``confidence`` 0, ``q`` zeros, ``in_domain`` False), as it does for anyone who runs the file with
  plain onnxruntime. For a full export with sample shape (1, H, W), (N, H, W) is accepted. Large inputs run in
  chunks of ``batch_size`` rows.
* Outputs: :class:`AssignResult` ``(q, label, confidence, in_domain)``; ``in_domain`` is None for a file exported
  before that output existed (three outputs; such files still load).
* CUDA-resident torch tensors on a CUDA session go through IOBinding: onnxruntime reads the tensor's memory and
  writes into torch tensors preallocated on the same device; nothing is copied to the host, and the result holds
  CUDA tensors. Every other input gives numpy results.
* Dependencies: numpy and onnxruntime (and onnx, to read the file). torch is optional: it is never imported for
  the CPU provider; for ``"auto"``/``"cuda"`` it is imported (when installed) before the CUDA session is created,
  because it loads the CUDA libraries that onnxruntime-gpu needs. Torch tensors are recognised only when the
  caller has imported torch (``sys.modules``), which any caller holding one has.

Example:
    >>> from dcss_plugin.export.runtime import OnnxClusterAssigner
    >>> assigner = OnnxClusterAssigner("runs/digits/assigner.onnx", provider="auto")
    >>> out = assigner(load_digits().images)  # AssignResult(q (N, K), label (N,), confidence (N,), in_domain (N,))
    >>> assigner.provider, out.label[:5], out.in_domain.mean()
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from dcss_plugin.errors import DataError

from .format import (
    ASSIGNER_FORMAT,
    DIGEST_KEY,
    IN_DOMAIN_KEYS,
    LEGACY_OUTPUT_NAMES,
    METADATA_KEYS,
    OUTPUT_NAMES,
    SIGNATURE_KEY,
    metadata_digest,
    read_signing_key,
    signature_entry,
    signature_of,
)

if TYPE_CHECKING:  # torch is optional here: only CUDA tensors need it, and a caller who has them has torch
    import torch

__all__ = [
    "AssignResult",
    "AssignerFileError",
    "AssignerSignatureError",
    "OnnxClusterAssigner",
    "ProviderUnavailableError",
    "assign_from_cli",
    "read_assigner",
    "verify_signature",
]

log = logging.getLogger("dcss_plugin")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
NONFINITE_MODES = ("raise", "flag")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DTYPES = {"q": np.float32, "label": np.int64, "confidence": np.float32, "in_domain": np.bool_}


def _torch() -> Any:
    """The torch module when the process has imported it, else None (torch is optional here)."""
    return sys.modules.get("torch")


def _load_cuda_libraries() -> None:
    """Import torch, when installed, before onnxruntime creates a CUDA session: torch loads the CUDA libraries
    (cuDNN, cuBLAS, ...) that onnxruntime-gpu's CUDA provider needs. Without torch nothing happens (the libraries
    must then be found by the system loader)."""
    if "torch" in sys.modules:
        return
    try:
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - not installed, or a broken install: onnxruntime reports what it lacks
        log.debug("torch not imported before the CUDA session (%s)", exc)


class AssignerFileError(ValueError):
    """The model file is missing its metadata, corrupt, edited after export, or not ONNX at all."""


class AssignerSignatureError(AssignerFileError):
    """A verify key was given and the file is not signed with it: unsigned, signed with another key, or changed
    (any byte) after signing."""


class ProviderUnavailableError(RuntimeError):
    """The requested onnxruntime execution provider cannot run on this machine; the message says why."""


class AssignResult(NamedTuple):
    """Outputs of one assignment: numpy arrays, or CUDA tensors when the input was a CUDA tensor.

    Attributes:
        q: (N, K) float32 soft assignments, rows sum to 1 (all zeros for a row the graph cannot answer).
        label: (N,) int64 cluster, ``argmax q``; -1 for a row with NaN/inf (only with ``nonfinite="flag"``).
        confidence: (N,) float32 ``max q``; 0 for such a row.
        in_domain: (N,) bool, the row looks like the training data (its ``u`` lies within the file's threshold of
            a cluster center); None for a file exported before in_domain existed (it cannot say).

    ``q, label, confidence = result[:3]`` works with files of either kind.
    """

    q: Any
    label: Any
    confidence: Any
    in_domain: Any = None


# ---------------------------------------------------------------------------------------------------- the file
def verify_signature(data: bytes, proto: Any, key: bytes, path: str) -> None:
    """Check the HMAC-SHA256 signature of the serialized model ``data`` (parsed: ``proto``) with ``key``.

    The file must hold exactly one ``signature`` entry, its serialized form must be the file's last bytes, and the
    HMAC of everything before them must equal it (see :func:`~dcss_plugin.export.onnx.sign_model_bytes`).

    Raises:
        AssignerSignatureError: unsigned, malformed, wrong key or changed bytes.
    """
    values = [p.value for p in proto.metadata_props if p.key == SIGNATURE_KEY]
    if not values:
        raise AssignerSignatureError(
            f"{path!r} is not signed, and a verify key was given: refusing an unsigned model. Export it with "
            "`dcss export ... --sign-key KEY_FILE` (export_assigner(..., sign_key=KEY_FILE)).")
    if len(values) > 1:
        raise AssignerSignatureError(f"{path!r} has {len(values)} signature entries (a signed model has one): "
                                     "it was edited after signing; refusing it.")
    entry = signature_entry(values[0])
    if not data.endswith(entry):
        raise AssignerSignatureError(f"{path!r}: the signature is not where signing puts it (the file's end), so "
                                     "the file was edited or re-saved after signing; refusing it.")
    expected = signature_of(data[:-len(entry)], key).encode("ascii")
    if not hmac.compare_digest(expected, values[0].encode("utf-8", "replace")):
        raise AssignerSignatureError(f"{path!r} failed signature verification: it was signed with another key, or "
                                     "changed after signing (a forged or edited model); refusing it.")


def read_assigner(path: Union[str, os.PathLike],
                  verify_key: Union[str, os.PathLike, bytes, None] = None) -> Tuple[bytes, Dict[str, str]]:
    """Read and check an exported assigner: returns its bytes and metadata, or raises :class:`AssignerFileError`.

    With ``verify_key`` (a key file, or the key as bytes) the file must also be signed with that key
    (:class:`AssignerSignatureError` otherwise); without it only the integrity digest is checked, which guards
    against accidental corruption, not against deliberate edits.

    Example:
        >>> data, meta = read_assigner("assigner.onnx")
        >>> meta["n_clusters"], meta["export_kind"]
        ('10', 'full')
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = os.fspath(path)
    key = read_signing_key(verify_key) if verify_key is not None else None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path!r}. Write one with `dcss export RUN_DIR --out "
                                "FILE.onnx`.")
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        proto = onnx.ModelProto.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise AssignerFileError(f"{path!r} is not a readable ONNX model (corrupt, truncated, or not an ONNX file): "
                                f"{exc}") from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise AssignerFileError(f"{path!r} is not an ONNX model (no graph found): corrupt or a different file type.")
    if key is not None:
        verify_signature(data, proto, key, path)
    if meta.get("format") != ASSIGNER_FORMAT:
        raise AssignerFileError(
            f"{path!r} is an ONNX model but not a dcss-plugin cluster assigner: its metadata lacks "
            f"format={ASSIGNER_FORMAT!r}. Export one with `dcss export RUN_DIR --out FILE.onnx` or "
            "dcss_plugin.export.onnx.export_assigner(model, FILE).")
    outputs = [o.name for o in proto.graph.output]
    required = set(METADATA_KEYS) - (set() if outputs == list(OUTPUT_NAMES) else set(IN_DOMAIN_KEYS))
    missing = sorted(required - set(meta))
    if missing:
        raise AssignerFileError(f"{path!r} lacks the metadata entries {missing}; export it again with this version.")
    if metadata_digest(proto) != meta[DIGEST_KEY]:
        raise AssignerFileError(
            f"{path!r} failed its integrity check (digest mismatch): the graph or its metadata changed after export, "
            "so the file is corrupt or was edited. Export it again from the run directory or the model. (The digest "
            "detects accidental corruption only; sign exports with --sign-key to detect deliberate tampering.)")
    if any(uses_external_data(t) for t in proto.graph.initializer):
        raise AssignerFileError(f"{path!r} refers to external tensor data; a dcss assigner is one self-contained file.")
    inputs = [i.name for i in proto.graph.input]
    promised = meta["outputs"].split(",")
    if inputs != [meta["input_name"]] or outputs != promised or promised not in (list(OUTPUT_NAMES),
                                                                                   list(LEGACY_OUTPUT_NAMES)):
        raise AssignerFileError(f"{path!r}: graph I/O {inputs} -> {outputs} does not match its metadata "
                                f"([{meta['input_name']!r}] -> {promised}; an assigner has the outputs "
                                f"{list(OUTPUT_NAMES)}, or {list(LEGACY_OUTPUT_NAMES)} when exported before "
                                "in_domain existed).")
    return data, meta


# ---------------------------------------------------------------------------------------------------- providers
@contextlib.contextmanager
def _captured_stderr() -> Iterator[List[str]]:
    """Collect what native code writes to file descriptor 2 (onnxruntime prints provider failures there)."""
    sink: List[str] = []
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2: nothing to capture
        yield sink
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode("utf-8", "replace"))


def _why(stderr_text: str) -> str:
    """A one-line reason from what onnxruntime printed while failing to start the CUDA provider."""
    text = _ANSI.sub("", stderr_text)
    parts = []
    lib = re.search(r"Failed to load library (\S+) with error: ([^\n]+)", text)
    if lib:
        parts.append(f"{os.path.basename(lib.group(1))} failed to load ({lib.group(2).strip()})")
    need = re.search(r"Require (.+?)\. Please", text)
    if need:
        parts.append(f"onnxruntime needs {need.group(1).strip()} and a working NVIDIA driver")
    if not parts:
        lines = [re.sub(r"^\S+ \S+ \[[EWI]:onnxruntime:[^\]]*\]\s*", "", ln).strip() for ln in text.splitlines()]
        parts = [ln for ln in lines if ln][:2]
    reason = "; ".join(parts)
    return reason[:400] if reason else "onnxruntime gave no reason (check the NVIDIA driver and CUDA/cuDNN libraries)"


def create_session(data: bytes, provider: str = "auto", device_id: int = 0,
                   options: Any = None) -> Tuple[Any, str, Optional[str]]:
    """An onnxruntime session on the provider that really runs.

    Args:
        data: the serialized model.
        provider: ``"auto"``, ``"cuda"`` or ``"cpu"``.
        device_id: the CUDA device.
        options: ``onnxruntime.SessionOptions``.

    Returns:
        ``(session, "cuda" | "cpu", why_not_cuda)``; the last is ``None`` unless ``auto`` fell back to CPU.

    Example:
        >>> session, running, why = create_session(open("a.onnx", "rb").read(), "auto")
    """
    if provider not in ("auto", "cpu", "cuda"):
        raise ValueError(f"provider must be 'auto', 'cpu' or 'cuda', got {provider!r}.")
    if provider != "cpu":
        _load_cuda_libraries()
    import onnxruntime as ort

    if provider == "cpu":
        return ort.InferenceSession(data, sess_options=options, providers=[PROVIDERS["cpu"]]), "cpu", None
    available = ort.get_available_providers()
    session = None
    if PROVIDERS["cuda"] not in available:
        reason = (f"this onnxruntime {ort.__version__} build has no CUDAExecutionProvider (available: {available}); "
                  "install onnxruntime-gpu")
    else:
        with _captured_stderr() as err:
            session = ort.InferenceSession(
                data, sess_options=options,
                providers=[(PROVIDERS["cuda"], {"device_id": int(device_id)}), PROVIDERS["cpu"]])
        if PROVIDERS["cuda"] in session.get_providers():
            return session, "cuda", None
        reason = "the CUDA provider failed to start (onnxruntime fell back to CPU): " + _why("".join(err))
    if provider == "cuda":
        raise ProviderUnavailableError(f"provider='cuda' cannot run here: {reason}. Use provider='cpu', or "
                                       "'auto' (CUDA when it runs, else CPU).")
    if session is None:
        session = ort.InferenceSession(data, sess_options=options, providers=[PROVIDERS["cpu"]])
    return session, "cpu", reason


# ---------------------------------------------------------------------------------------------------- assigner
class OnnxClusterAssigner:
    """Assign clusters with an exported DCSS ONNX model (see :func:`~dcss_plugin.export.onnx.export_assigner`).

    Args:
        path: the ``.onnx`` file.
        provider: ``"auto"`` (CUDA when it really runs, else CPU), ``"cuda"`` or ``"cpu"``.
        batch_size: rows per onnxruntime call; larger inputs are chunked.
        device_id: CUDA device for the CUDA provider.
        intra_op_threads: onnxruntime intra-op threads; 0 is onnxruntime's own default (one per physical core).
        verify_key: a secret key file (or the key as bytes): refuse the file unless it is signed with this key
            (:class:`AssignerSignatureError`). Without it only the integrity digest is checked.
        nonfinite: ``"raise"`` (default): an input with NaN/inf raises :class:`DataError` naming the rows;
            ``"flag"``: such rows get the graph's safe answer (``label`` -1, ``confidence`` 0, ``q`` zeros,
            ``in_domain`` False) and the others their labels. ``"flag"`` needs a file with the ``in_domain``
            output (files exported before it give no safe answer).

    Attributes:
        provider: ``"cuda"`` or ``"cpu"``, the provider that actually runs.
        signature_verified: True when ``verify_key`` was given (and so the signature was checked).
        metadata: the file's metadata (strings).
        input_name: ``"u"`` (head export) or ``"x"`` (full export).
        input_shape: the graph input's shape without the batch axis.
        has_in_domain: whether the file has the ``in_domain`` output (False for files exported before it).
        in_domain_threshold: the squared u-distance to the nearest center up to which a row is in_domain (inf
            when the export had no training data; None without ``in_domain``).
        n_clusters, latent_dim, export_kind, fp16, normalization (dict with numpy ``offset``/``scale``).

    Shapes:
        input: ``u`` (N, d) or ``x`` (N, *sample_shape); (N, H, W) too when sample_shape is (1, H, W).
        output: :class:`AssignResult` ``q`` (N, K) float32, ``label`` (N,) int64, ``confidence`` (N,) float32,
        ``in_domain`` (N,) bool (None for a file without that output).

    Example:
        >>> assigner = OnnxClusterAssigner("assigner.onnx", provider="cpu")
        >>> result = assigner(np.random.rand(5, 1, 8, 8).astype(np.float32) * 16)
        >>> result.label.shape, result.q.sum(1), result.in_domain       # (5,), ~1, (5,) bool
    """

    def __init__(self, path: Union[str, os.PathLike], provider: str = "auto", batch_size: int = 65536,
                 device_id: int = 0, intra_op_threads: int = 0,
                 verify_key: Union[str, os.PathLike, bytes, None] = None, nonfinite: str = "raise") -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be 'raise' or 'flag', got {nonfinite!r}.")
        self.path = os.fspath(path)
        self.batch_size = int(batch_size)
        self.device_id = int(device_id)
        self.nonfinite = nonfinite
        data, self.metadata = read_assigner(self.path, verify_key=verify_key)
        self.signature_verified = verify_key is not None
        self._read_metadata()
        if nonfinite == "flag" and not self.has_in_domain:
            raise ValueError(f"nonfinite='flag' needs an assigner that answers NaN/inf rows itself; {self.path!r} "
                             "was exported before that (no in_domain output). Export it again, or use "
                             "nonfinite='raise'.")
        self._open_session(data, provider, int(intra_op_threads))
        self._outputs = list(OUTPUT_NAMES if self.has_in_domain else LEGACY_OUTPUT_NAMES)

    def _read_metadata(self) -> None:
        """The attributes that describe the model, from :attr:`metadata` (:class:`AssignerFileError` if unreadable)."""
        meta = self.metadata
        try:
            self.input_name: str = meta["input_name"]
            self.export_kind: str = meta["export_kind"]
            self.input_shape: Tuple[int, ...] = tuple(int(s) for s in json.loads(meta["input_shape"]))
            self.sample_shape: Tuple[int, ...] = tuple(int(s) for s in json.loads(meta["sample_shape"]))
            self.n_clusters = int(meta["n_clusters"])
            self.latent_dim = int(meta["latent_dim"])
            self.fp16 = meta["fp16"] == "true"
            norm = json.loads(meta["normalization"])
            self.normalization: Dict[str, Any] = {
                "kind": norm["kind"],
                "offset": np.asarray(norm["offset"], dtype=np.float32).reshape(norm["offset_shape"]),
                "scale": np.asarray(norm["scale"], dtype=np.float32).reshape(norm["scale_shape"]),
            }
            self.has_in_domain = meta["outputs"].split(",") == list(OUTPUT_NAMES)
            self.in_domain_threshold: Optional[float] = (float(meta["in_domain_threshold"]) if self.has_in_domain
                                                         else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise AssignerFileError(f"{self.path!r} has unreadable dcss metadata ({exc}); export it again.") from exc

    def _open_session(self, data: bytes, provider: str, intra_op_threads: int) -> None:
        """The onnxruntime session on the provider that really runs; sets :attr:`provider` and the fallback reason."""
        if provider in ("auto", "cuda"):
            _load_cuda_libraries()  # before onnxruntime, as create_session does
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3  # errors only; provider fallbacks are reported by us
        try:
            self._session, self.provider, why = create_session(data, provider, self.device_id, options)
        except (ProviderUnavailableError, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error classes
            raise AssignerFileError(f"onnxruntime could not load {self.path!r}: {exc}") from exc
        graph_shape = self._session.get_inputs()[0].shape[1:]
        if [int(s) if isinstance(s, int) else s for s in graph_shape] != list(self.input_shape):
            raise AssignerFileError(f"{self.path!r}: graph input shape {graph_shape} does not match its metadata "
                                    f"{list(self.input_shape)}.")
        if why:
            log.info("onnxruntime: CUDA not used (%s)", why)
        self.fallback_reason = why
        log.info("onnxruntime provider: %s (%s) for %s", self.provider, PROVIDERS[self.provider], self.path)

    def __repr__(self) -> str:
        return (f"OnnxClusterAssigner({self.path!r}, kind={self.export_kind}, input={self.input_name} "
                f"(N, {', '.join(map(str, self.input_shape))}), K={self.n_clusters}, provider={self.provider})")

    # ------------------------------------------------------------------ validation
    def _describe(self) -> str:
        return f"{self.input_name} of shape (N, {', '.join(map(str, self.input_shape))})"

    def _check_shape(self, shape: Tuple[int, ...]) -> bool:
        """Raise :class:`DataError` for a wrong rank or sample shape; ``True`` when a channel axis must be added."""
        want = self.input_shape
        add_channel = (self.input_name == "x" and len(want) == 3 and want[0] == 1 and len(shape) == 3
                       and tuple(shape[1:]) == want[1:])
        if add_channel:
            return True
        if len(shape) != len(want) + 1:
            hint = " (one sample? add a batch axis: x[None])" if tuple(shape) == want else ""
            raise DataError(f"Expected {self._describe()}: {len(want) + 1} dimensions; got {len(shape)} with shape "
                            f"{tuple(shape)}{hint}.")
        if tuple(shape[1:]) != want:
            if self.input_name == "u":
                raise DataError(f"u must have d={want[0]} columns (this model's latent width); got {shape[1]}. u is "
                                f"the encoder output on normalised input ({self.metadata['u_definition']}); for raw "
                                "samples export with --full.")
            if len(want) == 1:
                raise DataError(f"x must have {want[0]} features per row (as in training); got {shape[1]}.")
            raise DataError(f"x samples must have shape {want} (as in training); got {tuple(shape[1:])}.")
        return False

    def _bad_rows(self, finite_rows: np.ndarray) -> None:
        """Raise :class:`DataError` naming the rows with NaN/inf (``nonfinite="raise"``); with ``"flag"`` the
        graph answers them (label -1)."""
        rows = np.flatnonzero(~finite_rows)
        if rows.size and self.nonfinite == "raise":
            raise DataError(f"{self.input_name} contains NaN or inf in {rows.size} row(s) (first: "
                            f"{rows[:5].tolist()}); drop or impute those rows first, or create the assigner with "
                            "nonfinite='flag' to get label -1 for them.")

    def _prepare_numpy(self, x: Any) -> np.ndarray:
        torch = _torch()
        if torch is not None and isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype in (torch.bfloat16, torch.float16):
                x = x.float()
            x = x.numpy()
        arr = x if type(x) is np.ndarray else np.asarray(x)
        kind = arr.dtype.kind  # b(ool), i/u(nt), f(loat), c(omplex), O/U/S/... (not numbers)
        if kind not in "biuf":
            if kind == "c":
                raise DataError(f"{self.input_name} must be real-valued; got complex dtype {arr.dtype}.")
            raise DataError(f"{self.input_name} must be numeric; got dtype {arr.dtype}.")
        if self._check_shape(arr.shape):
            arr = arr[:, None]
        if arr.dtype != np.float32 or not arr.flags.c_contiguous:
            with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: caught below
                arr = np.ascontiguousarray(arr, dtype=np.float32)
        # NaN/inf make the sum NaN/inf; only then (or on overflow of the sum itself) look row by row
        if kind == "f" and arr.size and not np.isfinite(arr.sum()):
            self._bad_rows(np.isfinite(arr.reshape(len(arr), -1)).all(1))
        return arr

    def _prepare_cuda(self, x: "torch.Tensor") -> "torch.Tensor":
        torch = _torch()
        if x.is_complex():
            raise DataError(f"{self.input_name} must be real-valued; got complex dtype {x.dtype}.")
        if self._check_shape(tuple(x.shape)):
            x = x.unsqueeze(1)
        x = x.detach().to(torch.float32).contiguous()
        if x.numel() and not bool(torch.isfinite(x).all()):
            self._bad_rows(torch.isfinite(x.reshape(len(x), -1)).all(1).cpu().numpy())
        return x

    # ------------------------------------------------------------------ running
    def _run_numpy(self, x: np.ndarray) -> AssignResult:
        n, bs = len(x), self.batch_size
        if 0 < n <= bs:
            return AssignResult(*self._session.run(self._outputs, {self.input_name: x}))
        shapes = {"q": (n, self.n_clusters)}
        outs = [np.empty(shapes.get(name, (n,)), _DTYPES[name]) for name in self._outputs]
        for i in range(0, n, bs):
            for out, part in zip(outs, self._session.run(self._outputs, {self.input_name: x[i:i + bs]})):
                out[i:i + bs] = part
        return AssignResult(*outs)

    def _run_cuda(self, x: "torch.Tensor") -> AssignResult:
        """IOBinding: onnxruntime reads ``x``'s device memory and writes into preallocated CUDA tensors."""
        torch = _torch()
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if index != self.device_id:
            raise ValueError(f"The input is on cuda:{index} but this session runs on cuda:{self.device_id}; move "
                             f"it or create the assigner with device_id={index}.")
        torch.cuda.current_stream(x.device).synchronize()  # x is fully written before onnxruntime's stream reads it
        return self._run_bound(x, "cuda", index)

    def _empty_tensors(self, n: int, device: Any) -> List[Any]:
        """Uninitialised output tensors for ``n`` rows on ``device``, one per output of the file."""
        torch = _torch()
        dtypes = {"q": torch.float32, "label": torch.int64, "confidence": torch.float32, "in_domain": torch.bool}
        return [torch.empty((n, self.n_clusters) if name == "q" else (n,), dtype=dtypes[name], device=device)
                for name in self._outputs]

    def _run_bound(self, x: "torch.Tensor", device_type: str, device_id: int) -> AssignResult:
        """Run on a contiguous float32 tensor through IOBinding, outputs written into tensors on ``x.device``.

        Neither the input nor the outputs leave the device: onnxruntime is handed raw pointers (``data_ptr``).
        """
        n, bs = len(x), self.batch_size
        outs = self._empty_tensors(n, x.device)
        for i in range(0, n, bs):
            xb = x[i:i + bs]  # rows of a contiguous tensor: contiguous
            binding = self._session.io_binding()
            binding.bind_input(self.input_name, device_type, device_id, np.float32, tuple(xb.shape), xb.data_ptr())
            for name, out in zip(self._outputs, outs):
                part = out[i:i + bs]
                binding.bind_output(name, device_type, device_id, _DTYPES[name], tuple(part.shape), part.data_ptr())
            binding.synchronize_inputs()
            self._session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        return AssignResult(*outs)

    def assign(self, x: Any) -> AssignResult:
        """Soft assignments, labels, confidences and in-domain flags for ``x`` (numpy array or torch tensor).

        Raises:
            DataError: wrong rank or sample shape, non-numeric or complex dtype, NaN or inf (the last only with
                ``nonfinite="raise"``, the default).
        """
        torch = _torch()
        if torch is not None and isinstance(x, torch.Tensor) and x.is_cuda and self.provider == "cuda":
            xc = self._prepare_cuda(x)
            if len(xc) == 0:
                return AssignResult(*self._empty_tensors(0, xc.device))
            return self._run_cuda(xc)
        arr = self._prepare_numpy(x)
        if len(arr) == 0:
            return AssignResult(*(np.empty((0, self.n_clusters) if name == "q" else (0,), _DTYPES[name])
                                  for name in self._outputs))
        return self._run_numpy(arr)

    __call__ = assign

    def predict(self, x: Any) -> Any:
        """Cluster of each row, (N,) int64."""
        return self.assign(x).label


# ---------------------------------------------------------------------------------------------------- CLI
def assign_from_cli(args: Any) -> int:
    """``dcss assign MODEL --data X.npy --out labels.npy [--provider auto|cpu|cuda] [--batch-size N]
    [--verify-key KEY]``."""
    from dcss_plugin.arrays import load_array
    from dcss_plugin.io import atomic_save_npy

    out = os.fspath(args.out)
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a directory; give a file name such as {os.path.join(out, 'labels.npy')!r}.")
    verify_key = getattr(args, "verify_key", None)
    if verify_key and os.path.abspath(out) == os.path.abspath(os.fspath(verify_key)):
        raise ValueError(f"--out {out!r} is the --verify-key file; writing there would destroy the key.")
    try:
        assigner = OnnxClusterAssigner(args.model, provider=getattr(args, "provider", "auto") or "auto",
                                       batch_size=getattr(args, "batch_size", None) or 65536,
                                       verify_key=verify_key)
    except ProviderUnavailableError as exc:  # a user choice that cannot be honoured here: exit status 2
        raise ValueError(str(exc)) from exc
    x = load_array(args.data)
    t0 = time.perf_counter()
    result = assigner.assign(x)
    seconds = time.perf_counter() - t0
    labels = np.asarray(result.label, dtype=np.int64)
    atomic_save_npy(out, labels)
    why = assigner.fallback_reason
    note = f" (CUDA not used: {why[:200]}{'...' if len(why) > 200 else ''})" if why else ""
    signed = ", signature verified" if assigner.signature_verified else ""
    print(f"dcss assign: {len(labels)} rows, K={assigner.n_clusters}, {assigner.export_kind} model{signed}, "
          f"provider {assigner.provider} ({PROVIDERS[assigner.provider]}){note}, {seconds:.3f} s; wrote {out}")
    return 0
