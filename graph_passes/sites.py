"""Weight-site discovery: every MatMul/Gemm whose weight is a constant 2-D float tensor.

Handled shapes of the weight operand (B of MatMul/Gemm):
- a plain initializer ``[K, N]`` (what Optimum's constant folding leaves),
- ``Transpose(initializer [N, K])`` (exports without constant folding, and the tied lm_head, which reads
  ``Transpose(embed_tokens)``),
- Gemm with ``transB=1`` (and combinations with a Transpose), keeping Gemm's bias C.
Anything that looks like a candidate but cannot be handled is reported in ``SiteReport.skipped`` with a
reason, never silently dropped; MatMuls between two activations (attention scores) are not candidates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import onnx_ir as ir

from .errors import InternalError, InvalidOptionError
from .records import SiteReport, SkippedSite, WeightSite

__all__ = ["ALREADY_QUANTIZED", "find_weight_sites", "layer_index", "module_path"]

ALREADY_QUANTIZED = "already quantized"
"""Prefix of the skip reason for weights that already go through MatMulNBits / DequantizeLinear."""

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_QUANTIZED_OPS = frozenset({"MatMulNBits", "MatMulBnb4", "DequantizeLinear", "GatherBlockQuantized"})


def module_path(node_name: str) -> str:
    """``/model/layers.0/self_attn/q_proj/MatMul`` -> ``model.layers.0.self_attn.q_proj``."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) >= 2:
        return ".".join(parts[:-1])
    return node_name


def layer_index(path: str) -> int | None:
    """Decoder layer index in a module path (``layers.3`` / GPT-2's ``h.3``), or None."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    """Initializer tensor of a value (None for computed values and graph inputs without initializer)."""
    if value is None or not value.is_initializer():
        return None
    return value.const_value


def _is_graph_output(value: ir.Value) -> bool:
    return value.is_graph_output()


class _Candidate:
    """Everything learned about one MatMul/Gemm while deciding whether it is a site."""

    def __init__(self, node: ir.Node) -> None:
        self.node = node
        self.weight: ir.Value | None = None
        self.transpose: ir.Node | None = None
        self.transposed = False
        self.reason: str | None = None


def _attr(node: ir.Node, name: str, default: float | int) -> float | int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _trace_weight(node: ir.Node) -> _Candidate | None:
    """Find the constant weight behind ``node``'s B input; None if the node is not a candidate at all."""
    cand = _Candidate(node)
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    a, b = node.inputs[0], node.inputs[1]
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            cand.reason = "Gemm with transA=1 is not supported"
        elif float(_attr(node, "alpha", 1.0)) != 1.0:
            cand.reason = f"Gemm with alpha={_attr(node, 'alpha', 1.0)} is not supported"
        elif len(node.inputs) > 2 and node.inputs[2] is not None and float(_attr(node, "beta", 1.0)) != 1.0:
            cand.reason = f"Gemm with beta={_attr(node, 'beta', 1.0)} is not supported"
        cand.transposed = bool(_attr(node, "transB", 0))
    producer = b.producer()
    if _const(b) is not None:
        cand.weight = b
    elif producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx"):
        src = producer.inputs[0]
        if _const(src) is None:
            return None if _const(a) is None else _first_operand(cand)
        perm = producer.attributes.get("perm")
        if perm is not None and list(perm.value) != [1, 0]:
            cand.reason = cand.reason or f"weight reached through Transpose with perm={list(perm.value)}"
        cand.weight = src
        cand.transpose = producer
        cand.transposed = not cand.transposed
    elif producer is not None and producer.op_type == "Constant":
        cand.reason = (
            f"weight comes from Constant node {producer.name!r} (lift constants to initializers first)"
        )
    elif producer is not None and producer.op_type in _QUANTIZED_OPS:
        cand.reason = f"{ALREADY_QUANTIZED} (weight produced by {producer.op_type} {producer.name!r})"
    elif producer is not None and any(
        _const(i) is not None and _const(i).shape.rank() >= 2 for i in producer.inputs if i
    ):
        cand.reason = (
            f"weight computed by {producer.op_type} node {producer.name!r} (only Transpose is handled)"
        )
    elif _const(a) is not None:
        return _first_operand(cand)
    else:
        return None  # activation x activation (attention scores): not a weight site
    return cand


def _first_operand(cand: _Candidate) -> _Candidate:
    cand.reason = cand.reason or "the constant is the first operand (x @ W expected)"
    return cand


def _check_tensor(cand: _Candidate) -> str | None:
    tensor = cand.weight.const_value if cand.weight is not None else None
    if tensor is None:
        return "the weight has no constant value"
    if tensor.dtype not in _FLOAT_TYPES:
        return f"non-float weight ({tensor.dtype.name})"
    if tensor.shape.rank() != 2:
        return (
            f"weight {cand.weight.name!r} is {tensor.shape.rank()}-D {list(tensor.shape.dims)} (2-D expected)"
        )
    if not tensor.shape.is_static():
        return f"weight {cand.weight.name!r} has a dynamic shape {tensor.shape}"
    return None


