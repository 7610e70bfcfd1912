"""The predicted side of ``predictor.py``: predictions for the measured rows, statistics, table and plot."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def _schemes(labels: set[str], sites: list[Any]) -> dict[str, Any]:
    from optimum.adaround.graph_passes.pipeline import choose_format
    from optimum.adaround.graph_passes.scheme import QuantScheme, WeightFormat

    shapes = [(s.k, s.n) for s in sites]
    return {lab: choose_format(QuantScheme.parse(lab, format=WeightFormat.AUTO), shapes) for lab in labels}


def predict_rows(args: argparse.Namespace, source: Path, measured: dict[str, Any]) -> dict[str, Any]:
    from optimum.adaround.data.text import calibration_token_ids
    from optimum.adaround.graph_passes.model_io import load_model
    from optimum.adaround.graph_passes.pipeline import prepare_sites
    from optimum.adaround.graph_passes.predict.estimate import FLOAT, estimate_errors
    from optimum.adaround.graph_passes.predict.int8_inputs import INT8_SEQUENCES, input_blocks
    from optimum.adaround.graph_passes.predict.law import predict
    from optimum.adaround.graph_passes.predict.probe import Sensitivity, probe_int8_inputs, probe_sensitivity
    from optimum.adaround.graph_passes.predict.units import lookup_site, site_errors, units_of
    from optimum.adaround.graph_passes.rounding.base import method_config

    model = load_model(str(source)).model
    sites = prepare_sites(model, quantize_lm_head=True).sites
    rows = {k: v for k, v in measured.items() if k != "fp32"}
    ids = calibration_token_ids(source, None, 32, 256, seed=0)
    seconds: dict[str, float] = {}
    errors = {}
    for method in sorted({r["options"]["method"] for r in rows.values()}):
        labels = {
            lab
            for r in rows.values()
            if r["options"]["method"] == method
            for lab in r["site_schemes"].values()
        }
        t0 = time.perf_counter()
        errors[method] = estimate_errors(
            model, sites, {**_schemes(labels, sites), FLOAT: None}, method_config(method), ids, progress=False
        )
        seconds[f"estimate_{method}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept = args.work / "sensitivity.json"  # probed by the first --target-bits row (gptq, same tokens)
    if kept.exists():
        sens = Sensitivity.from_dict(json.loads(kept.read_text()))
        seconds["probe (by the first --target-bits row)"] = sens.seconds
    else:
        sens = probe_sensitivity(model, sites, units_of(sites), errors["gptq"].energy,
                                 ids[: args.probe_samples], progress=True, shaped=errors["gptq"].shaped)  # fmt: skip
        seconds["probe"] = time.perf_counter() - t0
    labels_of = {
        name: {s.name: r["site_schemes"].get(s.name, FLOAT) for s in sites} for name, r in rows.items()
    }
    blocks_of = {name: input_blocks(labels, sites, rows[name]["options"].get("accuracy_level", 4))
                 for name, labels in labels_of.items()}  # fmt: skip
    if missing := sorted({b for bl in blocks_of.values() for b in bl.values()} - set(sens.int8_inputs)):
        t0 = time.perf_counter()
        found = probe_int8_inputs(model, sites, ids[:INT8_SEQUENCES], missing)
        sens = dataclasses.replace(sens, int8_inputs={**sens.int8_inputs, **found})
        seconds["int8 input probes"] = time.perf_counter() - t0
    plain = dataclasses.replace(sens, method_factors={})  # rtn: the probes' own noise is its error
    fp = measured["fp32"]["ppl"]
    out = []
    for name, r in rows.items():
        t = site_errors(labels_of[name], errors[r["options"]["method"]].errors, lookup_site(sites))
        p = predict(sens if r["options"]["method"] != "rtn" else plain, t, blocks_of[name])
        out.append({"name": name, "bits_per_weight": r["bits_per_weight"], "size_mb": r["size_mb"], "ppl": r["ppl"],
                    "measured_delta": math.log(r["ppl"] / fp), "predicted_delta": p.delta, "measured_at": r.get("commit"),
                    "predicted_se": p.delta_se, "linear": p.linear, "quantize_seconds": r["quantize_seconds"]})  # fmt: skip
    return {"fp32_ppl": fp, "eval_tokens": args.eval_tokens, "probe_samples": args.probe_samples,
            "seconds": seconds, "rows": out, "stats": stats(out), "sensitivity": sens.to_dict(), "method_factors": dict(sens.method_factors)}  # fmt: skip


def _cost_lines(cost: dict[str, Any] | None) -> list[str]:
    if not cost:
        return []
    run = cost["gptq_run"]
    line = (f"Cost on a quiet machine, one after the other (`--cost`, commit {cost.get('commit', 'unrecorded')}): gptq "
            f"W4 g128 run {run:.0f} s; predicting it from nothing (joint probe) {cost['predict']:.0f} s "
            f"({cost['predict'] / run:.2f}x: estimate {cost['predict_estimate']:.0f} s, probes "
            f"{cost['predict_probe']:.0f} s)")  # fmt: skip
    if "predict_from_profile" in cost:
        line += (f"; from the sensitivities an allocation kept (linear law) {cost['predict_from_profile']:.1f} s "
                 f"({cost['predict_from_profile'] / run:.3f}x)")  # fmt: skip
    return ["", line + "."]


def joint_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """``--joint``: the uniform and random rows predicted by the joint probe (``predict``'s one-configuration
    path), with their accuracy over those rows."""
    if not rows:
        return []
    s = stats(rows)
    at = ", ".join(sorted({str(r.get("predicted_at")) for r in rows}))
    out = ["", f"Joint probe (`--joint`, commit {at}): each uniform and random row predicted as `predict` does for "
           f"one configuration. Spearman **{s['spearman']:.3f}**, median absolute relative error "
           f"**{100 * s['median_abs_rel_error']:.1f}%** over {s['n']} configurations.", "",
           "| row | measured d ln ppl | predicted | +/- | factor | seconds |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    misses = [f"{r['name']} {100 * (r['predicted_delta'] / r['measured_delta'] - 1):+.0f}%" for r in rows
              if abs(r["predicted_delta"] / r["measured_delta"] - 1) > 0.2]  # fmt: skip
    if misses:
        out[1] += " Off by more than 20%: " + ", ".join(misses) + "."
    for r in rows:
        sec = sum(r["seconds"].values())
        out.append(f"| {r['name']} | {r['measured_delta']:.4f} | {r['predicted_delta']:.4f} | {r['predicted_se']:.4f} | "
                   f"{r['factor']:.3f} | {sec:.0f} |")  # fmt: skip
    return out


def _ranks(x: list[float]) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    meas = [r["measured_delta"] for r in rows]
    pred = [r["predicted_delta"] for r in rows]
    rm, rp = _ranks(meas), _ranks(pred)
    spearman = float(np.corrcoef(rm, rp)[0, 1])
    rel = [abs(p - m) / abs(m) for p, m in zip(pred, meas, strict=True) if m != 0]
    return {"n": len(rows), "spearman": spearman, "median_abs_rel_error": float(np.median(rel))}


def max_size_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """``--max-size`` runs (``maxsize`` rows: asked, written, perplexity on the same tokens, prediction)."""
    if not rows:
        return []
    out = ["", "`--max-size` (gptq, the sensitivities of the allocations above reused):", "",
           "| max_size MB | written MB | bits/weight | perplexity | measured d ln ppl | predicted | commit |",
           "|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['max_size_mb']:g} | {r['written_mb']:.3f} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | "
                   f"{r['delta']:.4f} | {r['predicted_delta']:.4f} | {r['commit']} |")  # fmt: skip
    return out


def accuracy_level_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """``--accuracy-levels``: the int8 inputs' loss measured (W8 g128 at levels 0 and 4) and probed."""
    if not rows:
        return []
    out = ["", "int8 inputs (`--accuracy-levels`): W8 g128 at `accuracy_level` 0 and 4, and the predictor's probe "
           "(every site's input rounded at block 128) on calibration sequences:", "",
           "| row | d ln ppl | +/- | commit |", "|---|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if "method" in r:
            out.append(
                f"| {r['method']} W8 g128, accuracy_level {r['accuracy_level']} | {r['delta']:.4f} | | {r['commit']} |"
            )
        else:
            out.append(
                f"| probe, {r['probe_sequences']} sequences | {r['delta']:.4f} | {r['se']:.4f} | {r['commit']} |"
            )
    return out


def report(result: dict[str, Any]) -> str:
    """The whole markdown: predictions, allocations against uniform and peer rows, and the later runs kept."""
    lines = [
        render(result),
        *joint_lines(result.get("joint")),
        *allocation_lines(result, result.get("peers", [])),
        *max_size_lines(result.get("max_size")),
        *accuracy_level_lines(result.get("accuracy_levels")),
    ]
    return "\n".join(lines)


def _measured_at(rows: list[dict[str, Any]]) -> str:
    counts = Counter(str(r.get("measured_at") or "an unrecorded commit") for r in rows)
    return ", ".join(f"{c} ({n} rows)" for c, n in counts.items())


def render(result: dict[str, Any]) -> str:
    p, s, sec = result["provenance"], result["stats"], result["seconds"]
    gptq = [r["quantize_seconds"] for r in result["rows"] if r["name"] == "gptq w4-g128"]
    lines = [
        f"Predicted {p.get('date')} on {p.get('machine')}, commit {p.get('commit')}; the quantized models were "
        f"measured (and cached) at {_measured_at(result['rows'])}. SmolLM2-135M (Optimum export, fp32), perplexity "
        f"over the first {result['eval_tokens']} tokens of the embedded Wikipedia evaluation split (windows of "
        f"256); fp32 {result['fp32_ppl']:.2f}. Output projection at the runs' 8 bits.",
        "",
        f"Spearman rank correlation of predicted vs measured increase of ln(perplexity): **{s['spearman']:.3f}**; "
        f"median absolute relative error of the increase: **{100 * s['median_abs_rel_error']:.1f}%** over {s['n']} "
        "configurations.",
        "",
        "Cost in this run (other jobs shared the 2 cores): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in sec.items())
        + (f"; a gptq W4 g128 run took {gptq[0]:.0f} s" if gptq else "")
        + ".",
        *_cost_lines(result.get("cost")),
        "",
        "| configuration | bits/weight | perplexity | measured d ln ppl | predicted | +/- |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {r['measured_delta']:.4f} | "
                     f"{r['predicted_delta']:.4f} | {r['predicted_se']:.4f} |")  # fmt: skip
    return "\n".join(lines)


def allocation_lines(result: dict[str, Any], peers: list[dict[str, Any]]) -> list[str]:
    """Each --target-bits row beside the smallest uniform or peer row at least as large, and every row at
    least as large that has the lower perplexity."""
    rows = result["rows"]
    uniform = [r for r in rows if "mixed" not in r["name"] and "target" not in r["name"]]
    others = uniform + [
        {"name": f"NNCF {p['config']}", "size_mb": p["model_mb"], "ppl": p["ppl_wikipedia"]} for p in peers
    ]
    lines = ["", "| allocation | bits/weight | size MB | perplexity | smallest uniform or peer row at least as large "
             "| rows at least as large with a lower perplexity |", "|---|---:|---:|---:|---|---|"]  # fmt: skip
    for r in (r for r in rows if "target" in r["name"]):
        bigger = sorted((o for o in others if o["size_mb"] >= r["size_mb"]), key=lambda o: o["size_mb"])
        first = (
            f"{bigger[0]['name']}: {bigger[0]['size_mb']:.1f} MB, {bigger[0]['ppl']:.2f}"
            if bigger
            else "none"
        )
        better = [o for o in bigger if o["ppl"] < r["ppl"]]
        near = (
            f" (smallest: {better[0]['name']}, {better[0]['size_mb']:.1f} MB, {better[0]['ppl']:.2f})"
            if better
            else ""
        )
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['size_mb']:.1f} | {r['ppl']:.2f} | {first} | "
                     f"{len(better)} of {len(bigger)}{near} |")  # fmt: skip
    if peers:
        lines += ["", "| peer (NNCF 3.4.0) | size MB | perplexity Wikipedia | news |", "|---|---:|---:|---:|"]
        lines += [
            f"| {p['config']} | {p['model_mb']:.1f} | {p['ppl_wikipedia']:.2f} | {p['ppl_news']:.2f} |"
            for p in peers
        ]
    return lines


