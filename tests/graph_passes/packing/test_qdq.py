"""QDQ packer: DequantizeLinear (opset 21) + MatMul/Gemm in onnxruntime equals QuantizedWeight.dequantize."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packing_helpers import (
    assert_close,
    exact_session,
    one_site_model,
    random_qweight,
    reference,
    replace_site,
)

from optimum.adaround.graph_passes.errors import UnsupportedSchemeError
from optimum.adaround.graph_passes.packing.base import get_packer
from optimum.adaround.graph_passes.packing.qdq import QDQPacker
from optimum.adaround.graph_passes.scheme import PER_CHANNEL, QuantScheme

N = 24


def _cases() -> list[tuple]:
    """(bits, group, symmetric, scale_dtype, K, site kind, emulate_low_bits)."""
    cases = []
    for bits in (4, 8):
        for g in (16, 32, 64, 128, 256, PER_CHANNEL):
            for sym in (True, False):
                for sd in ("float32", "float16"):
                    k = 576 if g in (128, PER_CHANNEL) else 2 * g + g // 2 + 3
                    cases.append((bits, g, sym, sd, k, "matmul", False))
        for sym in (True, False):
            cases.append((bits, 64, sym, "float32", 128, "matmul", False))  # K a multiple of the block
            cases.append((bits, 32, sym, "float32", 100, "gemm", False))
            cases.append((bits, 64, sym, "float16", 130, "transpose", False))
    for bits in (2, 3, 5, 6, 7):  # emulated in int4/uint4 (2, 3) or int8/uint8 (5..7) containers
        for sym in (True, False):
            cases.append((bits, 32, sym, "float32", 96, "matmul", True))
    return cases


@pytest.mark.parametrize(("bits", "group", "sym", "scale_dtype", "k", "kind", "emulate"), _cases())
def test_matches_dequantize_in_onnxruntime(bits, group, sym, scale_dtype, k, kind, emulate):
    rng = np.random.default_rng(bits * 1000 + k)
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype, format="qdq")
    qw = random_qweight(rng, scheme, N, k)
    bias = rng.standard_normal(N).astype(np.float32) if kind == "gemm" else None
    m = one_site_model(kind, rng.standard_normal((N, k)).astype(np.float32), bias)
    packer = QDQPacker(emulate_low_bits=emulate)
    sess = exact_session(replace_site(m, packer, packer.pack(qw)))
    ops = [n.op_type for n in m.model.graph]
    assert ops[-2:] == ["DequantizeLinear", "Gemm" if kind == "gemm" else "MatMul"]
    assert ("Cast" in ops) == (scale_dtype == "float16")
    for mrows in (1, 5):
        x = rng.standard_normal((mrows, k)).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        assert_close(y, reference(x, qw, bias))


def test_stored_types_and_orientation():
    rng = np.random.default_rng(0)
    packer = QDQPacker()
    sym = random_qweight(rng, QuantScheme(bits=4, group_size=32, format="qdq"), 8, 70)
    p = packer.pack(sym)
    assert p.tensors["q"].dtype == ml_dtypes.int4 and p.tensors["q"].shape == (70, 8)
    assert p.tensors["scales"].shape == (3, 8) and "zero_points" not in p.tensors
    assert p.attributes == {"axis": 0, "block_size": 32}
    np.testing.assert_array_equal(p.tensors["q"].astype(np.int16).T, sym.codes.astype(np.int16) - 8)
    asym = random_qweight(
        rng, QuantScheme(bits=8, group_size=PER_CHANNEL, symmetric=False, format="qdq"), 8, 70
    )
    p = packer.pack(asym)
    assert p.tensors["q"].dtype == np.uint8 and p.tensors["zero_points"].shape == (8,)
    assert p.tensors["scales"].shape == (8,) and p.attributes == {"axis": 1}


def test_low_bits_need_the_explicit_option():
    scheme = QuantScheme(bits=3, group_size=32, format="qdq")
    reason = QDQPacker().supports(scheme, 64, 8)
    assert reason is not None and "emulate_low_bits" in reason
    with pytest.raises(UnsupportedSchemeError, match="4- and 8-bit"):
        get_packer("qdq").pack(random_qweight(np.random.default_rng(0), scheme, 8, 64))
    assert get_packer("qdq", emulate_low_bits=True).supports(scheme, 64, 8) is None


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(16, 700),
    bits=st.sampled_from([2, 3, 4, 5, 8]),
    group=st.sampled_from([16, 32, 64, 128, 256, PER_CHANNEL]),
    sym=st.booleans(),
    scale_dtype=st.sampled_from(["float32", "float16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(n, k, bits, group, sym, scale_dtype, seed):
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype, format="qdq")
    qw = random_qweight(np.random.default_rng(seed), scheme, n, k)
    packer = QDQPacker(emulate_low_bits=True)
    back = packer.unpack(packer.pack(qw), scheme, k, n)
    assert back.codes.tobytes() == qw.codes.tobytes()
    assert back.scales.tobytes() == qw.scales.tobytes()
    if not sym:
        assert back.zero_points.tobytes() == qw.zero_points.tobytes()
