"""Calibration: streams token batches through onnxruntime and reduces per-activation statistics.

``engine.run_calibration`` is the entry point (one pass, or decoder block by decoder block with the
quantized blocks upstream); ``blocks`` cuts the graph into parts, ``feeds`` builds a batch's graph inputs,
``stats`` reduces activations into ``H = sum X^T X``, ``sessions`` opens onnxruntime sessions of parts.
"""
