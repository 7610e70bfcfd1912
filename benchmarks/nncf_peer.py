"""Intel NNCF's weight compression of the default model, as a peer row for our benchmarks.

``nncf.compress_weights`` (NNCF 3.4.0, ``pip install -e .[nncf]``) is applied to the default model's fp32
Optimum ONNX export (``default_onnx_dir()``, SmolLM2-135M) and written as a model folder our evaluation
scores like any of ours (``model.onnx`` + the source's config and tokenizer files). For each named
configuration (CONFIGS below) it prints one JSON line: compression seconds and peak memory, the size of the
folder and of the model files (MB), bits per weight over the linear layers our reader finds
(``quantized_sites``: MatMulNBits and blockwise DequantizeLinear), how many linear MatMuls stayed float,
and the perplexity on the embedded Wikipedia (``--eval-tokens``, 16384) and news (``--news-tokens``, 8192)
evaluation splits::

    python benchmarks/nncf_peer.py --config int4-g128-data-free --config int4-g128-awq-se --json OUT.json

Each configuration runs in its own spawned process (``measure.run_function``), so the model is freed
between configurations and the peak memory is that configuration's own; the folders stay in ``--work``.

What NNCF does on ONNX (read from its 3.4.0 source): the export has opset 18, so 4-bit weights become
``com.microsoft`` MatMulNBits (``accuracy_level=0``), DequantizeLinear with ``block_size`` needing opset 21.
The embedding Gather and the last MatMul (lm_head) are always kept in the backup precision, INT8_ASYM per
channel, unless ``all_layers``. NF4, MX/FP formats, codebooks, 2/3-bit, GPTQ and LoRA correction are refused
on ONNX. ``ratio`` and ``sensitivity_metric``: see :func:`compress`.

Three fixes make NNCF's ONNX path run on this export (each recorded in the row): the tied lm_head's
``Transpose(embed_tokens)`` is folded into its own initializer (NNCF fails on it otherwise, and the two
tables are then stored in INT8 separately); K = 576 is not a multiple of 128, and NNCF has no partial last
block, so ``group_size_fallback="adjust"`` quantizes those layers at block 64 ("g128" is g64 for q/k/v/o/
gate/up and g128 for down); the ``com.microsoft`` opset import NNCF leaves out is added before saving.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # measure.py; the jobs below must be importable by a spawned process
from measure import provenance, run_function  # noqa: E402

# name -> compress() options. Data-aware ones calibrate on 32 x 256 Wikipedia tokens, as our GPTQ does.
CONFIGS: dict[str, dict[str, Any]] = {
    "int4-g128-data-free": {"mode": "int4_sym", "group_size": 128, "ratio": 1.0},
    "int4-g128-awq-se": {"mode": "int4_sym", "group_size": 128, "ratio": 1.0, "awq": True, "scale_estimation": True},
    "int4-g128-awq-se-r0.8": {"mode": "int4_sym", "group_size": 128, "ratio": 0.8, "awq": True, "scale_estimation": True},
    "int4-g64-awq-se": {"mode": "int4_sym", "group_size": 64, "ratio": 1.0, "awq": True, "scale_estimation": True},
}  # fmt: skip
MODEL_FILES = ("model.onnx", "model.onnx_data", "model.onnx.data")
EXTERNAL_DATA_BYTES = (
    1_800_000_000  # protobuf refuses messages over 2 GB: bigger models go to model.onnx_data
)
DEFAULT_WORK = Path("~/.cache/optimum-adaround/bench-nncf").expanduser()


def calibration_dataset(src: Path, model_proto: Any, n_samples: int, seq_len: int) -> list[dict[str, Any]]:
    """One feed dict per calibration sequence (batch 1, empty caches), as our own calibration feeds."""
    import onnx_ir as ir

    from optimum.adaround.data.text import calibration_token_ids
    from optimum.adaround.graph_passes.calibration.feeds import feed_specs, make_feeds, window_capacities

    graph = ir.from_proto(model_proto).graph  # wraps the proto's tensors without copying them
    specs = feed_specs(list(graph.inputs), folder=src, capacities=window_capacities(graph))
    ids = calibration_token_ids(src, None, n_samples, seq_len, seed=0)
    return [make_feeds(specs, ids[i : i + 1]) for i in range(len(ids))]


def fold_weight_transposes(model_proto: Any) -> list[str]:
    """Replace every Transpose of a 2-D initializer by an initializer holding the transposed tensor.

    The export's tied lm_head reads ``Transpose(model.embed_tokens.weight)``; NNCF 3.4.0's ONNX backend takes
    the Transpose output for the MatMul's weight and fails with "There is no tensor with the name
    model.embed_tokens.weight_transposed". Folding it (as a constant-folded export would) unties the table:
    NNCF then stores the embedding and the lm_head separately, each in INT8. Returns the folded outputs."""
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    folded = []
    for node in list(graph.node):
        src = inits.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if src is None or len(src.dims) != 2 or perm != [1, 0]:
            continue
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(src).T.copy(), node.output[0]))
        graph.node.remove(node)
        folded.append(node.output[0])
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name in inits and t.name not in used]:
        graph.initializer.remove(t)  # a source read by nothing else now (an untied weight)
    return folded


def embedding_gathers(model_proto: Any) -> list[str]:
    """Gather nodes reading a 2-D float initializer (the token embedding): with ``all_layers`` NNCF would
    make them 4-bit MatMuls fed with token ids, which onnxruntime refuses, so they are ignored."""
    import onnx

    tables = {
        t.name
        for t in model_proto.graph.initializer
        if len(t.dims) == 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }
    return [n.name for n in model_proto.graph.node if n.op_type == "Gather" and n.input[0] in tables]


def declare_domains(model_proto: Any) -> list[str]:
    """Add the opset imports of node domains the model uses but does not declare: NNCF 3.4.0 writes
    ``com.microsoft`` MatMulNBits without importing that domain, which onnx.checker (and so our loader)
    refuses. Returns the domains added."""
    import onnx

    declared = {o.domain for o in model_proto.opset_import}
    missing = sorted({n.domain for n in model_proto.graph.node if n.domain not in ("", "ai.onnx")} - declared)
    model_proto.opset_import.extend(onnx.helper.make_opsetid(d, 1) for d in missing)
    return missing


def save_folder(model_proto: Any, src: Path, out: Path) -> None:
    """Write ``out`` whole: a temporary folder renamed into place, so a failed run leaves no half model."""
    import onnx

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    big = sum(t.ByteSize() for t in model_proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model_proto,
        str(tmp / "model.onnx"),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
    )
    for f in src.iterdir():  # config, tokenizer, generation config: what evaluation and genai read
        if f.is_file() and f.name not in MODEL_FILES and not f.name.endswith(".onnx"):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def compress(
    src: Path,
    out: Path,
    *,
    mode: str = "int4_sym",
    group_size: int = 128,
    ratio: float = 1.0,
    awq: bool = False,
    scale_estimation: bool = False,
    sensitivity_metric: str | None = None,
    calib_samples: int = 32,
    seq_len: int = 256,
    all_layers: bool = False,
    group_size_fallback: str = "adjust",
) -> dict[str, Any]:
    """Compress ``src``'s ``model.onnx`` with ``nncf.compress_weights`` into the model folder ``out``.

    ``mode``: a ``nncf.CompressWeightsMode`` value (``int4_sym``, ``int4_asym``, ``int8_asym``...).
    ``ratio``: the share of the *ratio-defining* weights (every MatMul but the last, plus the embedding
    Gather when ``all_layers``), counted in weights, not layers, that goes to ``mode``; the rest take the
    backup precision (INT8_ASYM per channel). NNCF scores each layer with ``sensitivity_metric``, sorts them
    from least to most sensitive and gives 4 bits to the least sensitive ones while the 4-bit share stays
    below ``ratio`` (so the most sensitive stay 8-bit); ``ratio=1.0`` skips the scoring.
    ``sensitivity_metric``: a ``nncf.SensitivityMetric`` value; None takes NNCF's default,
    ``weight_quantization_error`` without a dataset (1 / the worst output channel's mean squared error of
    per-channel INT8_ASYM quantization: the weight alone) and ``max_activation_variance`` with one (that
    score times the largest, over input channels, variance of the layer's input along the sequence, averaged
    over samples); also ``mean_activation_variance``, ``mean_activation_magnitude`` and
    ``hessian_input_activation`` (Hessian trace x 8-bit noise). The data-aware metrics need a dataset, and
    with them an embedding Gather (``all_layers``) scores lowest, so it goes to 4 bits first.
    ``group_size_fallback``: NNCF's ``GroupSizeFallbackMode`` for a K that ``group_size`` does not divide
    (NNCF has no partial last block): its default ``error`` refuses SmolLM2's K=576 at g128; ``adjust`` (ours)
    uses the largest power of two dividing K, below ``group_size`` and >= 32 (576 -> 64); ``ignore`` keeps
    those layers float.
    Data-free when ``awq`` and ``scale_estimation`` are off and ``ratio == 1.0``; otherwise NNCF gets
    ``calib_samples`` Wikipedia sequences of ``seq_len`` tokens, one per feed (batch 1).
    Returns the options, compression seconds and the process's peak RSS (MB) so far.
    """
    import nncf
    import onnx

    opts = {"mode": mode, "group_size": group_size, "ratio": ratio, "awq": awq,
            "scale_estimation": scale_estimation, "sensitivity_metric": sensitivity_metric,
            "all_layers": all_layers, "group_size_fallback": group_size_fallback}  # fmt: skip
    t0 = time.perf_counter()
    model = onnx.load(str(src / "model.onnx"))
    folded = fold_weight_transposes(model)
    data_aware = awq or scale_estimation or ratio != 1.0
    feeds = calibration_dataset(src, model, calib_samples, seq_len) if data_aware else None
    ignored = nncf.IgnoredScope(names=embedding_gathers(model)) if all_layers else None
    model = nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode(mode),
        group_size=group_size,
        ratio=ratio,
        all_layers=all_layers,
        ignored_scope=ignored,
        dataset=nncf.Dataset(feeds) if feeds is not None else None,
        subset_size=calib_samples,  # NNCF's default is 128: use what we calibrate with
        awq=awq,
        scale_estimation=scale_estimation,
        sensitivity_metric=nncf.SensitivityMetric(sensitivity_metric) if sensitivity_metric else None,
        advanced_parameters=nncf.AdvancedCompressionParameters(
            group_size_fallback_mode=nncf.GroupSizeFallbackMode(group_size_fallback)
        ),
    )
    seconds = time.perf_counter() - t0
    added = declare_domains(model)
    save_folder(model, src, out)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {**opts, "folded_transposes": folded, "added_opsets": added, "data_aware": data_aware, "calib": [calib_samples, seq_len] if data_aware else None,
            "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)}  # fmt: skip


def storage(folder: Path) -> dict[str, Any]:
    """Sizes, bits per weight over the sites ``quantized_sites`` reads, and what it leaves unread."""
    from optimum.adaround.evaluation import model_bytes, quantized_sites
    from optimum.adaround.graph_passes.model_io import load_model

    model = load_model(str(folder)).model
    sites, _ = quantized_sites(model)
    weights = sum(s.k * s.n for s in sites)
    nodes = list(model.graph.all_nodes())
    float_linear = [n.name for n in nodes if n.op_type in ("MatMul", "Gemm") and _const_2d(n.inputs[1])]
    float_gather = [n.name for n in nodes if n.op_type == "Gather" and _const_2d(n.inputs[0])]
    return {
        "size_mb": round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6, 2),
        "model_mb": round(model_bytes(folder / "model.onnx", model) / 1e6, 2),
        "bits_per_weight": round(8 * sum(s.stored_bytes for s in sites) / weights, 4) if weights else None,
        "sites_read": len(sites),
        "site_weights": weights,
        "site_schemes": dict(
            Counter(f"{s.stored.scheme.bits}b/g{s.stored.scheme.group_size}" for s in sites)
        ),
        "float_linear_matmuls": len(float_linear),
        "int8_dq": _dq_tables(model, {id(t) for s in sites for t in s.tensors.values()}),
        "float_embedding_gathers": len(float_gather),
        "ops": {k: v for k, v in Counter(n.op_type for n in nodes).items() if k in _WEIGHT_OPS},
    }


_WEIGHT_OPS = ("MatMulNBits", "DequantizeLinear", "MatMul", "Gather", "GatherBlockQuantized")


def _dq_tables(model: Any, read: set[int]) -> dict[str, Any]:
    """Per-channel DequantizeLinear weights that ``quantized_sites`` leaves unread (NNCF's INT8_ASYM backup
    for the embedding and the lm_head): their weights and bits per weight (codes + scales + zero points)."""
    out: dict[str, Any] = {"count": 0, "weights": 0, "bytes": 0}
    for node in model.graph.all_nodes():
        tensors = [v.const_value for v in node.inputs if v is not None and v.const_value is not None]
        if node.op_type != "DequantizeLinear" or not tensors or id(tensors[0]) in read:
            continue
        out["count"] += 1
        out["weights"] += tensors[0].size
        out["bytes"] += sum(t.nbytes for t in tensors)
    out["bits_per_weight"] = round(8 * out["bytes"] / out["weights"], 4) if out["weights"] else None
    return out


def _const_2d(value: Any) -> bool:
    """A 2-D float constant: a weight still stored in float."""
    t = value.const_value if value is not None else None
    return t is not None and len(t.shape) == 2 and t.dtype.is_floating_point()


def run_config(name: str, work: str, eval_tokens: int, news_tokens: int) -> dict[str, Any]:
    """Compress with configuration ``name`` into ``work/name`` and score it (one spawned process each)."""
    from optimum.adaround.data.default_model import default_onnx_dir
    from optimum.adaround.data.text import evaluation_text
    from optimum.adaround.evaluation import perplexity

    out = Path(work) / name
    row: dict[str, Any] = {"config": name, **compress(default_onnx_dir(), out, **CONFIGS[name])}
    row.update(storage(out))
    for text, tokens in (("wikipedia", eval_tokens), ("news", news_tokens)):
        res = perplexity(out, evaluation_text(text), max_tokens=tokens, progress=False)
        row[f"ppl_{text}"], row[f"tokens_{text}"] = round(res.perplexity, 4), res.tokens
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="repeatable (default: all)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="Wikipedia evaluation tokens")
    p.add_argument("--news-tokens", type=int, default=8192, help="news evaluation tokens")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the model folders are written")
    p.add_argument("--json", type=Path, help="write every row here")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per configuration")
    args = p.parse_args(argv)
    import nncf  # fail here, before any process starts, when the extra is not installed

    rows, failed = [], 0
    for name in args.config or list(CONFIGS):
        res = run_function(run_config, args.timeout, name=name, work=str(args.work),
                           eval_tokens=args.eval_tokens, news_tokens=args.news_tokens)  # fmt: skip
        row = (
            res["info"]
            if res["ok"]
            else {"config": name, "error": res["error"], "traceback": res.get("traceback")}
        )
        row |= {
            "wall_seconds": round(res["wall_seconds"], 1),
            "peak_rss_anon_mb": round(res["peak_rss_anon_mb"]),
        }
        failed += not res["ok"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"nncf": nncf.__version__, **provenance(), "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
