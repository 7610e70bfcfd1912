"""What people deploy, measured through both runtimes: size on disk, decode speed and perplexity.

Two tables in one run, on the default model (SmolLM2-135M):

1. **Optimum export** (``optimum-adaround quantize`` on the default model's ``optimum-cli export onnx``
   folder): the output of 0.7.0 (output projection and embedding in float, ``accuracy_level`` 0) beside
   today's defaults, and the defaults at ``accuracy_level`` 0, each through onnxruntime and
   onnxruntime-genai.
2. **onnxruntime-genai builder model** (the builder's fp32 model of the same checkpoint as input): the
   builder's own int4 models (``benchmarks/genai_peers.py``) beside ours, through onnxruntime-genai.

Perplexity: non-overlapping windows of 256 tokens over the first ``--eval-tokens`` tokens of the embedded
Wikipedia evaluation split and of the news text (the second domain every default is checked on).
Decode: greedy, ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt, KV cache, all cores; ratios are
against rows of the same run. Quantized models are made once under ``--work`` (reruns measure again).

    python benchmarks/deploy.py --peers ~/.cache/optimum-adaround/genai-peers [--json OUT] [--md OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from decode_speed import decode_speed  # noqa: E402
from measure import emit, provenance  # noqa: E402

DOMAINS = ("wikipedia", "news")
OLD_OUTPUT = {
    "lm_head": "none",
    "embeddings": "none",
    "accuracy_level": 0,
    "fuse": False,
    "share_shapes": False,
}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    source: str
    """``optimum`` (the Optimum export) or ``builder`` (the builder's fp32 model)."""
    options: dict[str, Any] | None = None
    """``quantize`` keywords; None = the source itself or a peer."""
    peer: str | None = None
    """A builder variant of ``genai_peers.py`` (``int4``, ``int4-block128``...)."""

    @property
    def runtimes(self) -> tuple[str, ...]:
        return ("onnxruntime", "genai") if self.source == "optimum" and self.options else ("genai",) if (
            self.source == "builder") else ("onnxruntime",)  # fmt: skip


ROWS = (
    Row("fp32", "optimum"),
    Row("gptq W4 g128, 0.7.0 output (float head and embedding, accuracy_level 0)", "optimum",
        {"method": "gptq", **OLD_OUTPUT}),
    Row("gptq W4 g128, defaults (8-bit head shared with the embedding, accuracy_level 4)", "optimum",
        {"method": "gptq"}),
    Row("gptq W4 g128, defaults at accuracy_level 0", "optimum", {"method": "gptq", "accuracy_level": 0}),
    Row("gptq W4 g128, defaults without shape sharing", "optimum", {"method": "gptq", "share_shapes": False}),
    Row("gptq W4 g128, defaults with --ort-fusions", "optimum", {"method": "gptq", "ort_fusions": True}),
    Row("builder fp32", "builder", peer="fp32"),
    Row("builder int4 (RTN, block 32)", "builder", peer="int4"),
    Row("builder int4 block 128", "builder", peer="int4-block128"),
    Row("builder int4 k_quant_mixed", "builder", peer="int4-k_quant_mixed"),
    Row("ours gptq W4 g64, 4-bit head", "builder", {"method": "gptq", "scheme": "w4-g64", "lm_head": "4"}),
    Row("ours adaround W4 g64, 4-bit head", "builder",
        {"method": "adaround", "scheme": "w4-g64", "lm_head": "4"}),
    Row("ours gptq W4 g128, 4-bit head", "builder", {"method": "gptq", "lm_head": "4"}),
    Row("ours gptq W4 g128, defaults", "builder", {"method": "gptq"}),
    Row("ours gptq W4 g32 asym, 8-bit head", "builder", {"method": "gptq", "scheme": "w4-g32-asym"}),
    Row("ours adaround W4 g32 asym, 8-bit head", "builder", {"method": "adaround", "scheme": "w4-g32-asym"}),
)  # fmt: skip


def slug(row: Row) -> str:
    return "".join(c if c.isalnum() else "-" for c in f"{row.source}-{row.name}").strip("-").lower()[:80]


def model_dir(row: Row, sources: dict[str, Path], peers: Path, work: Path) -> tuple[Path, float | None]:
    """The row's model folder (quantized into ``work`` on first use) and the quantization seconds."""
    if row.peer is not None:
        return peers / row.peer, None
    if row.options is None:
        return sources[row.source], None
    from optimum.adaround import quantize
    from optimum.adaround.api import run_config

    out = work / slug(row)
    record = out / "quantization_config.json"
    if record.is_file():  # made earlier: reused only when made under the same configuration as now
        made = json.loads(record.read_text())
        if made["config"] == run_config(None, **row.options).to_dict():
            return out, made["timings"].get("total_with_save")

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    quantize(str(sources[row.source]), str(out), progress=False, **row.options)
    return out, time.perf_counter() - t0


def genai_decode(folder: Path, prompt: np.ndarray, new_tokens: int) -> dict[str, float]:
    """Greedy decode through onnxruntime-genai: prefill ``prompt``, then ``new_tokens`` one at a time."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def run(ids: np.ndarray, n: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=int(ids.size) + n)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids[None].astype(np.int32))
        t1 = time.perf_counter()
        for _ in range(n):
            gen.generate_next_token()
        return t1 - t0, time.perf_counter() - t1

    run(prompt[:8], 4)  # warm-up
    prefill, decode = run(prompt, new_tokens)
    return {"prefill_seconds": prefill, "decode_tokens_per_s": new_tokens / decode}


def measure_ppl(folder: Path, runtime: str, eval_tokens: int) -> dict[str, float]:
    from optimum.adaround.data.text import evaluation_text
    from optimum.adaround.evaluation import perplexity

    out = {}
    for domain in DOMAINS:
        res = perplexity(
            folder, evaluation_text(domain), max_tokens=eval_tokens, runtime=runtime, progress=False
        )
        out[f"ppl_{domain}"] = res.perplexity
    return out


def decode_tokens_per_s(folder: Path, runtime: str, prompt: np.ndarray, new_tokens: int) -> float:
    if runtime == "genai":
        return genai_decode(folder, prompt, new_tokens)["decode_tokens_per_s"]
    return decode_speed(folder, prompt, new_tokens)["decode_tokens_per_s"]


def measure_speed(rows: list[dict[str, Any]], args: argparse.Namespace, prompt: np.ndarray) -> None:
    """Decode speed of every (row, runtime), ``--speed-reps`` rounds over all rows in turn (so a slow
    moment of the machine hits every row alike); the median and the rounds are stored."""
    pairs = [(r, rt) for r in rows for rt in r["runtimes"]]
    runs: dict[tuple[int, str], list[float]] = {(id(r), rt): [] for r, rt in pairs}
    for _ in range(args.speed_reps):
        for r, rt in pairs:
            runs[(id(r), rt)].append(decode_tokens_per_s(Path(r["folder"]), rt, prompt, args.new_tokens))
    for r, rt in pairs:
        r[rt]["decode_runs"] = runs[(id(r), rt)]
        r[rt]["decode_tokens_per_s"] = float(np.median(runs[(id(r), rt)]))


def size_mb(folder: Path) -> float:
    """The decoder's ONNX file and its external data (``model.onnx.data`` or ``model.onnx_data``)."""
    name = "model.onnx"
    if (folder / "genai_config.json").is_file():
        name = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(name)) / 1e6


