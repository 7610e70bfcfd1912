"""The plots are real PNGs with the requested pixel size."""

from __future__ import annotations

import math
import struct

import pytest

from optimum.adaround.plots import PlotError, plot_perplexity_vs_bits, plot_sqnr_bars


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"), "PNG not terminated"
    return width, height


def test_sqnr_bars_png(tmp_path):
    sqnr = {
        f"model.layers.{i}.self_attn.{p}_proj": 18.0 + i + 0.1 * j
        for i in range(3)
        for j, p in enumerate("qkvo")
    }
    sqnr["model.layers.3.mlp.down_proj"] = math.inf  # lossless site: drawn, not dropped
    out = plot_sqnr_bars(sqnr, tmp_path / "sub" / "sqnr.png", size_px=(800, 400))
    assert out.is_file() and _png_size(out) == (800, 400)


def test_ppl_vs_bits_png(tmp_path):
    points = [
        {"method": "ours:gptq", "bits_per_weight": 4.25, "perplexity": 30.1, "label": "w4-g128"},
        {"method": "ours:gptq", "bits_per_weight": 3.25, "perplexity": 45.0, "label": "w3-g128"},
        {"method": "onnxruntime:default", "bits_per_weight": 4.6, "perplexity": 39.7},
        {"method": "onnxruntime:hqq", "bits_per_weight": None, "perplexity": None},  # a failed run: left out
    ]
    out = plot_perplexity_vs_bits(points, tmp_path / "ppl.png", fp32_perplexity=27.9)
    assert _png_size(out) == (900, 600)


def test_nothing_to_plot_is_a_clear_error(tmp_path):
    with pytest.raises(PlotError, match="no per-site SQNR"):
        plot_sqnr_bars({}, tmp_path / "a.png")
    with pytest.raises(PlotError, match="no \\(bits per weight, perplexity\\) points"):
        plot_perplexity_vs_bits(
            [{"method": "x", "bits_per_weight": 4, "perplexity": float("nan")}], tmp_path / "b.png"
        )
    assert not list(tmp_path.iterdir())
