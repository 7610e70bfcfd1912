"""Token embedding tables -> GatherBlockQuantized: which tables qualify, and the lookup onnxruntime runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from optimum.adaround.graph_passes.embeddings import embedding_scheme, quantize_embeddings, token_embeddings
from optimum.adaround.graph_passes.rounding.rtn import RTN, RTNConfig
from optimum.adaround.graph_passes.scheme import QuantScheme

RNG = np.random.default_rng(3)
V, K, N = 300, 96, 40


def _model(ids_name: str = "input_ids", tied: bool = False, dtype=np.float32) -> tuple[ir.Model, np.ndarray]:
    """Gather(E, ids) -> MatMul(W) -> logits; ``tied``: the MatMul reads Transpose(E) instead of W."""
    e = RNG.standard_normal((V, K)).astype(dtype)
    w = RNG.standard_normal((K, N)).astype(dtype)
    elem = onnx.TensorProto.FLOAT if dtype == np.float32 else onnx.TensorProto.FLOAT16
    nodes = [helper.make_node("Gather", ["E", ids_name], ["h"], name="/model/embed_tokens/Gather")]
    if tied:
        nodes += [
            helper.make_node("Transpose", ["E"], ["Et"], name="T", perm=[1, 0]),
            helper.make_node("MatMul", ["h", "Et"], ["logits"], name="/lm_head/MatMul"),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["h", "W"], ["logits"], name="/lm_head/MatMul"))
    inits = [numpy_helper.from_array(e, "E")] + ([] if tied else [numpy_helper.from_array(w, "W")])
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(ids_name, onnx.TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", elem, None), helper.make_tensor_value_info("h", elem, None)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return ir.serde.deserialize_model(proto), e


def _lookup(model: ir.Model, ids: np.ndarray, ids_name: str = "input_ids") -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["h"], {ids_name: ids})[0]


@pytest.mark.parametrize(("bits", "dtype"), [(8, np.float32), (4, np.float32), (8, np.float16)])
def test_separate_table_becomes_gather_block_quantized(bits, dtype):
    model, e = _model(dtype=dtype)
    done = quantize_embeddings(model, bits, QuantScheme.parse("w4-g32"))
    assert [n.op_type for n in model.graph] == ["GatherBlockQuantized", "MatMul"]
    assert "E" not in model.graph.initializers
    (rec,) = done
    assert rec["table"] == "E" and rec["bits"] == bits and rec["block_size"] == 32
    assert rec["packed_bytes"] <= rec["float_bytes"] * (bits + 32 / 32) / (
        8 * e.itemsize
    )  # codes + fp32 scales
    ids = RNG.integers(0, V, (2, 7))
    h = _lookup(model, ids)
    assert h.dtype == dtype  # a float16 table gets float16 scales and output
    qw = RTN(RTNConfig()).quantize(e.astype(np.float32), embedding_scheme(bits, QuantScheme.parse("w4-g32")))
    np.testing.assert_allclose(h.astype(np.float32), qw.dequantize()[ids], rtol=1e-3, atol=1e-3)
    # 8 bits: the lookup is within half a step of the float rows
    if bits == 8:
        step = np.abs(e.astype(np.float32)).max() / 127
        assert np.abs(h.astype(np.float32) - e.astype(np.float32)[ids]).max() <= 0.5 * step + 1e-3


def test_tables_that_do_not_qualify_stay_float():
    tied, _ = _model(tied=True)  # also the float weight of the output projection: quantizing adds bytes
    assert token_embeddings(tied.graph) == []
    positions, _ = _model(ids_name="position_ids")  # not a token lookup
    assert quantize_embeddings(positions, 8, QuantScheme()) == []
    assert "E" in positions.graph.initializers


def test_block_follows_the_run_within_the_lookup_limits():
    assert embedding_scheme(8, QuantScheme.parse("w4-g64")).group_size == 64
    assert embedding_scheme(8, QuantScheme.parse("w4-pc")).group_size == 128
    assert embedding_scheme(4, QuantScheme.parse("w3-g512")).group_size == 128
