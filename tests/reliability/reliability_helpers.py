"""Helpers of the reliability tests: tiny hand-built ONNX models and an output-folder inspector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, N = 64, 32


def matmul_model(
    weights: list[np.ndarray] | None = None,
    *,
    opset: int = 18,
    extra_nodes: list[onnx.NodeProto] | None = None,
    extra_inits: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    """``x -> MatMul(W0) -> MatMul(W1) ... -> Relu -> y``; node names look like Optimum's module paths."""
    if weights is None:
        weights = [np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)]
    nodes, inits, x = [], [], "x"
    for i, w in enumerate(weights):
        nodes.append(
            helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"/model/layers.{i}/mlp/proj/MatMul")
        )
        inits.append(numpy_helper.from_array(np.asarray(w, np.float32), f"W{i}"))
        x = f"h{i}"
    nodes.append(helper.make_node("Relu", [x], ["y"], name="/model/act/Relu"))
    nodes += extra_nodes or []
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", weights[0].shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", weights[-1].shape[1]])],
        inits + list(extra_inits or []),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def save(model: onnx.ModelProto, folder: Path, *, external: bool = False) -> Path:
    """Save ``model`` as ``folder/model.onnx`` (weights in ``model.onnx_data`` if ``external``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=external, location="model.onnx_data", size_threshold=0)
    return path


def leftovers(parent: Path) -> list[str]:
    """Temporary or set-aside siblings an atomic write may have left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
