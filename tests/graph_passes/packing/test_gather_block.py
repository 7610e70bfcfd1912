"""GatherBlockQuantized packer: onnxruntime's quantized gather equals a float Gather of the dequantized table."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packing_helpers import assert_same_record, exact_session, int_schemes, model_of, random_qweight

from optimum.adaround.graph_passes.packing.gather_block import GatherBlockQuantizedPacker
from optimum.adaround.graph_passes.packing.matmulnbits import MatMulNBitsPacker
from optimum.adaround.graph_passes.records import WeightSite
from optimum.adaround.graph_passes.scheme import PER_CHANNEL, QuantScheme

VOCAB = 50


def _float_gather(table: np.ndarray) -> ir.Model:
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "S"]))
    t = ir.Tensor(table, name="E")
    e = ir.Value(name="E", type=ir.TensorType(t.dtype), shape=ir.Shape(t.shape), const_value=t)
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT))
    g = ir.Graph(
        [ids], [y], nodes=[ir.node("Gather", [e, ids], outputs=[y])], initializers=[e], opset_imports={"": 21}
    )
    return ir.Model(g, ir_version=10)


def _quantized_gather(packed) -> ir.Model:
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "S"]))
    return model_of([ids], GatherBlockQuantizedPacker().build(ids, packed, "embed"))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_matches_float_gather(bits, group, sym, scale_dtype):
    rng = np.random.default_rng(bits + group)
    hidden = 576 if group == 128 else 2 * group + 8  # short last block
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype)
    qw = random_qweight(rng, scheme, VOCAB, hidden)
    ids = rng.integers(0, VOCAB, (2, 7)).astype(np.int64)
    ids[0, 0] = VOCAB - 1
    (want,) = exact_session(_float_gather(qw.dequantize())).run(None, {"ids": ids})
    (got,) = exact_session(_quantized_gather(GatherBlockQuantizedPacker().pack(qw))).run(None, {"ids": ids})
    assert got.shape == (2, 7, hidden)
    np.testing.assert_array_equal(got, want)  # a gather does no arithmetic beyond (q - z) * s


def test_tied_embedding_and_head_share_one_quantization():
    """One QuantizedWeight of E[vocab, hidden] feeds both the Gather and the lm_head MatMulNBits."""
    rng = np.random.default_rng(7)
    scheme = QuantScheme(bits=4, group_size=64, symmetric=True)
    qw = random_qweight(rng, scheme, VOCAB, 192)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, "S"]))
    emb = GatherBlockQuantizedPacker().build(ids, GatherBlockQuantizedPacker().pack(qw), "embed")
    site = WeightSite(
        "lm_head",
        "lm_head/MatMul",
        "MatMul",
        "E",
        192,
        VOCAB,
        True,
        emb.output.name,
        kind="lm_head",
        tied=True,
    )
    head = MatMulNBitsPacker().build(site, emb.output, MatMulNBitsPacker().pack(qw), None, "lm_head")
    head.output.name = "logits"
    g = ir.Graph(
        [ids],
        [head.output],
        nodes=[*emb.nodes, *head.nodes],
        initializers=[*emb.initializers, *head.initializers],
        opset_imports={"": 21, "com.microsoft": 1},
    )
    tokens = np.array([[3, 0, 49, 3]], np.int64)
    (logits,) = exact_session(ir.Model(g, ir_version=10)).run(None, {"ids": tokens})
    w = qw.dequantize().astype(np.float64)
    want = w[tokens[0]] @ w.T
    assert np.max(np.abs(logits[0] - want)) <= 1e-5 * np.max(np.abs(want))


def test_unsupported():
    p = GatherBlockQuantizedPacker()
    assert "bits 2/4/8" in p.supports(QuantScheme(bits=3, group_size=32), 64, 10)
    assert "per-channel" in p.supports(QuantScheme(bits=4, group_size=PER_CHANNEL), 64, 10)
    assert "whole bytes" in p.supports(QuantScheme(bits=4, group_size=32), 65, 10)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    half_k=st.integers(8, 350),
    scheme=int_schemes((2, 4, 8), (16, 32, 64, 128, 256)),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(n, half_k, scheme, seed):
    k = 4 * half_k if scheme.bits == 2 else 2 * half_k
    qw = random_qweight(np.random.default_rng(seed), scheme, n, k)
    p = GatherBlockQuantizedPacker()
    assert_same_record(p.unpack(p.pack(qw), scheme, k, n), qw)
