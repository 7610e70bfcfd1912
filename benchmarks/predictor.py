"""The perplexity predictor against measured perplexity, and budgeted allocations against uniform schemes.

Measured side (``--measure``): the default model's Optimum export quantized under uniform schemes (W2/W3/W4/W8
at block 64 and 128, rtn and gptq) and under random per-unit allocations (gptq, each unit's scheme drawn
from a candidate list, some units kept in float), each scored by perplexity over the first
``--eval-tokens`` tokens of the embedded Wikipedia evaluation split (windows of 256); the fp32 model on the
same tokens. Every row is cached in ``--work`` as it finishes (a run can be resumed).

Predicted side (``--predict``): the predictor's sensitivities (probes through onnxruntime on calibration
sequences) and per-site error estimates (one float calibration pass) for every scheme the measured rows
used, each row's predicted increase of ln(perplexity) from the schemes its sites got, with the time each
step took beside a gptq run's. Report: Spearman rank correlation and median absolute relative error of the
predicted vs measured increase, and a scatter plot.

    python benchmarks/predictor.py --measure --predict --json benchmarks/results/predictor.json \
        --md benchmarks/results/predictor.md --plot benchmarks/results/predictor.png

``--joint`` predicts the uniform and random rows as ``predict`` does; ``--measured-from RESULT.json`` takes
their measured perplexities from an earlier result instead of ``--work``'s cache (each row's site schemes
are planned again from its options, as the run planned them):

    python benchmarks/predictor.py --joint --measured-from benchmarks/results/predictor.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from deploy import size_mb  # noqa: E402
from measure import commit, emit, provenance  # noqa: E402

UNIFORM = [f"w{b}-g{g}" for b in (2, 3, 4, 8) for g in (64, 128)]
MIXED_CHOICES = ("w2-g64", "w3-g128", "w4-g64", "w4-g128", "w8-g128", "float")


def default_source() -> Path:
    from optimum.adaround.data.default_model import default_onnx_dir

    return Path(default_onnx_dir())


def units(source: Path) -> list[Any]:
    from optimum.adaround.graph_passes.model_io import load_model
    from optimum.adaround.graph_passes.pipeline import prepare_sites
    from optimum.adaround.graph_passes.predict.units import units_of

    model = load_model(str(source)).model
    return units_of(prepare_sites(model, quantize_lm_head=True).sites)


def mixed_options(groups: list[Any], seed: int) -> dict[str, Any]:
    """A random per-unit allocation as the run's options: overrides by exact site names, float by exclude."""
    from optimum.adaround.graph_passes.predict.plan import unit_pattern

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(MIXED_CHOICES), size=len(groups))
    overrides, exclude = [], []
    for unit, i in zip(groups, picks, strict=True):
        if MIXED_CHOICES[i] == "float":
            exclude.append(unit_pattern(unit))
        else:
            overrides.append({"pattern": unit_pattern(unit), "scheme": MIXED_CHOICES[i]})
    return {"scheme": "w4-g128", "overrides": overrides, "exclude": exclude}


def configs(groups: list[Any], n_mixed: int, budgets: list[float]) -> dict[str, dict[str, Any]]:
    out = {f"{m} {s}": {"method": m, "scheme": s} for m in ("rtn", "gptq") for s in UNIFORM}
    for i in range(n_mixed):
        out[f"gptq mixed {i}"] = {"method": "gptq", **mixed_options(groups, seed=100 + i)}
    for bits in budgets:
        out[f"gptq target {bits:g} bits"] = {"method": "gptq", "target_bits": bits}
    return out


def perplexity_of(folder: Path, eval_tokens: int) -> float:
    from optimum.adaround.data.text import evaluation_text
    from optimum.adaround.evaluation import perplexity

    return perplexity(folder, evaluation_text("wikipedia"), max_tokens=eval_tokens, progress=False).perplexity


def run_options(options: dict[str, Any]) -> dict[str, Any]:
    """A row's options (as cached: JSON) as ``quantize`` takes them: scheme overrides as ``ModuleOverride``."""
    from optimum.adaround.graph_passes.config import ModuleOverride

    opts = dict(options)
    if "overrides" in opts:
        opts["overrides"] = tuple(ModuleOverride(**o) for o in opts["overrides"])
        opts["exclude"] = tuple(opts["exclude"])
    return opts


