"""``optimum-adaround quantize IN OUT``: quantize the weights of an exported ONNX model."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..defaults import DEFAULT_SEQ_LEN, DEFAULT_SINK_WEIGHT, calib_samples_help
from ..graph_passes.errors import UnsupportedSchemeError
from ..graph_passes.scheme import PER_CHANNEL, QuantScheme, WeightFormat

__all__ = ["add_parser", "parse_method_options", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="quantize the weights of an ONNX model (file or exported folder)",
        description="Quantize every linear layer of an ONNX model (MatMul/Gemm with a constant weight) and "
        "write the result atomically to OUT with quantization_config.json.",
    )
    p.add_argument("input", metavar="IN", help="a .onnx file or an Optimum-exported folder")
    p.add_argument("output", metavar="OUT", help="output folder (must not be inside IN)")
    g = p.add_argument_group("scheme")
    g.add_argument("--bits", type=int, default=4, help="bits per weight (default 4)")
    g.add_argument(
        "--group-size", type=int, default=128, help=f"block length along K; {PER_CHANNEL} = per channel"
    )
    sym = g.add_mutually_exclusive_group()
    sym.add_argument(
        "--sym", dest="symmetric", action="store_true", default=True, help="symmetric grid (default)"
    )
    sym.add_argument(
        "--asym", dest="symmetric", action="store_false", help="asymmetric grid with zero points"
    )
    g.add_argument(
        "--format", default="matmulnbits", choices=[f.value for f in WeightFormat], help="graph format"
    )
    m = p.add_argument_group("method")
    m.add_argument("--method", default="rtn", help="rounding method: rtn, gptq, adaround, ... (default rtn)")
    m.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of the rounding method (repeatable; VALUE parsed as JSON when it can be)",
    )
    m.add_argument("--calib-data", default=None, help="calibration text: a file/folder or a source name")
    m.add_argument(
        "--calib-samples",
        type=int,
        default=None,
        help=calib_samples_help(),
    )
    m.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        help=f"tokens per calibration sequence (default {DEFAULT_SEQ_LEN})",
    )
    m.add_argument(
        "--one-pass", dest="sequential", action="store_false", help="calibrate the float model in one pass"
    )
    m.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: calibrate through onnxruntime's CUDA provider, and run AdaRound's refinement on the GPU "
        "where torch sees one (--method-option device=cpu keeps it on the CPU)",
    )
    m.add_argument(
        "--sink-weight",
        type=float,
        default=DEFAULT_SINK_WEIGHT,
        help="times each calibration sequence's first position counts for the attention q/k/v projections "
        f"(default {DEFAULT_SINK_WEIGHT:g}; 1 = off)",
    )
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that round a decoder block's sites side by side (same output; default: one per CPU, "
        "at most 4, for models of 16M+ weights; 1 = none)",
    )
    s = p.add_argument_group("selection")
    s.add_argument(
        "--include", action="append", default=[], metavar="REGEX", help="quantize only matching modules"
    )
    s.add_argument(
        "--exclude", action="append", default=[], metavar="REGEX", help="leave matching modules in float"
    )
    s.add_argument("--lm-head", action="store_true", help="quantize the output projection too")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)
    return p


def parse_method_options(items: list[str]) -> dict[str, Any]:
    """``["damp=0.01", "act_order=true"]`` -> ``{"damp": 0.01, "act_order": True}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UnsupportedSchemeError(f"--method-option {item!r}: use KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from ..api import quantize  # lazy: keeps `optimum-adaround --help` fast
    from ..output import CONFIG_NAME

    scheme = QuantScheme(
        bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, format=args.format
    )
    out = quantize(
        args.input,
        args.output,
        scheme=scheme,
        method=args.method,
        method_options=parse_method_options(args.method_option),
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        sequential=args.sequential,
        sink_weight=args.sink_weight,
        workers=args.workers,
        include=args.include,
        exclude=args.exclude,
        quantize_lm_head=args.lm_head,
        device=args.device,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print_summary(Path(out), json.loads((Path(out) / CONFIG_NAME).read_text()))
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def print_summary(out: Path, record: dict[str, Any]) -> None:
    """A few lines: scheme/method, sites quantized, skipped by reason, size before/after, where."""
    label = QuantScheme.from_dict(record["scheme"]).label
    print(
        f"quantized {record['n_sites']} weights with {record['method']['name']} {label} ({record['format']})"
    )
    reasons = Counter(s["reason"] for s in record["skipped"])
    if reasons:
        print(f"skipped {sum(reasons.values())}:")
        for reason, count in reasons.most_common():
            print(f"  {count} x {reason}")
    before, after = record["float_bytes"], record.get("quantized_bytes", 0)
    ratio = f" ({before / after:.2f}x smaller)" if after else ""
    print(f"size: {_mb(before)} of weights -> {_mb(after)} on disk{ratio}")
    print(f"output: {out}")
