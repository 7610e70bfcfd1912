"""optimum-cli hook: registers ``optimum-cli export onnx-quant``.

optimum-cli imports every module of the ``optimum.commands.register`` namespace on *every* invocation, and a
module that raises breaks the whole CLI. So this module imports nothing of optimum-adaround (whose import
pulls in torch, onnx-ir...): it only declares the command and its flags; the work is imported in ``run``,
where an import failure becomes a one-line error of this command alone.
"""

from __future__ import annotations

import sys
from typing import Any

REGISTER_COMMANDS: list = []

PROG = "optimum-cli export onnx-quant"
DEFAULT_TASK = "text-generation-with-past"


def add_quant_arguments(parser: Any) -> None:
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
        "--calib-samples",
        type=int,
        default=None,
        help="number of calibration sequences (default 32; 128 for adaround and adaround_ls)",
    )
    g.add_argument(
        "--seq-len", type=int, default=None, help="calibration sequence length in tokens (default 256)"
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
    g.add_argument(
        "--sink-weight",
        type=float,
        default=None,
        help="times each calibration sequence's first position counts for the q/k/v projections (default 64)",
    )
    g.add_argument("--seed", type=int, default=None, help="random seed of calibration sampling (default 0)")
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that round a decoder block's sites side by side (same output; default: one per CPU, "
        "at most 4, for models of 16M+ weights; 1 = none)",
    )
    g.add_argument(
        "--recipe", default=None, help="recipe preset name or YAML/JSON file; flags given here override it"
    )
    g.add_argument(
        "--eval", action="store_true", help="measure perplexity before/after and add it to the model card"
    )
    g.add_argument(
        "--eval-data", default=None, help="evaluation text (default: embedded Wikipedia eval split)"
    )
    g.add_argument(
        "--eval-tokens", type=int, default=None, help="evaluate on the first N tokens of the text only"
    )
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    g.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="upload the finished folder to this Hub repo"
    )
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_export_arguments(parser: Any) -> None:
    """Optimum's own ``export onnx`` flags, then ours; the task defaults to text generation with past."""
    try:
        from optimum.commands.export.onnx import parse_args_onnx
    except Exception:  # optimum-onnx missing or broken: keep optimum-cli usable, with the essential flags
        parser.add_argument("-m", "--model", required=True, help="model id on the Hub or local folder")
        parser.add_argument("output", help="output folder")
        parser.add_argument("--task", default=DEFAULT_TASK)
        parser.add_argument("--opset", type=int, default=None)
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--trust-remote-code", action="store_true")
    else:
        parse_args_onnx(parser)
    parser.set_defaults(task=DEFAULT_TASK)
    add_quant_arguments(parser)


def run_command(args: Any) -> int:
    try:
        from optimum.adaround.commands.export_onnx_quant import run_export
    except Exception as e:  # a broken install must not look like a crash of optimum-cli
        print(f"{PROG}: error: optimum-adaround failed to import ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    return run_export(args)


try:
    from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
    from optimum.commands.export.base import ExportCommand

    class ONNXQuantExportCommand(BaseOptimumCLICommand):
        COMMAND = CommandInfo(
            name="onnx-quant",
            help="Export to ONNX and quantize the weights (GPTQ / AdaRound / RTN; MatMulNBits, QDQ or low-bit ops)",
        )

        @staticmethod
        def parse_args(parser: Any) -> None:
            add_export_arguments(parser)

        def run(self) -> None:
            sys.exit(run_command(self.args))

    REGISTER_COMMANDS = [(ONNXQuantExportCommand, ExportCommand)]
except (
    Exception
):  # optimum's CLI classes moved or broke: register nothing, keep the rest of optimum-cli alive
    REGISTER_COMMANDS = []
