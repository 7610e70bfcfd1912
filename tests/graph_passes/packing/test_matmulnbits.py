"""MatMulNBits packer: exact against onnxruntime's CPU kernel, byte-exact pack/unpack round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packing_helpers import (
    assert_close,
    assert_same_record,
    check_in_onnxruntime,
    exact_session,
    int_schemes,
    one_site_model,
    random_qweight,
    reference,
    replace_site,
)

from optimum.adaround.graph_passes.errors import UnsupportedSchemeError
from optimum.adaround.graph_passes.packing.base import get_packer
from optimum.adaround.graph_passes.packing.matmulnbits import MatMulNBitsPacker
from optimum.adaround.graph_passes.scheme import PER_CHANNEL, QuantScheme, WeightFormat

N = 24
BLOCKS = (16, 32, 64, 128, 256)


def _cases() -> list[tuple]:
    """(bits, group, symmetric, scale_dtype, K, site kind): the full bits x block x symmetry x scale dtype
    cross with a K that is *not* a multiple of the block (576 with 128 as in SmolLM2), then K a multiple
    of the block, per-channel, and the Gemm / Transpose-fed sites over bits x symmetry."""
    cases = []
    for bits in (2, 4, 8):
        for g in BLOCKS:
            for sym in (True, False):
                for sd in ("float32", "float16"):
                    k = 576 if g == 128 else 2 * g + g // 2 + 3
                    cases.append((bits, g, sym, sd, k, "matmul"))
        for g in (16, 256):
            cases.append((bits, g, bits != 4, "float32", 2 * g, "matmul"))
        for sym in (True, False):
            cases.append((bits, PER_CHANNEL, sym, "float32", 64, "matmul"))
            cases.append((bits, 32, sym, "float32", 100, "gemm"))
            cases.append((bits, 64, sym, "float16", 130, "transpose"))
    return cases


@pytest.mark.parametrize(("bits", "group", "sym", "scale_dtype", "k", "kind"), _cases())
def test_matches_dequantize_in_onnxruntime(bits, group, sym, scale_dtype, k, kind):
    rng = np.random.default_rng(bits * 1000 + k)
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype)
    qw = random_qweight(rng, scheme, N, k)
    packer = MatMulNBitsPacker()
    assert packer.supports(scheme, k, N) is None
    model = check_in_onnxruntime(packer, qw, kind, rng)
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]


def test_packed_layout_by_hand():
    """4-bit, K=20, block 16: element 2i in the low nibble; the tail of block 2 padded with its zero point."""
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False)
    codes = np.arange(40, dtype=np.uint8).reshape(2, 20) % 16
    zp = np.array([[3, 9], [10, 1]], np.uint8)
    qw = random_qweight(np.random.default_rng(0), scheme, 2, 20)
    qw.codes, qw.zero_points = codes, zp
    p = MatMulNBitsPacker().pack(qw)
    b = p.tensors["B"]
    assert b.shape == (2, 2, 8)
    assert b[0, 0, 0] == (codes[0, 0] | codes[0, 1] << 4)
    assert b[0, 1, 1] == (codes[0, 18] | codes[0, 19] << 4)
    assert b[0, 1, 2] == (9 | 9 << 4)  # padding = zero point of the last block
    assert p.tensors["zero_points"].tolist() == [[3 | 9 << 4], [10 | 1 << 4]]
    assert p.tensors["scales"].shape == (4,)
    assert p.attributes == {"K": 20, "N": 2, "bits": 4, "block_size": 16, "accuracy_level": 0}


def test_gemm_bias_goes_into_bias_input():
    rng = np.random.default_rng(3)
    scheme = QuantScheme(bits=4, group_size=32)
    qw = random_qweight(rng, scheme, N, 64)
    m = one_site_model("gemm", np.zeros((N, 64), np.float32), np.ones(N, np.float32))
    packer = MatMulNBitsPacker(accuracy_level=4)
    replace_site(m, packer, packer.pack(qw))
    (node,) = list(m.model.graph)
    assert len(node.inputs) == 6 and node.inputs[5].name == "bias" and node.inputs[3] is None
    assert node.attributes["accuracy_level"].value == 4


@pytest.mark.parametrize(
    ("scheme", "k", "needle"),
    [
        (QuantScheme(bits=3, group_size=64), 128, "bits 2/4/8"),
        (QuantScheme(bits=4, group_size=512), 1024, "block sizes"),
        (QuantScheme(bits=4, group_size=PER_CHANNEL), 576, "per-channel"),
    ],
)
def test_unsupported_schemes_give_reasons(scheme, k, needle):
    packer = MatMulNBitsPacker()
    reason = packer.supports(scheme, k, 8)
    assert reason is not None and needle in reason
    qw = random_qweight(np.random.default_rng(0), scheme, 8, k)
    with pytest.raises(UnsupportedSchemeError, match=needle):
        packer.pack(qw)


def test_registry():
    assert isinstance(get_packer("matmulnbits", accuracy_level=4), MatMulNBitsPacker)
    assert get_packer(WeightFormat.MATMULNBITS).accuracy_level == 0
    with pytest.raises(UnsupportedSchemeError, match="unknown weight format"):
        get_packer("int3")
    with pytest.raises(UnsupportedSchemeError, match="accuracy_level"):
        get_packer("matmulnbits", accuracy_level=7)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(16, 700),
    scheme=int_schemes((2, 4, 8), BLOCKS, ("float32", "float16")),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(n, k, scheme, seed):
    qw = random_qweight(np.random.default_rng(seed), scheme, n, k)
    packer = MatMulNBitsPacker()
    assert_same_record(packer.unpack(packer.pack(qw), scheme, k, n), qw)


@pytest.mark.parametrize("sym", [True, False])
def test_ort_padding_changes_only_the_tail_bytes(sym):
    """Code-0 padding (onnxruntime's bytes) and zero-point padding give the same kernel output."""
    rng = np.random.default_rng(11)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=sym)
    qw = random_qweight(rng, scheme, N, 70)  # last block holds 6 of 32
    x = rng.standard_normal((3, 70)).astype(np.float32)
    ys = []
    for ort_padding in (False, True):
        packer = MatMulNBitsPacker(ort_padding=ort_padding)
        packed = packer.pack(qw)
        assert packer.unpack(packed, scheme, 70, N).codes.tobytes() == qw.codes.tobytes()
        tail = packed.tensors["B"][:, -1, 3:]
        assert (tail == 0).all() if ort_padding else (tail != 0).all()
        m = one_site_model("matmul", np.zeros((N, 70), np.float32))
        ys.append(exact_session(replace_site(m, packer, packed)).run(None, {"x": x})[0])
    np.testing.assert_array_equal(ys[0], ys[1])
    assert_close(ys[0], reference(x, qw, None))


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_3d_activations_and_2d_gemm_bias(fmt):
    """LLM activations are [batch, seq, K]; a Gemm bias of shape [1, N] goes through an Add."""
    import onnx_ir as ir

    from optimum.adaround.graph_passes.records import WeightSite

    rng = np.random.default_rng(5)
    k = 80
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False, format=fmt)
    qw = random_qweight(rng, scheme, N, k)
    packer = get_packer(fmt)
    packed = packer.pack(qw)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", k]))
    site = WeightSite("lin", "lin/MatMul", "MatMul", "W", k, N, False, "x")
    rep = packer.build(site, x, packed, None, "lin")
    assert list(rep.output.shape) == ["B", "S", N]
    bias = rng.standard_normal((1, N)).astype(np.float32)
    bt = ir.Tensor(bias, name="bias")
    bv = ir.Value(name="bias", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, N]), const_value=bt)
    x2 = ir.Value(name="x2", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["M", k]))
    gsite = WeightSite("gemm", "gemm/Gemm", "Gemm", "W2", k, N, True, "x2", bias_name="bias")
    rep2 = packer.build(gsite, x2, packer.pack(qw), bv, "gemm")
    rep.output.name, rep2.output.name = "y", "y2"
    g = ir.Graph(
        [x, x2],
        [rep.output, rep2.output],
        nodes=[*rep.nodes, *rep2.nodes],
        initializers=[*rep.initializers, *rep2.initializers, bv],
        opset_imports={"": 21, **rep.opset_imports},
    )
    xs = rng.standard_normal((2, 3, k)).astype(np.float32)
    x2s = rng.standard_normal((4, k)).astype(np.float32)
    y, y2 = exact_session(ir.Model(g, ir_version=10)).run(None, {"x": xs, "x2": x2s})
    assert y.shape == (2, 3, N)
    assert_close(y.reshape(6, N), reference(xs.reshape(6, k), qw, None))
    assert_close(y2, reference(x2s, qw, bias))
