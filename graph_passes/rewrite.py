"""The rewrite pass: replace each weight site's MatMul/Gemm with its packer's replacement nodes.

An onnx-ir in-place pass (``__call__(model) -> PassResult``). Per site it inserts the packer's nodes and
initializers, reroutes the old output (keeping its name, so graph outputs like ``logits`` stay), removes
the old node, then the Transpose and float weight once nothing else reads them (a tied embedding's Gather
keeps its table, or, with ``share_embeddings``, becomes a lookup into the same packed arrays). Opset imports are added; the default domain is bumped when a format needs a newer opset
(blockwise DequantizeLinear needs 21), together with the IR version that opset requires. Finally onnx-ir's
cleanup passes run (unused nodes/initializers, topological sort).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from .errors import InternalError
from .packing.base import PackedWeight, Packer, ReplacementNodes
from .records import WeightSite

__all__ = [
    "ReplaceWeightSitesPass",
    "SiteRewrite",
    "min_ir_version",
    "put_in_place",
    "take_place",
    "tied_gathers",
]

# Minimum IR version for a default-domain opset (onnx's VERSION_TABLE, the part that matters here).
_IR_FOR_OPSET = {19: 9, 20: 9, 21: 10, 22: 10, 23: 11, 24: 11, 25: 12}


def min_ir_version(opset: int) -> int:
    """The IR version a model importing default-domain ``opset`` must declare at least."""
    if opset <= 18:
        return 8
    return _IR_FOR_OPSET.get(opset, max(_IR_FOR_OPSET.values()))


@dataclasses.dataclass
class SiteRewrite:
    """One site, its packed weight and the packer that emits it."""

    site: WeightSite
    packed: PackedWeight
    packer: Packer


class ReplaceWeightSitesPass(ir.passes.InPlacePass):
    """Replace every site in ``rewrites`` by its packer's ``build(...)`` nodes, then clean up the graph.

    ``share_embeddings``: an embedding table tied to a replaced weight (a Gather reading the same tensor
    as an ``[N, K]`` table) is replaced by the packer's ``build_gather`` over the same stored arrays, so
    no float copy remains; ``shared`` lists those tables. Packers without ``build_gather`` keep the table."""

    def __init__(self, rewrites: Sequence[SiteRewrite], *, share_embeddings: bool = False) -> None:
        super().__init__()
        self.rewrites = list(rewrites)
        self.share_embeddings = share_embeddings
        self.shared: list[dict[str, object]] = []

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
        repl = rw.packer.build(site, x, rw.packed, bias, scope)
        put_in_place(graph, node, repl)
        weight = graph.initializers.get(site.weight_name)
        opsets = dict(repl.opset_imports)
        if weight is not None and self.share_embeddings:
            opsets.update(self._share_tables(graph, rw, repl, weight))
        if weight is not None:
            for t in {id(u.node): u.node for u in weight.uses()}.values():
                out = t.outputs[0]
                if t.op_type == "Transpose" and not out.uses() and not out.is_graph_output():
                    graph.remove(t, safe=True)
        if weight is not None and not weight.uses() and not weight.is_graph_output():
            if weight.is_graph_input():
                # Exports with keep_initializers_as_inputs list every weight as an input too: drop it with its
                # data, else the quantized model would demand it as a required input.
                graph.inputs.remove(weight)
            del graph.initializers[site.weight_name]
        return opsets

    def _share_tables(
        self, graph: ir.Graph, rw: SiteRewrite, head: ReplacementNodes, weight: ir.Value
    ) -> dict[str, int]:
        """Replace the Gathers of a table tied to ``rw``'s weight by lookups into its stored arrays."""
        build = getattr(rw.packer, "build_gather", None)
        opsets: dict[str, int] = {}
        for gather in tied_gathers(weight, rw.site) if build is not None else []:
            name = gather.name or f"{rw.site.name}.embedding"
            lookup = build(head, rw.packed, gather.inputs[1], name)
            if lookup is None:
                continue
            put_in_place(graph, gather, lookup)
            opsets.update(lookup.opset_imports)
            self.shared.append(
                {"table": rw.site.weight_name, "node": name, "shared_with": rw.site.name,
                 "bits": rw.packed.attributes.get("bits"), "block_size": rw.packed.attributes.get("block_size")}
            )  # fmt: skip
        return opsets


def tied_gathers(weight: ir.Value, site: WeightSite) -> list[ir.Node]:
    """Gathers (axis 0) reading ``weight`` as the ``[N, K]`` table of ``site``: the initializer itself
    when it is stored ``[N, K]``, else its Transpose."""
    if site.transposed:
        tables = [weight]
    else:
        tables = [
            u.node.outputs[0]
            for u in weight.uses()
            if u.node.op_type == "Transpose" and _attr(u.node, "perm", [1, 0]) == [1, 0]
        ]
    return [
        u.node
        for table in tables
        for u in table.uses()
        if u.node.op_type == "Gather" and u.idx == 0 and _attr(u.node, "axis", 0) == 0
        and u.node.domain in ("", "ai.onnx")
    ]  # fmt: skip


def _attr(node: ir.Node, name: str, default: object) -> object:
    a = node.attributes.get(name)
    return default if a is None else (list(a.value) if isinstance(a.value, Sequence) else a.value)


def put_in_place(graph: ir.Graph, node: ir.Node, repl: ReplacementNodes) -> None:
    """Register ``repl``'s initializers, insert its nodes before ``node`` and let its output take the place
    of ``node``'s (see :func:`take_place`)."""
    for value in repl.initializers:
        if value.name in graph.initializers:
            raise InternalError(f"node {node.name!r}: initializer name {value.name!r} already in the graph")
        graph.register_initializer(value)
    graph.insert_before(node, repl.nodes)
    take_place(graph, node, repl.output)


def take_place(graph: ir.Graph, node: ir.Node, output: ir.Value) -> None:
    """Reroute ``node``'s output to ``output`` and remove the node. The output keeps the old name (graph
    outputs such as logits and readers rely on it) and its type and shape (onnx.checker requires them on
    graph outputs; the value is the same)."""
    old = node.outputs[0]
    old_name = old.name
    ir.convenience.replace_all_uses_with(old, output, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    old.name = None
    output.name = old_name
    if output.type is None:
        output.type = old.type
    if output.shape is None:
        output.shape = old.shape
