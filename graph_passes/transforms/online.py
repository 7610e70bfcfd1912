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

from ..packing.base import initializer
from .residual import ResidualStream, StreamPass, kn_shape, weight_of
from .rotate import hadamard, replace_initializer, weight_kn

__all__ = ["HadamardDownProjPass", "block_hadamard"]


def block_hadamard(b: int, seed: int = 0) -> np.ndarray:
    """``D H_b``: a ``b x b`` orthogonal matrix (float64), ``H_b`` Sylvester's normalized, ``D`` random signs."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=b)
    return signs[:, None] * (hadamard(b) / np.sqrt(b))


def _block(k: int, max_block: int) -> int:
    return min(k & -k, max_block)


class HadamardDownProjPass(StreamPass):
    """Rotate the input of every residual writer fed by an elementwise product (the MLP's down projection)
    online, in blocks. ``record`` says which and the block, or why none."""

    def __init__(self, seed: int = 0, max_block: int = 128) -> None:
        super().__init__(seed)
        self.max_block = max_block

    def rewrite(self, graph: ir.Graph, stream: ResidualStream) -> dict[str, object] | str:
        blocks = {w: _block(kn_shape(w)[0], self.max_block) for w, _ in stream.writers if _fed_by_product(w)}
        rotated = {w: b for w, b in blocks.items() if b >= 16}
        if not rotated:
            return "no down projection (a writer fed by Mul) with K divisible by 16"
        for i, (node, b) in enumerate(rotated.items()):
            self._rotate(graph, node, b, i)
        return {"layers": len(rotated), "block": sorted(set(rotated.values()))}

    def _rotate(self, graph: ir.Graph, node: ir.Node, b: int, index: int) -> None:
        w = weight_kn(node)
        k = w.shape[0]
        h = block_hadamard(b, self.seed)
        # W' = (I (x) H)^T W: each block of b rows of W is multiplied by H^T
        rotated = np.einsum("ji,cjn->cin", h, w.reshape(k // b, b, -1)).reshape(k, -1)
        replace_initializer(graph, node, 1, rotated, weight_of(node)[0])  # type: ignore[index]
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
    value = initializer(name, array)
    graph.register_initializer(value)
    return value
