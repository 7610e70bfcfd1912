"""The residual stream of a decoder graph: what writes it, the RMSNorms that read it, the linears behind them.

A rotation ``Q`` of the stream (``x -> x Q``) leaves the model's function unchanged when every reader of
the stream is an RMSNorm (``mean(x^2)`` is invariant under an orthogonal ``Q``) whose scale has been folded
into the linear layers it feeds, and every writer is a linear layer (or the embedding lookup) whose output
columns can be rotated. This module finds that structure in an exported graph, or says why it is not there:

    embedding Gather (xQ) -> [Mul by a scalar] -> stream -> RMSNorm -> readers (W <- Q^T diag(g) W)
                                                   |   <- Add <- writer (W <- W Q, bias <- bias Q)
                                                   '-> ... -> final RMSNorm -> output projection

RMSNorm is matched as onnxruntime's ``SimplifiedLayerNormalization``, ONNX's ``RMSNormalization``, or the
decomposition Optimum's exports hold (``Pow -> ReduceMean -> Add eps -> Sqrt -> Div/Reciprocal -> Mul``,
with optional Casts, then ``Mul`` by the scale or by ``1 + scale`` as in Gemma).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from ..embeddings import id_lookups

__all__ = [
    "Bias", "Norm", "ResidualStream", "StreamPass", "find_residual_stream", "find_rms_norms", "kn_shape",
    "weight_of",
]  # fmt: skip

_STD = ("", "ai.onnx")
_FUSED_NORMS = {("SimplifiedLayerNormalization", ""), ("SimplifiedLayerNormalization", "com.microsoft"),
                ("RMSNormalization", "")}  # fmt: skip


@dataclasses.dataclass
class Norm:
    """One RMSNorm: ``output = rms_normalize(input) * (offset + scale)``."""

    input: ir.Value
    output: ir.Value
    scale: ir.Value
    """The per-channel scale initializer ``[d]``."""
    offset: float
    """0, or 1 where the graph multiplies by ``1 + scale`` (Gemma)."""
    nodes: list[ir.Node]
    """The nodes of the pattern (those that read ``input`` among them)."""
    scale_user: tuple[ir.Node, int]
    """Where the scale (or ``offset + scale``) enters: the node and its input index."""


@dataclasses.dataclass
class Bias:
    """A writer's bias: the Add that applies it, which input, and the initializer behind it."""

    add: ir.Node
    index: int
    value: ir.Value


@dataclasses.dataclass
class ResidualStream:
    width: int
    embeddings: list[ir.Node]
    """Gathers of token ids in a float table ``[V, width]`` that start the stream."""
    norms: list[Norm]
    readers: dict[int, list[ir.Node]]
    """Per norm (index into ``norms``): the MatMuls reading its output, weights ``[width, n]``."""
    writers: list[tuple[ir.Node, Bias | None]]
    """MatMuls whose output is added into the stream (weights ``[m, width]``), each with its bias."""


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain in _STD else None


def _skip_cast(value: ir.Value | None) -> ir.Value | None:
    cast = _producer(value, "Cast")
    return cast.inputs[0] if cast is not None else value


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant (initializer or Constant node)."""
    if value is None:
        return None
    tensor = value.const_value
    node = value.producer()
    if tensor is None and node is not None and node.op_type == "Constant":
        attr = node.attributes.get("value")
        tensor = attr.value if attr is not None else None
    return float(tensor.numpy().reshape(())) if tensor is not None and tensor.size == 1 else None


def _initializer(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind ``value`` (through Identity nodes, which exports write for shared weights)."""
    while value is not None and _producer(value, "Identity") is not None:
        value = value.producer().inputs[0]  # type: ignore[union-attr]
    return value if value is not None and value.is_initializer() and value.const_value is not None else None


def _vector(value: ir.Value | None) -> bool:
    init = _initializer(value)
    return init is not None and init.const_value.shape.rank() == 1  # type: ignore[union-attr]


def _scale_of(mul: ir.Node) -> tuple[int, ir.Value, float, list[ir.Node]] | None:
    """(index of the scale input, the scale initializer, offset, extra nodes) of the final ``Mul``."""
    for i, value in enumerate(mul.inputs):
        if _vector(value):
            return i, _initializer(value), 0.0, []  # type: ignore[return-value]
        add = _producer(value, "Add")
        if add is not None:
            a, b = add.inputs
            for vec, const in ((a, b), (b, a)):
                if _vector(vec) and _scalar(const) is not None:
                    return i, _initializer(vec), _scalar(const), [add]  # type: ignore[return-value]
    return None


