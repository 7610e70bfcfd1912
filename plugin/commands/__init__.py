"""Subcommands of the ``optimum-adaround`` CLI (one module each) and the optimum-cli ``export onnx-quant``."""
