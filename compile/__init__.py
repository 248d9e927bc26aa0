"""Materialization, ONNX/TensorRT export and benchmarking (installed as ``dymu.compile``)."""
