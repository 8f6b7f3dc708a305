"""A Triton Inference Server model repository for an exported assigner (``dcss export RUN --full --triton REPO``).

Layout written by :func:`write_triton_repository` (the standard Triton model repository)::

    REPO/
      NAME/                      NAME defaults to "dcss"
        config.pbtxt             platform "onnxruntime_onnx", max_batch_size, inputs/outputs, dynamic batching,
                                 instance_group (KIND_GPU or KIND_CPU)
        1/
          model.onnx             the exported file itself, byte for byte (signed if it was)

Serve it with Triton (a container or an install with the onnxruntime backend; Triton cannot run on this project's
development machines, so the repository is checked by parsing ``config.pbtxt`` against the ONNX graph, not by a
live server)::

    tritonserver --model-repository=REPO
    curl -s localhost:8000/v2/models/dcss/config          # the configuration Triton loaded

The configuration is read from the ONNX graph, so it always matches the file:

* ``max_batch_size`` N > 0: Triton owns the batch axis, so every ``dims`` leaves it out. The input keeps the rest
  of its shape (``x``: the sample shape, e.g. ``[ 1, 8, 8 ]``; ``x`` of vectors or ``u``: ``[ d ]``); ``q`` is
  ``[ K ]``.
* ``label``, ``confidence`` and ``in_domain`` are (N,) in the graph: nothing is left once the batch axis is gone,
  and Triton needs non-empty ``dims``. As Triton's model-configuration guide prescribes for batch-only tensors,
  they are declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``; clients receive them as (N, 1).
* Data types from the graph: ``TYPE_FP32`` (``x``/``u``, ``q``, ``confidence``), ``TYPE_INT64`` (``label``),
  ``TYPE_BOOL`` (``in_domain``).
* ``dynamic_batching``: Triton merges concurrent requests up to ``max_batch_size`` rows, waiting at most
  ``max_queue_delay_microseconds``.

Needs ``onnx`` (to read the graph's inputs and outputs); no torch.

Example:
    >>> from dcss_plugin.export.triton import write_triton_repository
    >>> write_triton_repository("runs/digits/assigner.onnx", "models", name="dcss", max_batch=1024, kind="gpu")
    'models/dcss'
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, List, Sequence, Tuple, Union

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_NAME", "TRITON_DTYPES", "check_target", "triton_config",
           "write_triton_repository"]

DEFAULT_NAME = "dcss"
DEFAULT_MAX_BATCH = 1024
DEFAULT_QUEUE_DELAY_US = 500
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}

#: ONNX ``TensorProto`` element types (numbers) -> Triton data types.
TRITON_DTYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 6: "TYPE_INT32", 7: "TYPE_INT64",
                 9: "TYPE_BOOL", 2: "TYPE_UINT8", 3: "TYPE_INT8"}


def _tensors(values: Sequence[Any]) -> List[Tuple[str, str, List[Union[int, str]]]]:
    """``(name, Triton data type, shape)`` of graph inputs or outputs (a symbolic axis stays its name)."""
    found = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in TRITON_DTYPES:
            raise ValueError(f"ONNX tensor {v.name!r} has element type {t.elem_type}, which has no Triton data type "
                             "here; export the assigner again with dcss export.")
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        found.append((v.name, TRITON_DTYPES[t.elem_type], shape))
    return found


def _entry(name: str, dtype: str, shape: List[Union[int, str]]) -> str:
    """One ``input``/``output`` entry: ``shape`` is the graph's, its first axis (the batch axis) is left out."""
    rest = shape[1:]
    if any(not isinstance(s, int) or s < 1 for s in rest):
        raise ValueError(f"ONNX tensor {name!r} has shape {shape}: only the batch axis may be dynamic for Triton.")
    if rest:
        dims = f"dims: [ {', '.join(str(s) for s in rest)} ]"
    else:  # batch-only tensor (N,): Triton's documented form
        dims = "dims: [ 1 ]\n    reshape: { shape: [ ] }"
    return f"  {{\n    name: \"{name}\"\n    data_type: {dtype}\n    {dims}\n  }}"


