"""TorchGraph computes what onnxruntime computes on exported decoders, and refuses what it cannot run."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from optimum.adaround.graph_passes.calibration.feeds import feed_specs, make_feeds, window_capacities
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.tune.torch_graph import TorchGraph, UnsupportedGraphError


def _run_both(model: ir.Model, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    ref = sess.run(None, feeds)
    with torch.no_grad():
        got = TorchGraph(model.graph).run({k: torch.from_numpy(v) for k, v in feeds.items()})
    return ref, [g.numpy() for g in got]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma3_text"])
def test_exported_decoders_match_onnxruntime(tiny_hf_onnx, arch):
    model = load_model(str(tiny_hf_onnx(arch))).model
    specs = feed_specs(model.graph.inputs, folder=None, capacities=window_capacities(model.graph))
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 24))
    ref, got = _run_both(model, make_feeds(specs, ids))
    assert len(ref) == len(got)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-4 * max(1.0, float(np.abs(r).max())))


def test_weights_replace_initializers_and_carry_gradients():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.ones(12, np.float32))],
    )
    tg = TorchGraph(ir.from_proto(helper.make_model(graph)).graph)
    x = torch.ones(2, 3)
    assert torch.equal(tg.run({"x": x})[0], torch.full((2, 4), 3.0))
    w = torch.zeros(3, 4, requires_grad=True)
    y = tg.run({"x": x}, {"w": w})[0]
    y.sum().backward()
    assert torch.equal(y, torch.zeros(2, 4)) and torch.equal(w.grad, torch.full((3, 4), 2.0))


def test_unsupported_op_is_named_before_running():
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->i")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(UnsupportedGraphError, match="Einsum"):
        TorchGraph(ir.from_proto(helper.make_model(graph)).graph)
