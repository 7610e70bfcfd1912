"""Sibling ``MatMulNBits`` nodes -> one ``MatMulNBits`` over their stacked rows, then a ``Split``.

Projections that read the same activation (q/k/v, gate/up) with the same K, bits, block, accuracy level
and zero-point layout compute exactly what one node over their rows stacked along N computes; onnxruntime
then launches one kernel (and quantizes the activation once at ``accuracy_level`` 4) instead of two or
three. On a small model, where decode time goes to per-node overhead, this is a measured share of decode
speed (benchmarks/results/small_fast_defaults.md); onnxruntime-genai's builder fuses the same way.

The fused node records the nodes it replaces (name and rows) in its metadata, so evaluation still reads
one weight per module; the Split's outputs keep the old outputs' names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from .packing.base import initializer
from .rewrite import take_place

__all__ = ["FUSED_KEY", "FuseSiblingMatMulNBitsPass", "fused_parts"]

FUSED_KEY = "optimum_adaround.fused"
"""Metadata key of a fused node: JSON ``[[node name, rows], ...]`` in row order."""

_ROLES = ("B", "scales", "zero_points")
Store = Callable[[str, np.ndarray], np.ndarray]


def fused_parts(node: ir.Node) -> list[tuple[str, int]] | None:
    """``(original node name, rows)`` of a fused node, in row order; None for any other node."""
    text = node.metadata_props.get(FUSED_KEY)
    return None if text is None else [(str(name), int(rows)) for name, rows in json.loads(text)]


def _key(node: ir.Node) -> tuple[object, ...] | None:
    """What siblings must share to be fused; None when the node cannot be fused."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or not 3 <= len(node.inputs) <= 4:
        return None
    consts = [v.const_value if v is not None else None for v in node.inputs[1:]]
    if any(c is None for c in consts) or node.outputs[0].is_graph_output():
        return None
    if consts[0].shape.rank() != 3:  # type: ignore[union-attr]
        return None
    attrs = tuple(node.attributes[a].value if a in node.attributes else None
                  for a in ("K", "bits", "block_size", "accuracy_level"))  # fmt: skip
    return (id(node.inputs[0]), attrs, len(node.inputs), consts[1].dtype)  # type: ignore[union-attr]


def sibling_groups(graph: ir.Graph) -> list[list[ir.Node]]:
    """Groups of two or more fusable MatMulNBits nodes reading the same input, in graph order."""
    groups: dict[tuple[object, ...], list[ir.Node]] = {}
    for node in graph:
        key = _key(node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    return [g for g in groups.values() if len(g) > 1]


def _scope(names: Sequence[str]) -> str:
    parts = [n.split("/")[:-2] for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return "/".join(common) or "fused"


class FuseSiblingMatMulNBitsPass(ir.passes.InPlacePass):
    """Fuse every sibling group (see the module docstring). ``store(name, array)`` may put the stacked
    arrays somewhere other than memory (the pipeline spills them to its scratch folder)."""

    def __init__(self, store: Store | None = None) -> None:
        super().__init__()
        self.store = store or (lambda name, array: array)
        self.fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", 0) < 13:  # Split takes its sizes as an input from opset 13
            return ir.passes.PassResult(model, modified=False)
        for group in sibling_groups(model.graph):
            self._fuse(model.graph, group)
        if self.fused:
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.fused))

    def _fuse(self, graph: ir.Graph, group: list[ir.Node]) -> None:
        first = group[0]
        names = [str(n.name) for n in group]
        name = f"{_scope(names)}/MatMulNBits_{'+'.join(n.split('/')[-2] if '/' in n else n for n in names)}"
        rows = [int(n.attributes["N"].value) for n in group]
        inits = [self._stacked(group, i, f"{name}.{_ROLES[i - 1]}") for i in range(1, len(first.inputs))]
        sizes = initializer(f"{name}.split", np.asarray(rows, np.int64))
        for value in (*inits, sizes):
            graph.register_initializer(value)
        attrs = {a: first.attributes[a].value for a in ("K", "bits", "block_size", "accuracy_level")
                 if a in first.attributes}  # fmt: skip
        out = ir.Value(name=f"{name}/output", type=first.outputs[0].type)
        fused = ir.node("MatMulNBits", [first.inputs[0], *inits], {**attrs, "N": sum(rows)},
                        domain="com.microsoft", outputs=[out], name=name)  # fmt: skip
        fused.metadata_props[FUSED_KEY] = json.dumps([[n.name, r] for n, r in zip(group, rows, strict=True)])
        parts = [ir.Value(name=f"{name}/part_{i}", type=n.outputs[0].type) for i, n in enumerate(group)]
        split = ir.node("Split", [out, sizes], {"axis": -1}, outputs=parts, name=f"{name}/Split")
        graph.insert_before(first, [fused, split])
        for node, part in zip(group, parts, strict=True):
            take_place(graph, node, part)
        self.fused += 1

    def _stacked(self, group: list[ir.Node], index: int, name: str) -> ir.Value:
        """The group's ``index``-th inputs stacked along N (scales flattened to ``[N * k_blocks]``)."""
        arrays = [np.asarray(n.inputs[index].const_value.numpy()) for n in group]  # type: ignore[union-attr]
        if index == 2:
            arrays = [a.reshape(-1) for a in arrays]
        return initializer(name, self.store(name, np.concatenate(arrays, axis=0)))