def measure_row(
    source: Path, work: Path, name: str, options: dict[str, Any], eval_tokens: int
) -> dict[str, Any]:
    from optimum.adaround import quantize

    out = work / re.sub(r"[^a-z0-9]+", "-", name)
    shutil.rmtree(out, ignore_errors=True)
    opts = run_options(options)
    stamp = commit()  # the code that quantizes this row (rows are cached across runs)
    sens = work / "sensitivity.json"  # the first allocation's probes serve the later budgets
    if "target_bits" in opts and sens.exists():
        opts["sensitivity"] = str(sens)
    t0 = time.perf_counter()
    quantize(str(source), str(out), progress=False, **opts)
    seconds = time.perf_counter() - t0
    record = json.loads((out / "quantization_config.json").read_text())
    if record.get("allocation") and not sens.exists():
        sens.write_text(json.dumps(record["allocation"]["sensitivity"]))
    sites = {s["name"]: s["scheme"] for s in record["sites"]}
    sqnr = {s["name"]: s["metrics"].get("output_sqnr_db") for s in record["sites"]}
    weights = sum(s["k"] * s["n"] for s in record["sites"])
    bits = 8 * sum(s["packed_bytes"] for s in record["sites"]) / max(weights, 1)
    row = {"name": name, "commit": stamp, "options": options, "quantize_seconds": seconds, "size_mb": size_mb(out),
           "site_schemes": sites, "site_output_sqnr_db": sqnr, "bits_per_weight": bits,
           "allocation": {k: v for k, v in (record.get("allocation") or {}).items() if k != "sensitivity"}, "ppl": perplexity_of(out, eval_tokens)}  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    return row


def run_measure(args: argparse.Namespace, source: Path) -> dict[str, Any]:
    cache = args.work / "measured.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    if "fp32" not in done:
        done["fp32"] = {"ppl": perplexity_of(source, args.eval_tokens)}
        cache.write_text(json.dumps(done, indent=1))
    for name, options in configs(units(source), args.mixed, args.budgets).items():
        if name in done:
            continue
        done[name] = measure_row(source, args.work, name, options, args.eval_tokens)
        print(
            json.dumps(
                {
                    k: v
                    for k, v in done[name].items()
                    if k not in ("site_schemes", "site_output_sqnr_db", "options")
                }
            ),
            flush=True,
        )
        cache.write_text(json.dumps(done, indent=1))
    return done


def run_cost(source: Path, work: Path) -> dict[str, Any]:
    """Wall seconds, one after the other on a quiet machine: a gptq W4 g128 run and a prediction of it from
    nothing (the joint probe)."""
    from optimum.adaround import quantize
    from optimum.adaround.prediction import predict

    out = work / "cost-gptq"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    quantize(str(source), str(out), method="gptq", scheme="w4-g128", progress=False)
    t1 = time.perf_counter()
    joint = predict(str(source), method="gptq", scheme="w4-g128", progress=False)
    t2 = time.perf_counter()
    cost = {"gptq_run": t1 - t0, "predict": t2 - t1, "predict_estimate": joint["seconds"]["estimate"],
            "predict_probe": joint["seconds"]["probe"], "predicted_delta": joint["delta_nll"], "commit": commit()}  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    return cost


