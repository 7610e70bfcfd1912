"""What ``accuracy_level`` 4 does to a quantized layer's input, as ONNX ops the probes can run.

MatMulNBits (and our low-bit op) at ``accuracy_level`` 4 round their input to int8 before the product: per
block of the weight's block size along K, a symmetric scale ``max |x| / 127`` (a last, shorter block when K
is not a multiple). That costs loss on its own, whatever the weights' bits (SmolLM2-135M W8 g128 rtn: +0.0075
nats at level 4, +0.0004 at level 0; benchmarks/results/predictor.md), so the predictor measures it: the
float model with every site's input rounded this way (``round_site_inputs``) against the float model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from ..errors import UserError
from ..packing.base import initializer
from ..records import WeightSite
from ..scheme import QuantScheme

__all__ = ["INT8_LEVEL", "INT8_SEQUENCES", "input_blocks", "round_site_inputs"]

INT8_LEVEL = 4
"""The ``accuracy_level`` at which the CPU kernels compute with int8 inputs."""
INT8_SEQUENCES = 8
"""Calibration sequences the int8 probes read. Standard error of the block-128 probe on SmolLM2-135M: 0.007
nats on 2 sequences (the units' probes), 0.0037 on 8, 0.0018 on 32 (mean 0.022, 0.010, 0.011), the
measured W8 g128 cost 0.0071-0.0079 (benchmarks/results/predictor.md); 8 take about 10 s per block size
there."""


def input_blocks(
    labels: Mapping[str, str], sites: Sequence[WeightSite], accuracy_level: int
) -> dict[str, int]:
    """Site -> the block size at which its input is rounded to int8, for sites quantized under ``labels``
    (scheme labels; float and unparsable labels are not quantized) at ``accuracy_level``."""
    if accuracy_level != INT8_LEVEL:
        return {}
    out = {}
    for site in sites:
        label = labels.get(site.name)
        try:
            scheme = QuantScheme.parse(label) if label else None
        except UserError:
            scheme = None
        if scheme is not None:
            out[site.name] = scheme.group_size if scheme.group_size > 0 else site.k
    return out


def round_site_inputs(
    graph: ir.Graph, sites: Sequence[WeightSite], block: int | Mapping[str, int], gate: ir.Value | None = None
) -> int:
    """Rewrite ``graph`` so that each site's MatMul reads its input rounded to int8 per ``block`` along K
    (or per site name -> block; sites absent from it keep their input), one rounding per activation, shared
    by the sites it feeds (at the first one's block). ``gate`` (a float scalar the caller feeds): the input
    read is ``x + gate * (rounded - x)``, so one session runs with (1) and without (0) the rounding.
    Returns how many inputs were rounded."""
    by_node = {n.name: n for n in graph}
    rounded: dict[str, ir.Value] = {}
    for site in sites:
        node = by_node.get(site.node_name)
        size = block if isinstance(block, int) else block.get(site.name)
        if node is None or size is None:
            continue
        for i, x in enumerate(node.inputs):
            if x is None or x.name != site.activation:
                continue
            if x.name not in rounded:
                rounded[x.name] = _rounded(graph, node, x, site.k, size, len(rounded), gate)
            node.replace_input_with(i, rounded[x.name])
    return len(rounded)


def _rounded(graph: ir.Graph, before: ir.Node, x: ir.Value, k: int, block: int, index: int,
             gate: ir.Value | None) -> ir.Value:  # fmt: skip
    """``x`` ([..., k]) rounded to int8 per block of ``block`` along its last axis (by ``gate``)."""
    name = f"optimum_adaround.int8_input_{index}"
    padded = -(-k // block) * block
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    nodes: list[ir.Node] = []

    def const(suffix: str, array: np.ndarray) -> ir.Value:
        value = initializer(f"{name}.{suffix}", array)
        graph.register_initializer(value)
        return value

    def op(op_type: str, *inputs: ir.Value, **attributes: int) -> ir.Value:
        nodes.append(ir.node(op_type, list(inputs), attributes=attributes, name=f"{name}/{len(nodes)}"))
        return nodes[-1].outputs[0]

    shape = op("Shape", x)
    rows = op("Reshape", x, const("rows", np.array([-1, k], np.int64)))
    if padded != k:  # a last, shorter block: zeros do not change its maximum
        rows = op("Pad", rows, const("pads", np.array([0, 0, 0, padded - k], np.int64)))
    blocks = op("Reshape", rows, const("blocks", np.array([-1, block], np.int64)))
    amax = op("ReduceMax", op("Abs", blocks), const("axes", np.array([1], np.int64)), keepdims=1)
    scale = op(
        "Max", op("Div", amax, const("levels", np.array(127, dtype))), const("tiny", np.array(1e-30, dtype))
    )
    back = op("Reshape", op("Mul", op("Round", op("Div", blocks, scale)), scale),
              const("flat", np.array([-1, padded], np.int64)))  # fmt: skip
    if padded != k:
        starts, ends = const("starts", np.array([0], np.int64)), const("ends", np.array([k], np.int64))
        back = op("Slice", back, starts, ends, const("axis", np.array([1], np.int64)))
    out = op("Reshape", back, shape)
    if gate is not None:
        out = op("Add", x, op("Mul", gate, op("Sub", out, x)))
    graph.insert_before(before, nodes)
    return out
