"""Token embedding tables -> ``com.microsoft::GatherBlockQuantized`` (data-free, round to nearest).

The token embedding is the largest single tensor of a small LLM (SmolLM2-135M: 28M of its 135M weights)
and a lookup reads one row per token, so storing it in 8 bits costs no measurable quality
(benchmarks/results/small_fast_defaults.md). A table qualifies when a ``Gather`` (axis 0) reads it as a
2-D float initializer with the ``input_ids`` graph input as indices, and nothing else reads it: a table
that is also the float weight of an output projection would keep its float copy anyway, and one tied to a
quantized output projection is shared with it by the rewrite pass instead (``ReplaceWeightSitesPass``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from .packing.gather_block import GatherBlockQuantizedPacker
from .rewrite import put_in_place
from .rounding.rtn import RTN, RTNConfig
from .scheme import QuantScheme

__all__ = [
    "EMBEDDING_BLOCKS",
    "QuantizeEmbeddingsPass",
    "embedding_scheme",
    "id_lookups",
    "quantize_embeddings",
    "token_embeddings",
]

EMBEDDING_BLOCKS = (16, 32, 64, 128, 256)
"""Block sizes used for tables: the run's group size when it is one of these, else 128."""

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def embedding_scheme(bits: int, run: QuantScheme) -> QuantScheme:
    """Symmetric ``bits`` with the run's block (128 when the run's is per channel or out of range)."""
    block = run.group_size if run.group_size in EMBEDDING_BLOCKS else 128
    return QuantScheme(bits=bits, group_size=block, symmetric=True)


def id_lookups(graph: ir.Graph) -> list[ir.Node]:
    """The Gathers (axis 0) that look the graph input ``input_ids`` up in a constant 2-D table: the one
    definition of "token embedding lookup" that quantization, the transforms and their checks share."""
    out = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        table, ids = node.inputs[0], node.inputs[1]
        axis = node.attributes.get("axis")
        if table is None or ids is None or (axis is not None and axis.value != 0):
            continue
        if not (ids.is_graph_input() and ids.name == "input_ids"):
            continue
        tensor = table.const_value
        if tensor is not None and tensor.shape.rank() == 2:
            out.append(node)
    return out


def token_embeddings(graph: ir.Graph) -> list[ir.Node]:
    """The token-id lookups in a float table no other node reads."""
    out = []
    for node in id_lookups(graph):
        table = node.inputs[0]
        if table.const_value.dtype not in _FLOATS:  # type: ignore[union-attr]
            continue
        if len(table.uses()) != 1 or table.is_graph_output() or table.is_graph_input():  # type: ignore[union-attr]
            continue
        out.append(node)
    return out


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Replace each token-embedding Gather by a ``GatherBlockQuantized`` of its table at ``bits``."""

    def __init__(self, bits: int, run: QuantScheme) -> None:
        super().__init__()
        self.scheme = embedding_scheme(bits, run)
        self.packer = GatherBlockQuantizedPacker()
        self.done: list[dict[str, Any]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for gather in token_embeddings(graph):
            table = gather.inputs[0]
            tensor = table.const_value  # type: ignore[union-attr]
            n, k = (int(d) for d in tensor.shape.dims)  # type: ignore[union-attr]
            if self.packer.supports(self.scheme, k, n) is not None:
                continue  # e.g. a hidden size whose packed row does not fill whole bytes
            self._replace(graph, gather, tensor.numpy(), tensor.dtype)  # type: ignore[union-attr]
        if self.done and model.opset_imports.get("com.microsoft", 0) < 1:
            model.opset_imports["com.microsoft"] = 1
        return ir.passes.PassResult(model, modified=bool(self.done))

    def _replace(self, graph: ir.Graph, gather: ir.Node, table: np.ndarray, dtype: ir.DataType) -> None:
        table_name = str(gather.inputs[0].name)  # type: ignore[union-attr]
        qw = RTN(RTNConfig()).quantize(table, self.scheme, site=table_name)  # reads it by row chunks
        packed = self.packer.pack(qw)
        name = gather.name or f"{table_name}.lookup"
        repl = self.packer.build(gather.inputs[1], packed, name, dtype)  # type: ignore[arg-type]
        put_in_place(graph, gather, repl)
        del graph.initializers[table_name]  # its only reader is gone
        self.done.append(
            {"table": table_name, "node": name, "shared_with": None, "bits": self.scheme.bits,
             "block_size": self.scheme.group_size, "float_bytes": int(table.nbytes),
             "packed_bytes": int(packed.nbytes), "sqnr_db": float(qw.metrics.get("sqnr_db", float("nan")))}
        )  # fmt: skip


def quantize_embeddings(model: ir.Model, bits: int, run: QuantScheme) -> list[dict[str, Any]]:
    """Quantize the token embedding tables of ``model`` in place; one record per table replaced."""
    quantizer = QuantizeEmbeddingsPass(bits, run)
    quantizer(model)
    return quantizer.done
