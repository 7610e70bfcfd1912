"""Does a rounding method's proxy-loss gain hold on calibration text it never saw?

Every calibrated method minimises the layer loss ``tr(dW H dW^T)`` on the calibration tokens, so a lower
loss on those tokens can be fit to their noise. This script measures it out of sample on the default
model (SmolLM2-135M):

1. it runs the main job's sequential calibration twice, on two independent draws of calibration windows
   (A: seed 0, the main job's own draw; B: seed 1), rounding every site to nearest in both runs so that A
   and B describe the same upstream model, and keeps each site's weight and statistics (q/k/v with the main
   job's sink weighting) in memory (~2.5 GB for the whole model);
2. it quantizes every site with each method from A's statistics only and scores the rounding under A
   (in sample) and under B (held out), as mean per-token output error.

The table gives, per method and site type, the geometric mean of the loss ratio to the baseline method
and on how many sites the method is lower, in and out of sample.

    python benchmarks/holdout_proxy.py --methods gptq adaround --md results/holdout_proxy.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SITE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def collect(seed: int, samples: int, seq_len: int, layers: str | None) -> dict[str, tuple[np.ndarray, Any]]:
    """``{site: (weight, SiteStats)}`` of the default model's sequential calibration on draw ``seed``."""
    from optimum.adaround import quantize
    from optimum.adaround.data.default_model import default_onnx_dir
    from optimum.adaround.data.text import calibration_token_ids
    from optimum.adaround.graph_passes.rounding import base

    store: dict[str, tuple[np.ndarray, Any]] = {}
    pattern = re.compile(layers) if layers else None

    @dataclasses.dataclass(frozen=True)
    class CollectConfig(base.MethodConfig):  # round to nearest, keeping a float32 copy of what is handed over
        name = "holdout_collect"
        needs = frozenset({"hessian"})

    class Collect:
        def __init__(self, config: CollectConfig) -> None:
            self.config, self.rtn = config, base.get_method("rtn")

        def quantize(self, weight, scheme, stats=None, *, site="?"):
            if stats is not None and (pattern is None or pattern.search(site)):
                extra = {
                    k: np.asarray(v, np.float32 if np.ndim(v) == 2 else None) for k, v in stats.extra.items()
                }
                hessian = np.asarray(stats.hessian, np.float32)
                store[site] = (np.array(weight, np.float32), base.SiteStats(hessian, stats.n_tokens, extra))
            return self.rtn.quantize(weight, scheme, stats, site=site)

    # registered per call (it closes over this call's store), taken out again below
    base.register_method(CollectConfig)(Collect)
    model = default_onnx_dir()
    ids = calibration_token_ids(model, None, samples, seq_len, seed=seed)
    try:
        with tempfile.TemporaryDirectory() as out:
            quantize(
                model,
                Path(out) / "m",
                scheme="w4-g128-sym",
                method=CollectConfig.name,
                calib_data=ids,
                workers=1,
            )
    finally:
        base.METHODS.pop(CollectConfig.name, None)
    return store


def _float64(stats: Any, base: Any) -> Any:
    extra = {k: v.astype(np.float64) if np.ndim(v) == 2 else v for k, v in stats.extra.items()}
    return base.SiteStats(stats.hessian.astype(np.float64), stats.n_tokens, extra)


def score_sites(
    sites_a: dict[str, tuple[np.ndarray, Any]],
    sites_b: dict[str, tuple[np.ndarray, Any]],
    methods: dict[str, dict[str, Any]],
    scheme: str = "w4-g128-sym",
    log: bool = True,
) -> list[dict[str, Any]]:
    """One row per (method, site): the rounding found from A's statistics, scored under A and under B."""
    from optimum.adaround.graph_passes.rounding import base
    from optimum.adaround.graph_passes.rounding.metrics import proxy_loss
    from optimum.adaround.graph_passes.scheme import QuantScheme

    sch = QuantScheme.parse(scheme)
    rows = []
    for label, options in methods.items():
        options = dict(options)
        method = base.get_method(options.pop("method", label), **options)
        for site in sorted(sites_a):
            w, st_a = sites_a[site]
            _, st_b = sites_b[site]
            t0 = time.perf_counter()
            wq = method.quantize(w, sch, _float64(st_a, base), site=site).dequantize()
            row = {"method": label, "site": site, "s": time.perf_counter() - t0,
                   "loss_a": proxy_loss(w, wq, st_a.hessian, st_a.n_tokens),
                   "loss_b": proxy_loss(w, wq, st_b.hessian, st_b.n_tokens)}  # fmt: skip
            rows.append(row)
            if log:
                print(json.dumps(row), flush=True)
    return rows


def _site_type(site: str) -> str:
    return next((t for t in SITE_TYPES if t in site), "other")


def _ratios(rows: Sequence[dict], method: str, baseline: str, key: str, sites: Iterable[str]) -> np.ndarray:
    by = {(r["method"], r["site"]): r[key] for r in rows}
    return np.array([by[method, s] / by[baseline, s] for s in sites if by[baseline, s] > 0])


def summary(rows: Sequence[dict], baseline: str) -> list[str]:
    """Markdown: per method and site type, geometric-mean loss ratio to ``baseline`` and sites lower."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != baseline]
    sites = sorted({r["site"] for r in rows if r["method"] == baseline})
    lines = [
        f"| method | sites | in sample (A): ratio to {baseline} | lower | held out (B): ratio | lower |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        groups = [("all", sites)] + [
            (t, [s for s in sites if _site_type(s) == t]) for t in (*SITE_TYPES, "other")
        ]
        for name, group in groups:
            if not group:
                continue
            a = _ratios(rows, m, baseline, "loss_a", group)
            b = _ratios(rows, m, baseline, "loss_b", group)
            label = f"`{m}`" if name == "all" else f"&nbsp;&nbsp;{name}"
            lines.append(
                f"| {label} | {len(group)} | {math.exp(np.log(a).mean()):.4f} | {int((a < 1).sum())} | "
                f"{math.exp(np.log(b).mean()):.4f} | {int((b < 1).sum())} |"
            )
    return lines


def _method_specs(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``NAME``, ``NAME:k=v,...`` or ``LABEL=NAME:k=v,...`` -> ``{label: {"method": NAME, k: v}}``."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        head, _, opts = spec.partition(":")
        label, _, name = head.partition("=")
        options: dict[str, Any] = {"method": name or label}
        for kv in filter(None, opts.split(",")):
            k, _, v = kv.partition("=")
            try:
                options[k] = json.loads(v)
            except json.JSONDecodeError:
                options[k] = v
        out[label] = options
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["gptq", "adaround"],
                    help="NAME or LABEL=NAME:key=value,... (the first is the baseline)")  # fmt: skip
    ap.add_argument("--scheme", default="w4-g128-sym")
    ap.add_argument("--layers", default=None, help="regex on site names (default: every site)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="window draws of A and B")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    methods = _method_specs(args.methods)
    t0 = time.perf_counter()
    sites_a = collect(args.seeds[0], args.calib_samples, args.seq_len, args.layers)
    sites_b = collect(args.seeds[1], args.calib_samples, args.seq_len, args.layers)
    print(f"calibrated {len(sites_a)} sites twice in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = score_sites(sites_a, sites_b, methods, args.scheme)
    lines = summary(rows, next(iter(methods)))
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": None, "md": None}, "rows": rows}, indent=1)
        )
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