def prompt_ids(n: int) -> np.ndarray:
    from optimum.adaround.data.default_model import default_onnx_dir
    from optimum.adaround.data.text import evaluation_text
    from optimum.adaround.evaluation import load_tokenizer

    tokenizer = load_tokenizer(str(default_onnx_dir()))
    return np.asarray(tokenizer(evaluation_text())["input_ids"][:n], dtype=np.int64)


def run_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from optimum.adaround.data.default_model import default_onnx_dir

    sources = {"optimum": default_onnx_dir(), "builder": args.peers / "fp32"}
    prompt = prompt_ids(args.prompt_tokens)
    rows = []
    for row in ROWS:
        if args.only and not any(o in slug(row) for o in args.only):
            continue
        folder, seconds = model_dir(row, sources, args.peers, args.work)
        if args.quantize_only:
            continue
        rec = {"name": row.name, "source": row.source, "options": row.options, "peer": row.peer,
               "folder": str(folder), "runtimes": list(row.runtimes), "size_mb": size_mb(folder),
               "quantize_seconds": seconds}  # fmt: skip
        for runtime in row.runtimes:
            rec[runtime] = {} if args.speed_only else measure_ppl(folder, runtime, args.eval_tokens)
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    measure_speed(rows, args, prompt)
    return rows


