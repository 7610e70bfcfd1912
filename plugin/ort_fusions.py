"""onnxruntime's transformer fusions on a written output (``ort_fusions``, off by default).

Optimum's exports spell rotary embeddings and the residual-add + RMSNorm pairs as dozens of small ops per
layer, and decode of a small model is bound by that per-node overhead. onnxruntime's own transformer
optimizer (``onnxruntime.transformers.optimizer``, GPT-2 fusions, no session-level rewrites) replaces them
by ``RotaryEmbedding`` and ``SkipSimplifiedLayerNormalization``: on SmolLM2-135M 7.4k -> 5.1k nodes and
1.34x -> 1.56x decode against the 0.7.0 output at the same perplexity
(benchmarks/results/small_fast_defaults.md). It loads the whole model into memory, so it is skipped above
2 GB, and it is skipped for graphs that already use fused attention (onnxruntime-genai's builder) or our
op library; a failure leaves the output as it was and says why in the record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from .graph_passes.model_io import save_model
from .graph_passes.shapes import ShareShapeComputationsPass

__all__ = ["MAX_BYTES", "apply_ort_fusions", "max_positions"]

MAX_BYTES = 2_000_000_000
"""Models above this are left alone: the optimizer holds the whole protobuf in memory."""

_FUSED_ATTENTION = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention", "PagedAttention"})


def _skip_reason(model: ir.Model, size: int) -> str | None:
    if size > MAX_BYTES:
        return (
            f"the model is {size / 1e9:.1f} GB (the optimizer loads it whole; limit {MAX_BYTES / 1e9:.0f} GB)"
        )
    domains = {n.domain for n in model.graph} - {"", "ai.onnx", "com.microsoft"}
    if domains:
        return f"the graph uses ops of {', '.join(sorted(domains))}"
    fused = sorted({n.op_type for n in model.graph if n.op_type in _FUSED_ATTENTION})
    if fused:
        return f"the graph already runs fused attention ({', '.join(fused)})"
    return None


def _trim_rotary_caches(graph: object, positions: int | None) -> int:
    """Cut the cos/sin caches the rotary fusion writes (131072 rows on SmolLM2, 34 MB) to the model's
    ``max_position_embeddings`` rows: positions beyond it are never looked up. Returns the bytes saved."""
    if not positions:
        return 0
    names = {n.input[i] for n in graph.node if n.op_type == "RotaryEmbedding" for i in (2, 3)}  # type: ignore[attr-defined]
    saved = 0
    for t in graph.initializer:  # type: ignore[attr-defined]
        if t.name in names and len(t.dims) == 2 and t.dims[0] > positions and t.raw_data:
            row = len(t.raw_data) // t.dims[0]
            saved += (t.dims[0] - positions) * row
            t.raw_data = t.raw_data[: positions * row]
            t.dims[0] = positions
    return saved


def max_positions(folder: Path | None) -> int | None:
    """``max_position_embeddings`` of the model folder's config.json, if it says."""
    try:
        hf = json.loads((folder / "config.json").read_text()) if folder is not None else {}
    except (OSError, ValueError):
        return None
    value = hf.get("max_position_embeddings") if isinstance(hf, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def apply_ort_fusions(
    model: ir.Model,
    model_file: Path,
    files: list[Path],
    source: Path | None = None,
    *,
    share_shapes: bool = False,
) -> tuple[dict[str, object], list[Path]]:
    """Rewrite ``model_file`` (with its external data ``files``) in place with onnxruntime's fusions;
    ``source``: the input's folder, whose config.json's ``max_position_embeddings`` the rotary caches are cut
    to; ``share_shapes``: run ``ShareShapeComputationsPass`` on the fused graph (after the fusions: the
    rotary one matches the export's own shape reads). Returns what happened (``{"applied": bool, "reason" |
    "fused": ...}``) and the model's files now."""
    reason = _skip_reason(model, sum(f.stat().st_size for f in files))
    if reason is not None:
        return {"applied": False, "reason": reason}, files
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:  # pragma: no cover - onnxruntime ships it
        return {"applied": False, "reason": f"onnxruntime.transformers is not available ({e})"}, files
    before = len(model.graph)
    tmp = Path(tempfile.mkdtemp(dir=model_file.parent, prefix=".ort-fusions-"))
    try:
        optimized = optimize_model(
            str(model_file), model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0
        )
        trimmed = _trim_rotary_caches(optimized.model.graph, max_positions(source))
        fused = ir.serde.deserialize_model(optimized.model)
        shapes = ShareShapeComputationsPass() if share_shapes else None
        if shapes is not None:
            shapes(fused)
        save_model(fused, tmp / model_file.name, external_data=len(files) > 1)
    except Exception as e:  # any optimizer failure keeps the unfused output, said in the record
        shutil.rmtree(tmp, ignore_errors=True)
        failed = f"onnxruntime's optimizer failed: {str(e).splitlines()[0][:200]}"
        return {"applied": False, "reason": failed}, files
    for f in files:  # the fused model is complete on disk: it takes the unfused one's place
        f.unlink()
    written = [model_file.parent / f.name for f in tmp.iterdir()]
    for f in tmp.iterdir():
        os.replace(f, model_file.parent / f.name)
    tmp.rmdir()
    counts: dict[str, int] = {}
    for node in fused.graph:
        if node.op_type in (
            "RotaryEmbedding",
            "SkipSimplifiedLayerNormalization",
            "SimplifiedLayerNormalization",
        ):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    done = {
        "applied": True,
        "nodes_before": before,
        "nodes_after": len(fused.graph),
        "fused": counts,
        "rotary_cache_bytes_cut": trimmed,
        "shapes": shapes.record if shapes is not None else None,
    }
    return done, sorted(written)
