"""Split a decoder graph into prologue, decoder blocks and epilogue, and extract each part as a model.

Nodes are assigned to a decoder block by the layer index in their name (``/model/layers.3/...``, GPT-2
``/transformer/h.3/...``). Nodes without an index are placed by position and data flow: before the first
block node they form the *prologue* (embeddings, mask, rotary tables), after the last one the *epilogue*
(final norm, lm_head); an unnamed node in between joins the latest part it reads from.

Constant sub-expressions (nodes fed only by initializers and other constant nodes, e.g. ``Constant``,
Optimum's deduplication ``Identity`` of shared initializers, or ``Transpose(embed_tokens)`` of a tied
lm_head) belong to no part: every extracted part pulls in the ones it needs, so they never become cached
boundary tensors.

The values that cross from one part to a later one are that later part's inputs (graph inputs such as
``input_ids`` or ``past_key_values.*`` are fed directly, never cached).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from ..errors import CalibrationError

__all__ = ["LAYER_PATTERN", "Part", "PartPlan", "extract_part", "layer_of", "plan_parts"]

LAYER_PATTERN = re.compile(r"/(?:layers|layer|h|blocks|block)\.(\d+)/")
"""Decoder-layer index in an exported node name: Llama/Qwen2/Mistral/Phi-3 ``/model/layers.{i}/``,
GPT-2 ``/transformer/h.{i}/``, BERT-like ``/encoder/layer.{i}/``."""

PROLOGUE = "prologue"
EPILOGUE = "epilogue"


def layer_of(node_name: str | None) -> int | None:
    """Decoder-layer index parsed from a node name, or None outside the decoder stack."""
    if not node_name:
        return None
    m = LAYER_PATTERN.search(node_name)
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class Part:
    """One contiguous piece of the graph run as its own onnxruntime session."""

    index: int
    """Position in execution order (0 = prologue)."""
    label: str
    """``prologue``, ``block 3``, ``epilogue``."""
    layer: int | None
    node_names: set[str]
    inputs: list[str]
    """Values this part reads that are graph inputs or produced by earlier parts."""
    outputs: list[str]
    """Values this part produces that later parts read (the boundary tensors to cache)."""


@dataclasses.dataclass
class PartPlan:
    """The parts in execution order and, per boundary value, the last part that reads it."""

    parts: list[Part]
    graph_inputs: list[str]
    last_reader: dict[str, int]
    node_part: dict[str, int]
    """Node name -> part index (constant nodes are absent)."""

    def part_of_node(self, node_name: str) -> Part | None:
        idx = self.node_part.get(node_name)
        return None if idx is None else self.parts[idx]


def _constant_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Nodes whose every input is an initializer or the output of another constant node."""
    const: set[ir.Node] = set()
    for node in graph:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            continue  # subgraphs may read outer-scope values: treat as data-dependent
        ok = True
        for v in node.inputs:
            if v is None or (v.is_initializer() and not v.is_graph_input()):
                continue
            producer = v.producer()
            if producer is None or producer not in const:
                ok = False
                break
        if ok:
            const.add(node)
    return const


def plan_parts(graph: ir.Graph) -> PartPlan:
    """Partition ``graph`` into prologue, one part per decoder layer, and epilogue.

    Raises CalibrationError when the graph has no layer-indexed nodes or when a block reads a value that
    a later block produces (the graph cannot then run block by block).
    """
    node_part, layers = _assign_parts(list(graph), _constant_nodes(graph))
    return _build_plan(graph, node_part, layers)


def _layer_span(
    nodes: list[ir.Node], labels: list[int | None], const: set[ir.Node]
) -> tuple[int, int, list[int]]:
    """Positions of the first and last layer-indexed node, and the sorted layer indices."""
    positions = [
        i for i, (n, lab) in enumerate(zip(nodes, labels, strict=True)) if lab is not None and n not in const
    ]
    if not positions:
        raise CalibrationError(
            "no decoder-layer nodes found (node names like /model/layers.0/... or /transformer/h.0/): "
            "this graph cannot be calibrated block by block; use sequential=False"
        )
    layers = sorted({lab for n, lab in zip(nodes, labels, strict=True) if lab is not None and n not in const})
    return positions[0], positions[-1], layers


