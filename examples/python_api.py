"""Export + quantize from Python in one call, then print the measured results.

python examples/python_api.py MODEL_DIR_OR_HUB_ID OUTPUT_DIR [--recipe examples/recipe.yaml] [--method gptq]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optimum.adaround import export


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="local model folder (or a Hub id when online)")
    parser.add_argument("output", type=Path)
    parser.add_argument("--recipe", default=None, help="preset name or recipe file")
    parser.add_argument("--method", default=None, help="overrides the recipe's method (rtn, gptq, adaround)")
    parser.add_argument("--scheme", default=None, help="overrides the recipe's scheme, e.g. w4-g128")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument(
        "--eval-data", default=None, help="evaluation text (default: embedded Wikipedia eval split)"
    )
    parser.add_argument("--eval-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    args = parser.parse_args(argv)

    extra = {} if args.calib_samples is None else {"calib_samples": args.calib_samples}
    out = export(
        args.model,
        args.output,
        scheme=args.scheme,
        method=args.method,
        recipe=args.recipe,
        eval=True,
        eval_options={"max_tokens": args.eval_tokens, "dataset": args.eval_data},
        overwrite=True,
        **extra,
    )
    results = json.loads((out / "eval_results.json").read_text())
    before, after = results["original"], results["quantized"]
    print(f"wrote {out}")
    print(f"size: {before['model_bytes'] / 1e6:.2f} MB -> {after['model_bytes'] / 1e6:.2f} MB")
    print(f"bits per weight (quantized layers): {after['bits_per_weight']:.3f}")
    print(f"perplexity: {before['perplexity']['perplexity']:.3f} -> {after['perplexity']['perplexity']:.3f}")
    return out


if __name__ == "__main__":
    main()
