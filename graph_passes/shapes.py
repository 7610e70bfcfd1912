"""Shape reads -> constants and one shared value per symbolic dimension (``share_shapes``).

Exports of decoder models recompute the same sizes in every layer: ``Shape(x) -> Gather(i) -> Unsqueeze
-> Concat -> Reshape`` for each projection, for repeat_kv and for the mask slice, reading a different
tensor each time (Optimum's SmolLM2-135M: about 4,000 of its 7,400 nodes). Decode of a small model is
bound by that per-node work. Symbolic shape inference (onnxruntime's, on the graph without its weights)
says which dimension each read gives: a fixed size becomes a constant, and every read of the same
symbolic dimension (``batch_size``, ``past_sequence_length + sequence_length``) reuses the first one.
The per-layer chains are then identical, and common-subexpression elimination keeps one of each. What the
model computes is unchanged (outputs equal bit for bit, tested); decode 1.31x -> 1.81x of the 0.7.0
output on SmolLM2 (benchmarks/results/small_fast_defaults.md).

A graph symbolic inference cannot read is left as it was, and the record says why.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    DeduplicateInitializersPass,
    RemoveUnusedNodesPass,
)

from .packing.base import initializer

__all__ = ["ShareShapeComputationsPass", "symbolic_dims"]

Dim = int | str | None
_SMALL = 64
"""Initializers up to this many elements stay in the weightless copy shape inference reads (shape
constants, axes); larger ones (weights) are given by shape and type only."""


@contextlib.contextmanager
def _without_weights(model: ir.Model) -> Iterator[set[str]]:
    """The model with large initializers' values detached and small ones read into memory (inference reads
    their bytes, and an external file would be looked up from the working directory), restored on exit.
    Yields the names of those detached."""
    swapped: dict[str, ir.TensorProtocol] = {}
    detached: set[str] = set()
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    try:
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if tensor is None or (tensor.size <= _SMALL and isinstance(tensor, ir.Tensor)):
                continue
            swapped[name] = tensor
            if tensor.size > _SMALL:
                detached.add(name)
                value.const_value = None
            else:
                value.const_value = ir.tensor(tensor.numpy(), name=name)
        serde_log.setLevel(logging.ERROR)  # it warns once per initializer without a value
        yield detached
    finally:
        serde_log.setLevel(level)
        for name, tensor in swapped.items():
            model.graph.initializers[name].const_value = tensor


def symbolic_dims(model: ir.Model) -> dict[str, list[Dim]]:
    """Every value's dimensions as onnxruntime's symbolic shape inference gives them (ints, symbol strings
    such as ``past_sequence_length + sequence_length``, None where unknown), read from a copy of the
    graph without its weights. Raises what the inference raises when it cannot read the graph."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    with _without_weights(model) as detached:
        proto = ir.serde.serialize_model(model)
    # detached weights travel as graph inputs of known shape (their value_info entries)
    proto.graph.input.extend(vi for vi in proto.graph.value_info if vi.name in detached)
    # an incomplete inference saves its partial graph into the working directory: keep it out of the user's
    with tempfile.TemporaryDirectory(prefix="adaround-shapes-") as scratch, contextlib.chdir(scratch):
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=False, guess_output_rank=False)
    dims: dict[str, list[Dim]] = {}
    graph = inferred.graph
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            dims[info.name] = [_dim(d) for d in tensor.shape.dim]
    return dims


def _dim(d: object) -> Dim:
    if d.HasField("dim_value"):  # type: ignore[attr-defined]
        return int(d.dim_value)  # type: ignore[attr-defined]
    return str(d.dim_param) if d.HasField("dim_param") else None  # type: ignore[attr-defined]


def _shape_read(node: ir.Node, dims: dict[str, list[Dim]]) -> list[Dim] | None:
    """The dimensions a standard ``Shape`` node returns (its start/end applied), when inference knows its
    input's rank; None for any other node."""
    if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
        return None
    full = dims.get(node.inputs[0].name or "")
    if full is None:
        return None
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(full))
    return full[slice(start, end)]


