"""Grid math: scales/zero points, rounding conventions (ours and onnxruntime's), padding, float16 scales."""

from __future__ import annotations

import numpy as np
import pytest

from optimum.adaround.graph_passes.errors import UserError
from optimum.adaround.graph_passes.records import QuantizedWeight
from optimum.adaround.graph_passes.rounding.grid import (
    blockwise_minmax,
    check_finite,
    codes_from_weight,
    dequantize_blocks,
    grid_params,
    ort_codes,
    ort_grid_params,
    pad_blocks,
    quantize_blocks,
    round_scales,
)
from optimum.adaround.graph_passes.scheme import PER_CHANNEL, QuantScheme


def test_pad_blocks_repeats_the_edge():
    w = np.arange(10, dtype=np.float32).reshape(1, 10)
    b = pad_blocks(w, 4)
    assert b.shape == (1, 3, 4)
    assert b[0, 2].tolist() == [8, 9, 9, 9]
    lo, hi = blockwise_minmax(w, QuantScheme(bits=4, group_size=16))
    assert (lo[0, 0], hi[0, 0]) == (0, 9)


def test_symmetric_grid():
    s4 = QuantScheme(bits=4, group_size=PER_CHANNEL)
    w = np.array([[-2.0, -1.0, 0.0, 0.5, 2.0], [-0.5, 0.25, 0.0, 1.0, 0.0]], np.float32)
    scales, zp = grid_params(*blockwise_minmax(w, s4), s4)
    # The scale keeps the sign of the extreme (row 1: +1.0, so s < 0); a tie max == -min (row 0) is positive.
    assert zp is None and scales[:, 0].tolist() == [0.25, -0.125]
    codes = codes_from_weight(w, scales, zp, s4)
    assert codes[0].tolist() == [0, 4, 8, 10, 15]  # -absmax exact at code 0, +absmax clamps to 15
    assert codes[1].tolist() == [12, 6, 8, 0, 8]  # the extreme +1.0 lands exactly on code 0
    assert np.array_equal(QuantizedWeight(codes, scales, zp, s4).dequantize()[1], w[1])


def test_asymmetric_grid_includes_zero():
    s = QuantScheme(bits=2, group_size=PER_CHANNEL, symmetric=False)
    w = np.array([[1.0, 2.0, 3.0], [-3.0, 0.0, 3.0]], np.float32)
    scales, zp = grid_params(*blockwise_minmax(w, s), s)
    assert scales[:, 0].tolist() == [1.0, 2.0]  # range widened to include 0: [0, 3] and [-3, 3]
    assert zp[:, 0].tolist() == [0, 2]  # round(1.5) = 2, ties to even
    assert codes_from_weight(w, scales, zp, s).tolist() == [[1, 2, 3], [0, 2, 3]]


def test_clip_per_block_array():
    s = QuantScheme(bits=4, group_size=16)
    lo = np.array([[-1.0, -1.0]], np.float32)
    hi = np.array([[1.0, 1.0]], np.float32)
    scales, _ = grid_params(lo, hi, s, clip=np.array([[1.0, 0.5]], np.float32))
    assert scales.tolist() == [[0.125, 0.0625]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_block_is_exact(symmetric):
    s = QuantScheme(bits=3, group_size=16, symmetric=symmetric)
    w = np.zeros((2, 20), np.float32)
    scales, zp = grid_params(*blockwise_minmax(w, s), s)
    assert (scales == 0).all()
    codes = codes_from_weight(w, scales, zp, s)
    qw = QuantizedWeight(codes, scales, zp, s)
    assert np.array_equal(qw.dequantize(), w)


def test_ties_round_to_even_ours_and_half_up_ort():
    s = QuantScheme(bits=4, group_size=PER_CHANNEL)
    scales = np.array([[0.25]], np.float32)  # a power of two: w / s and w * (1/s) are both exact
    w = np.array([[0.625, -0.625, 0.375, -0.375]], np.float32)  # +-2.5, +-1.5 steps
    assert codes_from_weight(w, scales, None, s).tolist() == [[10, 6, 10, 6]]
    # onnxruntime adds z before roundf, so every tie sits at a positive number and rounds up
    assert ort_codes(w, scales, None, s).tolist() == [[11, 6, 10, 7]]


def test_ort_symmetric_scale_keeps_the_sign_of_the_extreme():
    s = QuantScheme(bits=4, group_size=PER_CHANNEL)
    w = np.array([[-1.0, 2.0], [-2.0, 1.0]], np.float32)
    scales, zp = ort_grid_params(*blockwise_minmax(w, s), s)
    assert zp is None and scales[:, 0].tolist() == [-0.25, 0.25]
    codes = ort_codes(w, scales, None, s)
    assert codes.tolist() == [[12, 0], [0, 12]]  # the extreme lands on code 0 either way
    qw = QuantizedWeight(codes, scales, None, s)
    assert np.array_equal(qw.dequantize(), w)


def test_float16_scales():
    s16 = QuantScheme(bits=4, group_size=16, scale_dtype="float16")
    x = np.array([0.1, 1e-3, 7e5], np.float32)
    r = round_scales(x, s16)
    assert r.dtype == np.float32
    assert r.tolist() == [float(np.float16(0.1)), float(np.float16(1e-3)), 65504.0]  # saturates, no inf
    assert np.array_equal(round_scales(x, QuantScheme(bits=4, group_size=16)), x)
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    scales, _ = grid_params(*blockwise_minmax(w, s16), s16)
    assert np.array_equal(scales.astype(np.float16).astype(np.float32), scales)


def test_block_helpers_match_the_record():
    rng = np.random.default_rng(1)
    s = QuantScheme(bits=3, group_size=16, symmetric=False)
    w = rng.standard_normal((5, 40)).astype(np.float32)
    scales, zp = grid_params(*blockwise_minmax(w, s), s)
    q = quantize_blocks(pad_blocks(w, 16), scales, zp, s)
    qw = QuantizedWeight(q.reshape(5, -1)[:, :40].astype(np.uint8), scales, zp, s)
    deq = dequantize_blocks(q, scales, zp, s).reshape(5, -1)[:, :40]
    assert np.array_equal(deq, qw.dequantize())


def test_check_finite_names_the_entry():
    w = np.zeros((3, 4), np.float32)
    check_finite(w)
    w[1, 2] = np.nan
    with pytest.raises(UserError, match=r"\[1, 2\]"):
        check_finite(w)
