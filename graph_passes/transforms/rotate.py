"""Rotate the residual stream by an orthogonal matrix folded into the weights (QuaRot-style, offline).

After ``x -> x Q`` every linear layer that reads the stream sees its input's outlier channels spread over
all channels, so rounding its weight errs less where it matters; the float model computes the same
function (``RMSNorm(x Q) = RMSNorm(x) Q`` once each norm's scale is folded into the layers it feeds).
``Q`` is a randomized Hadamard matrix where the width is a power of two, else the Kronecker product of one
with a random orthogonal matrix of the odd part (SmolLM2's 576 = 64 x 9), from a fixed seed.

The graph's shape is unchanged: only initializers are replaced (the embedding table, every reader's and
writer's weight, writers' biases, and the norms' scales, which become ones).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..packing.base import initializer
from .residual import ResidualStream, StreamPass, weight_of

__all__ = ["RotateResidualPass", "hadamard", "orthogonal", "replace_initializer", "weight_kn"]


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), entries +-1."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def orthogonal(d: int, seed: int = 0) -> np.ndarray:
    """A ``d x d`` orthogonal matrix (float64): random signs times ``H_(2^k) (x) R_m`` with ``d = 2^k m``,
    ``H`` Hadamard and ``R`` a random orthogonal matrix (QR of a Gaussian, signs fixed) when ``m > 1``."""
    rng = np.random.default_rng(seed)
    k = d & -d  # the largest power of two dividing d
    m = d // k
    q = hadamard(k) / np.sqrt(k)
    if m > 1:
        r, upper = np.linalg.qr(rng.standard_normal((m, m)))
        q = np.kron(r * np.sign(np.diag(upper)), q)
    return rng.choice([-1.0, 1.0], size=d)[:, None] * q


class RotateResidualPass(StreamPass):
    """Fold each RMSNorm's scale into its readers and rotate the residual stream by ``orthogonal(d, seed)``.
    ``record`` says what was rotated, or why nothing was (the graph is then left as it was)."""

    def rewrite(self, graph: ir.Graph, stream: ResidualStream) -> dict[str, object]:
        _rotate(graph, stream, orthogonal(stream.width, self.seed))
        return {"width": stream.width, "norms": len(stream.norms),
                "readers": sum(len(r) for r in stream.readers.values()), "writers": len(stream.writers)}  # fmt: skip


def _rotate(graph: ir.Graph, stream: ResidualStream, q: np.ndarray) -> None:
    for gather in stream.embeddings:
        table = gather.inputs[0]
        replace_initializer(graph, gather, 0, _array(table) @ q, table)  # type: ignore[arg-type]
    for i, norm in enumerate(stream.norms):
        scale = norm.offset + _array(norm.scale)
        for reader in stream.readers[i]:
            w = weight_kn(reader)
            replace_initializer(graph, reader, 1, q.T @ (scale[:, None] * w), weight_of(reader)[0])  # type: ignore[index]
        node, index = norm.scale_user
        replace_initializer(graph, node, index, np.ones_like(scale), norm.scale)
    for writer, bias in stream.writers:
        replace_initializer(graph, writer, 1, weight_kn(writer) @ q, weight_of(writer)[0])  # type: ignore[index]
        if bias is not None:
            replace_initializer(graph, bias.add, bias.index, _array(bias.value) @ q, bias.value)


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]


def weight_kn(node: ir.Node) -> np.ndarray:
    """A linear layer's weight as ``[K, N]`` float64."""
    w, transposed = weight_of(node)  # type: ignore[misc]
    array = _array(w)
    return array.T if transposed else array


def replace_initializer(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, old: ir.Value) -> None:
    """Give ``node`` a new initializer (the old one's dtype) at input ``index``; the old one is left to any
    other reader (a tied table) and dropped when none remains."""
    dtype = old.const_value.dtype.numpy()  # type: ignore[union-attr]
    name, n = f"{old.name}.rotated", 1
    while name in graph.initializers:
        name, n = f"{old.name}.rotated{n}", n + 1
    value = initializer(name, array.astype(dtype))
    graph.register_initializer(value)
    node.replace_input_with(index, value)
    if not old.uses() and not old.is_graph_output() and old.name in graph.initializers:
        graph.initializers.pop(old.name)
