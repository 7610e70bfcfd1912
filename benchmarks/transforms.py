"""Equivalent transforms before rounding: perplexity of gptq with and without them, on two text domains.

Rows: for each scheme (``--schemes``), gptq on the default model's Optimum export as it is, after
``--transform rotate`` (residual stream), and after ``rotate`` + ``rotate_down`` (also the down
projection's input, online). Output projection and embedding in float and ``accuracy_level`` 0, as in the
quality benchmark's rows, so only the transforms differ. Perplexity: windows of 256 tokens over the first
``--eval-tokens`` tokens of the embedded Wikipedia evaluation split and of the news text; the fp32 model is
measured on the same tokens. Size on disk beside it (a rotated model's embedding is no longer the output
projection's transpose: it is stored on its own).

    python benchmarks/transforms.py --json benchmarks/results/transforms.json --md benchmarks/results/transforms.md

``--decode-speed``: greedy decode speed through onnxruntime (CPU, KV cache) of the same scheme with each
variant, as written by default (rtn: the graph is the same whatever the rounding; accuracy_level 4, 8-bit
output projection), the variants interleaved over ``--rounds`` so that a busy moment hits them alike; the
median tokens per second and its ratio to the untransformed model, measured in the same run.

    python benchmarks/transforms.py --decode-speed --json benchmarks/results/transforms_decode.json \
        --md benchmarks/results/transforms_decode.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from deploy import DOMAINS, size_mb  # noqa: E402
from measure import emit, provenance  # noqa: E402

VARIANTS = {
    "none": (),
    "rotate": ("rotate",),
    "rotate + rotate_down": ("rotate", "rotate_down"),
    "awq": ("awq",),
}
FIXED = {"method": "gptq", "lm_head": "none", "embeddings": "none", "accuracy_level": 0}
HEAD_8 = {"lm_head": 8, "embeddings": 8}
"""``--head 8``: the output projection (and the tied embedding reading its codes) in 8 bits, as NNCF stores
them, for rows compared with NNCF's."""


def measure(folder: Path, eval_tokens: int) -> dict[str, float]:
    from optimum.adaround.data.text import evaluation_text
    from optimum.adaround.evaluation import perplexity

    out: dict[str, float] = {}
    for d in DOMAINS:
        res = perplexity(folder, evaluation_text(d), max_tokens=eval_tokens, progress=False)
        out[f"ppl_{d}"], out[f"tokens_{d}"] = res.perplexity, res.tokens
    return out


def tuned_blocks(record: dict[str, Any]) -> dict[str, float]:
    """The block tuning's mean output error over the tuned blocks, before and after (empty: not tuned)."""
    tuned = [p["tune"] for p in (record.get("calibration_report") or {}).get("parts", []) if p.get("tune")]
    if not tuned:
        return {}
    return {k: sum(t[k] for t in tuned) / len(tuned) for k in ("error_before", "error_after")}


def row(
    source: Path, work: Path, scheme: str, variant: str, eval_tokens: int, method: str = "gptq",
    head: dict[str, Any] | None = None, tune_steps: int = 0, calib_samples: int | None = None,
    tune_targets: str = "float",
) -> dict[str, Any]:  # fmt: skip
    from optimum.adaround import quantize

    name = f"{method}-{scheme}-{variant.replace(' + ', '+')}-t{tune_steps}{tune_targets[0]}-c{calib_samples or 'd'}"
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    options = {
        **FIXED,
        "method": method,
        **(head or {}),
        "tune_steps": tune_steps,
        "tune_targets": tune_targets,
        "calib_samples": calib_samples,
    }
    quantize(str(source), str(out), scheme=scheme, transform=VARIANTS[variant], progress=False, **options)
    seconds = time.perf_counter() - t0
    record = json.loads((out / "quantization_config.json").read_text())
    rec = {"scheme": scheme, "method": method, "transform": variant, "tune_steps": tune_steps,
           "tune_targets": tune_targets,
           "calib_samples": (record.get("calibration") or {}).get("n_samples"),
           "quantize_seconds": seconds, "size_mb": size_mb(out), "transforms": record.get("transforms", []),
           "tune_error": tuned_blocks(record), **measure(out, eval_tokens)}  # fmt: skip
    print(json.dumps(rec), flush=True)
    return rec


