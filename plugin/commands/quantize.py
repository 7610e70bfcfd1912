"""``optimum-adaround quantize IN OUT``: quantize the weights of an exported ONNX model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..graph_passes.rounding.base import METHODS
from ..graph_passes.scheme import QuantScheme
from ..output import CONFIG_NAME
from .options import add_config_arguments, config_from_args

__all__ = ["add_parser", "print_summary", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="quantize the weights of an ONNX model (file or exported folder)",
        description="Quantize every linear layer of an ONNX model (MatMul/Gemm with a constant weight) and "
        "write the result atomically to OUT with quantization_config.json and the recipe of the run.",
        epilog=method_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="a .onnx file or an Optimum-exported folder")
    p.add_argument("output", metavar="OUT", help="output folder (must not be inside IN)")
    add_config_arguments(p.add_argument_group("quantization (defaults: optimum.adaround.QuantConfig)"))
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)
    return p


def method_options_help() -> str:
    """Each method's options with their defaults, for ``--help``."""
    lines = ["rounding methods and their --method-option KEY=VALUE options (defaults; VALUE is JSON):"]
    for name in sorted(METHODS):
        cls = METHODS[name]
        opts = ", ".join(f"{f.name}={json.dumps(f.default)}" for f in dataclasses.fields(cls))
        lines.append(f"  {name}: {opts or '(none)'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..api import quantize  # lazy: keeps `optimum-adaround --help` fast

    config = config_from_args(args)
    out = quantize(args.input, args.output, config, overwrite=args.overwrite, progress=args.progress)
    print_summary(Path(out), json.loads((Path(out) / CONFIG_NAME).read_text()))
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _print_graph(record: dict[str, Any]) -> None:
    """What shape sharing (and onnxruntime's fusions, when asked) did to the graph, or why they did not."""
    fusions = record.get("ort_fusions")
    shapes = (fusions or {}).get("shapes") or record.get("shapes")
    if fusions is not None and not fusions.get("applied"):
        print(f"  onnxruntime fusions not applied: {fusions.get('reason')}")
    if shapes is not None and shapes.get("applied"):
        print(f"  graph: {shapes['nodes_before']} -> {shapes['nodes_after']} nodes (shape reads shared)")
    elif shapes is not None:
        print(f"  shape sharing not applied: {shapes.get('reason')}")


_LAYER = re.compile(r"^(?P<head>.*?layers?\.)(?P<layer>\d+)\.(?P<kind>.+)$")


def allocation_rows(units: dict[str, str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """``(columns, rows)`` of an allocation by block and layer group: one row per decoder block (a unit
    outside the stack, such as the output projection, gets its own row), one column per group kind."""
    by_layer: dict[str, dict[str, str]] = {}
    for unit, label in units.items():
        m = _LAYER.match(unit)
        layer, kind = (m["layer"], m["kind"].replace("_proj", "")) if m else (unit, "")
        by_layer.setdefault(layer, {})[kind] = label
    columns = list(dict.fromkeys(k for row in by_layer.values() for k in row if k))
    rows = [(layer, [row.get(c, row.get("", "")) for c in columns] if any(row) else [row[""]])
            for layer, row in by_layer.items()]  # fmt: skip
    return columns, rows


def print_allocation(allocation: dict[str, Any]) -> None:
    """The allocation's target, prediction and table (blocks x layer groups)."""
    increase = math.expm1(allocation["predicted_delta_nll"])
    print(f"  allocation: {allocation['bits_per_weight']:.3f} bits per weight (budget "
          f"{8 * allocation['budget_bytes'] / allocation['weights']:.3f}), predicted perplexity "
          f"+{100 * increase:.1f}%")  # fmt: skip
    columns, rows = allocation_rows(allocation["units"])
    width = max([len(c) for c in columns] + [len(v) for _, vs in rows for v in vs] + [4])
    print("    " + "block".ljust(8) + "".join(c.ljust(width + 2) for c in columns))
    for layer, values in rows:
        print("    " + layer.ljust(8) + "".join(v.ljust(width + 2) for v in values))


def print_summary(out: Path, record: dict[str, Any]) -> None:
    """A few lines: scheme/method, sites quantized, skipped by reason, size before/after, where."""
    label = QuantScheme.from_dict(record["scheme"]).label
    asked = record.get("config", {}).get("data", {}).get("scheme", {}).get("data", {}).get("format")
    chosen = f"format {record['format']}" + (" (chosen by --format auto)" if asked == "auto" else "")
    print(f"quantized {record['n_sites']} weights with {record['method']['name']} {label}, {chosen}")
    others = Counter(s["scheme"] for s in record["sites"] if s.get("scheme", label) != label)
    allocation = record.get("allocation")
    if allocation:
        print_allocation(allocation)
    for scheme, count in [] if allocation else others.items():
        names = [s["name"] for s in record["sites"] if s.get("scheme") == scheme]
        print(f"  {count} at {scheme}: {', '.join(names[:3])}{', ...' if count > 3 else ''}")
    level = record.get("config", {}).get("data", {}).get("output", {}).get("accuracy_level")
    slow = [s["name"] for s in record["sites"] if s.get("scheme", "").startswith("w8-")]
    if level == 0 and record["format"] != "qdq" and slow:
        print(
            f"  note: {len(slow)} site(s) at 8 bits with accuracy_level 0 ({slow[0]}...): onnxruntime's exact 8-bit "
            "kernel is far slower on CPU than the float MatMul (benchmarks/results/small_fast_defaults.md); "
            "--accuracy-level 4 or --lm-head none keep decoding fast"
        )
    for table in record.get("embeddings", []):
        how = f"shares {table['shared_with']}'s codes" if table.get("shared_with") else "GatherBlockQuantized"
        print(f"  embedding {table['table']}: {table['bits']} bits, {how}")
    _print_graph(record)
    reasons = Counter(s["reason"] for s in record["skipped"])
    if reasons:
        print(f"skipped {sum(reasons.values())}:")
        for reason, count in reasons.most_common():
            print(f"  {count} x {reason}")
    before, after = record["float_bytes"], record.get("quantized_bytes", 0)
    ratio = f" ({before / after:.2f}x smaller)" if after else ""
    print(f"size: {_mb(before)} of weights -> {_mb(after)} on disk{ratio}")
    print(f"output: {out}")
