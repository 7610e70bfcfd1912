"""Peak memory of ``quantize`` on synthetic multi-GB models: it must not grow with the model.

A chain of MatMuls with float32 ``4096x6144`` / ``6144x4096`` weights (100.7 MB each) is written with
external data (streamed, one weight generated at a time), then quantized with the public API (RTN, W4 g128,
MatMulNBits) in a fresh subprocess that samples its own anonymous memory (``RssAnon`` in
``/proc/self/status``) every few milliseconds. ``RssAnon`` is what the process really allocates; max RSS would
also count the memory-mapped weight pages, which the kernel can drop at will. The big files are deleted
afterwards.

    python benchmarks/memory.py                      # 10 and 25 layers (1.0 and 2.5 GB of weights)
    python benchmarks/memory.py --layers 4 --no-write  # a quick check, results not written

Writes ``benchmarks/results/memory.json`` and ``benchmarks/results/memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PeakRss, commit, machine, rss_anon_kb

HIDDEN, FFN = 4096, 6144
RESULTS = Path(__file__).resolve().parent / "results"


def build_model(folder: Path, layers: int) -> int:
    """Write ``folder/model.onnx`` + ``model.onnx_data``; returns the bytes of weights. Bounded memory:
    each weight is a LazyTensor generated when the save streams it."""
    import numpy as np
    import onnx_ir as ir

    folder.mkdir(parents=True, exist_ok=True)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", HIDDEN]))
    prev, nodes, weights, total = x, [], [], 0
    for i in range(layers):
        k, n = (HIDDEN, FFN) if i % 2 == 0 else (FFN, HIDDEN)

        def make(i: int = i, k: int = k, n: int = n) -> ir.Tensor:
            rng = np.random.default_rng(i)
            return ir.tensor(rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.02))

        w = ir.Value(
            name=f"w{i}",
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape([k, n]),
            const_value=ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape([k, n]), name=f"w{i}"),
        )
        node = ir.node("MatMul", [prev, w], name=f"/model/layers.{i}/mlp/proj/MatMul")
        nodes.append(node)
        weights.append(w)
        prev = node.outputs[0]
        prev.type, prev.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", n])  # a valid value_info
        total += k * n * 4
    prev.name = "y"
    graph = ir.Graph([x], [prev], nodes=nodes, initializers=weights, opset_imports={"": 18}, name="chain")
    ir.save(ir.Model(graph, ir_version=8), folder / "model.onnx", external_data="model.onnx_data")
    return total


def measure(src: Path, out: Path) -> dict:
    """Quantize ``src`` into ``out`` in this process, sampling RssAnon in a thread; returns the figures."""
    from optimum.adaround import quantize

    baseline = rss_anon_kb(os.getpid()) or 0
    with PeakRss(os.getpid(), interval=0.002) as peak:  # this process and its rounding workers
        t0 = time.perf_counter()
        quantize(src, out, scheme="w4-g128", method="rtn", format="matmulnbits", progress=False)
        wall = time.perf_counter() - t0
    record = json.loads((out / "quantization_config.json").read_text())
    return {
        "baseline_anon_mb": baseline / 1024,
        "peak_anon_mb": max(peak.kb, baseline) / 1024,
        "peak_anon_over_baseline_mb": (max(peak.kb, baseline) - baseline) / 1024,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": wall,
        "n_sites": record["n_sites"],
        "output_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
    }


def run_size(layers: int, workdir: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"mem-{layers}-", dir=workdir))
    try:
        t0 = time.perf_counter()
        weight_bytes = build_model(folder / "in", layers)
        build_s = time.perf_counter() - t0
        proc = subprocess.run(
            [sys.executable, __file__, "--measure", str(folder / "in"), str(folder / "out")],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"layers": layers, "weight_bytes": weight_bytes, "build_s": build_s, **figures}
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # multi-GB files: never leave them behind


def write_results(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": machine(),
        "commit": commit(),
        "scheme": "w4-g128-sym, rtn (default MSE clip search), matmulnbits",
        "weights": f"chain of MatMuls, float32 {HIDDEN}x{FFN} / {FFN}x{HIDDEN}, external data",
        "memory": "RssAnon of the quantizing process and its workers, sampled every 2 ms (max RSS also counts mmap'd weights)",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    (RESULTS / "memory.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    lines = [
        "# Peak memory of `quantize` (RTN W4 g128, MatMulNBits)",
        "",
        f"{meta['weights']}; {meta['memory']}. {meta['machine']}, commit {meta['commit']}, {meta['date']}.",
        "Reproduce: `python benchmarks/memory.py`.",
        "",
        "| layers | weights (GB) | peak RssAnon (MB) | over baseline (MB) | max RSS (MB) | output (MB) | wall (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['weight_bytes'] / 1e9:.2f} | {r['peak_anon_mb']:.0f} | "
            f"{r['peak_anon_over_baseline_mb']:.0f} | {r['max_rss_mb']:.0f} | {r['output_bytes'] / 1e6:.0f} | "
            f"{r['wall_s']:.1f} |"
        )
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--layers", type=int, nargs="+", default=[10, 25], help="MatMuls per model (100.7 MB each)"
    )
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="where the big files go")
    p.add_argument("--no-write", action="store_true", help="print only, do not write benchmarks/results")
    p.add_argument("--measure", nargs=2, type=Path, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    rows = []
    for layers in args.layers:
        row = run_size(layers, args.workdir)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not args.no_write:
        write_results(rows)


if __name__ == "__main__":
    main()