def nncf_row(source: Path, work: Path, config: str, eval_tokens: int) -> dict[str, Any]:
    """NNCF's ``compress_weights`` under ``config`` (``nncf_peer.CONFIGS``; data-aware ones calibrate on 32
    x 256 Wikipedia tokens, as gptq does) on the same export, scored on the same tokens as the other rows."""
    from nncf_peer import CONFIGS, compress

    out = work / f"nncf-{config}"
    shutil.rmtree(out, ignore_errors=True)
    opts = CONFIGS[config]
    t0 = time.perf_counter()
    compress(source, out, **opts)
    rec = {"scheme": f"w4-g{opts['group_size']}", "method": f"NNCF {config}", "transform": "-",
           "quantize_seconds": time.perf_counter() - t0, "size_mb": size_mb(out), **measure(out, eval_tokens)}  # fmt: skip
    print(json.dumps(rec), flush=True)
    return rec


def decode_rows(source: Path, work: Path, scheme: str, rounds: int, new_tokens: int) -> list[dict[str, Any]]:
    """Median decode tokens per second of each variant (interleaved rounds) and its ratio to ``none``."""
    import numpy as np
    from decode_speed import decode_speed

    from optimum.adaround import quantize
    from optimum.adaround.data.text import calibration_token_ids

    folders = {}
    for variant, names in VARIANTS.items():
        folders[variant] = work / f"decode-{scheme}-{variant.replace(' + ', '+')}"
        shutil.rmtree(folders[variant], ignore_errors=True)
        quantize(
            str(source), str(folders[variant]), scheme=scheme, method="rtn", transform=names, progress=False
        )
    prompt = calibration_token_ids(source, None, 1, 64, seed=0)[0]
    speeds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant, folder in folders.items():
            speeds[variant].append(decode_speed(folder, prompt, new_tokens)["decode_tokens_per_s"])
    base = float(np.median(speeds["none"]))
    return [{"scheme": scheme, "transform": v, "decode_tokens_per_s": float(np.median(x)), "rounds": x,
             "ratio_to_none": float(np.median(x)) / base, "size_mb": size_mb(folders[v])}
            for v, x in speeds.items()]  # fmt: skip


