"""What a written model stores outside the layers an allocation chooses for: ``--max-size`` leaves those
layers the rest.

The rest is every other initializer as it will be written (a token embedding table that the embedding pass
quantizes at its packed size, everything else as stored) and the graph itself: the source file's bytes that
are not tensor data, plus ``GRAPH_BYTES_PER_SITE`` for each quantized layer's nodes and tensor names. The run
checks the written size against the limit before it keeps the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from ..embeddings import embedding_scheme, token_embeddings
from ..packing.gather_block import GatherBlockQuantizedPacker
from ..records import WeightSite
from ..scheme import QuantScheme

__all__ = ["GRAPH_BYTES_PER_SITE", "MB", "rest_bytes"]

MB = 1_000_000
"""``--max-size`` counts megabytes of 10^6 bytes, as file sizes are shown on model hubs."""
GRAPH_BYTES_PER_SITE = 1024
"""Graph bytes reserved per quantized layer: SmolLM2-135M's rewritten graph is 116 KB larger than its
source's for 211 layers (550 bytes each: MatMulNBits nodes, their tensors' names and attributes)."""


def rest_bytes(
    model: ir.Model, sites: Sequence[WeightSite], source: Path | None, embedding_bits: int | None,
    run: QuantScheme,
) -> int:  # fmt: skip
    """Bytes the written model keeps outside ``sites``' weights: other initializers (token embedding
    tables at ``embedding_bits`` when the embedding pass takes them) and the graph (``source``: the
    ``.onnx`` file read; its bytes beyond the inline tensors, and ``GRAPH_BYTES_PER_SITE`` per site)."""
    chosen = {s.weight_name for s in sites}
    packed = _embedding_bytes(model, embedding_bits, run) if embedding_bits else {}
    tensors, inline = 0, 0
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None:
                continue
            if not isinstance(tensor, ir.ExternalTensor):
                inline += tensor.nbytes
            if name not in chosen:
                tensors += packed.get(name, tensor.nbytes)
    graph_bytes = max(source.stat().st_size - inline, 0) if source is not None and source.is_file() else 0
    return int(tensors + graph_bytes + GRAPH_BYTES_PER_SITE * len(sites))


def _embedding_bytes(model: ir.Model, bits: int, run: QuantScheme) -> dict[str, int]:
    """Table name -> the bytes its ``GatherBlockQuantized`` stores (codes, and scales in the table's type),
    for the tables the embedding pass takes."""
    scheme = embedding_scheme(bits, run)
    packer = GatherBlockQuantizedPacker()
    out = {}
    for gather in token_embeddings(model.graph):
        tensor = gather.inputs[0].const_value  # type: ignore[union-attr]
        n, k = (int(d) for d in tensor.shape.dims)  # type: ignore[union-attr]
        if packer.supports(scheme, k, n) is None:
            row = k * scheme.bits // 8 + scheme.n_blocks(k) * int(tensor.dtype.itemsize)  # type: ignore[union-attr]
            out[str(gather.inputs[0].name)] = n * row  # type: ignore[union-attr]
    return out
