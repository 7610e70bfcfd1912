"""Rounding methods: each turns a float weight (+ calibration statistics) into a QuantizedWeight."""

from . import rtn  # noqa: F401  (registers "rtn")
