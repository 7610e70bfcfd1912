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
from measure import provenance  # noqa: E402

DOMAINS = ("wikipedia", "news")
OLD_OUTPUT = {"lm_head": "none", "embeddings": "none", "accuracy_level": 0}


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
    Row("builder fp32", "builder", peer="fp32"),
    Row("builder int4 (RTN, block 32)", "builder", peer="int4"),
    Row("builder int4 block 128", "builder", peer="int4-block128"),
    Row("builder int4 k_quant_mixed", "builder", peer="int4-k_quant_mixed"),
    Row("ours gptq W4 g64, 4-bit head", "builder", {"method": "gptq", "scheme": "w4-g64", "lm_head": "4"}),
    Row("ours adaround W4 g64, 4-bit head", "builder",
        {"method": "adaround", "scheme": "w4-g64", "lm_head": "4"}),
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
    out = work / slug(row)
    if (out / "quantization_config.json").is_file():
        return out, json.loads((out / "quantization_config.json").read_text())["timings"].get(
            "total_with_save"
        )
    from optimum.adaround import quantize

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


def measure(folder: Path, runtime: str, args: argparse.Namespace, prompt: np.ndarray) -> dict[str, Any]:
    from optimum.adaround.data.text import evaluation_text
    from optimum.adaround.evaluation import perplexity

    out: dict[str, Any] = {}
    for domain in DOMAINS:
        text = evaluation_text(domain)
        res = perplexity(folder, text, max_tokens=args.eval_tokens, runtime=runtime, progress=False)
        out[f"ppl_{domain}"] = res.perplexity
    if runtime == "genai":
        out.update(genai_decode(folder, prompt, args.new_tokens))
    else:
        speed = decode_speed(folder, prompt, args.new_tokens)
        out.update(prefill_seconds=speed["prefill_seconds"], decode_tokens_per_s=speed["decode_tokens_per_s"])
    return out


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
        rec = {"name": row.name, "source": row.source, "options": row.options, "peer": row.peer,
               "size_mb": size_mb(folder), "quantize_seconds": seconds}  # fmt: skip
        for runtime in row.runtimes:
            rec[runtime] = measure(folder, runtime, args, prompt)
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    return rows


def render(result: dict[str, Any]) -> str:
    """The markdown tables of ``result`` (rows and provenance)."""
    p = result["provenance"]
    lines = [f"Measured {p.get('date')} on {p.get('machine')}, commit {p.get('commit')}; "
             f"{result['eval_tokens']} evaluation tokens per domain, decode of {result['new_tokens']} tokens "
             f"after {result['prompt_tokens']}.", ""]  # fmt: skip
    for source, title in (("optimum", "Optimum export"), ("builder", "onnxruntime-genai builder model")):
        rows = [r for r in result["rows"] if r["source"] == source]
        runtimes = [rt for rt in ("onnxruntime", "genai") if any(rt in r for r in rows)]
        head = ["model", "size (MB)"]
        for rt in runtimes:
            head += [f"ppl wiki ({rt})", f"ppl news ({rt})", f"decode tok/s ({rt})"]
        lines += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["name"], f"{r['size_mb']:.1f}"]
            for rt in runtimes:
                m = r.get(rt)
                cells += ["-"] * 3 if m is None else [
                    f"{m['ppl_wikipedia']:.2f}", f"{m['ppl_news']:.2f}", f"{m['decode_tokens_per_s']:.1f}"]  # fmt: skip
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
    ap.add_argument("--only", action="append", help="measure rows whose slug contains this (repeatable)")
    ap.add_argument("--json", type=Path, help="write the rows and provenance here")
    ap.add_argument("--md", type=Path, help="write the markdown tables here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"provenance": provenance(), "eval_tokens": args.eval_tokens, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "rows": run_rows(args)}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    text = render(result)
    if args.md:
        args.md.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