def triton_config(model_proto: Any, name: str = DEFAULT_NAME, max_batch: int = DEFAULT_MAX_BATCH,
                  kind: str = "gpu", queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> str:
    """The ``config.pbtxt`` text for an assigner graph (an ``onnx.ModelProto``).

    Example:
        >>> print(triton_config(onnx.load("assigner.onnx"), max_batch=256, kind="cpu"))
        name: "dcss"
        platform: "onnxruntime_onnx"
        max_batch_size: 256
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ] ...
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'gpu' or 'cpu', got {kind!r}.")
    if int(max_batch) < 1:
        raise ValueError(f"max_batch must be a positive integer (Triton's batch axis), got {max_batch}.")
    graph = model_proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = _tensors([i for i in graph.input if i.name not in initializers])
    outputs = _tensors(graph.output)
    for tname, _, shape in inputs + outputs:
        if not shape or isinstance(shape[0], int):
            raise ValueError(f"ONNX tensor {tname!r} has shape {shape} without a dynamic batch axis; export the "
                             "assigner again with dcss export.")
    meta = {p.key: p.value for p in model_proto.metadata_props}
    header = (f"# Triton model configuration written by dcss export for a dcss-plugin cluster assigner "
              f"(K={meta.get('n_clusters', '?')}, {meta.get('export_kind', '?')} export, digest "
              f"{meta.get('digest', '?')[:16]}).\n# Serve: tritonserver --model-repository=<the folder above "
              f"{name}/>\n")
    return (header
            + f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {int(max_batch)}\n'
            + "input [\n" + ",\n".join(_entry(*t) for t in inputs) + "\n]\n"
            + "output [\n" + ",\n".join(_entry(*t) for t in outputs) + "\n]\n"
            + f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(queue_delay_us)}\n}}\n"
            + f"instance_group [\n  {{\n    kind: {KINDS[kind]}\n    count: 1\n  }}\n]\n")


def check_target(repo: Union[str, os.PathLike], name: str, overwrite: bool = False) -> str:
    """``REPO/NAME`` if a model may be written there: ``name`` is a plain folder name, and an existing ``REPO/NAME``
    only with ``overwrite`` (``FileExistsError`` otherwise). Cheap, so callers check before the export's work."""
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name) or '"' in name:
        raise ValueError(f"--name {name!r} is not a usable model name: give a folder name such as 'dcss'.")
    target = os.path.join(os.fspath(repo), name)
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(f"--triton: {target!r} already exists; nothing was written. Give another --name or "
                              "REPO, or add --overwrite to replace that model.")
    return target


def write_triton_repository(model: Union[str, os.PathLike, bytes], repo: Union[str, os.PathLike],
                            name: str = DEFAULT_NAME, max_batch: int = DEFAULT_MAX_BATCH, kind: str = "gpu", *,
                            overwrite: bool = False, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> str:
    """Write ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.onnx`` (the exported bytes, unchanged); return
    ``REPO/NAME``.

    The model folder is built beside its target and renamed into place, so ``REPO/NAME`` is either absent, the old
    one or the complete new one. An existing ``REPO/NAME`` is replaced (as a whole) only with ``overwrite=True``;
    other models in ``REPO`` are never touched.

    Args:
        model: the exported ``.onnx`` file (path) or its bytes.
        repo: the model repository folder (created if missing).
        name: the model's folder and Triton name.
        max_batch: Triton's ``max_batch_size`` (rows per merged batch).
        kind: ``"gpu"`` (``KIND_GPU``) or ``"cpu"`` (``KIND_CPU``).

    Raises:
        FileExistsError: ``REPO/NAME`` exists and ``overwrite`` is False.
        ValueError: a bad name, kind or max_batch, or a graph without a dynamic batch axis.
    """
    import onnx

    from dcss_plugin.io import current_umask

    target = check_target(repo, name, overwrite)
    if isinstance(model, (bytes, bytearray)):
        data = bytes(model)
    else:
        with open(os.fspath(model), "rb") as fh:
            data = fh.read()
    try:
        proto = onnx.ModelProto.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError
        raise ValueError(f"not a readable ONNX model ({exc}).") from exc
    config = triton_config(proto, name, max_batch, kind, queue_delay_us)
    repo = os.fspath(repo)
    if os.path.exists(repo) and not os.path.isdir(repo):
        raise ValueError(f"--triton {repo!r} is a file, not a folder.")
    os.makedirs(repo, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=repo)
    try:
        os.makedirs(os.path.join(work, "1"))
        for path, payload in ((os.path.join(work, "config.pbtxt"), config.encode("utf-8")),
                              (os.path.join(work, "1", "model.onnx"), data)):
            with open(path, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(work, 0o777 & ~current_umask())
        old = None
        if os.path.lexists(target):
            old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=repo)
            os.replace(target, os.path.join(old, name))
        try:
            os.replace(work, target)
        except BaseException:
            if old is not None:  # put the old model back
                os.replace(os.path.join(old, name), target)
                os.rmdir(old)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target

