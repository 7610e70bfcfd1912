"""The CUDA GEMV benchmark's pure parts (benchmarks/cuda_gemv.py is a script, imported by path; its GPU
parts need a GPU)."""

from __future__ import annotations

import pytest


def _result(variants):
    checks = [{"variant": v, "rel_err": 1e-6 * (j + 1), "ok": j == 0} for v in variants for j in range(2)]
    gemv = [
        {"variant": v, "K": 4096, "N": 4096, "bits": 4, "dtype": "float16", "ms": 0.0073, "weight_GBps": 1226.0,
         "pct_of_peak": 25.47}
        for v in variants
    ]  # fmt: skip
    return {"device": "GPU", "date": "today", "checks": checks, "gemv": gemv, "nominal_peak_GBps": 4814.0,
            "copy_GBps": 2714.0, "timing": "cuda graph"}  # fmt: skip


def test_markdown_one_build_has_no_variant_column(cuda_gemv):
    lines = cuda_gemv._markdown(_result(["default"]), ["default"])
    assert "Checks: 2 cases, worst rel. error 2.00e-06, 1 failures." in lines
    assert "| K | N | bits | dtype | ms | weight GB/s | % peak |" in lines
    assert "| 4096 | 4096 | 4 | float16 | 0.0073 | 1226 | 25 |" in lines


def test_markdown_variants_side_by_side(cuda_gemv):
    lines = cuda_gemv._markdown(_result(["old", "new"]), ["old", "new"])
    assert "Checks: old: 2 cases, worst rel. error 2.00e-06, 1 failures." in lines
    assert "Checks: new: 2 cases, worst rel. error 2.00e-06, 1 failures." in lines
    assert "| variant | K | N | bits | dtype | ms | weight GB/s | % peak |" in lines
    assert "|---|---|---|---|---|---|---|---|" in lines
    assert "| new | 4096 | 4096 | 4 | float16 | 0.0073 | 1226 | 25 |" in lines


@pytest.mark.parametrize("spec", ["noequals", "=x.so", "name=/does/not/exist.so"])
def test_variant_spec_errors_name_the_spec(cuda_gemv, spec):
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        cuda_gemv._variants([spec])
