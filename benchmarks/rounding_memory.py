"""Working memory of each calibrated rounding method per site: the figures behind ``row_bytes`` and
``hessian_copies`` (``graph_passes/rounding/base.py``), and a check that a memory budget holds.

Each measurement runs in a fresh process that builds a random weight ``[N, K]`` and a correlated Hessian,
then samples its anonymous memory (``RssAnon``) every 2 ms while one method rounds the site. The peak over
the baseline, at three shapes, gives ``a N K + b K^2``: ``a`` bytes per weight of a row chunk (two sites of
the same K), ``b / 8`` float64 ``K x K`` copies (a wider one). Then each method rounds a larger site under a budget (``memory=``) and
the peak is compared with it.

    python benchmarks/rounding_memory.py            # writes benchmarks/results/rounding_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import commit, machine

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("gptq", "adaround", "adaround_ls")
SHAPES = ((2048, 1024), (4096, 1024), (2048, 2048))
CHECK = (8192, 2048)
MB = 1 << 20

CHILD = """
import hashlib, json, os, sys, time
import numpy as np
sys.path.insert(0, {bench!r})
from measure import PeakRss, rss_anon_kb
from optimum.adaround.graph_passes.rounding.base import SiteStats, build_method, method_config
from optimum.adaround.graph_passes.scheme import QuantScheme
n, k, method, memory = {n}, {k}, {method!r}, {memory}
g = np.random.default_rng(0)
x = g.standard_normal((4 * k, k)) @ (np.eye(k) + g.standard_normal((k, k)) / (4 * np.sqrt(k)))
stats = SiteStats(hessian=x.T @ x, n_tokens=4 * k)
del x
w = (g.standard_normal((n, k)) * 0.05).astype(np.float32)
impl = build_method(method_config(method))
impl.quantize(w[:64].copy(), QuantScheme.parse("w4-g128"), stats, site="warm-up")
base = rss_anon_kb(os.getpid())
t0 = time.perf_counter()
with PeakRss(os.getpid(), 0.002) as peak:
    qw = impl.quantize(w, QuantScheme.parse("w4-g128"), stats, site="s", memory=memory)
digest = hashlib.sha256(qw.codes.tobytes() + qw.scales.tobytes()).hexdigest()[:16]
print(json.dumps({{"base_kb": base, "peak_kb": peak.kb, "seconds": time.perf_counter() - t0, "sha": digest}}))
"""
WIDE = (256, 8192)
"""A wide site (float32 K x K work arrays, ``hessian.WIDE_K``) with few rows: its peak is the K x K arrays'."""
HEAD = (262144, 640)
"""A 270M-class output projection (Gemma-3's vocabulary x hidden): rounded at two budgets, same bytes?"""


def run_child(method: str, n: int, k: int, memory: int | None) -> dict:
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), n=n, k=k, method=method, memory=memory)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(points: list[tuple[int, int, float]]) -> tuple[float, float]:
    """``over = a N K + b K^2 + c`` through ``(n, k, over_bytes)`` at SHAPES: ``a`` from the two sites of
    the same K (the row term), ``b`` from the wider one once the row term is taken off."""
    (n1, k1, o1), (n2, _, o2), (n3, k3, o3) = points
    per_weight = (o2 - o1) / ((n2 - n1) * k1)
    per_k2 = (o3 - o1 - per_weight * (n3 * k3 - n1 * k1)) / (k3 * k3 - k1 * k1)
    return float(per_weight), float(per_k2)


def measure(method: str) -> dict:
    from optimum.adaround.graph_passes.rounding.base import method_config

    points, rows = [], []
    for n, k in SHAPES:
        r = run_child(method, n, k, None)
        over = (r["peak_kb"] - r["base_kb"]) * 1024.0
        points.append((n, k, over))
        rows.append({"n": n, "k": k, "over_mb": over / MB, "seconds": r["seconds"]})
    per_weight, per_k2 = fit(points)
    config = method_config(method)
    n, k = CHECK
    checks = []
    for budget_mb in (256, 512):
        r = run_child(method, n, k, budget_mb * MB)
        over = (r["peak_kb"] - r["base_kb"]) / 1024.0
        checks.append(
            {
                "budget_mb": budget_mb,
                "over_mb": over,
                "seconds": r["seconds"],
                "rows": config.rows_within(budget_mb * MB, n, k),
            }
        )
    wn, wk = WIDE
    r = run_child(method, wn, wk, None)
    wide = {
        "n": wn,
        "k": wk,
        "over_mb": (r["peak_kb"] - r["base_kb"]) / 1024.0,
        "declared_mb": (config.row_bytes * wn * wk + config.fixed_bytes(wn, wk)) / MB,
        "seconds": r["seconds"],
    }
    return {
        "method": method,
        "shapes": rows,
        "wide": wide,
        "fit_bytes_per_weight": per_weight,
        "fit_hessian_copies": per_k2 / 8.0,
        "row_bytes": config.row_bytes,
        "hessian_copies": config.hessian_copies,
        "budget_checks": checks,
        "check_shape": list(CHECK),
    }


