"""Rounding methods: each turns a float weight (+ calibration statistics) into a QuantizedWeight."""

from . import (  # noqa: F401  (register "adaround", "gptq", "adaround_ls")
    adaround,
    gptq,
    learned_scale,
    rtn,
)
