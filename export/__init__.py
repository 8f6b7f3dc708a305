"""ONNX export of DCSS models and an onnxruntime cluster assigner (imported as ``dcss_plugin.export``).

* :mod:`dcss_plugin.export.onnx`: ``export_assigner(model, path, *, full=False, fp16=False, input_shape=None)``
  writes one self-contained ``.onnx`` file from a :class:`~dcss_plugin.DCSSModel` (trained anywhere, a user's own
  loop included), a fitted :class:`~dcss_plugin.DCSS` or a run directory: input ``u`` (N, d) (head) or ``x``
  (N, *sample_shape) (full: normalisation + encoder + selected head); outputs ``q`` (N, K) float32, ``label`` (N,)
  int64 (-1 for a row with NaN/inf), ``confidence`` (N,) float32 (0 for such a row), ``in_domain`` (N,) bool (the
  row's ``u`` lies within the training data's reach of a cluster center); dynamic batch axis; metadata with K, d,
  the normalisation, the in-domain threshold, the config, the package version and an integrity digest (against
  accidental corruption; ``sign_key=`` adds an HMAC-SHA256 signature against tampering). Every export is checked
  against PyTorch with onnxruntime.
* :mod:`dcss_plugin.export.runtime`: ``OnnxClusterAssigner(path, provider="auto"|"cuda"|"cpu", verify_key=None)``
  checks the file (and, with ``verify_key``, its signature) and the inputs, reports the provider that really
  runs, and binds CUDA tensors without a host copy. It needs numpy and onnxruntime only (torch is optional).
* :mod:`dcss_plugin.export.format`: the file format shared by both (names, metadata keys, digest, signature);
  torch-free.
* :mod:`dcss_plugin.export.triton`: ``write_triton_repository(model, repo, name="dcss", max_batch=1024,
  kind="gpu")`` writes ``REPO/NAME/config.pbtxt`` + ``REPO/NAME/1/model.onnx`` for ``tritonserver``; torch-free.
  The HTTP service of the same model is ``dcss serve`` (:mod:`dcss_plugin.export.serve`); see ``docs/deploy.md``.

onnx and onnxruntime are imported by those submodules, not here, so ``import dcss_plugin.export`` stays light.
The export reads only the model's public parts; ``dcss_plugin`` itself never imports this package. The assign
benchmark (PyTorch eager versus onnxruntime) lives in ``benchmarks/assign.py``.

Example:
    >>> from dcss_plugin.export.onnx import export_assigner
    >>> from dcss_plugin.export.runtime import OnnxClusterAssigner
    >>> export_assigner("runs/digits", "runs/digits/assigner.onnx", full=True)
    >>> OnnxClusterAssigner("runs/digits/assigner.onnx")(x).label       # x: (N, 8, 8) or (N, 1, 8, 8)
"""

__all__ = ["write_triton_repository"]


def __getattr__(name: str):
    """``write_triton_repository`` on first use (PEP 562), so that ``import dcss_plugin.export`` loads nothing."""
    if name == "write_triton_repository":
        from .triton import write_triton_repository

        return write_triton_repository
    raise AttributeError(f"module 'dcss_plugin.export' has no attribute {name!r}")