READING = """Reading: the declared `row_bytes` cover the measured bytes per weight of a site rounded in one piece
(its report's float64 sums are full-size then). The K x K estimates of the first table are small differences
of large peaks and swing with the allocator (a negative one means the wider site happened to reuse freed
memory); the wide site shows them directly: GPTQ's factorisation gathers the permuted Hessian into one work
array and factors it in place (one transient array more), AdaRound frees that factor before it makes its
mean Hessian and guard, so both peak at about two work arrays plus the rows, inside the declared
`hessian_copies` (gptq 3, adaround 3). What matters is the budget table: under a budget the peak over the
baseline stays below it, and the time changes little with the chunk size (times from a 2-core machine
shared with other work: compare them with care)."""


def head_check(method: str, budgets_mb: tuple[int, ...] = (1000, 4000)) -> dict:
    """``method`` on the ``HEAD`` site at each budget: peak over baseline, seconds, digest of the codes."""
    n, k = HEAD
    runs = []
    for budget_mb in budgets_mb:
        r = run_child(method, n, k, budget_mb * MB)
        over = (r["peak_kb"] - r["base_kb"]) / 1024.0
        runs.append({"budget_mb": budget_mb, "over_mb": over, "seconds": r["seconds"], "sha": r["sha"]})
    return {"method": method, "shape": list(HEAD), "runs": runs}


def render_head(head: dict) -> list[str]:
    n, k = head["shape"]
    lines = [
        "",
        f"Output projection {n}x{k} ({head['method']}, W4 g128) at two budgets: the same codes and scales?",
        "",
        "| budget (MB) | peak over baseline (MB) | seconds | sha256 of codes + scales |",
        "|---:|---:|---:|---|",
    ]
    for r in head["runs"]:
        lines.append(f"| {r['budget_mb']} | {r['over_mb']:.0f} | {r['seconds']:.1f} | `{r['sha']}` |")
    return lines


def render(results: list[dict], info: dict, head: dict | None = None) -> str:
    lines = [
        "# Working memory of the calibrated rounding methods",
        "",
        f"{info['machine']}, commit {info['commit']}, {info['date']}. Reproduce: `python benchmarks/rounding_memory.py`.",
        "",
        "Peak anonymous memory (RssAnon, sampled every 2 ms) of one process rounding one random site (W4 g128,",
        "correlated Hessian) over its baseline: `a` bytes per weight from the two sites of equal K, `b / 8` K x K",
        "float64 copies from the wider one. The declared figures",
        "(`row_bytes`, `hessian_copies` in the method's config) size the row chunks under `--max-memory`.",
        "",
        "| method | over baseline (MB) at "
        + ", ".join(f"{n}x{k}" for n, k in SHAPES)
        + " | fit: bytes per weight | fit: K x K float64 copies | declared row_bytes | declared copies |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        overs = ", ".join(f"{s['over_mb']:.0f}" for s in r["shapes"])
        lines.append(
            f"| {r['method']} | {overs} | {r['fit_bytes_per_weight']:.1f} | {r['fit_hessian_copies']:.2f} "
            f"| {r['row_bytes']:.0f} | {r['hessian_copies']:g} |"
        )
    wn, wk = WIDE
    lines += [
        "",
        f"A wide site, {wn}x{wk} in one piece (K x K work arrays in float32, {4 * wk * wk / MB:.0f} MB each): "
        "peak over baseline vs what the method declares for it (`row_bytes` x N K + `fixed_bytes`).",
        "",
        "| method | peak over baseline (MB) | declared (MB) | seconds |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        if "wide" in r:
            w = r["wide"]
            lines.append(
                f"| {r['method']} | {w['over_mb']:.0f} | {w['declared_mb']:.0f} | {w['seconds']:.1f} |"
            )
    n, k = CHECK
    lines += [
        "",
        f"Under a budget (`memory=`), site {n}x{k}: peak over baseline vs the budget.",
        "",
        "| method | budget (MB) | rows per chunk | peak over baseline (MB) | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for c in r["budget_checks"]:
            lines.append(
                f"| {r['method']} | {c['budget_mb']} | {c['rows']} | {c['over_mb']:.0f} | {c['seconds']:.1f} |"
            )
    if head:
        lines += render_head(head)
    lines += ["", READING]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--head-only", action="store_true", help="only the output projection check")
    args = ap.parse_args()
    if args.head_only:  # keep the per-method rows of the last full run
        results = json.loads((RESULTS / "rounding_memory.json").read_text())["results"]
    else:
        results = [measure(m) for m in args.methods]
    head = head_check("adaround")
    info = {"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d")}
    text = render(results, info, head)
    print(text)
    if not args.no_write:
        (RESULTS / "rounding_memory.json").write_text(
            json.dumps({**info, "results": results, "head": head}, indent=1) + "\n"
        )
        (RESULTS / "rounding_memory.md").write_text(text)


if __name__ == "__main__":
    main()
