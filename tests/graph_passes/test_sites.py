"""Weight-site discovery on small inline graphs: shapes handled, shapes skipped (with reasons), selection."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from optimum.adaround.graph_passes.sites import ALREADY_QUANTIZED, find_weight_sites, layer_index, module_path


def _model(nodes, inits, inputs, outputs, opset=18, extra_opsets=()):
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()]
    )
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


def _x(k=32, name="x"):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["b", "s", k])


def _y(name="y"):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


RNG = np.random.default_rng(0)


def _w(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def test_module_path_and_layer_index():
    assert module_path("/model/layers.0/self_attn/q_proj/MatMul") == "model.layers.0.self_attn.q_proj"
    assert module_path("/transformer/h.3/attn/c_attn/Gemm") == "transformer.h.3.attn.c_attn"
    assert module_path("MatMul_7") == "MatMul_7"
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("lm_head") is None


def test_plain_transposed_gemm_and_bias():
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Transpose", ["W1"], ["W1t"], name="/model/layers.0/T", perm=[1, 0]),
        helper.make_node("MatMul", ["a", "W1t"], ["b"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("Flatten", ["b"], ["b2"], name="flat", axis=2),
        helper.make_node(
            "Gemm", ["b2", "W2", "C2"], ["y"], name="/transformer/h.1/attn/c_attn/Gemm", transB=1
        ),
    ]
    inits = {"W0": _w(32, 48), "W1": _w(16, 48), "W2": _w(24, 16), "C2": _w(24)}
    report = find_weight_sites(_model(nodes, inits, [_x()], [_y()]))
    assert report.skipped == []
    by = {s.name: s for s in report.sites}
    up, down, attn = (
        by["model.layers.0.mlp.up_proj"],
        by["model.layers.0.mlp.down_proj"],
        by["transformer.h.1.attn.c_attn"],
    )
    assert (up.k, up.n, up.transposed, up.layer, up.transpose_node) == (32, 48, False, 0, None)
    assert (down.k, down.n, down.transposed, down.transpose_node) == (48, 16, True, "/model/layers.0/T")
    assert (attn.op_type, attn.k, attn.n, attn.transposed, attn.bias_name, attn.layer) == (
        "Gemm",
        16,
        24,
        True,
        "C2",
        1,
    )
    assert up.activation == "x" and down.activation == "a"


def test_shared_activation_groups_sites_and_tied_lm_head():
    # q/k read the same activation; the lm_head reads Transpose(embedding) which a Gather also reads.
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["h", "Wq"], ["q"], name="/model/layers.0/self_attn/q_proj/MatMul"),
        helper.make_node("MatMul", ["h", "Wk"], ["k"], name="/model/layers.0/self_attn/k_proj/MatMul"),
        helper.make_node("Add", ["q", "k"], ["s"], name="add"),
        helper.make_node("Transpose", ["E"], ["Et"], name="Transpose_9", perm=[1, 0]),
        helper.make_node("MatMul", ["s", "Et"], ["logits"], name="/lm_head/MatMul"),
    ]
    ids = helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "s"])
    model = _model(nodes, {"E": _w(50, 16), "Wq": _w(16, 16), "Wk": _w(16, 16)}, [ids], [_y("logits")])
    report = find_weight_sites(model)
    assert [s.name for s in report.sites] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]
    assert list(report.by_activation()) == ["h"]
    assert len(report.skipped) == 1 and "lm_head" in report.skipped[0].reason
    head = find_weight_sites(model, quantize_lm_head=True).sites[-1]
    assert (head.kind, head.tied, head.transposed, head.k, head.n, head.weight_name) == (
        "lm_head",
        True,
        True,
        16,
        50,
        "E",
    )


@pytest.mark.parametrize(
    ("weight", "producer", "reason"),
    [
        (_w(32), None, "1-D"),
        (RNG.integers(-8, 8, (32, 8)).astype(np.int8), None, "non-float weight (INT8)"),
        (_w(2, 32, 8), None, "3-D"),
        (_w(32, 8), "Cast", "computed by Cast"),
        (_w(32, 8), "Constant", "Constant node"),
    ],
)
def test_unhandled_candidates_are_reported(weight, producer, reason):
    if producer == "Cast":
        nodes = [helper.make_node("Cast", ["W"], ["Wc"], name="cast", to=onnx.TensorProto.FLOAT)]
        inits, b = {"W": weight}, "Wc"
    elif producer == "Constant":
        nodes = [
            helper.make_node("Constant", [], ["Wc"], name="const", value=numpy_helper.from_array(weight))
        ]
        inits, b = {}, "Wc"
    else:
        nodes, inits, b = [], {"W": weight}, "W"
    nodes.append(helper.make_node("MatMul", ["x", b], ["y"], name="/model/layers.0/mlp/up_proj/MatMul"))
    report = find_weight_sites(_model(nodes, inits, [_x()], [_y()]))
    assert report.sites == []
    assert len(report.skipped) == 1 and reason in report.skipped[0].reason
    assert report.skipped[0].node_name == "/model/layers.0/mlp/up_proj/MatMul"


def test_activation_products_are_not_candidates_and_gemm_options_are_checked():
    nodes = [
        helper.make_node("MatMul", ["x", "x2"], ["s"], name="/model/layers.0/self_attn/MatMul"),
        helper.make_node("Flatten", ["s"], ["f"], name="flat", axis=2),
        helper.make_node("Gemm", ["f", "W"], ["y"], name="/h.0/c_fc/Gemm", alpha=0.5),
    ]
    x2 = helper.make_tensor_value_info("x2", onnx.TensorProto.FLOAT, ["b", 32, 32])
    report = find_weight_sites(_model(nodes, {"W": _w(32, 8)}, [_x(), x2], [_y()]))
    assert report.sites == []
    assert [(s.node_name, "alpha=0.5" in s.reason) for s in report.skipped] == [("/h.0/c_fc/Gemm", True)]


def test_already_quantized_weights_are_reported():
    nodes = [
        helper.make_node("DequantizeLinear", ["Q", "S"], ["Wd"], name="dq", axis=0, block_size=16),
        helper.make_node("MatMul", ["x", "Wd"], ["a"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node(
            "MatMulNBits",
            ["a", "B", "sc"],
            ["y"],
            name="/model/layers.0/mlp/down_proj/MatMulNBits",
            domain="com.microsoft",
            K=8,
            N=8,
            bits=4,
            block_size=16,
        ),
    ]
    inits = {
        "Q": RNG.integers(-8, 8, (32, 8)).astype(np.int8),
        "S": _w(2, 8),
        "B": np.zeros((8, 1, 8), np.uint8),
        "sc": _w(8),
    }
    report = find_weight_sites(
        _model(nodes, inits, [_x()], [_y()], opset=21, extra_opsets=[("com.microsoft", 1)])
    )
    assert report.sites == []
    assert len(report.skipped) == 2
    assert all(s.reason.startswith(ALREADY_QUANTIZED) for s in report.skipped)


def test_include_exclude_and_name_collisions():
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a"], name="/model/layers.0/mlp/MatMul"),
        helper.make_node("MatMul", ["a", "W1"], ["b"], name="/model/layers.0/mlp/MatMul_1"),
        helper.make_node("MatMul", ["b", "W2"], ["y"], name="/model/layers.1/self_attn/o_proj/MatMul"),
    ]
    model = _model(nodes, {"W0": _w(32, 32), "W1": _w(32, 32), "W2": _w(32, 32)}, [_x()], [_y()])
    names = [s.name for s in find_weight_sites(model).sites]
    assert names == [
        "model.layers.0.mlp.MatMul",
        "model.layers.0.mlp.MatMul_1",
        "model.layers.1.self_attn.o_proj",
    ]
    report = find_weight_sites(model, include=[r"layers\.0\."], exclude=[r"MatMul_1$"])
    assert [s.name for s in report.sites] == ["model.layers.0.mlp.MatMul"]
    reasons = sorted(s.reason for s in report.skipped)
    assert "excluded by pattern" in reasons[0] and "matches no include" in reasons[1]