BASELINES = {"optimum": "0.7.0", "builder": "builder int4 (RTN"}
"""Per table, the row (name prefix or part) decode speeds are compared with."""


def _ratios(rows: list[dict[str, Any]], source: str, runtime: str) -> dict[str, float]:
    base = next((r for r in rows if BASELINES[source] in r["name"] and runtime in r), None)
    if base is None:
        return {}
    ref = base[runtime]["decode_tokens_per_s"]
    return {r["name"]: r[runtime]["decode_tokens_per_s"] / ref for r in rows if runtime in r}


def render(result: dict[str, Any]) -> str:
    """The markdown tables of ``result`` (rows and provenance)."""
    p = result["provenance"]
    lines = [f"Measured {p.get('date')} on {p.get('machine')}, commit {p.get('commit')}; "
             f"{result['eval_tokens']} evaluation tokens per domain, decode of {result['new_tokens']} tokens "
             f"after {result['prompt_tokens']}.", ""]  # fmt: skip
    for source, title in (("optimum", "Optimum export"), ("builder", "onnxruntime-genai builder model")):
        rows = [r for r in result["rows"] if r["source"] == source]
        if not rows:
            continue
        runtimes = [rt for rt in ("onnxruntime", "genai") if any(rt in r for r in rows)]
        head = ["model", "size (MB)"]
        for rt in runtimes:
            head += [f"ppl wiki ({rt})", f"ppl news ({rt})", f"decode tok/s ({rt})", "decode ratio"]
        lines += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        ratios = {rt: _ratios(rows, source, rt) for rt in runtimes}
        for r in rows:
            cells = [r["name"], f"{r['size_mb']:.1f}"]
            for rt in runtimes:
                m = r.get(rt)
                ratio = ratios[rt].get(r["name"])
                cells += ["-"] * 4 if m is None else [
                    f"{m['ppl_wikipedia']:.2f}" if "ppl_wikipedia" in m else "-",
                    f"{m['ppl_news']:.2f}" if "ppl_news" in m else "-", f"{m['decode_tokens_per_s']:.1f}",
                    "-" if ratio is None else f"{ratio:.2f}x"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--peers", type=Path, required=True, help="genai_peers.py --out folder (fp32 + int4 peers)"
    )
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/optimum-adaround/bench-deploy")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--speed-reps", type=int, default=5, help="decode measurements per row (median kept)")
    ap.add_argument("--quantize-only", action="store_true", help="make the quantized models, measure nothing")
    ap.add_argument("--speed-only", action="store_true", help="measure decode speed only (no perplexity)")
    ap.add_argument("--only", action="append", help="measure rows whose slug contains this (repeatable)")
    ap.add_argument("--json", type=Path, help="write the rows and provenance here")
    ap.add_argument("--md", type=Path, help="write the markdown tables here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"provenance": provenance(), "eval_tokens": args.eval_tokens, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "rows": run_rows(args)}  # fmt: skip
    emit(result, render(result), args.json, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