def _small_int(value: ir.Value | None) -> np.ndarray | None:
    """The value's int tensor when it is a constant of one element (an initializer or a Constant node)."""
    if value is None:
        return None
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        tensor = attr.value if attr is not None else None
    if tensor is None or tensor.size != 1 or tensor.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    return tensor.numpy()


class ShareShapeComputationsPass(ir.passes.InPlacePass):
    """Replace shape reads by constants or by the first read of the same symbolic dimension, then keep one
    of each identical computation. ``record`` says what was done (or why nothing was)."""

    def __init__(self) -> None:
        super().__init__()
        self.record: dict[str, object] = {"applied": False}
        self._constants: dict[tuple[object, ...], ir.Value] = {}
        self._first: dict[tuple[object, ...], ir.Value] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph)
        try:
            dims = symbolic_dims(model)
        except Exception as e:  # the inference's own errors vary by op; the graph stays as it was
            self.record = {"applied": False, "reason": f"symbolic shape inference failed: {str(e)[:200]}"}
            return ir.passes.PassResult(model, modified=False)
        constants = shared = 0
        for node in list(model.graph):  # in graph order: a shared value is computed before its new readers
            if node.domain not in ("", "ai.onnx"):
                continue
            c, s = self._replace(model.graph, node, dims)
            constants, shared = constants + c, shared + s
        modified = bool(constants or shared)
        if modified:
            for cleanup in (RemoveUnusedNodesPass(), DeduplicateInitializersPass(), CommonSubexpressionEliminationPass(), RemoveUnusedNodesPass()):  # fmt: skip
                cleanup(model)
        self.record = {"applied": True, "nodes_before": before, "nodes_after": len(model.graph),
                       "constant_reads": constants, "shared_reads": shared}  # fmt: skip
        return ir.passes.PassResult(model, modified=modified)

    def _replace(self, graph: ir.Graph, node: ir.Node, dims: dict[str, list[Dim]]) -> tuple[int, int]:
        """Rewire one read: a ``Shape`` node's whole output, or a ``Gather`` of one of its entries.
        Returns (reads made constant, reads shared)."""
        span = _shape_read(node, dims)
        if span is None and node.op_type == "Gather" and len(node.inputs) == 2:
            source = node.inputs[0].producer() if node.inputs[0] is not None else None
            shape = _shape_read(source, dims) if source is not None else None
            index = _small_int(node.inputs[1])
            if shape is None or index is None or node.attributes.get_int("axis", 0) != 0:
                return 0, 0
            if not -len(shape) <= index.item() < len(shape):
                return 0, 0
            d = shape[index.item()]
            if isinstance(d, int):
                return self._to_constant(graph, node.outputs[0], np.full(index.shape, d, np.int64)), 0
            return (0, 0) if d is None else (0, self._share((d, index.shape), node.outputs[0]))
        if span is None:
            return 0, 0
        if all(isinstance(d, int) for d in span):
            return self._to_constant(graph, node.outputs[0], np.array(span, np.int64)), 0
        if any(d is None for d in span):
            return 0, 0
        return 0, self._share(("shape", tuple(span)), node.outputs[0])

    def _to_constant(self, graph: ir.Graph, value: ir.Value, array: np.ndarray) -> int:
        value.replace_all_uses_with(self._constant(graph, array))
        return 1

    def _share(self, key: tuple[object, ...], value: ir.Value) -> int:
        """Use the first value read for ``key`` in place of ``value`` (nodes come in topological order, so
        the first is computed before any later read's users). 1 when replaced."""
        first = self._first.setdefault(key, value)
        if first is value:
            return 0
        value.replace_all_uses_with(first)
        return 1

    def _constant(self, graph: ir.Graph, array: np.ndarray) -> ir.Value:
        key = (array.shape, array.tobytes())
        if key not in self._constants:
            n = len(graph.initializers)
            while f"optimum_adaround.shape_{n}" in graph.initializers:
                n += 1
            value = initializer(f"optimum_adaround.shape_{n}", array)
            graph.register_initializer(value)
            self._constants[key] = value
        return self._constants[key]
