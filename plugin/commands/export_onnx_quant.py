"""``optimum-cli export onnx-quant``: Optimum's ``export onnx`` flags plus weight-quantization flags.

Registered by the optimum-cli hook (``optimum.commands.register.adaround_onnx_quant``). Importing this
module stays light (argparse only); the export machinery is imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

__all__ = ["ONNXQuantExportCommand", "add_quant_arguments", "quantize_options"]

PROG = "optimum-cli export onnx-quant"


def add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    """Quantization flags. Defaults are None so that a ``--recipe`` value is overridden only when given."""
    g = parser.add_argument_group("Weight quantization (optimum-adaround)")
    g.add_argument("--weight-bits", type=int, default=None, help="bits per weight, 2..8 (default 4)")
    g.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="block length along the input dimension, -1 = per channel (default 128)",
    )
    sym = g.add_mutually_exclusive_group()
    sym.add_argument(
        "--sym", dest="symmetric", action="store_true", default=None, help="symmetric codes (default)"
    )
    sym.add_argument(
        "--asym", dest="symmetric", action="store_false", help="asymmetric codes with zero points"
    )
    g.add_argument("--method", default=None, help="rounding method: rtn | gptq | adaround (default adaround)")
    g.add_argument(
        "--format", dest="weight_format", choices=("matmulnbits", "qdq", "lowbit"), default=None,
        help="graph format: com.microsoft MatMulNBits, blockwise QDQ (opset 21), or our custom op (3-bit...)",
    )  # fmt: skip
    g.add_argument(
        "--calib-data", default=None, help="calibration text: file, folder, 'wikipedia', 'news', hf:NAME"
    )
    g.add_argument(
        "--calib-samples", type=int, default=None, help="number of calibration sequences (default 128)"
    )
    g.add_argument(
        "--seq-len", type=int, default=None, help="calibration sequence length in tokens (default 512)"
    )
    g.add_argument(
        "--include", action="append", default=None, metavar="REGEX", help="quantize only matching modules"
    )
    g.add_argument(
        "--exclude", action="append", default=None, metavar="REGEX", help="leave matching modules in float"
    )
    g.add_argument(
        "--quantize-lm-head", action="store_true", default=None, help="also quantize the output projection"
    )
    g.add_argument("--seed", type=int, default=None, help="random seed of calibration sampling (default 0)")
    g.add_argument(
        "--recipe", default=None, help="recipe preset name or YAML/JSON file; flags given here override it"
    )
    g.add_argument(
        "--eval", action="store_true", help="measure perplexity before/after and add it to the model card"
    )
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    g.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="upload the finished folder to this Hub repo"
    )
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _scheme_label(args: argparse.Namespace, base: str) -> str | None:
    """Scheme label from --weight-bits/--group-size/--sym/--asym on top of the recipe's ``base`` label."""
    if args.weight_bits is None and args.group_size is None and args.symmetric is None:
        return None
    from optimum.adaround.graph_passes.scheme import QuantScheme

    s = QuantScheme.parse(base)
    bits = s.bits if args.weight_bits is None else args.weight_bits
    group = s.group_size if args.group_size is None else args.group_size
    symmetric = s.symmetric if args.symmetric is None else args.symmetric
    return f"w{bits}-{'pc' if group == -1 else f'g{group}'}-{'sym' if symmetric else 'asym'}"


def quantize_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``export()`` from parsed flags (Optimum's and ours)."""
    from optimum.adaround.recipes import Recipe, resolve_recipe

    recipe = resolve_recipe(args.recipe)
    base = recipe or Recipe()
    kw: dict[str, Any] = {
        "scheme": _scheme_label(args, base.scheme),
        "method": args.method,
        "recipe": recipe,
        "task": args.task,
        "opset": args.opset,
        "eval": args.eval,
        "overwrite": args.overwrite,
        "push_to_hub": args.push_to_hub,
        "trust_remote_code": args.trust_remote_code,
        "device": args.device,
        "progress": not args.no_progress,
    }
    optional = {
        "format": args.weight_format,
        "calib_data": args.calib_data,
        "calib_samples": args.calib_samples,
        "seq_len": args.seq_len,
        "include": tuple(args.include) if args.include else None,
        "exclude": tuple(args.exclude) if args.exclude else None,
        "quantize_lm_head": args.quantize_lm_head,
        "seed": args.seed,
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    export_options = {
        "dtype": args.dtype,
        "atol": args.atol,
        "pad_token_id": args.pad_token_id,
        "cache_dir": args.cache_dir,
        "library_name": args.library_name,
        "model_kwargs": args.model_kwargs,
        "no_dynamic_axes": args.no_dynamic_axes,
        "do_constant_folding": not args.no_constant_folding,
        "_variant": args.variant,
        "device": args.device,
    }
    kw["export_options"] = {k: v for k, v in export_options.items() if v is not None}
    return kw


class ONNXQuantExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="onnx-quant",
        help="Export to ONNX and quantize the weights (GPTQ / AdaRound / RTN; MatMulNBits, QDQ or low-bit ops)",
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        from optimum.commands.export.onnx import parse_args_onnx

        parse_args_onnx(parser)
        parser.set_defaults(task="text-generation-with-past")
        add_quant_arguments(parser)

    def run(self) -> None:
        sys.exit(run_export(self.args))


def run_export(args: argparse.Namespace) -> int:
    """Run the export; map errors to exit codes like ``optimum-adaround`` (2 user error, 130 Ctrl-C)."""
    from optimum.adaround.graph_passes.errors import AdaroundError, UserError

    try:
        from optimum.adaround.export import export

        out = export(args.model, args.output, **quantize_options(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except AdaroundError as e:
        print(f"{PROG}: internal error: {e}", file=sys.stderr)
        return 1
    print(f"Quantized ONNX model written to {out}")
    return 0
