"""Calibration: streams token batches through onnxruntime and reduces per-activation statistics."""
