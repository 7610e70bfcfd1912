"""Shape sharing: fewer nodes, and exactly the same outputs for any batch, prompt and cache length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from optimum.adaround.graph_passes.shapes import ShareShapeComputationsPass, symbolic_dims

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "genai"
# (batch, cached tokens, new tokens): prefill, decode, a second prefill chunk, batch of three at once
CASES = [(2, 0, 7), (2, 5, 1), (1, 9, 3), (3, 0, 1)]


def _session(model: ir.Model) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, batch: int, past: int, new: int, seed: int) -> dict[str, np.ndarray]:
    """Optimum's decoder inputs: ids, a mask with left padding on the first row, positions, random caches."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 60, (batch, new)).astype(np.int64)
        elif i.name == "attention_mask":
            mask = np.ones((batch, past + new), np.int64)
            mask[0, :1] = 0
            feeds[i.name] = mask
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1))
        elif i.name.startswith("past"):
            dims = [batch if d == "batch_size" else past if isinstance(d, str) else d for d in i.shape]
            feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
        else:
            raise AssertionError(f"unexpected input {i.name}")
    return feeds


def _assert_same_outputs(before: ir.Model, after: ir.Model) -> None:
    a, b = _session(before), _session(after)
    for k, (batch, past, new) in enumerate(CASES):
        feeds = _feeds(a, batch, past, new, seed=k)
        for x, y in zip(a.run(None, feeds), b.run(None, feeds), strict=True):
            assert x.shape == y.shape
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma3_text", "gpt2"])
def test_optimum_exports_lose_their_repeated_shape_reads_and_keep_their_outputs(arch, tiny_hf_onnx):
    path = tiny_hf_onnx(arch) / "model.onnx"
    original, model = ir.load(path), ir.load(path)
    shapes = ShareShapeComputationsPass()
    assert shapes(model).modified
    record = shapes.record
    assert record["applied"] and record["constant_reads"] > 0 and record["shared_reads"] > 0
    assert record["nodes_before"] == len(original.graph) and record["nodes_after"] == len(model.graph)
    # every layer recomputes the same sizes: sharing them leaves well under the export's node count
    assert len(model.graph) < 0.8 * len(original.graph)
    assert sum(n.op_type == "Shape" for n in model.graph) < sum(n.op_type == "Shape" for n in original.graph)
    _assert_same_outputs(original, model)


def test_a_builder_graph_keeps_its_outputs(tmp_path):
    """onnxruntime-genai's builder graph (GroupQueryAttention, few shape reads): still exact."""
    path = FIXTURES / "llama-fp32" / "model.onnx"
    original, model = (ir.external_data.load_to_model(ir.load(path)) for _ in range(2))
    ShareShapeComputationsPass()(model)
    a, b = _session(original), _session(model)
    names = {i.name: i for i in a.get_inputs()}
    feeds = {"input_ids": np.array([[3, 9, 4, 1]], np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    for name, info in names.items():
        if name.startswith("past"):
            # an empty cache; the fixture's head size is 16 (genai_config.json), symbolic in the graph
            sizes = {"batch_size": 1, "past_sequence_length": 0, "kv_cache_dim": 16}
            feeds[name] = np.zeros([sizes.get(d, d) for d in info.shape], np.float32)
    for x, y in zip(a.run(None, feeds), b.run(None, feeds), strict=True):
        np.testing.assert_array_equal(x, y)


def _graph(nodes: list, inputs: list, outputs: list) -> ir.Model:
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=8)  # fmt: skip
    return ir.serde.deserialize_model(proto)


def test_fixed_sizes_become_constants_and_symbols_are_read_once():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    out = [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("sx", "sy", "cx")]
    nodes = [
        helper.make_node("Constant", [], ["i0"], value=helper.make_tensor("i0", TensorProto.INT64, [], [0])),
        helper.make_node("Constant", [], ["i1"], value=helper.make_tensor("i1", TensorProto.INT64, [], [1])),
        helper.make_node("Relu", ["y"], ["y2"]),
        helper.make_node("Shape", ["x"], ["shx"]),
        helper.make_node("Gather", ["shx", "i0"], ["gx"]),
        helper.make_node("Shape", ["y2"], ["shy"]),
        helper.make_node("Gather", ["shy", "i0"], ["gy"]),
        helper.make_node("Gather", ["shy", "i1"], ["gc"]),
        helper.make_node("Neg", ["gx"], ["sx"]),
        helper.make_node("Neg", ["gy"], ["sy"]),
        helper.make_node("Neg", ["gc"], ["cx"]),
    ]
    model = _graph(nodes, [x, y], out)
    assert symbolic_dims(model)["y2"] == ["b", 4]
    shapes = ShareShapeComputationsPass()
    shapes(model)
    # Shape(y2) is Shape(x) ([b, 4] both), then its batch entry is x's; its fixed entry is a constant
    assert shapes.record["shared_reads"] == 2 and shapes.record["constant_reads"] == 1
    assert sum(n.op_type == "Shape" for n in model.graph) == 1
    negs = [n for n in model.graph if n.op_type == "Neg"]
    # sy reads the batch size x's Shape gave (CSE then keeps one Neg for both); cx reads the constant 4
    by_output = {n.outputs[0].name: n for n in negs}
    assert by_output["cx"].inputs[0].const_value.numpy().item() == 4
    feeds = {"x": np.zeros((3, 4), np.float32), "y": np.zeros((3, 4), np.float32)}
    assert [int(v) for v in _session(model).run(None, feeds)] == [-3, -3, -4]


def test_a_graph_inference_cannot_read_is_left_as_it_was(tmp_path, monkeypatch):
    """Two symbolic sizes added together: the inference cannot prove them equal and stops (and leaves no
    partial graph in the working directory)."""
    monkeypatch.chdir(tmp_path)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m"])
    z = helper.make_tensor_value_info("z", TensorProto.INT64, None)
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Shape", ["s"], ["z"])]
    model = _graph(nodes, [a, b], [z])
    shapes = ShareShapeComputationsPass()
    assert not shapes(model).modified
    assert not shapes.record["applied"] and "symbolic shape inference failed" in shapes.record["reason"]
    assert [n.op_type for n in model.graph] == ["Add", "Shape"]
    assert list(tmp_path.iterdir()) == []


def test_weights_are_back_in_place_after_the_inference(tiny_hf_onnx):
    model = ir.load(tiny_hf_onnx("llama") / "model.onnx")
    before = {k: v.const_value for k, v in model.graph.initializers.items()}
    symbolic_dims(model)
    assert all(model.graph.initializers[k].const_value is t for k, t in before.items())