def _uses_other_than(value: ir.Value, nodes: Iterable[ir.Node | None]) -> bool:
    own = {id(n) for n in nodes if n is not None}
    return any(id(use.node) not in own for use in value.uses()) or _is_graph_output(value)


def find_weight_sites(
    model: ir.Model,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    quantize_lm_head: bool = False,
    min_features: int = 1,
) -> SiteReport:
    """Find every quantizable weight of ``model`` (main graph) and report the rest with reasons.

    ``include`` / ``exclude``: regexes searched in the module path (``model.layers.0.mlp.up_proj``); a site
    must match one include (if any) and no exclude. The output projection (``kind="lm_head"``) is left in
    float unless ``quantize_lm_head``. Sites with K or N below ``min_features`` are skipped.
    """
    includes = [_compile(p, "include") for p in include]
    excludes = [_compile(p, "exclude") for p in exclude]
    sites: list[WeightSite] = []
    skipped: list[SkippedSite] = []
    cands: list[_Candidate] = []

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == "com.microsoft" and node.op_type in _QUANTIZED_OPS:
            skipped.append(SkippedSite(node.name or node.op_type, f"{ALREADY_QUANTIZED} ({node.op_type})"))
            continue
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        cand = _trace_weight(node)
        if cand is None:
            continue
        if node.graph is not model.graph and cand.reason is None:
            cand.reason = "inside a subgraph (If/Loop/Scan body): not supported"
        if cand.reason is None:
            cand.reason = _check_tensor(cand)
        if cand.reason is not None:
            skipped.append(SkippedSite(node.name or node.op_type, cand.reason))
            continue
        cands.append(cand)

    names = _unique_names(cands)
    for cand, name in zip(cands, names, strict=True):
        node = cand.node
        if cand.weight is None or cand.weight.const_value is None:  # _check_tensor kept only constants
            raise InternalError(f"node {cand.node.name!r}: a weight site without a constant value")
        rows, cols = (int(d) for d in cand.weight.const_value.shape.dims)
        k, n = (cols, rows) if cand.transposed else (rows, cols)
        # The output projection: named lm_head, or producing the graph's logits directly.
        is_head = name.split(".")[-1] == "lm_head" or (
            node.outputs[0].is_graph_output() and node.outputs[0].name == "logits"
        )
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        site = WeightSite(
            name=name,
            node_name=node.name or name,
            op_type=node.op_type,  # type: ignore[arg-type]
            weight_name=str(cand.weight.name),
            k=k,
            n=n,
            transposed=cand.transposed,
            activation=str(node.inputs[0].name),  # type: ignore[union-attr]
            layer=layer_index(name),
            kind="lm_head" if is_head else "linear",
            transpose_node=cand.transpose.name if cand.transpose is not None else None,
            bias_name=bias.name if bias is not None else None,
            tied=_uses_other_than(cand.weight, (node, cand.transpose)),
        )
        reason = _selection_reason(site, includes, excludes, quantize_lm_head, min_features)
        if reason is not None:
            skipped.append(SkippedSite(site.node_name, reason))
        else:
            sites.append(site)
    return SiteReport(sites=sites, skipped=skipped)


def _compile(pattern: str, option: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InvalidOptionError(
            f"{option} pattern {pattern!r} is not a valid regular expression ({e})"
        ) from None


def _unique_names(cands: Sequence[_Candidate]) -> list[str]:
    """Module paths, falling back to the full node path when two nodes share a module path."""
    paths = [
        module_path(c.node.name) if c.node.name else f"{c.node.op_type}_{i}" for i, c in enumerate(cands)
    ]
    counts: dict[str, int] = {}
    for p in paths:
        counts[p] = counts.get(p, 0) + 1
    out = []
    for c, p in zip(cands, paths, strict=True):
        if counts[p] > 1:
            p = ".".join(x for x in c.node.name.split("/") if x)
        out.append(p)
    seen: set[str] = set()
    for i, p in enumerate(out):  # still clashing (identical node names): number them
        name, j = p, 1
        while name in seen:
            j += 1
            name = f"{p}_{j}"
        seen.add(name)
        out[i] = name
    return out


def _selection_reason(
    site: WeightSite,
    includes: Sequence[re.Pattern[str]],
    excludes: Sequence[re.Pattern[str]],
    quantize_lm_head: bool,
    min_features: int,
) -> str | None:
    if site.kind == "lm_head" and not quantize_lm_head:
        return "lm_head left in float (lm_head=True / --lm-head quantizes it)"
    if includes and not any(p.search(site.name) for p in includes):
        return f"{site.name} matches no include pattern"
    for p in excludes:
        if p.search(site.name):
            return f"{site.name} excluded by pattern {p.pattern!r}"
    if min(site.k, site.n) < min_features:
        return f"too small ({site.n}x{site.k}, min_features={min_features})"
    return None
