"""CPU benchmark of our MatMulLowBit against onnxruntime's MatMulNBits and fp32 MatMul.

For each [M x K] x [K x N] (K, N in {576, 1536, 4096, 11008}, M in {1, 64}) it builds one model per
variant, each holding ``r`` independent copies of the op on the same X (r > 1 only for small weights, so
that Python/session overhead does not dominate and the weights stream from memory as in a real model),
then times the variants interleaved (every repetition runs each variant once, in rotating order) and
reports medians, ratios measured in the same run, and achieved weight bandwidth (bytes of packed weights
+ scales read per op / time).

Variants: fp32 MatMul; MatMulNBits 4-bit accuracy_level 0 and 4; MatMulLowBit 3-bit and 4-bit,
accuracy_level 0 and 4. All symmetric, block 32 by default. Weights are random codes (speed does not
depend on their values).

    python benchmarks/ops.py                      # full grid, 1 thread, writes benchmarks/results/ops.{json,md}
    python benchmarks/ops.py --shapes 4096x4096 --m 1 --reps 15 --out build/ops
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optimum.adaround import custom_ops
from optimum.adaround.custom_ops import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import commit, cpu_model  # a sibling module (benchmarks/ is no package)

SIZES = (576, 1536, 4096, 11008)
VARIANTS = (
    "fp32",
    "nbits4_acc0",
    "nbits4_acc4",
    "lowbit3_acc0",
    "lowbit3_acc4",
    "lowbit4_acc0",
    "lowbit4_acc4",
)


def _model(
    variant: str, k: int, n: int, block: int, copies: int, rng: np.random.Generator
) -> tuple[onnx.ModelProto, int]:
    """A model with ``copies`` ops reading X; returns it and the weight bytes one op reads."""
    nb = -(-k // block)
    nodes, inits, outputs = [], [], []
    nbytes = 0
    for i in range(copies):
        y = f"Y{i}"
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
        scales = (rng.uniform(0.5, 1.5, (n, nb)) * 0.01).astype(np.float32)
        if variant == "fp32":
            w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"W{i}"))
            nodes.append(helper.make_node("MatMul", ["X", f"W{i}"], [y]))
            nbytes = w.nbytes
        elif variant.startswith("nbits"):
            bits, acc = int(variant[5]), int(variant[-1])
            b = rng.integers(0, 256, (n, nb, block * bits // 8), dtype=np.uint8)
            inits += [
                numpy_helper.from_array(b, f"B{i}"),
                numpy_helper.from_array(scales.reshape(-1), f"S{i}"),
            ]
            nodes.append(
                helper.make_node(
                    "MatMulNBits", ["X", f"B{i}", f"S{i}"], [y], domain="com.microsoft",
                    K=k, N=n, bits=bits, block_size=block, accuracy_level=acc,
                )
            )  # fmt: skip
            nbytes = b.nbytes + scales.nbytes
        else:
            bits, acc = int(variant[6]), int(variant[-1])
            b = rng.integers(0, 256, ref.packed_shape(n, k, bits), dtype=np.uint8)
            inits += [numpy_helper.from_array(b, f"B{i}"), numpy_helper.from_array(scales, f"S{i}")]
            nodes.append(
                helper.make_node(
                    "MatMulLowBit", ["X", f"B{i}", f"S{i}"], [y], domain=custom_ops.DOMAIN,
                    K=k, N=n, bits=bits, block_size=block, accuracy_level=acc,
                )
            )  # fmt: skip
            nbytes = b.nbytes + scales.nbytes
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])], outputs, inits
    )
    opsets = [
        helper.make_opsetid("", 21),
        helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid(custom_ops.DOMAIN, 1),
    ]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), nbytes


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = custom_ops.session_options(
        intra_op_num_threads=threads, inter_op_num_threads=1, log_severity_level=3
    )
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def bench_shape(m: int, k: int, n: int, *, block: int, threads: int, reps: int, variants, rng) -> dict:
    # ~8M weights per model keeps small shapes out of pure-overhead territory without big memory use.
    copies = max(1, min(16, (8 << 20) // (k * n)))
    x = rng.standard_normal((m, k)).astype(np.float32)
    sessions, nbytes = {}, {}
    for v in variants:
        model, nbytes[v] = _model(v, k, n, block, copies, rng)
        sessions[v] = _session(model, threads)
        del model
        for _ in range(2):  # warm-up (first run allocates)
            sessions[v].run(None, {"X": x})
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(reps):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            c0, t0 = time.thread_time(), time.perf_counter()
            sessions[v].run(None, {"X": x})
            wall[v].append((time.perf_counter() - t0) / copies)
            cpu[v].append((time.thread_time() - c0) / copies)
    # With one intra-op thread the ops run on this thread, so its CPU time excludes the time other
    # processes take from us; with more threads only wall time means anything.
    primary = cpu if threads == 1 else wall
    med = {v: statistics.median(t) for v, t in primary.items()}
    res = {
        "M": m,
        "K": k,
        "N": n,
        "copies": copies,
        "timer": "thread CPU time" if threads == 1 else "wall clock",
        "median_ms": {v: med[v] * 1e3 for v in variants},
        "median_wall_ms": {v: statistics.median(t) * 1e3 for v, t in wall.items()},
    }
    res["weight_GBps"] = {v: nbytes[v] / med[v] / 1e9 for v in variants}
    res["weight_MB"] = {v: nbytes[v] / 1e6 for v in variants}
    return res


def ratios(r: dict) -> dict[str, float]:
    t = r["median_ms"]
    out = {}
    for bits in (3, 4):
        if f"lowbit{bits}_acc0" in t and "fp32" in t:
            out[f"fp32/lowbit{bits}_acc0"] = t["fp32"] / t[f"lowbit{bits}_acc0"]
        if f"lowbit{bits}_acc4" in t and "fp32" in t:
            out[f"fp32/lowbit{bits}_acc4"] = t["fp32"] / t[f"lowbit{bits}_acc4"]
        for acc in (0, 4):
            if f"lowbit{bits}_acc{acc}" in t and f"nbits4_acc{acc}" in t:
                out[f"lowbit{bits}_acc{acc}/nbits4_acc{acc}"] = (
                    t[f"lowbit{bits}_acc{acc}"] / t[f"nbits4_acc{acc}"]
                )
    return out


def to_markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# MatMulLowBit CPU benchmark",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} at commit {meta.get('commit', 'unknown')} "
        f"({meta['cpu']}, {meta['threads']} thread(s), "
        f"onnxruntime {meta['onnxruntime']}, block {meta['block']}, {meta['reps']} interleaved repetitions, medians).",
        f"Load average before / after: {meta['load_before']} / {meta['load_after']} "
        "(other processes ran beside the benchmark: treat small differences as noise).",
        "",
        f"Times are per op in ms ({results[0]['timer'] if results else ''} medians; wall-clock medians are in the JSON). `acc0` = exact fp32 accumulation, `acc4` = int8 activations "
        "(MatMulNBits accuracy_level 4 semantics). Ratio columns: fp32 time / ours (speed-up), and ours / "
        "MatMulNBits 4-bit at the same accuracy level (< 1 = we are faster).",
        "",
    ]
    cols = meta["variants"]
    head = (
        "| M | K | N | "
        + " | ".join(cols)
        + " | fp32/lb3 acc0 | fp32/lb3 acc4 | lb3/nb4 acc0 | lb3/nb4 acc4 | lb4/nb4 acc4 | lb3 acc4 GB/s |"
    )
    lines += [head, "|" + "---|" * (len(cols) + 9)]
    for r in results:
        q = ratios(r)
        t = r["median_ms"]
        keys = (
            "fp32/lowbit3_acc0",
            "fp32/lowbit3_acc4",
            "lowbit3_acc0/nbits4_acc0",
            "lowbit3_acc4/nbits4_acc4",
            "lowbit4_acc4/nbits4_acc4",
        )
        cells = [f"{t[v]:.3f}" for v in cols] + [f"{q[key]:.2f}" if key in q else "-" for key in keys]
        gbs = r["weight_GBps"].get("lowbit3_acc4")
        cells.append(f"{gbs:.1f}" if gbs is not None else "-")
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | " + " | ".join(cells) + " |")
    lines += ["", "Geometric means over the K x N grid (same run):", ""]
    lines += ["| M | " + " | ".join(SUMMARY_KEYS) + " |", "|---|" + "---|" * len(SUMMARY_KEYS)]
    for m in sorted({r["M"] for r in results}):
        rs = [r["ratios"] for r in results if r["M"] == m]
        cells = [
            f"{geomean([q[k] for q in rs if k in q]):.2f}" if any(k in q for q in rs) else "-"
            for k in SUMMARY_KEYS
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SUMMARY_KEYS = (
    "fp32/lowbit3_acc0",
    "fp32/lowbit3_acc4",
    "lowbit3_acc0/nbits4_acc0",
    "lowbit3_acc4/nbits4_acc4",
    "lowbit4_acc0/nbits4_acc0",
    "lowbit4_acc4/nbits4_acc4",
)


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help="KxN pairs (default: all of 576/1536/4096/11008 squared)")
    ap.add_argument("--m", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ops"))
    ap.add_argument("--render", action="store_true", help="only rewrite <out>.md from an existing <out>.json")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(to_markdown(data["meta"], data["results"]))
        return 0
    shapes = (
        [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        if args.shapes
        else [(k, n) for k in SIZES for n in SIZES]
    )
    rng = np.random.default_rng(0)
    meta = {
        "command": "python "
        + " ".join([os.path.relpath(__file__, Path.cwd()), *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model(),
        "commit": commit(),
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "block": args.block,
        "reps": args.reps,
        "variants": args.variants,
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    results = []
    for m in args.m:
        for k, n in shapes:
            r = bench_shape(
                m,
                k,
                n,
                block=args.block,
                threads=args.threads,
                reps=args.reps,
                variants=args.variants,
                rng=rng,
            )
            r["ratios"] = ratios(r)
            results.append(r)
            print(
                f"M={m} K={k} N={n}: " + ", ".join(f"{v} {t:.3f} ms" for v, t in r["median_ms"].items()),
                flush=True,
            )
            print("   " + ", ".join(f"{key} {v:.2f}" for key, v in r["ratios"].items()), flush=True)
    meta["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(to_markdown(meta, results))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
