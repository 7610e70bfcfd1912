"""Packer plumbing: bit packing, registry, scale storage checks, float16 graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packing_helpers import exact_session, model_of, random_qweight

from optimum.adaround.graph_passes.errors import InternalError, UnsupportedSchemeError
from optimum.adaround.graph_passes.packing.base import (
    PACKERS,
    activation_dtype,
    get_packer,
    pack_lsb,
    stored_scales,
    unpack_lsb,
)
from optimum.adaround.graph_passes.records import WeightSite
from optimum.adaround.graph_passes.scheme import QuantScheme, WeightFormat


def test_pack_lsb_layout():
    assert pack_lsb(np.array([1, 2, 3], np.uint8), 4).tolist() == [0x21, 0x03]
    assert pack_lsb(np.array([1, 2, 3, 0, 1], np.uint8), 2).tolist() == [0b00111001, 0b01]
    # 3 bits run across byte boundaries: 5 | 7 << 3 | 1 << 6 (low two bits of 6) ...
    assert pack_lsb(np.array([5, 7, 6], np.uint8), 3).tolist() == [5 | 7 << 3 | (6 & 3) << 6, 6 >> 2]


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), length=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_pack_unpack_lsb_round_trip(bits, rows, length, seed):
    v = np.random.default_rng(seed).integers(0, 1 << bits, (rows, length)).astype(np.uint8)
    p = pack_lsb(v, bits)
    assert p.shape == (rows, (length * bits + 7) // 8)
    assert np.array_equal(unpack_lsb(p, bits, length), v)


def test_registry_has_the_exact_formats():
    get_packer("qdq")  # loads the built-in packer modules
    assert {WeightFormat.MATMULNBITS, WeightFormat.QDQ} <= set(PACKERS)
    for fmt, cls in PACKERS.items():
        assert cls.format is fmt
    with pytest.raises(UnsupportedSchemeError, match="unknown weight format 'gguf'"):
        get_packer("gguf")


def test_lossy_float16_scales_are_refused():
    scheme = QuantScheme(bits=4, group_size=32, scale_dtype="float16")
    qw = random_qweight(np.random.default_rng(0), scheme, 4, 64)
    assert stored_scales(qw).dtype == np.float16
    qw.scales = qw.scales + np.float32(1e-7)  # no longer representable in float16
    with pytest.raises(InternalError, match="not representable"):
        get_packer("matmulnbits").pack(qw)


def test_activation_dtype():
    assert activation_dtype(ir.Value(name="x")) == ir.DataType.FLOAT
    with pytest.raises(UnsupportedSchemeError, match="INT64"):
        activation_dtype(ir.Value(name="x", type=ir.TensorType(ir.DataType.INT64)))


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_float16_graph(fmt, scale_dtype):
    """A float16 model gets float16 scales (the kernels compute in float16: compared at fp16 precision)."""
    rng = np.random.default_rng(1)
    k, n = 96, 16
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False, scale_dtype=scale_dtype, format=fmt)
    qw = random_qweight(rng, scheme, n, k)
    packer = get_packer(fmt)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape(["M", k]))
    site = WeightSite("lin", "lin/MatMul", "MatMul", "W", k, n, False, "x")
    rep = packer.build(site, x, packer.pack(qw), None, "lin")
    assert rep.output.dtype == ir.DataType.FLOAT16
    xs = (rng.standard_normal((3, k)) * 0.5).astype(np.float16)
    (y,) = exact_session(model_of([x], rep)).run(None, {"x": xs})
    assert y.dtype == np.float16
    ref = xs.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    assert np.max(np.abs(y - ref)) <= 5e-3 * np.max(np.abs(ref))
