"""``optimum-adaround eval MODEL_DIR``: perplexity through onnxruntime, size, bits per weight, SQNR."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="perplexity (onnxruntime), model size, bits per weight and weight SQNR of an ONNX model",
        description=(
            "Evaluate an exported/quantized ONNX causal LM folder. Perplexity uses non-overlapping windows of "
            "--context-length tokens (BOS first when the tokenizer adds one) over the embedded Wikipedia "
            "evaluation split unless --text is given."
        ),
    )
    p.add_argument("model_dir", type=Path, help="folder with model.onnx (+ data), config and tokenizer")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="FP32_DIR",
        help="fp32 export of the same model: report per-site weight SQNR against it",
    )
    p.add_argument(
        "--text",
        default=None,
        help="evaluation text: wikipedia (default), news, embedded, a .txt/.jsonl file, or hf:NAME",
    )
    p.add_argument("--context-length", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N text tokens")
    p.add_argument("--batch-size", type=int, default=1, help="windows per onnxruntime call (default 1)")
    p.add_argument(
        "--runtime",
        choices=("onnxruntime", "genai"),
        default="onnxruntime",
        help="perplexity through onnxruntime (default) or onnxruntime-genai (needs the folder's "
        "genai_config.json, written by quantize; pip install 'optimum-adaround[genai]')",
    )
    p.add_argument("--no-perplexity", action="store_true", help="only size, bits per weight and SQNR")
    p.add_argument(
        "--sqnr-plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="write per-site SQNR bars here (needs --reference)",
    )
    p.add_argument(
        "--json", type=Path, default=None, metavar="OUT.json", help="also write the report as JSON"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..data.text import evaluation_text
    from ..evaluation import evaluate
    from ..graph_passes.errors import UserError

    if args.sqnr_plot is not None and args.reference is None:
        raise UserError("--sqnr-plot needs --reference FP32_DIR (SQNR compares against the fp32 weights)")
    text = evaluation_text(args.text) if args.text is not None else None
    report = evaluate(
        args.model_dir,
        text=text,
        reference=args.reference,
        context_length=args.context_length,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        runtime=args.runtime,
        skip_perplexity=args.no_perplexity,
        progress=not args.no_progress,
    )
    d = report.to_dict()
    if report.perplexity is not None:
        pr = report.perplexity
        print(
            f"perplexity      {pr.perplexity:.4f}  ({pr.tokens} tokens, {pr.windows} windows of {pr.context_length}"
            f", {args.runtime})"
        )
    _print_predicted(args.model_dir)
    print(f"model size      {report.model_bytes / 1e6:.2f} MB")
    if report.bits_per_weight is not None:
        print(
            f"bits per weight {report.bits_per_weight:.3f}  ({report.sites} quantized sites, "
            f"{report.quantized_weights} weights)"
        )
    else:
        print("bits per weight -  (no quantized linear weights found)")
    if d["mean_weight_sqnr_db"] is not None:
        worst = min(report.weight_sqnr_db.items(), key=lambda kv: kv[1])
        print(f"weight SQNR     mean {d['mean_weight_sqnr_db']:.2f} dB, worst {worst[1]:.2f} dB ({worst[0]})")
    if report.unreadable_sites:
        print(
            f"note: {len(report.unreadable_sites)} custom-op nodes not counted: {report.unreadable_sites[:3]}",
            file=sys.stderr,
        )
    if args.sqnr_plot is not None:
        from ..plots import plot_sqnr_bars

        plot_sqnr_bars(report.weight_sqnr_db, args.sqnr_plot, title=f"Weight SQNR: {args.model_dir.name}")
        print(f"wrote {args.sqnr_plot}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(d), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _print_predicted(folder: Path) -> None:
    """The increase the predictor gave before a ``--target-bits`` run, beside what was just measured."""
    record = folder / "quantization_config.json"
    alloc = json.loads(record.read_text()).get("allocation") if record.is_file() else None
    if isinstance(alloc, dict) and "predicted_delta_nll" in alloc:
        increase = math.expm1(alloc["predicted_delta_nll"])
        spread = alloc.get("predicted_delta_nll_se", 0.0) * (1 + increase)
        print(
            f"predicted       +{100 * increase:.1f}% (+/- {100 * spread:.1f}%) over the float model, before the run"
        )


def _jsonable(obj: object) -> object:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj
