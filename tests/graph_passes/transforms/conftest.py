"""Random decoder-shaped graphs for the transform tests: the residual structure with random weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

VOCAB = 40


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


def build_random_decoder(
    rng: np.random.Generator, d: int, layers: int, style: str, bias: bool, readers: int
) -> ir.Model:
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


@pytest.fixture(scope="session")
def random_decoder():
    """``random_decoder(rng, d, layers, style, bias, readers) -> ir.Model`` (style: fused, div, reciprocal,
    gemma; readers 2 multiplies two projections, so the writer is fed by a product like a down projection)."""
    return build_random_decoder


@pytest.fixture(scope="session")
def run_logits():
    def run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
        proto = ir.serde.serialize_model(model).SerializeToString()
        return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[
            0
        ]

    return run
