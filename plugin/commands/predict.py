"""``optimum-adaround predict IN``: the perplexity a quantization would give, without running it."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .options import add_config_arguments, config_from_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="predict the perplexity increase of a quantization (or of a --target-bits allocation)",
        description="Print the predicted increase of perplexity over the float model under the options "
        "given (those of quantize), without running it: one configuration by a joint probe through "
        "onnxruntime (every layer moved at once by the error its rounding leaves, on a few calibration "
        "sequences); --target-bits/--max-size by each layer group's probed sensitivity and estimated error "
        "(reusable with --sensitivity). Nothing is written unless --json.",
    )
    p.add_argument("input", metavar="IN", help="a .onnx file or an Optimum-exported folder")
    add_config_arguments(p.add_argument_group("quantization (defaults: optimum.adaround.QuantConfig)"))
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="also write the prediction")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..prediction import predict  # lazy: keeps `optimum-adaround --help` fast

    result = predict(args.input, config_from_args(args), progress=args.progress)
    what = result.get("schemes") or f"allocation at {result['bits_per_weight']:.3f} bits per weight"
    increase = math.expm1(result["delta_nll"])
    spread = result["delta_nll_se"] * (1 + increase)
    print(f"{result['method']} {', '.join(what) if isinstance(what, list) else what}: "
          f"{result['bits_per_weight']:.3f} bits per weight")  # fmt: skip
    print(f"predicted perplexity increase: +{100 * increase:.1f}% (+/- {100 * spread:.1f}%, probe sampling)")
    print(f"on the probe tokens: {result['probe_perplexity']:.2f} -> {result['predicted_perplexity']:.2f}")
    if result.get("allocation"):
        from .quantize import print_allocation

        print_allocation(result["allocation"])
    print(f"took {result['seconds']['total']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0
