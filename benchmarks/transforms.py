"""Equivalent transforms before rounding: perplexity of gptq with and without them, on two text domains.

Rows: for each scheme (``--schemes``), gptq on the default model's Optimum export as it is, after
``--transform rotate`` (residual stream), and after ``rotate`` + ``rotate_down`` (also the down
projection's input, online). Output projection and embedding in float and ``accuracy_level`` 0, as in the
quality benchmark's rows, so only the transforms differ. Perplexity: windows of 256 tokens over the first
``--eval-tokens`` tokens of the embedded Wikipedia evaluation split and of the news text; the fp32 model is
measured on the same tokens. Size on disk beside it (a rotated model's embedding is no longer the output
projection's transpose: it is stored on its own).

    python benchmarks/transforms.py --json benchmarks/results/transforms.json --md benchmarks/results/transforms.md
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

VARIANTS = {"none": (), "rotate": ("rotate",), "rotate + rotate_down": ("rotate", "rotate_down")}
FIXED = {"method": "gptq", "lm_head": "none", "embeddings": "none", "accuracy_level": 0}


def measure(folder: Path, eval_tokens: int) -> dict[str, float]:
    from optimum.adaround.data.text import evaluation_text
    from optimum.adaround.evaluation import perplexity

    return {f"ppl_{d}": perplexity(folder, evaluation_text(d), max_tokens=eval_tokens, progress=False).perplexity
            for d in DOMAINS}  # fmt: skip


def row(source: Path, work: Path, scheme: str, variant: str, eval_tokens: int) -> dict[str, Any]:
    from optimum.adaround import quantize

    out = work / f"{scheme}-{variant.replace(' + ', '+')}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    quantize(str(source), str(out), scheme=scheme, transform=VARIANTS[variant], progress=False, **FIXED)
    seconds = time.perf_counter() - t0
    record = json.loads((out / "quantization_config.json").read_text())
    rec = {"scheme": scheme, "transform": variant, "quantize_seconds": seconds, "size_mb": size_mb(out),
           "transforms": record.get("transforms", []), **measure(out, eval_tokens)}  # fmt: skip
    print(json.dumps(rec), flush=True)
    return rec


def render(result: dict[str, Any]) -> str:
    p, fp = result["provenance"], result["fp32"]
    lines = [f"Measured {p.get('date')} on {p.get('machine')}, commit {p.get('commit')}; gptq, "
             f"{result['eval_tokens']} evaluation tokens per domain. fp32: Wikipedia {fp['ppl_wikipedia']:.2f}, "
             f"news {fp['ppl_news']:.2f}.", "",
             "| scheme | transform | size (MB) | ppl wiki | increase wiki | ppl news | increase news |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        inc = {d: r[f"ppl_{d}"] / fp[f"ppl_{d}"] - 1 for d in DOMAINS}
        lines.append(f"| {r['scheme']} | {r['transform']} | {r['size_mb']:.1f} | {r['ppl_wikipedia']:.2f} | "
                     f"{inc['wikipedia']:+.1%} | {r['ppl_news']:.2f} | {inc['news']:+.1%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=["w4-g128", "w3-g128", "w2-g64"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/optimum-adaround/bench-transforms")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    from optimum.adaround.data.default_model import default_onnx_dir

    source = default_onnx_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"provenance": provenance(), "eval_tokens": args.eval_tokens,
                              "fp32": measure(source, args.eval_tokens)}  # fmt: skip
    result["rows"] = [
        row(source, args.work, s, v, args.eval_tokens) for s in args.schemes for v in args.variants
    ]
    emit(result, render(result), args.json, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
