"""Row-chunked rounding: the calibrated methods give the same bytes whatever the memory they are given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum.adaround.graph_passes.rounding.base import (
    FIRST_POSITION,
    FIRST_POSITION_TOKENS,
    ROW_ALIGN,
    SiteStats,
    build_method,
    chunk_rows,
    method_config,
)
from optimum.adaround.graph_passes.rounding.calibrated import merge_info, row_slices
from optimum.adaround.graph_passes.scheme import QuantScheme

FAST = {
    "gptq": {},
    "adaround": {"iters": 20, "polish_steps": 20},
    "adaround_ls": {"iters": 10, "polish_steps": 10, "scale_steps": 1},
}


def _site(correlated_hessian, n=300, k=128, seed=0):
    h, tokens = correlated_hessian(k, tokens=512, seed=seed)
    g = np.random.default_rng(seed)
    w = (g.standard_normal((n, k)) * 0.05).astype(np.float32)
    rows = g.standard_normal((2, k)) * 3.0  # two "first position" rows, part of H
    stats = SiteStats(
        hessian=h + rows.T @ rows,
        n_tokens=tokens + 2,
        extra={FIRST_POSITION: rows, FIRST_POSITION_TOKENS: np.asarray(2)},
    )
    return w, stats


@pytest.mark.parametrize("method", sorted(FAST))
@pytest.mark.parametrize("label", ["w4-g32", "w3-g64-asym"])
def test_chunked_rounding_gives_the_same_bytes(correlated_hessian, method, label):
    """300 rows (not a multiple of the 64-row chunk) rounded in one piece, in chunks of 64 and of 128 rows."""
    w, stats = _site(correlated_hessian)
    w0, h0 = w.copy(), stats.hessian.copy()
    scheme = QuantScheme.parse(label)
    config = method_config(method, FAST[method])
    n, k = w.shape
    whole = build_method(config).quantize(w, scheme, stats, site="s")
    fixed = config.fixed_bytes(n, k)
    for rows in (64, 128):
        memory = fixed + int(config.row_bytes * k * rows)
        assert config.rows_within(memory, n, k) == rows
        part = build_method(config).quantize(w, scheme, stats, site="s", memory=memory)
        np.testing.assert_array_equal(part.codes, whole.codes)
        np.testing.assert_array_equal(part.scales, whole.scales)
        if whole.zero_points is None:
            assert part.zero_points is None
        else:
            np.testing.assert_array_equal(part.zero_points, whole.zero_points)
        for key in ("proxy_loss", "proxy_loss_rtn", "sqnr_db", "output_sqnr_db"):
            assert part.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-9)
    np.testing.assert_array_equal(w, w0)  # the inputs are not modified
    np.testing.assert_array_equal(stats.hessian, h0)


def test_calibrated_methods_declare_their_footprint():
    for method in FAST:
        config = method_config(method)
        assert config.row_bytes > 0 and config.hessian_copies > 0
        assert config.rows_within(None, 1000, 64) is None
        rows = config.rows_within(config.fixed_bytes(1000, 64) + 10**9, 1000, 64)
        assert rows is not None and rows % config.row_align == 0


def test_chunk_rows_fits_the_budget_in_aligned_rows():
    assert chunk_rows(None, 64, 10.0) is None
    assert chunk_rows(64 * 10 * 200, 64, 10.0) == 192  # 200 rows fit: the largest multiple of 64
    assert chunk_rows(0, 64, 10.0) == ROW_ALIGN  # never less than one aligned chunk
    assert chunk_rows(-5, 64, 10.0, align=100) == 100


def test_row_slices_cover_the_rows_once():
    assert row_slices(300, None) == [(0, 300)]
    assert row_slices(300, 128) == [(0, 128), (128, 256), (256, 300)]
    assert row_slices(100, 128) == [(0, 100)]


def test_merge_info_weights_fractions_by_rows():
    merged = merge_info(
        [
            (100, {"flipped_frac": 0.2, "fallback": 0.0, "proxy_loss_before_polish": 1.0}),
            (300, {"flipped_frac": 0.6, "fallback": 1.0, "proxy_loss_before_polish": 2.0}),
        ]
    )
    assert merged == {"flipped_frac": pytest.approx(0.5), "fallback": 1.0, "proxy_loss_before_polish": 3.0}


@pytest.mark.parametrize("method", sorted(FAST))
def test_wide_layers_work_in_float32_close_to_float64(correlated_hessian, monkeypatch, method):
    """From ``WIDE_K`` inputs the K x K arrays are float32: half the memory, nearly the same rounding."""
    from optimum.adaround.graph_passes.rounding import hessian as hs

    w, stats = _site(correlated_hessian)
    h0 = stats.hessian.copy()
    scheme = QuantScheme.parse("w4-g32")
    config = method_config(method, FAST[method])
    narrow = build_method(config).quantize(w, scheme, stats, site="s")
    monkeypatch.setattr(hs, "WIDE_K", 128)  # this K = 128 site counts as wide
    assert hs.work_dtype(128) == torch.float32 and hs.mean_hessian(h0, 10).dtype == torch.float32
    assert config.fixed_bytes(300, 128) == int(config.hessian_copies * 4 * 128 * 128) + 2 * 300 * 128
    wide = build_method(config).quantize(w, scheme, stats, site="s")
    np.testing.assert_array_equal(stats.hessian, h0)  # the sum is never modified
    assert wide.metrics["proxy_loss"] == pytest.approx(narrow.metrics["proxy_loss"], rel=0.02)
    assert np.mean(wide.codes == narrow.codes) > 0.95


@pytest.mark.parametrize("method", sorted(FAST))
def test_a_strided_half_precision_view_rounds_like_its_float32_copy(correlated_hessian, method):
    """The pipeline hands over ``[K, N]``-stored weights as transposed views (of a memory map), in their own
    dtype: read a chunk at a time, they give the bytes of a contiguous float32 copy."""
    w, stats = _site(correlated_hessian)
    stored = np.ascontiguousarray(w.T.astype(np.float16))  # [K, N] as in an exported MatMul
    view = stored.T
    assert not view.flags.c_contiguous and view.dtype == np.float16
    config = method_config(method, FAST[method])
    copy = build_method(config).quantize(
        view.astype(np.float32), QuantScheme.parse("w4-g32"), stats, site="s"
    )
    memory = config.fixed_bytes(300, 128) + int(config.row_bytes * 128 * 64)
    read = build_method(config).quantize(view, QuantScheme.parse("w4-g32"), stats, site="s", memory=memory)
    np.testing.assert_array_equal(read.codes, copy.codes)
    np.testing.assert_array_equal(read.scales, copy.scales)


def test_a_non_finite_weight_is_a_one_line_error_naming_the_site(correlated_hessian):
    from optimum.adaround.graph_passes.errors import UserError

    w, stats = _site(correlated_hessian)
    w[200, 3] = np.nan  # in the last of the 64-row chunks
    config = method_config("gptq")
    with pytest.raises(UserError, match=r"^site model\.layers\.0\.mlp\.up_proj: weight") as e:
        build_method(config).quantize(
            w,
            QuantScheme.parse("w4-g32"),
            stats,
            site="model.layers.0.mlp.up_proj",
            memory=config.fixed_bytes(300, 128) + 1,
        )
    assert "\n" not in str(e.value)
