"""Residual-stream rotation: the rotated float graph computes the same function, or is left as it was."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from optimum.adaround.graph_passes.transforms.residual import find_residual_stream
from optimum.adaround.graph_passes.transforms.rotate import RotateResidualPass, orthogonal

VOCAB = 40  # the random decoders' vocabulary (conftest.py)


@pytest.mark.parametrize("d", [1, 7, 64, 96, 576])
def test_the_rotation_is_orthogonal(d):
    q = orthogonal(d, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-12)
    assert not np.allclose(q, orthogonal(d, seed=4)) or d == 1


@settings(max_examples=25, deadline=None)
@given(
    d=st.sampled_from([8, 12, 16, 24, 32]),
    layers=st.integers(1, 3),
    style=st.sampled_from(["fused", "div", "reciprocal", "gemma"]),
    bias=st.booleans(),
    readers=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_rotated_random_decoders_compute_the_same_function(
    d, layers, style, bias, readers, seed, random_decoder, run_logits
):
    rng = np.random.default_rng(seed)
    model = random_decoder(rng, d, layers, style, bias, readers)
    ids = rng.integers(0, VOCAB, (2, 5))
    want = run_logits(model, ids)
    rotate = RotateResidualPass(seed=seed)
    assert rotate(model).modified
    assert rotate.record["applied"] and rotate.record["writers"] == layers
    assert rotate.record["readers"] == layers * readers + 1 and rotate.record["norms"] == layers + 1
    got = run_logits(model, ids)
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
def test_a_graph_without_the_pattern_is_left_as_it_was(break_it, reason, random_decoder):
    rng = np.random.default_rng(0)
    proto = ir.serde.serialize_model(random_decoder(rng, 16, 2, "div", False, 1))
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
