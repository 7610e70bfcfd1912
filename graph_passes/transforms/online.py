"""An online block-Hadamard rotation of the MLP's inner activation, before the down projection.

The down projection's input (``silu(gate) * up``) carries the largest outlier channels of a decoder and
cannot be rotated offline: the elementwise product between the up and down projections does not commute
with a rotation. So the graph computes it: ``x -> Reshape [-1, b] -> MatMul (D H_b) -> Reshape [.., K]``
(the Reshape back reads the input's shape; ``H_b`` a normalized Hadamard matrix, ``D`` random signs; one small MatMul per layer) and the down
projection's weight absorbs the inverse, ``W <- (I (x) D H_b)^T W``. Same function, rows of the weight
mixed within blocks of ``b`` before rounding. ``b`` is the largest power of two dividing K, at most
``max_block`` (the MatMul costs ``K b`` multiply-adds per token against the projection's ``K N``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .residual import find_residual_stream, weight_of
from .rotate import _hadamard, _kn, _replace

__all__ = ["HadamardDownProjPass", "block_hadamard"]


def block_hadamard(b: int, seed: int = 0) -> np.ndarray:
    """``D H_b``: a ``b x b`` orthogonal matrix (float64), ``H_b`` Sylvester's normalized, ``D`` random signs."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=b)
    return signs[:, None] * (_hadamard(b) / np.sqrt(b))


def _block(k: int, max_block: int) -> int:
    return min(k & -k, max_block)


class HadamardDownProjPass(ir.passes.InPlacePass):
    """Rotate the input of every residual writer fed by an elementwise product (the MLP's down projection)
    online, in blocks. ``record`` says which and the block, or why none."""

    def __init__(self, seed: int = 0, max_block: int = 128) -> None:
        super().__init__()
        self.seed, self.max_block = seed, max_block
        self.record: dict[str, object] = {"applied": False}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stream = find_residual_stream(model)
        if isinstance(stream, str):
            self.record = {"applied": False, "reason": stream}
            return ir.passes.PassResult(model, modified=False)
        writers = [w for w, _ in stream.writers if _fed_by_product(w)]
        rotated = [w for w in writers if _block(_kn(w).shape[0], self.max_block) >= 16]
        if not rotated:
            self.record = {
                "applied": False,
                "reason": "no down projection (a writer fed by Mul) with K divisible by 16",
            }
            return ir.passes.PassResult(model, modified=False)
        blocks = sorted({_block(_kn(w).shape[0], self.max_block) for w in rotated})
        for i, node in enumerate(rotated):
            self._rotate(model.graph, node, i)
        self.record = {"applied": True, "layers": len(rotated), "block": blocks, "seed": self.seed}
        return ir.passes.PassResult(model, modified=True)

    def _rotate(self, graph: ir.Graph, node: ir.Node, index: int) -> None:
        w = _kn(node)
        k = w.shape[0]
        b = _block(k, self.max_block)
        h = block_hadamard(b, self.seed)
        # W' = (I (x) H)^T W: each block of b rows of W is multiplied by H^T
        rotated = np.einsum("ji,cjn->cin", h, w.reshape(k // b, b, -1)).reshape(k, -1)
        _replace(graph, node, 1, rotated, weight_of(node)[0])  # type: ignore[index]
        x = node.inputs[0]
        name = f"{node.name or f'down_proj_{index}'}/optimum_adaround.hadamard"
        dtype = node.inputs[1].const_value.dtype  # type: ignore[union-attr]
        split = _const(graph, f"{name}.split_shape", np.array([-1, b], np.int64))
        matrix = _const(graph, f"{name}.matrix", h.astype(dtype.numpy()))
        shape = ir.node("Shape", [x], name=f"{name}/Shape")
        blocks = ir.node("Reshape", [x, split], name=f"{name}/Reshape")
        mixed = ir.node("MatMul", [blocks.outputs[0], matrix], name=f"{name}/MatMul")
        back = ir.node("Reshape", [mixed.outputs[0], shape.outputs[0]], name=f"{name}/Reshape_1")
        graph.insert_before(node, [shape, blocks, mixed, back])
        node.replace_input_with(0, back.outputs[0])


def _fed_by_product(node: ir.Node) -> bool:
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    return producer is not None and producer.op_type == "Mul" and producer.domain in ("", "ai.onnx")


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array))
    value.shape, value.type = value.const_value.shape, ir.TensorType(value.const_value.dtype)  # type: ignore[union-attr]
    graph.register_initializer(value)
    return value
