"""The rewrite pass: replace each weight site's MatMul/Gemm with its packer's replacement nodes.

An onnx-ir in-place pass (``__call__(model) -> PassResult``). Per site it inserts the packer's nodes and
initializers, reroutes the old output (keeping its name, so graph outputs like ``logits`` stay), removes
the old node, then the Transpose and float weight once nothing else reads them (a tied embedding's Gather
keeps its table). Opset imports are added; the default domain is bumped when a format needs a newer opset
(blockwise DequantizeLinear needs 21), together with the IR version that opset requires. Finally onnx-ir's
cleanup passes run (unused nodes/initializers, topological sort).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from .errors import InternalError
from .packing.base import PackedWeight, Packer
from .records import WeightSite

__all__ = ["ReplaceWeightSitesPass", "SiteRewrite", "min_ir_version"]

# Minimum IR version for a default-domain opset (onnx's VERSION_TABLE, the part that matters here).
_IR_FOR_OPSET = {19: 9, 20: 9, 21: 10, 22: 10, 23: 11, 24: 11, 25: 12}


def min_ir_version(opset: int) -> int:
    """The IR version a model importing default-domain ``opset`` must declare at least."""
    if opset <= 18:
        return 8
    return _IR_FOR_OPSET.get(opset, max(_IR_FOR_OPSET.values()))


@dataclasses.dataclass
class SiteRewrite:
    """One site and its packed weight, ready to be emitted."""

    site: WeightSite
    packed: PackedWeight


class ReplaceWeightSitesPass(ir.passes.InPlacePass):
    """Replace every site in ``rewrites`` by ``packer.build(...)``'s nodes, then clean up the graph."""

    def __init__(self, packer: Packer, rewrites: Sequence[SiteRewrite]) -> None:
        super().__init__()
        self.packer = packer
        self.rewrites = list(rewrites)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph if node.name}
        opsets: dict[str, int] = {}
        for rw in self.rewrites:
            node = nodes.get(rw.site.node_name)
            if node is None or node.op_type != rw.site.op_type:
                raise InternalError(f"site {rw.site.name}: node {rw.site.node_name!r} not found in the graph")
            for domain, version in self._replace(graph, node, rw).items():
                opsets[domain] = max(opsets.get(domain, 0), version)
        for domain, version in opsets.items():
            if model.opset_imports.get(domain, 0) < version:
                model.opset_imports[domain] = version
        default = model.opset_imports.get("", 0)
        # Bumping the default opset is safe for the op set of exported LLMs (18 -> 21 only adds types);
        # tests verify the bumped graph in onnxruntime.
        if model.ir_version < min_ir_version(default):
            model.ir_version = min_ir_version(default)
        if self.rewrites:
            RemoveUnusedNodesPass()(model)
            TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.rewrites))

    def _replace(self, graph: ir.Graph, node: ir.Node, rw: SiteRewrite) -> dict[str, int]:
        site = rw.site
        x = node.inputs[0]
        if x is None:
            raise InternalError(f"site {site.name}: node {node.name!r} has no activation input")
        bias = node.inputs[2] if site.op_type == "Gemm" and len(node.inputs) > 2 else None
        # New nodes sit in the replaced node's scope (``/model/layers.0/mlp/up_proj/MatMul`` ->
        # ``/model/layers.0/mlp/up_proj/MatMulNBits``), so ``module_path`` of a quantized node still
        # names its module and evaluation can pair it with the fp32 weight.
        scope = node.name.rsplit("/", 1)[0] if node.name and "/" in node.name else (node.name or site.name)
        repl = self.packer.build(site, x, rw.packed, bias, scope)
        for value in repl.initializers:
            if value.name in graph.initializers:
                raise InternalError(f"site {site.name}: initializer name {value.name!r} already in the graph")
            graph.register_initializer(value)
        graph.insert_before(node, repl.nodes)
        old = node.outputs[0]
        old_name = old.name
        ir.convenience.replace_all_uses_with(old, repl.output, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        old.name = None
        repl.output.name = old_name  # keep the output's name: graph outputs (logits) and readers rely on it
        # ...and its type and shape: onnx.checker requires them on graph outputs, and the value is the same.
        if repl.output.type is None:
            repl.output.type = old.type
        if repl.output.shape is None:
            repl.output.shape = old.shape
        weight = graph.initializers.get(site.weight_name)
        if site.transpose_node is not None and weight is not None:
            for t in {id(u.node): u.node for u in weight.uses()}.values():
                out = t.outputs[0]
                if t.name == site.transpose_node and not out.uses() and not out.is_graph_output():
                    graph.remove(t, safe=True)
        if weight is not None and not weight.uses() and not weight.is_graph_output():
            if weight.is_graph_input():
                # Exports with keep_initializers_as_inputs list every weight as an input too: drop it with its
                # data, else the quantized model would demand it as a required input.
                graph.inputs.remove(weight)
            del graph.initializers[site.weight_name]
        return dict(repl.opset_imports)
