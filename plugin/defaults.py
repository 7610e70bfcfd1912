"""Defaults shared by the API, the CLIs and recipes (one place, so they never disagree)."""

# Calibration defaults: 32 x 256 = 8192 tokens. Measured on SmolLM2-135M (2 cores), a sequential pass costs
# ~160 CPU-s per 8k tokens (two onnxruntime runs per block + X^T X), which keeps gptq within ~3 minutes;
# GPTQ's output error changes little beyond a few thousand tokens for models of this size.
DEFAULT_CALIB_SAMPLES = 32
# Methods that profit from more data say so (``default_calib_samples`` on the method class): the AdaRound
# methods take 128 x 256 tokens, see graph_passes/rounding/adaround.py.
DEFAULT_SEQ_LEN = 256
# How many times each calibration sequence's first position (the attention sink) counts in the statistics
# of the attention q/k/v projections (graph_passes.rounding.base.weight_first_position). SmolLM2 W4 g128
# GPTQ on 32768 eval tokens: perplexity 32.92 with 1 (off), 31.12 with 64 (fp32 27.63).
DEFAULT_SINK_WEIGHT = 64.0


def default_calib_samples(method: str) -> int:
    """Calibration sequences for ``method`` when none are asked for: the method class's
    ``default_calib_samples``, else ``DEFAULT_CALIB_SAMPLES``."""
    from .graph_passes.rounding.base import METHODS

    return int(getattr(METHODS.get(method), "default_calib_samples", DEFAULT_CALIB_SAMPLES))


def calib_samples_help() -> str:
    return f"calibration sequences (default {DEFAULT_CALIB_SAMPLES}; 128 for adaround and adaround_ls)"