def _decomposed(mul: ir.Node) -> Norm | None:
    """Match ``Mul(scale, [Cast](Mul(xc, 1/Sqrt(ReduceMean(Pow(xc, 2)) + eps))))`` backwards from the last Mul."""
    found = _scale_of(mul) if mul.op_type == "Mul" and mul.domain in _STD else None
    if found is None:
        return None
    index, scale, offset, extra = found
    normed = _producer(_skip_cast(mul.inputs[1 - index]), "Mul")
    if normed is None:
        return None
    for x_pos in (0, 1):
        xc, inv = normed.inputs[x_pos], normed.inputs[1 - x_pos]
        div, rec = _producer(inv, "Div"), _producer(inv, "Reciprocal")
        sqrt = _producer(
            div.inputs[1] if div is not None else rec.inputs[0] if rec is not None else None, "Sqrt"
        )
        if sqrt is None or (div is not None and _scalar(div.inputs[0]) != 1.0):
            continue
        add = _producer(sqrt.inputs[0], "Add")
        mean = _producer(add.inputs[0], "ReduceMean") if add is not None else None
        power = _producer(mean.inputs[0], "Pow") if mean is not None else None
        if power is None or power.inputs[0] is not xc or _scalar(power.inputs[1]) != 2.0:
            continue
        x = _skip_cast(xc)
        inner = [n for n in (xc.producer() if xc is not x else None, power, mean, add, sqrt, div, rec,
                             normed, _producer(mul.inputs[1 - index], "Cast")) if n is not None]  # fmt: skip
        return Norm(x, mul.outputs[0], scale, offset, [*inner, *extra, mul], (mul, index))  # type: ignore[arg-type]
    return None


def find_rms_norms(graph: ir.Graph) -> list[Norm]:
    """Every RMSNorm of the graph with a constant per-channel scale, in graph order."""
    norms = []
    for node in graph:
        if (node.op_type, node.domain) in _FUSED_NORMS and len(node.inputs) >= 2 and _vector(node.inputs[1]):
            scale = _initializer(node.inputs[1])
            norms.append(Norm(node.inputs[0], node.outputs[0], scale, 0.0, [node], (node, 1)))  # type: ignore[arg-type]
            continue
        norm = _decomposed(node)
        if norm is not None:
            norms.append(norm)
    return norms


