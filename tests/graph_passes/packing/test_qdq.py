"""QDQ packer: DequantizeLinear (opset 21) + MatMul/Gemm in onnxruntime equals QuantizedWeight.dequantize."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packing_helpers import (
    assert_same_record,
    check_in_onnxruntime,
    int_schemes,
    one_site_model,
    random_qweight,
    replace_site,
)

from optimum.adaround.graph_passes.errors import UnsupportedSchemeError
from optimum.adaround.graph_passes.packing.base import PackedWeight, get_packer, read_stored_weight
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
    model = check_in_onnxruntime(QDQPacker(emulate_low_bits=emulate), qw, kind, rng)
    ops = [n.op_type for n in model.graph]
    assert ops[-2:] == ["DequantizeLinear", "Gemm" if kind == "gemm" else "MatMul"]
    assert ("Cast" in ops) == (scale_dtype == "float16")


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
    scheme=int_schemes((2, 3, 4, 5, 8), (16, 32, 64, 128, 256, PER_CHANNEL), ("float32", "float16"), "qdq"),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(n, k, scheme, seed):
    qw = random_qweight(np.random.default_rng(seed), scheme, n, k)
    packer = QDQPacker(emulate_low_bits=True)
    assert_same_record(packer.unpack(packer.pack(qw), scheme, k, n), qw)


@pytest.mark.parametrize(
    ("qdtype", "with_zp", "symmetric"),
    [
        (ml_dtypes.int4, True, False),
        (np.int8, True, False),
        (ml_dtypes.uint4, False, False),
        (np.uint8, False, False),
    ],
)
def test_unpack_takes_other_tools_layouts(qdtype, with_zp, symmetric):
    """Signed codes with zero points and unsigned codes without them (other quantizers' DQ weights):
    ``unpack`` gives the record of exactly ``(q - zp) * scale``."""
    rng = np.random.default_rng(2)
    k, n, block = 80, 6, 32
    info = ml_dtypes.iinfo(qdtype) if qdtype in (ml_dtypes.int4, ml_dtypes.uint4) else np.iinfo(qdtype)
    q = rng.integers(info.min, info.max + 1, (k, n))
    zp = rng.integers(info.min, info.max + 1, (3, n)) if with_zp else np.zeros((3, n), np.int64)
    scales = rng.uniform(0.01, 0.02, (3, n)).astype(np.float32)
    tensors = {"q": q.astype(qdtype), "scales": scales}
    if with_zp:
        tensors["zero_points"] = zp.astype(qdtype)
    bits = 4 if qdtype in (ml_dtypes.int4, ml_dtypes.uint4) else 8
    scheme = QuantScheme(bits=bits, group_size=block, symmetric=symmetric, format="qdq")
    qw = QDQPacker().unpack(PackedWeight(tensors, {}), scheme, k, n)
    want = (q - np.repeat(zp, block, axis=0)[:k]) * np.repeat(scales, block, axis=0)[:k]
    np.testing.assert_array_equal(qw.dequantize(), want.T.astype(np.float32))
    with pytest.raises(UnsupportedSchemeError, match="does not match the scheme, which is symmetric"):
        QDQPacker().unpack(PackedWeight(tensors, {}), dataclasses.replace(scheme, symmetric=True), k, n)


def test_read_leaves_other_layouts_alone():
    """A DQ weight that is not ``[K, N]`` with blocks along K (or one scale per channel) is not read."""
    rng = np.random.default_rng(4)
    k, n = 64, 8
    m = one_site_model("matmul", np.zeros((n, k), np.float32))
    packer = QDQPacker()
    qw = random_qweight(rng, QuantScheme(bits=4, group_size=32, format="qdq"), n, k)
    model = replace_site(m, packer, packer.pack(qw))
    dq = next(node for node in model.graph if node.op_type == "DequantizeLinear")
    assert read_stored_weight(dq) is not None
    dq.attributes["axis"] = ir.AttrInt64("axis", 1)  # blocks along N
    assert read_stored_weight(dq) is None
    assert read_stored_weight(next(node for node in model.graph if node.op_type == "MatMul")) is None
