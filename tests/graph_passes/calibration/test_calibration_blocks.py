"""Partitioning into prologue / decoder blocks / epilogue, part extraction, and feeds."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from optimum.adaround.graph_passes.calibration.blocks import extract_part, layer_of, plan_parts
from optimum.adaround.graph_passes.calibration.feeds import feed_specs, make_feeds
from optimum.adaround.graph_passes.errors import CalibrationError


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("/model/layers.12/self_attn/q_proj/MatMul", 12),
        ("/transformer/h.3/attn/c_attn/Gemm", 3),
        ("/model/norm/Mul_1", None),
        ("/lm_head/MatMul", None),
        ("/model/layers_norm/x", None),
        (None, None),
    ],
)
def test_layer_of(name, layer):
    assert layer_of(name) == layer


def test_plan_of_optimum_llama(tiny_llama):
    plan = plan_parts(tiny_llama.graph)
    assert [p.label for p in plan.parts] == ["prologue", "block 0", "block 1", "epilogue"]
    pro, b0, b1, epi = plan.parts
    assert {"input_ids", "attention_mask", "position_ids"} <= set(pro.inputs)
    assert {"past_key_values.0.key", "past_key_values.0.value"} <= set(b0.inputs)
    assert not any(n.startswith("past_key_values.0") for n in b1.inputs)
    assert set(b0.outputs) & set(b1.inputs)  # the hidden state crosses
    assert epi.inputs and set(epi.inputs) <= set(b1.outputs)
    values = {v.name: v for n in tiny_llama.graph for v in n.outputs}
    for part in plan.parts:
        for name in part.outputs:  # boundaries are data, never constants pulled in by every part
            assert not values[name].is_initializer()
            assert values[name].producer().op_type not in ("Constant", "Identity")
    assert plan.part_of_node("/model/layers.1/mlp/down_proj/MatMul") is b1
    assert plan.part_of_node("/lm_head/MatMul") is epi


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()}), strict=True))


def test_extracted_parts_chain_to_the_full_model(tiny_llama):
    """prologue -> block 0 -> block 1 -> epilogue, run as separate models, gives the full model's logits."""
    plan = plan_parts(tiny_llama.graph)
    ids = np.random.default_rng(0).integers(0, 256, (2, 5), dtype=np.int64)
    values = make_feeds(feed_specs(tiny_llama.graph.inputs), ids)
    full = _run(tiny_llama, values)["logits"]
    for part in plan.parts:
        outputs = part.outputs or ["logits"]
        sub = extract_part(tiny_llama, part.inputs, outputs, values, name=part.label)
        if part.layer is not None:  # a block holds its own nodes plus pulled-in constants only
            assert {layer_of(n.name) for n in sub.graph} <= {part.layer, None}
            assert {n.op_type for n in sub.graph if layer_of(n.name) is None} <= {"Constant", "Identity"}
        values.update(_run(sub, values))
    np.testing.assert_allclose(values["logits"], full, rtol=1e-5, atol=1e-5)


def test_no_layers_and_backward_edges_are_refused(handmade):
    for node in handmade.graph:
        node.name = node.name.replace("layers.", "stage")
    with pytest.raises(CalibrationError, match="no decoder-layer nodes"):
        plan_parts(handmade.graph)
    for node in handmade.graph:
        node.name = node.name.replace("stage", "layers.")
    tanh1 = next(n for n in handmade.graph if n.name == "/model/layers.1/mlp/act/Tanh")
    tanh1.name = "/model/layers.0/mlp/act/Tanh_late"  # reads layer 1's up_proj output
    with pytest.raises(CalibrationError, match="later decoder block"):
        plan_parts(handmade.graph)


def test_feeds_of_optimum_llama(tiny_llama):
    specs = feed_specs(tiny_llama.graph.inputs)
    feeds = make_feeds(specs, np.arange(12, dtype=np.int64).reshape(3, 4))
    assert feeds["attention_mask"].tolist() == [[1] * 4] * 3
    assert feeds["position_ids"].tolist() == [[0, 1, 2, 3]] * 3
    assert feeds["past_key_values.1.value"].shape == (3, 2, 0, 16)
    assert feeds["past_key_values.1.value"].dtype == np.float32
    assert feeds["input_ids"].dtype == np.int64


def test_unknown_input_is_refused():
    extra = ir.Value(name="token_type_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "t"]))
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "t"]))
    with pytest.raises(CalibrationError, match="'token_type_ids'"):
        feed_specs([ids, extra])
    with pytest.raises(CalibrationError, match="no 'input_ids'"):
        feed_specs([])
    past = ir.Value(
        name="past_key_values.0.key",
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(["b", "h", "p", 8]),
    )
    with pytest.raises(
        CalibrationError, match=r"dim 1 \(h, the number of KV heads\) is symbolic.*config\.json"
    ):
        feed_specs([ids, past])
