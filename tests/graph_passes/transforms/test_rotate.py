"""Residual-stream rotation: the rotated float graph computes the same function, or is left as it was."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from optimum.adaround.graph_passes.transforms.residual import find_residual_stream
from optimum.adaround.graph_passes.transforms.rotate import RotateResidualPass, orthogonal

VOCAB = 40


@pytest.mark.parametrize("d", [1, 7, 64, 96, 576])
def test_the_rotation_is_orthogonal(d):
    q = orthogonal(d, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-12)
    assert not np.allclose(q, orthogonal(d, seed=4)) or d == 1


def _norm_nodes(x: str, out: str, scale: str, style: str, eps: float) -> list:
    """An RMSNorm of ``x`` in one of the spellings exports use."""
    if style == "fused":
        # onnxruntime registers its fused RMSNorm in the ONNX domain
        return [helper.make_node("SimplifiedLayerNormalization", [x, scale], [out], axis=-1, epsilon=eps)]
    p = f"{out}_"
    inv = [helper.make_node("Div", [f"{p}one", f"{p}sqrt"], [f"{p}inv"])] if style == "div" else [
        helper.make_node("Reciprocal", [f"{p}sqrt"], [f"{p}inv"])]  # fmt: skip
    scaled = [helper.make_node("Mul", [scale, f"{p}n"], [out])]
    if style == "gemma":  # x * (1 + scale)
        scaled = [
            helper.make_node("Add", [scale, f"{p}one"], [f"{p}g"]),
            helper.make_node("Mul", [f"{p}n", f"{p}g"], [out]),
        ]
    return [
        helper.make_node("Constant", [], [f"{p}two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Constant", [], [f"{p}one"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
        helper.make_node("Constant", [], [f"{p}eps"], value=numpy_helper.from_array(np.array(eps, np.float32))),
        helper.make_node("Pow", [x, f"{p}two"], [f"{p}sq"]),
        helper.make_node("ReduceMean", [f"{p}sq"], [f"{p}ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", [f"{p}ms", f"{p}eps"], [f"{p}var"]),
        helper.make_node("Sqrt", [f"{p}var"], [f"{p}sqrt"]),
        *inv,
        helper.make_node("Mul", [x, f"{p}inv"], [f"{p}n"]),
        *scaled,
    ]  # fmt: skip


def _decoder(rng: np.random.Generator, d: int, layers: int, style: str, bias: bool, readers: int) -> ir.Model:
    """input_ids -> embedding -> layers of (RMSNorm -> readers -> Relu/Mul -> writer [+ bias] -> Add) ->
    RMSNorm -> output projection: the residual structure of a decoder, with random weights."""
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, d)).astype(np.float32), "embed")]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h0"])]

    def weight(name: str, shape: tuple[int, int]) -> str:
        inits.append(
            numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
        )
        return name

    def scale(name: str) -> str:
        inits.append(numpy_helper.from_array((1 + 0.5 * rng.standard_normal(d)).astype(np.float32), name))
        return name

    h = "h0"
    for i in range(layers):
        nodes += _norm_nodes(h, f"n{i}", scale(f"g{i}"), style, 1e-5)
        outs = []
        for j in range(readers):
            outs.append(f"r{i}_{j}")
            nodes.append(helper.make_node("MatMul", [f"n{i}", weight(f"wr{i}_{j}", (d, 2 * d))], [outs[-1]]))
        mixed = f"m{i}"
        nodes.append(helper.make_node("Relu", [outs[0]], [mixed]) if readers == 1 else
                     helper.make_node("Mul", outs[:2], [mixed]))  # fmt: skip
        nodes.append(helper.make_node("MatMul", [mixed, weight(f"ww{i}", (2 * d, d))], [f"w{i}"]))
        written = f"w{i}"
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [f"w{i}", f"b{i}"], [f"wb{i}"]))
            written = f"wb{i}"
        nodes.append(helper.make_node("Add", [h, written], [f"h{i + 1}"]))
        h = f"h{i + 1}"
    nodes += _norm_nodes(h, "nf", scale("gf"), style, 1e-5)
    nodes.append(helper.make_node("MatMul", ["nf", weight("head", (d, VOCAB))], ["logits"]))
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", VOCAB])
    proto = helper.make_model(helper.make_graph(nodes, "decoder", [ids], [out], inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)  # fmt: skip
    return ir.serde.deserialize_model(proto)


def _logits(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {"input_ids": ids})[0]


@settings(max_examples=25, deadline=None)
@given(
    d=st.sampled_from([8, 12, 16, 24, 32]),
    layers=st.integers(1, 3),
    style=st.sampled_from(["fused", "div", "reciprocal", "gemma"]),
    bias=st.booleans(),
    readers=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_rotated_random_decoders_compute_the_same_function(d, layers, style, bias, readers, seed):
    rng = np.random.default_rng(seed)
    model = _decoder(rng, d, layers, style, bias, readers)
    ids = rng.integers(0, VOCAB, (2, 5))
    want = _logits(model, ids)
    rotate = RotateResidualPass(seed=seed)
    assert rotate(model).modified
    assert rotate.record["applied"] and rotate.record["writers"] == layers
    assert rotate.record["readers"] == layers * readers + 1 and rotate.record["norms"] == layers + 1
    got = _logits(model, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # every norm's scale is now one: the scale lives in the layers it feeds
    stream = find_residual_stream(model)
    assert not isinstance(stream, str)
    for norm in stream.norms:
        node, index = norm.scale_user
        np.testing.assert_array_equal(node.inputs[index].const_value.numpy(), 1.0)


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        ("reader", "reads the residual stream"),
        ("head", "is not a linear layer"),
        ("output", "is a graph output"),
    ],
)
def test_a_graph_without_the_pattern_is_left_as_it_was(break_it, reason):
    rng = np.random.default_rng(0)
    proto = ir.serde.serialize_model(_decoder(rng, 16, 2, "div", False, 1))
    if break_it == "reader":  # something other than a norm or a residual Add reads the stream
        proto.graph.node.append(helper.make_node("Sigmoid", ["h1"], ["extra"]))
        proto.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    elif break_it == "head":  # the final norm feeds a non-linear op
        proto.graph.node.append(helper.make_node("Relu", ["nf"], ["extra"]))
        proto.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    else:  # the stream itself is an output (last hidden state)
        proto.graph.output.append(helper.make_tensor_value_info("h2", TensorProto.FLOAT, None))
    model = ir.serde.deserialize_model(proto)
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    rotate = RotateResidualPass()
    assert not rotate(model).modified
    assert not rotate.record["applied"] and reason in rotate.record["reason"]
    assert set(model.graph.initializers) == set(before)
    for k, v in model.graph.initializers.items():
        np.testing.assert_array_equal(v.const_value.numpy(), before[k])