def weight_of(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """A MatMul's constant 2-D weight: the initializer, and whether it is stored ``[N, K]`` behind a
    ``Transpose`` (the tied output projection of some exports)."""
    if node.op_type != "MatMul" or node.domain not in _STD or len(node.inputs) != 2:
        return None
    w, transposed = node.inputs[1], False
    transpose = _producer(w, "Transpose")
    if transpose is not None:
        perm = transpose.attributes.get("perm")
        if perm is not None and list(perm.value) != [1, 0]:
            return None
        w, transposed = transpose.inputs[0], True
    w = _initializer(w)
    return (w, transposed) if w is not None and w.const_value.shape.rank() == 2 else None  # type: ignore[union-attr]


def kn_shape(node: ir.Node) -> tuple[int, int]:
    """``(K, N)`` of a linear layer found by ``weight_of``."""
    w, transposed = weight_of(node)  # type: ignore[misc]
    k, n = w.const_value.shape  # type: ignore[union-attr]
    return (n, k) if transposed else (k, n)


def _writer(value: ir.Value, width: int) -> tuple[ir.Node, Bias | None] | None:
    """The MatMul (and its bias) that produces ``value``, when it is a linear layer of output ``width``."""
    bias = None
    add = _producer(value, "Add")
    if add is not None:
        for i in (0, 1):
            if _vector(add.inputs[i]) and add.inputs[1 - i] is not None:
                bias, value = Bias(add, i, _initializer(add.inputs[i])), add.inputs[1 - i]  # type: ignore[arg-type,assignment]
                break
    node = value.producer()
    if node is None or weight_of(node) is None or kn_shape(node)[1] != width or len(value.uses()) != 1:
        return None
    return node, bias  # type: ignore[return-value]


def _start(graph: ir.Graph) -> tuple[list[ir.Node], ir.Value] | str:
    """The embedding Gather and the stream's first value (after a scalar Mul, as in Gemma)."""
    gathers = [n for n in id_lookups(graph) if n.inputs[0].is_initializer()]  # type: ignore[union-attr]
    if len(gathers) != 1:
        return f"{len(gathers)} embedding lookups of input_ids in a constant table (one is handled)"
    value = gathers[0].outputs[0]
    uses = value.uses()
    if (
        len(uses) == 1
        and uses[0][0].op_type == "Mul"
        and _scalar(uses[0][0].inputs[1 - uses[0][1]]) is not None
    ):
        value = uses[0][0].outputs[0]
    return gathers, value


def find_residual_stream(model: ir.Model) -> ResidualStream | str:
    """The residual stream's structure, or a one-line reason it cannot be rotated."""
    start = _start(model.graph)
    if isinstance(start, str):
        return start
    embeddings, value = start
    width = embeddings[0].inputs[0].const_value.shape[1]  # type: ignore[union-attr]
    norms: dict[int, Norm] = {}
    for n in find_rms_norms(model.graph):  # keyed by the stream value and by its Cast the norm reads
        norms[id(n.input)] = norms[
            id(n.nodes[0].outputs[0]) if n.nodes[0].op_type == "Cast" else id(n.input)
        ] = n
    found: list[Norm] = []
    writers: list[tuple[ir.Node, Bias | None]] = []
    frontier = [value]
    while frontier:
        value = frontier.pop()
        if value.is_graph_output():
            return f"the residual stream value {value.name!r} is a graph output"
        norm = norms.get(id(value))
        for node, _ in value.uses():
            if node.op_type == "Cast" and node.domain in _STD:
                frontier.append(node.outputs[0])  # exports cast the stream to float32 before the norm
                continue
            if (norm is not None and node in norm.nodes) or (node.op_type == "Shape" and node.domain in _STD):
                continue  # the norm reads it, or only its size is read
            if node.op_type != "Add" or node.domain not in _STD:
                return f"{node.op_type} node {node.name!r} reads the residual stream"
            other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            writer = _writer(other, width) if other is not None else None
            if writer is None:
                return (
                    f"Add node {node.name!r} adds something other than a linear layer to the residual stream"
                )
            writers.append(writer)
            frontier.append(node.outputs[0])
        if norm is not None and norm not in found:
            found.append(norm)
    return _with_readers(width, embeddings, found, writers)


def _with_readers(width: int, embeddings: list[ir.Node], norms: list[Norm],
                  writers: list[tuple[ir.Node, Bias | None]]) -> ResidualStream | str:  # fmt: skip
    if not norms or not writers:
        return "no RMSNorm-and-residual structure found (LayerNorm models are not handled)"
    readers: dict[int, list[ir.Node]] = {}
    for i, norm in enumerate(norms):
        for node, index in norm.output.uses():
            if node.op_type == "Shape" and node.domain in _STD:
                continue
            if weight_of(node) is None or index != 0 or kn_shape(node)[0] != width:
                return (
                    f"{node.op_type} node {node.name!r} reads a normalized stream and is not a linear layer"
                )
            readers.setdefault(i, []).append(node)
        if norm.output.is_graph_output() or i not in readers:
            return f"the RMSNorm output {norm.output.name!r} feeds no linear layer"
    return ResidualStream(width, embeddings, norms, readers, writers)


class StreamPass(ir.passes.InPlacePass):
    """A rewrite of a decoder's residual stream: ``rewrite`` returns what it did (the record's fields) or a
    reason it did nothing; a graph without the stream is left as it was. ``record`` says which."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.record: dict[str, object] = {"applied": False}

    def rewrite(self, graph: ir.Graph, stream: ResidualStream) -> dict[str, object] | str:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stream = find_residual_stream(model)
        done = stream if isinstance(stream, str) else self.rewrite(model.graph, stream)
        if isinstance(done, str):
            self.record = {"applied": False, "reason": done}
            return ir.passes.PassResult(model, modified=False)
        self.record = {"applied": True, **done, "seed": self.seed}
        return ir.passes.PassResult(model, modified=True)
