"""Rounding methods: each turns a float weight (+ calibration statistics) into a QuantizedWeight."""
