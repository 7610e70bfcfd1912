"""Wall time of whole ``optimum-adaround quantize`` runs on the default model, each method at its defaults.

Each run is the command a user types (a fresh process: imports, calibration, rounding, packing and the
atomic write included), at the main job's scheme (W4 g128 symmetric, MatMulNBits) unless told otherwise;
every option but ``--method`` is left at its default, so ``gptq`` calibrates on 32 sequences and the
AdaRound methods on 128. The peak memory is the summed RssAnon of the run and its rounding workers.

    python benchmarks/quantize_time.py --methods rtn gptq adaround adaround_ls --out benchmarks

writes ``results/quantize_time.json`` and ``results/quantize_time.md`` (RESULTS.md quotes the latter).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import commit, machine, now, run_command  # a sibling module (benchmarks/ is no package)


def _cli_argv(model: Path, out: Path, method: str, bits: int, group_size: int, extra: list[str]) -> list[str]:
    """The user's command, as the console script runs it (the package must be installed in this Python)."""
    argv = [sys.executable, "-m", "optimum.adaround.cli", "quantize", str(model), str(out), "--no-progress"]
    return [*argv, "--bits", str(bits), "--group-size", str(group_size), "--method", method, *extra]


def time_methods(
    model: Path, methods: list[str], bits: int, group_size: int, extra: list[str], timeout_s: float
) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        with tempfile.TemporaryDirectory(prefix="quantize_time_") as tmp:
            out = Path(tmp) / "out"
            argv = _cli_argv(model, out, method, bits, group_size, extra)
            r = run_command(argv, timeout_s)
            config = out / "quantization_config.json"
            calib = (json.loads(config.read_text()).get("calibration") or {}) if config.is_file() else {}
        rows.append(
            {
                "method": method,
                **r,
                "calib_samples": calib.get("n_samples"),
                # the user's command; the folders are placeholders (the output is a temporary folder)
                "command": " ".join(
                    [
                        "optimum-adaround",
                        *_cli_argv(Path("MODEL"), Path("OUT"), method, bits, group_size, extra)[3:],
                    ]
                ),
            }
        )
        status = "ok" if r["ok"] else r["error"]
        print(f"{method}: {r['wall_seconds']:.0f} s, {r['peak_rss_anon_mb']:.0f} MB ({status})", flush=True)
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    at_commit = f" at commit {meta['commit']}" if meta.get("commit") else ""
    lines = [
        f"# Whole quantization runs, each method at its defaults ({meta['model']}, {meta['date']})",
        "",
        f"`{meta['command']}` on {meta['machine']}{at_commit}: each row is one `optimum-adaround quantize` process "
        f"(W{meta['bits']} g{meta['group_size']} symmetric, every other option at its default), timed from "
        "start to the finished output folder; peak memory is the RssAnon of that process and its rounding "
        "workers summed.",
        "",
        "| method | calibration sequences | wall time | peak memory | result |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        wall = f"{r['wall_seconds']:.0f} s ({r['wall_seconds'] / 60:.1f} min)"
        result = "ok" if r["ok"] else f"**error** {r['error']}"
        samples = "-" if r["calib_samples"] is None else str(r["calib_samples"])
        lines.append(f"| `{r['method']}` | {samples} | {wall} | {r['peak_rss_anon_mb']:.0f} MB | {result} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="an Optimum export folder (default: the embedded SmolLM2)")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "adaround", "adaround_ls"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further quantize options, last")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/results/quantize_time.{json,md}")
    a = p.parse_args(argv)
    model = a.model
    if model is None:
        from optimum.adaround.data.default_model import default_onnx_dir

        model = default_onnx_dir()
    rows = time_methods(model, a.methods, a.bits, a.group_size, a.extra, a.timeout)
    meta = {
        "model": "SmolLM2-135M" if a.model is None else model.name,
        "date": now(),
        "machine": machine(),
        "commit": commit(),
        "bits": a.bits,
        "group_size": a.group_size,
        "command": "python benchmarks/quantize_time.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    results = a.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "quantize_time.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (results / "quantize_time.md").write_text("\n".join(markdown(meta, rows)) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
