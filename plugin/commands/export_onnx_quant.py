"""``optimum-cli export onnx-quant``: Optimum's ``export onnx`` flags plus weight-quantization flags.

The hook ``optimum.commands.register.adaround_onnx_quant`` declares the command and its flags and calls
``run_export`` here when the command runs: flags -> ``export()`` keyword arguments -> exit code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

# The flags are declared once, in the optimum-cli hook (which must stay import-light).
from optimum.commands.register.adaround_onnx_quant import PROG, add_export_arguments

__all__ = ["add_parser", "build_parser", "quantize_options", "run_export"]


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
        "sink_weight": getattr(args, "sink_weight", None),
        "workers": getattr(args, "workers", None),
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    opt = vars(args)  # Optimum's own flags (absent when optimum-onnx's parser could not be imported)
    export_options = {
        "dtype": opt.get("dtype"),
        "atol": opt.get("atol"),
        "pad_token_id": opt.get("pad_token_id"),
        "cache_dir": opt.get("cache_dir"),
        "library_name": opt.get("library_name"),
        "model_kwargs": opt.get("model_kwargs"),
        "no_dynamic_axes": opt.get("no_dynamic_axes") or None,
        "do_constant_folding": not opt.get("no_constant_folding", False),
        "_variant": opt.get("variant"),
        "device": args.device,
        "optimize": opt.get("optimize"),
        "monolith": opt.get("monolith") or None,
        "no_post_process": opt.get("no_post_process") or None,
        "slim": opt.get("slim") or None,
        "framework": opt.get("framework"),
    }
    # Optimum's dummy-input shapes (--batch_size, --sequence_length...), passed through like `export onnx` does
    from optimum.utils.input_generators import DEFAULT_DUMMY_SHAPES

    export_options.update({k: opt[k] for k in DEFAULT_DUMMY_SHAPES if k in opt})
    kw["export_options"] = {k: v for k, v in export_options.items() if v is not None}
    eval_options = {"dataset": args.eval_data, "max_tokens": args.eval_tokens}
    kw["eval_options"] = {k: v for k, v in eval_options.items() if v is not None}
    kw["eval_options"]["progress"] = not args.no_progress
    return kw


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with exactly the flags of ``optimum-cli export onnx-quant``."""
    parser = argparse.ArgumentParser(prog=PROG)
    add_export_arguments(parser)
    return parser


def _terminate_as_interrupt() -> None:
    """Treat SIGTERM (``timeout``, job schedulers) like Ctrl-C, so temporary folders are removed on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_export(args: argparse.Namespace) -> int:
    """Run the export; map errors to exit codes like ``optimum-adaround`` (2 user error, 130 Ctrl-C)."""
    from optimum.adaround.graph_passes.errors import AdaroundError, UserError

    _terminate_as_interrupt()
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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``optimum-adaround export``: the same command inside our own CLI (which maps errors to exit codes)."""
    parser = subparsers.add_parser(
        "export",
        help="export a Hugging Face model with Optimum and quantize it (same flags as optimum-cli export onnx-quant)",
    )
    add_export_arguments(parser)
    parser.set_defaults(func=_run_in_adaround_cli)
    return parser


def _run_in_adaround_cli(args: argparse.Namespace) -> int:
    from optimum.adaround.export import export

    out = export(args.model, args.output, **quantize_options(args))
    print(f"Quantized ONNX model written to {out}")
    return 0