def _assign_parts(nodes: list[ir.Node], const: set[ir.Node]) -> tuple[dict[ir.Node, int], list[int]]:
    """Part index of every non-constant node (0 = prologue, 1..L = layers in ascending order, L+1 =
    epilogue), and the layer indices."""
    labels = [layer_of(n.name) for n in nodes]
    first, last, layers = _layer_span(nodes, labels, const)
    layer_part = {layer: i + 1 for i, layer in enumerate(layers)}
    epilogue = len(layers) + 1
    producer_part: dict[ir.Value, int] = {}
    node_part: dict[ir.Node, int] = {}
    for pos, (node, lab) in enumerate(zip(nodes, labels, strict=True)):
        if node in const:
            continue
        latest = max(
            (producer_part[v] for v in node.inputs if v is not None and v in producer_part), default=0
        )
        if lab is not None:
            part = layer_part[lab]
        else:
            part = 0 if pos < first else epilogue if pos > last else latest
        if latest > part:
            raise CalibrationError(
                f"node {node.name!r} (part {part}) reads a value computed by a later decoder block "
                f"(part {latest}): this graph cannot run block by block; use sequential=False"
            )
        node_part[node] = part
        for out in node.outputs:
            producer_part[out] = part
    return node_part, layers


def _build_plan(graph: ir.Graph, node_part: dict[ir.Node, int], layers: list[int]) -> PartPlan:
    """The parts with their boundary inputs and outputs, from each node's part."""
    n_parts = len(layers) + 2
    producer_part = {out: part for node, part in node_part.items() for out in node.outputs}
    inputs: list[dict[str, None]] = [{} for _ in range(n_parts)]
    outputs: list[dict[str, None]] = [{} for _ in range(n_parts)]
    names: list[set[str]] = [set() for _ in range(n_parts)]
    last_reader: dict[str, int] = {}
    graph_inputs = [v.name for v in graph.inputs if v.name]
    fed = set(graph_inputs)
    for node, part in node_part.items():
        names[part].add(node.name or "")
        for v in node.inputs:
            if v is None or not v.name:
                continue
            if v.name in fed:
                inputs[part][v.name] = None
                continue
            src = producer_part.get(v)
            if src is None or src == part:
                continue  # initializer, constant node, or produced inside this part
            inputs[part][v.name] = None
            outputs[src][v.name] = None
            last_reader[v.name] = max(last_reader.get(v.name, 0), part)

    labels = [PROLOGUE, *(f"block {layer}" for layer in layers), EPILOGUE]
    layer_ids: list[int | None] = [None, *layers, None]
    parts = [
        Part(i, labels[i], layer_ids[i], names[i], list(inputs[i]), list(outputs[i])) for i in range(n_parts)
    ]
    node_names = {n.name: p for n, p in node_part.items() if n.name}
    return PartPlan(parts=parts, graph_inputs=graph_inputs, last_reader=last_reader, node_part=node_names)


def _typed(value: ir.Value, example: np.ndarray | None) -> None:
    """Give a boundary value of the sub-model the dtype/rank of the tensor it will be fed or produce."""
    if example is None or value.type is not None:
        return
    value.dtype = ir.DataType.from_numpy(example.dtype)
    value.shape = ir.Shape([None] * example.ndim)


def extract_part(
    model: ir.Model,
    inputs: Sequence[str],
    outputs: Sequence[str],
    examples: dict[str, np.ndarray] | None = None,
    name: str = "part",
) -> ir.Model:
    """A new model computing ``outputs`` from ``inputs`` (+ initializers), sharing ``model``'s tensors.

    Only the nodes the outputs need are kept. ``model`` is not modified: nodes and values are cloned,
    weight tensors are shared (replace a value's ``const_value`` in the result to change a weight there).
    ``examples`` gives dtype/rank for boundary values that the exported graph left untyped.
    """
    examples = examples or {}
    if not outputs:
        raise ValueError("extract_part needs at least one output")
    try:
        graph = ir.convenience.extract(model.graph, list(inputs), list(dict.fromkeys(outputs)))
    except ValueError as e:
        raise CalibrationError(f"cannot extract {name} from the model: {e}") from e
    for v in graph.inputs:
        _typed(v, examples.get(v.name or ""))
    for v in graph.outputs:
        _typed(v, examples.get(v.name or ""))
    graph.name = name
    return ir.Model(
        graph,
        ir_version=model.ir_version,
        producer_name="optimum-adaround calibration",
        functions=list(model.functions.values()),
    )
