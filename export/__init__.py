"""ONNX export of fitted DCSS models and an onnxruntime cluster assigner (imported as ``dcss_plugin.export``).

onnx and onnxruntime are imported by the submodules ``onnx`` and ``runtime``, not here.
"""