def run_joint(source: Path, measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Each uniform and random row predicted by the joint probe (what ``predict`` does for one
    configuration), with its seconds; allocations are predicted by the law that chose them."""
    from predictor_report import _schemes

    from optimum.adaround.data.text import calibration_token_ids
    from optimum.adaround.graph_passes.model_io import load_model
    from optimum.adaround.graph_passes.pipeline import prepare_sites
    from optimum.adaround.graph_passes.predict.int8_inputs import input_blocks
    from optimum.adaround.graph_passes.predict.joint import predict_joint
    from optimum.adaround.graph_passes.rounding.base import method_config

    loaded = load_model(str(source))
    sites = prepare_sites(loaded.model, quantize_lm_head=True).sites
    ids = calibration_token_ids(source, None, 32, 256, seed=0)
    fp, rows = measured["fp32"]["ppl"], []
    at = commit()  # the code imported now: commits made while it runs do not relabel the rows
    for name, r in measured.items():
        if name == "fp32" or "target_bits" in r["options"]:
            continue
        chosen = [s for s in sites if s.name in r["site_schemes"]]
        labels = {s.name: r["site_schemes"][s.name] for s in chosen}
        by_label = _schemes(set(labels.values()), chosen)
        found = predict_joint(loaded.model, chosen, {n: by_label[lab] for n, lab in labels.items()},
                              method_config(r["options"]["method"]), ids, model_dir=loaded.directory,
                              int8_blocks=input_blocks(labels, chosen, r["options"].get("accuracy_level", 4)))  # fmt: skip
        rows.append({"name": name, "measured_delta": float(np.log(r["ppl"] / fp)), "predicted_delta": found.delta,
                     "predicted_se": found.delta_se, "factor": found.factor, "seconds": dict(found.seconds),
                     "measured_at": r.get("commit"), "predicted_at": at})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def measured_from(path: Path, source: Path, n_mixed: int) -> dict[str, Any]:
    """The measured rows of an earlier result (``--json``) in ``--measure``'s cache layout: each uniform and
    random row's options, its sites' schemes as the run plans them, its perplexity and commit."""
    from optimum.adaround.api import run_config
    from optimum.adaround.graph_passes.model_io import load_model
    from optimum.adaround.graph_passes.pipeline import plan_schemes, prepare_sites

    result = json.loads(path.read_text())
    options = configs(units(source), n_mixed, [])
    model = load_model(str(source)).model
    out: dict[str, Any] = {"fp32": {"ppl": result["fp32_ppl"]}}
    for r in (r for r in result["rows"] if r["name"] in options):
        cfg = run_config(None, **run_options(options[r["name"]]))
        sel = cfg.selection
        sites = prepare_sites(model, sel.include, sel.exclude, sel.quantize_lm_head).sites
        _, schemes = plan_schemes(cfg, sites)
        out[r["name"]] = {"options": options[r["name"]], "ppl": r["ppl"], "commit": r["measured_at"],
                          "site_schemes": {s.name: schemes[s.name].label for s in sites}}  # fmt: skip
    return out


def run_max_size(source: Path, work: Path, sizes: list[float], eval_tokens: int) -> list[dict[str, Any]]:
    """gptq under each ``--max-size``, reusing the allocations' kept sensitivities: written size, perplexity
    on the same tokens, and the prediction."""
    from optimum.adaround import quantize

    fp = perplexity_of(source, eval_tokens)
    rows = []
    for mb in sizes:
        out = work / f"max-size-{mb:g}"
        shutil.rmtree(out, ignore_errors=True)
        stamp, t0 = commit(), time.perf_counter()
        quantize(str(source), str(out), method="gptq", max_size=mb, sensitivity=str(work / "sensitivity.json"),
                 progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        alloc = json.loads((out / "quantization_config.json").read_text())["allocation"]
        ppl = perplexity_of(out, eval_tokens)
        rows.append({"max_size_mb": mb, "written_mb": size_mb(out), "ppl": ppl, "delta": float(np.log(ppl / fp)),
                     "predicted_delta": alloc["predicted_delta_nll"], "bits_per_weight": alloc["bits_per_weight"],
                     "seconds": seconds, "commit": stamp})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def run_accuracy_levels(source: Path, work: Path, eval_tokens: int) -> list[dict[str, Any]]:
    """W8 g128 (rtn, gptq) at ``accuracy_level`` 0 and 4: the loss of int8 inputs alone, beside the
    predictor's int8 probe for block 128 (on ``INT8_SEQUENCES`` calibration sequences)."""
    from optimum.adaround import quantize
    from optimum.adaround.data.text import calibration_token_ids
    from optimum.adaround.graph_passes.model_io import load_model
    from optimum.adaround.graph_passes.pipeline import prepare_sites
    from optimum.adaround.graph_passes.predict.int8_inputs import INT8_SEQUENCES
    from optimum.adaround.graph_passes.predict.probe import probe_int8_inputs

    fp = perplexity_of(source, eval_tokens)
    rows = []
    for method in ("rtn", "gptq"):
        for level in (0, 4):
            out = work / f"level-{method}-{level}"
            shutil.rmtree(out, ignore_errors=True)
            stamp = commit()
            quantize(
                str(source), str(out), method=method, scheme="w8-g128", accuracy_level=level, progress=False
            )
            ppl = perplexity_of(out, eval_tokens)
            rows.append({"method": method, "accuracy_level": level, "ppl": ppl, "delta": float(np.log(ppl / fp)),
                         "commit": stamp})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    model = load_model(str(source)).model
    sites = prepare_sites(model, quantize_lm_head=True).sites
    ids = calibration_token_ids(source, None, 32, 256, seed=0)
    for n in (2, INT8_SEQUENCES, 32):
        value, se = probe_int8_inputs(model, sites, ids[:n], [128])[128]
        rows.append({"probe_sequences": n, "delta": value, "se": se, "commit": commit()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def attach_kept(result: dict[str, Any], work: Path) -> None:
    """The --cost, --max-sizes, --accuracy-levels and --joint results kept in ``work`` (runs of their own)."""
    for key in ("cost", "max_size", "accuracy_levels", "joint"):
        if (work / f"{key}.json").exists():
            result[key] = json.loads((work / f"{key}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/optimum-adaround/bench-predictor")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--mixed", type=int, default=6)
    ap.add_argument("--probe-samples", type=int, default=2)
    ap.add_argument("--budgets", type=float, nargs="*", default=[2.5, 3.0, 3.5, 4.25])
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--predict", action="store_true")
    ap.add_argument(
        "--cost", action="store_true", help="time a gptq run against predicting it (quiet machine)"
    )
    ap.add_argument("--max-sizes", type=float, nargs="*", default=[],
                    help="also quantize under these --max-size MB (needs the kept sensitivities of a --measure run)")  # fmt: skip
    ap.add_argument("--accuracy-levels", action="store_true",
                    help="W8 g128 at accuracy_level 0 and 4, beside the int8 input probe on 2, 8 and 32 sequences")  # fmt: skip
    ap.add_argument(
        "--joint",
        action="store_true",
        help="predict each uniform and random row by the joint probe (predict's one-configuration path)",
    )
    ap.add_argument("--measured-from", type=Path, help="the measured rows of this earlier --json result")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--render-only", action="store_true", help="rewrite --md from --json")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--plot", type=Path, help="scatter of predicted vs measured")
    ap.add_argument(
        "--pareto", type=Path, help="perplexity vs size: uniform, random mixed, allocations, peers"
    )
    ap.add_argument(
        "--peers-json", type=Path, help="nncf_peer.py --json output of the same machine and tokens"
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = default_source()
    stamp = provenance()  # the code measured: commits made while it runs do not relabel it
    if args.render_only:  # the markdown again from a --json result (no measurement)
        from predictor_report import report

        result = json.loads(args.json.read_text())
        attach_kept(result, args.work)
        args.json.write_text(json.dumps(result, indent=1))
        args.md.write_text(report(result) + "\n")
        return
    if args.accuracy_levels:
        rows = run_accuracy_levels(source, args.work, args.eval_tokens)
        (args.work / "accuracy_levels.json").write_text(json.dumps(rows, indent=1))
    if args.max_sizes:
        rows = run_max_size(source, args.work, args.max_sizes, args.eval_tokens)
        (args.work / "max_size.json").write_text(json.dumps(rows, indent=1))
    if args.cost:
        cost = run_cost(source, args.work)
        (args.work / "cost.json").write_text(json.dumps(cost, indent=1))
        print(json.dumps(cost))
    if args.measure:
        measured = run_measure(args, source)
    elif args.measured_from:
        measured = measured_from(args.measured_from, source, args.mixed)
    else:
        measured = json.loads((args.work / "measured.json").read_text())
    if args.joint:
        (args.work / "joint.json").write_text(json.dumps(run_joint(source, measured), indent=1))
    if args.predict:
        from predictor_report import pareto, predict_rows, report, scatter

        peers = json.loads(args.peers_json.read_text())["rows"] if args.peers_json else []
        result = predict_rows(args, source, measured)
        result["provenance"], result["peers"] = {**provenance(), "commit": stamp["commit"]}, peers
        attach_kept(result, args.work)
        emit(result, report(result), args.json, args.md)
        if args.plot:
            scatter(result, args.plot)
        if args.pareto:
            pareto(result, peers, args.pareto)


if __name__ == "__main__":
    main()
