"""Build onnxruntime-genai's model-builder peers of the default model, and check that each one generates.

The builder (``python -m onnxruntime_genai.models.builder``) needs transformers 5.x, newer than this
project's environment, so it runs from a separate Python environment (see tests/fixtures/genai/README.md
for one that works); the checks run here, in this project's environment, with its onnxruntime-genai::

    python benchmarks/genai_peers.py --builder-python ENV/bin/python --out DIR [--variants NAME ...]

From the default model's Hugging Face checkpoint (``default_model_dir()``) it builds, for the CPU execution
provider, one folder per variant in DIR/NAME (VARIANTS below: fp32, int4 with the builder's defaults, int4 at
block 128, k_quant_mixed at its default block and at block 128). A folder that already exists is kept (each
build goes into a temporary folder renamed into place), so a rerun builds only what is missing; a failed
build is reported with its last error line and the others go on. For each variant it prints the build
time, the size of the model files (``model.onnx`` and its external data), whether ``og.Model`` loads it and
generates 8 greedy tokens, and how its weights are stored (MatMulNBits bits, block size, accuracy_level,
scales dtype; what the output projection and the embedding are).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import machine, now, run_command  # noqa: E402

# name -> builder arguments besides -i/-o/-e/-c. Symmetric weights are the builder's default.
INT4 = ["-p", "int4", "--extra_options"]
VARIANTS: dict[str, list[str]] = {
    "fp32": ["-p", "fp32"],
    "int4": ["-p", "int4"],
    "int4-block128": [*INT4, "block_size=128"],
    "int4-k_quant_mixed": [*INT4, "algo_config=k_quant_mixed"],
    "int4-k_quant_mixed-block128": [*INT4, "algo_config=k_quant_mixed", "block_size=128"],
}
# k-quant at block 128 is tried, but its failure does not fail the run (it is a result in itself).
OPTIONAL = frozenset({"int4-k_quant_mixed-block128"})
PROMPT = "The capital of France is"
NEW_TOKENS = 8
BUILDER_PACKAGES = ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "onnx-ir")


def builder_versions(python: str) -> dict[str, str]:
    """Versions of the builder's packages in the environment of ``python``."""
    code = (
        "import json, importlib.metadata as m\n"
        f"print(json.dumps({{p: m.version(p) for p in {BUILDER_PACKAGES!r}}}))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def build(python: str, hf: Path, out: Path, name: str) -> dict[str, Any]:
    """Build variant ``name`` into ``out/name`` unless that folder exists: ``ok``, ``error``, wall time."""
    target = out / name
    if target.is_dir():
        return {"ok": True, "error": None, "wall_seconds": None}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-", dir=out) as tmp:
        folder = Path(tmp) / name
        argv = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(folder)]
        res = run_command([*argv, *VARIANTS[name], "-e", "cpu", "-c", str(Path(tmp) / "cache")], 3600)
        if res["ok"]:
            folder.rename(target)
    return res


def model_files(folder: Path) -> list[Path]:
    """The decoder's ONNX file and its external data (named after it, as the builder writes them)."""
    config = json.loads((folder / "genai_config.json").read_text())
    name = config["model"]["decoder"]["filename"]
    return sorted(p for p in folder.iterdir() if p.name == name or p.name.startswith(name + "."))


def model_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in model_files(folder)) / 1e6


