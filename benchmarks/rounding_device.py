"""AdaRound's refinement on a GPU against the CPU, on one real decoder block of SmolLM2.

The rounding is timed apart from the model: a machine with a GPU needs neither the 540 MB SmolLM2 export nor
onnxruntime. This script splits the work:

``dump`` (on a machine with the default model) runs the real sequential calibration of
``optimum-adaround quantize`` and saves the weights and statistics (``X^T X``, first-position part, token
count) of the sites of one decoder block, float32, ~30 MB for SmolLM2-135M;

``time`` (anywhere with torch; needs only ``graph_passes``, so it runs from a checkout) rounds those sites
with ``gptq`` and ``adaround`` (W4 g128 symmetric, the main job's scheme, default options) on each device
asked for and prints the time and proxy loss of each site, then the block's totals.

    python benchmarks/rounding_device.py dump --layer 15 --out build/block15
    python benchmarks/rounding_device.py time build/block15 --devices cpu cuda --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _rounding():
    """graph_passes' rounding modules: from the installed package, else from the checkout by path."""
    try:
        from optimum.adaround.graph_passes.rounding import base
        from optimum.adaround.graph_passes.scheme import QuantScheme
    except ImportError:
        sys.path.insert(0, str(ROOT))
        from graph_passes.rounding import base  # type: ignore[no-redef]
        from graph_passes.scheme import QuantScheme  # type: ignore[no-redef]
    return base, QuantScheme


def dump(layer: int, out: Path, calib_samples: int, seq_len: int) -> None:
    from optimum.adaround import quantize
    from optimum.adaround.data.default_model import default_onnx_dir
    from optimum.adaround.graph_passes.rounding import base

    pattern = re.compile(rf"(?:^|[./_])layers[./_]{layer}(?:$|[./_])")
    out.mkdir(parents=True, exist_ok=True)

    @dataclasses.dataclass(frozen=True)
    class DumpStatsConfig(
        base.MethodConfig
    ):  # RTN's rounding, plus a copy of what a calibrated method is handed
        name = "dump_stats"
        needs = frozenset({"hessian"})

    class DumpStats:
        def __init__(self, config: DumpStatsConfig) -> None:
            self.config, self.rtn = config, base.get_method("rtn")

        def quantize(self, weight, scheme, stats=None, *, site="?"):
            if stats is not None and pattern.search(site):
                extra = {k: np.asarray(v, np.float32) for k, v in stats.extra.items() if np.ndim(v) == 2}
                tokens = {k: int(v) for k, v in stats.extra.items() if np.ndim(v) == 0}
                np.savez(
                    out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", site).strip("_") + ".npz"),
                    site=site,
                    weight=np.asarray(weight, np.float32),
                    hessian=np.asarray(stats.hessian, np.float32),
                    n_tokens=stats.n_tokens,
                    extra_names=np.array(sorted(extra)),
                    **{f"extra_{k}": v for k, v in extra.items()},
                    tokens=json.dumps(tokens),
                )
            return self.rtn.quantize(weight, scheme, stats, site=site)

    base.register_method(DumpStatsConfig)(DumpStats)
    quantize(
        default_onnx_dir(),
        out / "model",
        scheme="w4-g128-sym",
        method="dump_stats",
        calib_samples=calib_samples,
        seq_len=seq_len,
        workers=1,
        overwrite=True,
    )
    print(f"saved {len(list(out.glob('*.npz')))} sites of layer {layer} in {out}")


def load_sites(folder: Path, base) -> list[tuple[str, np.ndarray, object]]:
    sites = []
    for f in sorted(folder.glob("*.npz")):
        z = np.load(f)
        extra = {str(k): z[f"extra_{k}"].astype(np.float64) for k in z["extra_names"]}
        extra.update({k: np.asarray(v) for k, v in json.loads(str(z["tokens"])).items()})
        stats = base.SiteStats(z["hessian"].astype(np.float64), int(z["n_tokens"]), extra)
        sites.append((str(z["site"]), z["weight"], stats))
    if not sites:
        sys.exit(f"{folder}: no .npz site files (run `dump` first)")
    return sites


def time_sites(folder: Path, devices: list[str], methods: list[str], threads: int | None) -> list[dict]:
    base, QuantScheme = _rounding()
    scheme = QuantScheme.parse("w4-g128-sym")
    sites = load_sites(folder, base)
    rows = []
    for method in methods:
        for device in devices:
            opts = {} if method == "gptq" else {"device": device}
            if threads is not None:
                opts["threads"] = threads
            m = base.get_method(method, **opts)
            if device != "cpu" and method != "gptq":  # warm-up: CUDA context and kernels out of the timing
                m.quantize(
                    sites[0][1][:16], scheme, base.SiteStats(sites[0][2].hessian, sites[0][2].n_tokens)
                )
            for name, w, stats in sites:
                t0 = time.perf_counter()
                qw = m.quantize(w, scheme, stats, site=name)
                row = {"method": method, "device": device if method != "gptq" else "cpu", "site": name,
                       "shape": list(w.shape), "s": time.perf_counter() - t0,
                       "proxy_loss": qw.metrics.get("proxy_loss")}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
            if method == "gptq":
                break  # GPTQ always rounds on the CPU
    return rows


def summary(rows: list[dict]) -> list[str]:
    lines = ["| method | device | sites | block s | proxy loss (sum) |", "|---|---|---|---|---|"]
    keys = dict.fromkeys((r["method"], r["device"]) for r in rows)
    for method, device in keys:
        rs = [r for r in rows if r["method"] == method and r["device"] == device]
        lines.append(
            f"| {method} | {device} | {len(rs)} | {sum(r['s'] for r in rs):.2f} | "
            f"{sum(r['proxy_loss'] or 0 for r in rs):.6g} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="calibrate the default model and save one block's sites")
    d.add_argument("--layer", type=int, default=15)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--calib-samples", type=int, default=32, help="as the main job (32 x 256 tokens)")
    d.add_argument("--seq-len", type=int, default=256)
    t = sub.add_parser("time", help="round the saved sites on each device")
    t.add_argument("folder", type=Path)
    t.add_argument("--devices", nargs="+", default=["cpu"])
    t.add_argument("--methods", nargs="+", default=["gptq", "adaround"])
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: the methods' own, 1)")
    t.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "dump":
        dump(args.layer, args.out, args.calib_samples, args.seq_len)
        return 0
    rows = time_sites(args.folder, args.devices, args.methods, args.threads)
    lines = summary(rows)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": lines}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
