"""lowbit packer: exact in onnxruntime (our custom ops) for int 2..8 bits and codebooks, pack/unpack round trips."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packing_helpers import assert_same_record, check_in_onnxruntime, random_qweight

from optimum.adaround import custom_ops
from optimum.adaround.custom_ops import CustomOpsNotBuiltError
from optimum.adaround.custom_ops import reference as ref
from optimum.adaround.graph_passes.errors import UnsupportedSchemeError
from optimum.adaround.graph_passes.packing.base import get_packer
from optimum.adaround.graph_passes.packing.lowbit import LowbitPacker
from optimum.adaround.graph_passes.records import QuantizedWeight
from optimum.adaround.graph_passes.scheme import PER_CHANNEL, DataType, QuantScheme, WeightFormat

N = 20

try:
    custom_ops.library_path()
    HAVE_LIB = True
except CustomOpsNotBuiltError:  # pragma: no cover
    HAVE_LIB = False
needs_lib = pytest.mark.skipif(not HAVE_LIB, reason="custom-op library not built")


def _session(model: ir.Model) -> ort.InferenceSession:
    so = custom_ops.session_options(intra_op_num_threads=1, log_severity_level=3)
    return ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"]
    )


def _codebook_qweight(rng, scheme: QuantScheme, n: int, k: int) -> QuantizedWeight:
    qw = random_qweight(
        rng, dataclasses.replace(scheme, data_type=DataType.INT, format=WeightFormat.LOWBIT), n, k
    )
    cb = {
        DataType.NF4: ref.NF4_CODEBOOK,
        DataType.FP4: ref.FP4_E2M1_CODEBOOK,
        DataType.CODEBOOK: np.sort(rng.standard_normal(1 << scheme.bits)).astype(np.float32),
    }[scheme.data_type]
    return QuantizedWeight(qw.codes, qw.scales, None, scheme, codebook=cb)


def _cases() -> list[tuple]:
    """(bits, group, symmetric, scale dtype, data type, K, site kind)."""
    cases = []
    for bits in range(2, 9):
        for g in (16, 64, 128, PER_CHANNEL):
            for sym in (True, False):
                k = 576 if g == 128 else (100 if g == PER_CHANNEL else 2 * g + 7)
                cases.append((bits, g, sym, "float32", "int", k, "matmul"))
    for dt, bits in (("nf4", 4), ("fp4", 4), ("codebook", 3), ("codebook", 4), ("codebook", 2)):
        for g in (32, PER_CHANNEL):
            cases.append((bits, g, True, "float16" if g == 32 else "float32", dt, 150, "matmul"))
    cases += [
        (3, 32, True, "float16", "int", 100, "gemm"),
        (3, 64, False, "float32", "int", 130, "transpose"),
        (4, 32, True, "float32", "nf4", 96, "gemm"),
    ]
    return cases


@needs_lib
@pytest.mark.parametrize(("bits", "group", "sym", "scale_dtype", "dtype", "k", "kind"), _cases())
def test_matches_dequantize_in_onnxruntime(bits, group, sym, scale_dtype, dtype, k, kind):
    rng = np.random.default_rng(bits * 1000 + k + (group % 97))
    scheme = QuantScheme(
        bits=bits,
        group_size=group,
        symmetric=sym,
        scale_dtype=scale_dtype,
        data_type=dtype,
        format=WeightFormat.LOWBIT,
    )
    qw = random_qweight(rng, scheme, N, k) if dtype == "int" else _codebook_qweight(rng, scheme, N, k)
    packer = LowbitPacker()
    assert packer.supports(scheme, k, N) is None
    model = check_in_onnxruntime(packer, qw, kind, rng, session=_session)
    op = "MatMulLowBit" if dtype == "int" else "MatMulCodebook"
    assert [n.op_type for n in model.graph] == [op]
    assert custom_ops.uses_custom_domain(ir.to_proto(model))


@pytest.mark.parametrize("dtype", ["int", "nf4", "codebook"])
def test_pack_unpack_round_trip(dtype):
    rng = np.random.default_rng(0)
    scheme = QuantScheme(
        bits=4 if dtype == "nf4" else 3,
        group_size=32,
        symmetric=dtype != "int",
        data_type=dtype,
        format="lowbit",
    )
    qw = random_qweight(rng, scheme, 7, 77) if dtype == "int" else _codebook_qweight(rng, scheme, 7, 77)
    packer = get_packer("lowbit")
    packed = packer.pack(qw)
    assert packed.tensors["B"].shape == (7, 3, 4 * scheme.bits)
    assert_same_record(packer.unpack(packed, scheme, 77, 7), qw)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([16, 32, 64, 256, PER_CHANNEL]),
    sym=st.booleans(),
    n=st.integers(1, 6),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**31),
)
def test_round_trip_property(bits, group, sym, n, k, seed):
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym, format="lowbit")
    qw = random_qweight(np.random.default_rng(seed), scheme, n, k)
    packer = LowbitPacker(accuracy_level=4)
    packed = packer.pack(qw)
    assert packed.attributes == {
        "K": k,
        "N": n,
        "bits": bits,
        "block_size": scheme.block_size(k),
        "accuracy_level": 4,
    }
    back = packer.unpack(packed, scheme, k, n)
    np.testing.assert_array_equal(back.dequantize(), qw.dequantize())


def test_rejections():
    packer = LowbitPacker()
    scheme = QuantScheme(bits=3, group_size=32, format="lowbit")
    assert packer.supports(scheme, 0, 4) is not None
    nf4_asym = QuantScheme(bits=4, group_size=32, symmetric=False, data_type="nf4", format="lowbit")
    assert "no zero points" in packer.supports(nf4_asym, 64, 4)
    with pytest.raises(UnsupportedSchemeError, match="accuracy_level=7"):
        LowbitPacker(accuracy_level=7)
    qw = random_qweight(np.random.default_rng(0), scheme, 4, 64)
    packed = packer.pack(qw)
    packed.tensors["B"] = packed.tensors["B"][:, :1]
    with pytest.raises(
        UnsupportedSchemeError, match=r"lowbit B has shape \(4, 1, 12\), expected \(4, 2, 12\)"
    ):
        packer.unpack(packed, scheme, 64, 4)
    asym = dataclasses.replace(scheme, symmetric=False)
    with pytest.raises(UnsupportedSchemeError, match="lacks zero points but the scheme is asymmetric"):
        packer.unpack(packer.pack(qw), asym, 64, 4)