def render_decode(result: dict[str, Any]) -> str:
    p = result["provenance"]
    lines = [f"Measured {p.get('date')} on {p.get('machine')}, commit {p.get('commit')}: greedy decode through "
             f"onnxruntime (CPU, KV cache), 64-token prompt, {result['new_tokens']} new tokens, median of "
             f"{result['rounds']} interleaved rounds; rtn, default output (accuracy_level 4, 8-bit output "
             "projection).", "",
             "| scheme | transform | size (MB) | decode tokens/s | ratio to none |", "|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['scheme']} | {r['transform']} | {r['size_mb']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['ratio_to_none']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def _tokens(result: dict[str, Any]) -> str:
    """The tokens scored per domain (counted by the fp32 row when it recorded them)."""
    fp = result["fp32"]
    if all(f"tokens_{d}" in fp for d in DOMAINS):
        return "evaluation tokens scored: " + ", ".join(f"{d} {fp[f'tokens_{d}']}" for d in DOMAINS)
    return f"{result['eval_tokens']} evaluation tokens per domain"


def _tuning(r: dict[str, Any]) -> str:
    """A row's block tuning: its steps (and targets, when the float model's) and the blocks' mean output
    error before -> after."""
    err = r.get("tune_error") or {}
    if not r.get("tune_steps"):
        return "-"
    targets = ", float targets" if r.get("tune_targets") == "float" else ""
    return (f"{r['tune_steps']} steps{targets} ({err.get('error_before', 0):.4f} -> "
            f"{err.get('error_after', 0):.4f})")  # fmt: skip


def _seconds(r: dict[str, Any]) -> str:
    return f"{r['quantize_seconds']:.0f}" if "quantize_seconds" in r else "-"


def render(result: dict[str, Any]) -> str:
    p, fp = result["provenance"], result["fp32"]
    lines = [f"Measured {p.get('date')} on {p.get('machine')}, commit {p.get('commit')}; "
             f"{_tokens(result)}. fp32: Wikipedia {fp['ppl_wikipedia']:.2f}, "
             f"news {fp['ppl_news']:.2f}. Output projection and embedding of our rows: "
             f"{'8 bits (as NNCF stores them)' if result.get('head') == '8' else 'float'}.", "",
             "| scheme | method | transform | calibration sequences | block tuning | size (MB) | quantize (s) | "
             "ppl wiki | increase wiki | ppl news | increase news |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        inc = {d: r[f"ppl_{d}"] / fp[f"ppl_{d}"] - 1 for d in DOMAINS}
        lines.append(f"| {r['scheme']} | {r.get('method', 'gptq')} | {r['transform']} | {r.get('calib_samples') or '-'} | "
                     f"{_tuning(r)} | {r['size_mb']:.1f} | "
                     f"{_seconds(r)} | {r['ppl_wikipedia']:.2f} | {inc['wikipedia']:+.1%} | {r['ppl_news']:.2f} | "
                     f"{inc['news']:+.1%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=["w4-g128", "w3-g128", "w2-g64"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--methods", nargs="+", default=["gptq"])
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/optimum-adaround/bench-transforms")
    ap.add_argument("--decode-speed", action="store_true", help="decode speed of each variant instead")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--head", choices=["none", "8"], default="none", help="output projection of our rows")
    ap.add_argument("--nncf", nargs="*", default=[], help="NNCF configurations (nncf_peer.py) as rows too")
    ap.add_argument(
        "--tune-steps", type=int, nargs="+", default=[0], help="block tuning steps of our rows (0 = off)"
    )
    ap.add_argument(
        "--tune-targets", nargs="+", default=None, choices=["quantized", "float"],
        help="what tuned rows fit each block to, one row per choice (default: the run's, --tune-targets)",
    )  # fmt: skip
    ap.add_argument(
        "--calib-samples", type=int, nargs="+", default=[None],
        help="calibration sequences of our rows, one row per count (default: the run's)",
    )  # fmt: skip
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    from optimum.adaround.data.default_model import default_onnx_dir
    from optimum.adaround.graph_passes.config import TuneConfig

    source = default_onnx_dir()
    targets = args.tune_targets or [TuneConfig().tune_targets]
    args.work.mkdir(parents=True, exist_ok=True)
    if args.decode_speed:
        rows = [
            r for s in args.schemes for r in decode_rows(source, args.work, s, args.rounds, args.new_tokens)
        ]
        out = {"provenance": provenance(), "rounds": args.rounds, "new_tokens": args.new_tokens, "rows": rows}
        emit(out, render_decode(out), args.json, args.md)
        return 0
    head = HEAD_8 if args.head == "8" else None
    result: dict[str, Any] = {"provenance": provenance(), "eval_tokens": args.eval_tokens, "head": args.head,
                              "fp32": measure(source, args.eval_tokens)}  # fmt: skip
    result["rows"] = [
        row(source, args.work, s, v, args.eval_tokens, m, head, t, n, g)
        for m in args.methods
        for s in args.schemes
        for v in args.variants
        for n in args.calib_samples
        for t in args.tune_steps
        for g in (targets if t else targets[:1])  # an untuned row has no targets to vary
    ] + [nncf_row(source, args.work, c, args.eval_tokens) for c in args.nncf]
    emit(result, render(result), args.json, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
