"""``optimum-cli export onnx-quant``: Optimum's ``export onnx`` flags plus weight-quantization flags.

The hook ``optimum.commands.register.adaround_onnx_quant`` declares the command and its flags and calls
``run_export`` here when the command runs: flags -> ``export()`` keyword arguments -> exit code.
"""

from __future__ import annotations

import argparse
from typing import Any

# The flags are declared once, in the optimum-cli hook (which must stay import-light).
from optimum.commands.register.adaround_onnx_quant import PROG, add_export_arguments

__all__ = ["add_parser", "build_parser", "hook_specs", "quantize_options", "run_export"]


def quantize_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``export()`` from parsed flags (Optimum's and ours)."""
    from optimum.utils.input_generators import DEFAULT_DUMMY_SHAPES

    from optimum.adaround.commands.options import overrides_from_args

    kw: dict[str, Any] = {
        "config": getattr(args, "recipe", None),
        "task": args.task,
        "opset": args.opset,
        "eval": args.eval,
        "overwrite": args.overwrite,
        "push_to_hub": args.push_to_hub,
        "trust_remote_code": args.trust_remote_code,
        "progress": not args.no_progress,
        "device": args.device,  # Optimum's --device: the export's, and calibration's
        **overrides_from_args(args, hook_specs()),
    }
    opt = vars(args)  # Optimum's own flags (absent when optimum-onnx's parser could not be imported)
    export_options = {k: opt.get(k) for k in _OPTIMUM_KEYS}
    export_options.update(
        no_dynamic_axes=opt.get("no_dynamic_axes") or None,
        do_constant_folding=not opt.get("no_constant_folding", False),
        _variant=opt.get("variant"),
        device=args.device,
        monolith=opt.get("monolith") or None,
        no_post_process=opt.get("no_post_process") or None,
        slim=opt.get("slim") or None,
    )
    # Optimum's dummy-input shapes (--batch_size, --sequence_length...), passed through like `export onnx` does
    export_options.update({k: opt[k] for k in DEFAULT_DUMMY_SHAPES if k in opt})
    kw["export_options"] = {k: v for k, v in export_options.items() if v is not None}
    eval_options = {"dataset": args.eval_data, "max_tokens": args.eval_tokens}
    kw["eval_options"] = {k: v for k, v in eval_options.items() if v is not None}
    kw["eval_options"]["progress"] = not args.no_progress
    return kw


_OPTIMUM_KEYS = (
    "dtype", "atol", "pad_token_id", "cache_dir", "library_name", "model_kwargs", "optimize", "framework",
)  # fmt: skip


def hook_specs() -> list:
    """The quantization flags of optimum-cli export onnx-quant, derived from the config."""
    from optimum.adaround.commands.options import HOOK_SKIP, HOOK_SPELLING, flag_specs

    return flag_specs(HOOK_SPELLING, HOOK_SKIP)


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


def _export(args: argparse.Namespace) -> int:
    from optimum.adaround.export import export

    out = export(args.model, args.output, **quantize_options(args))
    print(f"Quantized ONNX model written to {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Run the export; errors map to exit codes like ``optimum-adaround`` (2 user error, 130 Ctrl-C)."""
    from optimum.adaround.cli import run_guarded

    _terminate_as_interrupt()
    return run_guarded(PROG, lambda: _export(args))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``optimum-adaround export``: the same command inside our own CLI (which maps errors to exit codes)."""
    parser = subparsers.add_parser(
        "export",
        help="export a Hugging Face model with Optimum and quantize it (same flags as optimum-cli export onnx-quant)",
    )
    add_export_arguments(parser)
    parser.set_defaults(func=_export)
    return parser
