"""Measure a sequential calibration pass on SmolLM2-135M (not collected by pytest; run it by hand).

    python tests/graph_passes/calibration/bench_smollm2.py --n 16 --seq 512 --method rtn

Prints the engine's summary and one JSON line: wall and CPU seconds, the split onnxruntime / X^T X /
rounding, the peak of cached boundary tensors, and the peak anonymous memory of the process (sampled every
50 ms; mmap'd weights are not counted). ``--method none`` returns no weights (one onnxruntime pass per block).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from measure import PeakRss, rss_anon_kb  # benchmarks/measure.py: the one RssAnon reader


def rss_anon_mib() -> int:
    return (rss_anon_kb(os.getpid()) or 0) // 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="calibration sequences")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--method", default="rtn", help="rounding method for on_block, or 'none'")
    p.add_argument("--scheme", default="w4-g128")
    p.add_argument("--precision", default="float64", choices=["float64", "float32"])
    p.add_argument("--one-pass", action="store_true")
    p.add_argument("--out", help="append the JSON line to this file")
    a = p.parse_args()

    import optimum.adaround.graph_passes.rounding.rtn  # noqa: F401  (registers "rtn")
    from optimum.adaround.data.default_model import default_onnx_dir
    from optimum.adaround.data.text import calibration_token_ids
    from optimum.adaround.graph_passes.calibration.engine import run_calibration
    from optimum.adaround.graph_passes.model_io import read_weight
    from optimum.adaround.graph_passes.rounding.base import get_method
    from optimum.adaround.graph_passes.scheme import QuantScheme
    from optimum.adaround.graph_passes.sites import find_weight_sites

    folder = default_onnx_dir()
    ids = calibration_token_ids(folder, n_samples=a.n, seq_len=a.seq)
    peak = PeakRss(os.getpid()).start()  # this process, sampled every 50 ms until stopped
    model = ir.load(folder / "model.onnx")
    loaded = rss_anon_mib()
    sites = find_weight_sites(model).sites
    scheme = QuantScheme.parse(a.scheme)
    method = None
    if a.method != "none":  # min-max RTN keeps the rounding share small; the engine is what is measured
        method = get_method("rtn", search="minmax") if a.method == "rtn" else get_method(a.method)
    rounding = [0.0]

    def on_block(block, stats):
        if method is None:
            return {}
        t = time.perf_counter()
        out = {s.name: method.quantize(read_weight(model, s), scheme, stats[s.name]) for s in block}
        rounding[0] += time.perf_counter() - t
        return out

    rep = run_calibration(
        model,
        sites,
        np.asarray(ids),
        on_block,
        sequential=not a.one_pass,
        batch_size=a.batch,
        progress=False,
        hessian_precision=a.precision,
    )
    peak.stop()
    res = {
        "n": a.n,
        "seq": a.seq,
        "batch": a.batch,
        "method": a.method,
        "precision": a.precision,
        "sequential": not a.one_pass,
        "sites": len(sites),
        "seconds": round(rep.seconds, 1),
        "cpu_seconds": round(rep.cpu_seconds, 1),
        "onnxruntime_s": round(sum(p.forward_s + p.requant_s for p in rep.parts), 1),
        "xtx_s": round(sum(p.stats_s for p in rep.parts), 1),
        "rounding_s": round(rounding[0], 1),
        "peak_cache_mib": round(rep.peak_cache_bytes / 2**20),
        "largest_part_weights_mib": round(rep.peak_part_weight_bytes / 2**20),
        "anon_after_load_mib": loaded,
        "peak_anon_mib": round(peak.mb),
    }
    print(rep.summary())
    print(json.dumps(res))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
