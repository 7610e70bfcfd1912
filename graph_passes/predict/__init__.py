"""Prediction helpers: choosing a quantization format per group of weight sites from predicted losses."""
