"""Loader for the custom-op library (C++/CUDA kernels registered in onnxruntime)."""