def pareto(result: dict[str, Any], peers: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups = {"rtn uniform": ("rtn ", "tab:gray", "o"), "gptq uniform": ("gptq w", "tab:blue", "o"),
              "gptq random mixed": ("mixed", "tab:orange", "x"), "gptq --target-bits": ("target", "tab:red", "*")}  # fmt: skip
    for label, (key, color, marker) in groups.items():
        pts = [(r["size_mb"], r["ppl"]) for r in result["rows"] if key in r["name"]]
        if pts:
            ax.scatter(*zip(*pts, strict=True), color=color, marker=marker, label=label, s=40)
    if peers:
        ax.scatter([p["model_mb"] for p in peers], [p["ppl_wikipedia"] for p in peers], color="tab:green",
                   marker="s", label="NNCF compress_weights", s=40)  # fmt: skip
    ax.axhline(result["fp32_ppl"], color="k", lw=0.8, ls="--", label="fp32")
    ax.set_yscale("log")
    ax.set_ylim(result["fp32_ppl"] * 0.95, result["fp32_ppl"] * 12)
    ax.set_xlabel("model size on disk (MB)")
    ax.set_ylabel("perplexity (Wikipedia, log scale)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def scatter(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for r in result["rows"]:
        ax.errorbar(r["measured_delta"], r["predicted_delta"], yerr=r["predicted_se"], fmt="o",
                    color="tab:red" if "mixed" in r["name"] else "tab:blue" if "gptq" in r["name"] else "tab:gray")  # fmt: skip
    lo = min(min(r["measured_delta"], r["predicted_delta"]) for r in result["rows"])
    hi = max(max(r["measured_delta"], r["predicted_delta"]) for r in result["rows"])
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured increase of ln(perplexity)")
    ax.set_ylabel("predicted")
    ax.set_title("predictor: blue gptq, gray rtn, red mixed allocations", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