def generate(folder: Path, prompt: list[int]) -> dict[str, Any]:
    """Load ``folder`` in onnxruntime-genai and generate NEW_TOKENS greedy tokens after the ``prompt`` ids;
    also what ``og.Tokenizer`` makes of PROMPT (it may disagree with transformers' tokenizer)."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + NEW_TOKENS)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return {"tokens": tokens, "og_tokenizer_ids": [int(i) for i in og.Tokenizer(model).encode(PROMPT)]}


def check(folder: Path, hf: Path) -> dict[str, Any]:
    """``generate`` in a child process of this interpreter (a crash in the runtime is a result too), the
    prompt encoded and the tokens decoded by the checkpoint's transformers tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    prompt = tokenizer(PROMPT)["input_ids"]
    argv = [sys.executable, __file__, "--generate", str(folder), json.dumps(prompt)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "(no output)").splitlines()
        return {"ok": False, "error": f"exit code {proc.returncode}: {lines[-1]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    plain = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    res["og_tokenizer_agrees"] = res["og_tokenizer_ids"] in (prompt, plain)
    return {"ok": True, "text": tokenizer.decode(res["tokens"]), **res}


def _weight_node(producers: dict[str, Any], name: str) -> Any:
    """The MatMul-like node ``name`` is computed from, walking back through first inputs (Cast, Reshape)."""
    node = producers.get(name)
    while node is not None and node.op_type not in ("MatMul", "MatMulNBits", "Gemm"):
        node = producers.get(node.input[0]) if node.input else None
    return node


def _source(producers: dict[str, Any], name: str) -> str:
    """The initializer behind ``name``, through the Transpose/Reshape/Cast that may feed a weight to its op."""
    while name in producers and producers[name].op_type in ("Transpose", "Reshape", "Cast"):
        name = producers[name].input[0]
    return name


def _attrs(node: Any) -> dict[str, Any]:
    return {a.name: a.i for a in node.attribute if a.type == a.INT}


def storage(folder: Path) -> dict[str, Any]:
    """How the weights are stored: MatMulNBits nodes per bits/block_size/accuracy_level, their scales' dtype,
    the op computing the logits, the op reading ``input_ids`` and whether it reads the output projection's
    weight."""
    import onnx

    graph = onnx.load(str(model_files(folder)[0]), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    dtypes = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    head = _weight_node(producers, graph.output[0].name)
    embed = next(n for n in graph.node if "input_ids" in n.input)
    key = ("bits", "block_size", "accuracy_level")  # counted per combination
    weight = _source(producers, head.input[1]) if len(head.input) > 1 else None
    return {
        "matmulnbits": dict(Counter("/".join(str(_attrs(n).get(k)) for k in key) for n in nbits)),
        "with_zero_points": sum(len(n.input) > 3 and bool(n.input[3]) for n in nbits),
        "scales_dtypes": sorted({dtypes.get(n.input[2], "?") for n in nbits}),
        "lm_head": head.op_type,
        "lm_head_bits": _attrs(head).get("bits"),
        "embedding": embed.op_type,
        "embedding_attrs": _attrs(embed),
        "embedding_shares_lm_head_weight": _source(producers, embed.input[0]) == weight,
    }


def measure_variant(python: str, hf: Path, out: Path, name: str) -> dict[str, Any]:
    res = build(python, hf, out, name)
    row = {"variant": name, "build_seconds": res["wall_seconds"], "error": res["error"]}
    if res["ok"]:
        folder = out / name
        row.update(model_mb=model_mb(folder), generate=check(folder, hf), storage=storage(folder))
    return row


def _line(row: dict[str, Any]) -> str:
    if row["error"]:
        return f"{row['variant']}: build failed: {row['error']}"
    took = "kept" if row["build_seconds"] is None else f"built in {row['build_seconds']:.0f} s"
    gen = row["generate"]
    loads = (
        f"generates {gen['tokens']} {gen['text']!r}" if gen["ok"] else f"does not generate: {gen['error']}"
    )
    if gen["ok"] and not gen["og_tokenizer_agrees"]:
        loads += f" (og.Tokenizer encodes the prompt as {gen['og_tokenizer_ids']})"
    return f"{row['variant']}: {took}, {row['model_mb']:.1f} MB, {loads}\n    {json.dumps(row['storage'])}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builder-python", required=True, help="python of an environment with the builder")
    p.add_argument("--out", required=True, type=Path, help="folder receiving one sub-folder per variant")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--json", type=Path, help="also write the rows and their provenance to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--generate"]:  # the child process of check()
        print(json.dumps(generate(Path(sys.argv[2]), json.loads(sys.argv[3]))))
        return 0
    args = parse_args(argv)
    from optimum.adaround.data.default_model import default_model_dir

    hf = default_model_dir()
    versions = builder_versions(args.builder_python)
    print(f"checkpoint {hf}\nbuilder environment: {versions}\n{machine()}, {now()}", flush=True)
    rows = []
    for name in args.variants:
        rows.append(measure_variant(args.builder_python, hf, args.out.expanduser(), name))
        print(_line(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"builder": versions, "machine": machine(), "rows": rows}, indent=1))
    failed = [r for r in rows if r["error"] or not r["generate"]["ok"]]
    return 1 if any(r["variant"] not in OPTIONAL for r in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
