"""benchmarks/scale.py: the per-site time fit and its estimate, the output digest, the recorded command."""

from __future__ import annotations

import pytest


def _sites(fit, shapes):
    a, b, c = fit
    return [{"name": f"model.layers.0.s{i}", "n": n, "k": k, "seconds": a * n * k * k + b * k**3 + c * n * k, "pack_s": 0.0}
            for i, (n, k) in enumerate(shapes)]  # fmt: skip


def test_the_site_time_fit_recovers_known_coefficients(scale):
    shapes = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096), (512, 8192)]
    got = scale.site_time_fit(_sites((1e-9, 2e-11, 3e-9), shapes))
    assert got == pytest.approx([1e-9, 2e-11, 3e-9], rel=1e-6)


def test_a_feature_that_would_come_out_negative_is_dropped(scale):
    shapes = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
    sites = _sites((1e-9, 0.0, 0.0), shapes)
    sites[1]["seconds"] *= 0.5  # a fast small site pulls the intercept-like terms below zero
    got = scale.site_time_fit(sites)
    assert got is not None and min(got) >= 0.0 and got[0] > 0
    assert scale.site_time_fit(sites[:2]) is None  # fewer sites than features


def test_site_shapes_are_the_decoder_blocks_linears(scale):
    shapes = scale.site_shapes(scale.MODELS["llama3-8b"], lm_head=True)
    assert shapes == [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                      (4096, 14336), (128256, 4096)]  # fmt: skip
    assert scale.site_shapes(scale.MODELS["llama2-70b"], lm_head=False)[-1] == (8192, 28672)


def test_the_estimate_scales_blocks_to_full_depth(scale):
    spec = scale.MODELS["llama3-8b"]
    shapes = scale.site_shapes(spec, lm_head=True)
    sites = _sites((1e-9, 0.0, 0.0), shapes)
    sites[-1]["name"] = "lm_head"
    block = sum(s["seconds"] for s in sites[:7])
    row = {
        "model": "llama3-8b", "lm_head": "scheme", "blocks": 1, "info": {"sites": sites},
        "phases": {"calibration_s": 0.0}, "per_block": [{"rounding_s": block / 2}],  # two sites at once
    }  # fmt: skip
    e = scale.shape_estimate(row, spec)
    assert e["parallel"] == pytest.approx(2.0)
    assert e["core_h"] * 3600 == pytest.approx(32 * block + sites[-1]["seconds"], rel=1e-6)
    assert e["wall_h"] * 3600 == pytest.approx(32 * block / 2 + sites[-1]["seconds"], rel=1e-6)


def test_the_output_digest_covers_model_files_only(scale, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "model.onnx_data").write_bytes(b"weights")
    (tmp_path / "quantization_config.json").write_text('{"seconds": 1}')
    first = scale.output_digest(tmp_path)
    (tmp_path / "quantization_config.json").write_text('{"seconds": 2}')  # records hold times
    assert scale.output_digest(tmp_path) == first
    (tmp_path / "model.onnx_data").write_bytes(b"weightz")
    assert scale.output_digest(tmp_path) != first


def test_the_recorded_command_leaves_the_workdir_out(scale):
    got = scale.command_line(
        ["--models", "llama3-8b", "--workdir", "/somewhere", "--budgets", "4", "--workdir=/x"]
    )
    assert got == "python benchmarks/scale.py --models llama3-8b --budgets 4"
