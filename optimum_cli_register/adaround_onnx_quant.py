"""optimum-cli hook: registers ``optimum-cli export onnx-quant``.

optimum-cli imports every module of the ``optimum.commands.register`` namespace and a module that raises
breaks the whole CLI, so nothing here may raise: if the real command cannot be imported, a stand-in
``onnx-quant`` command is registered that reports the import error only when it is used.
"""

from __future__ import annotations

REGISTER_COMMANDS: list = []

try:
    from optimum.commands.export.base import ExportCommand
except Exception:  # optimum itself is broken: register nothing, keep the rest of the CLI alive
    ExportCommand = None

if ExportCommand is not None:
    try:
        from optimum.adaround.commands.export_onnx_quant import ONNXQuantExportCommand

        REGISTER_COMMANDS = [(ONNXQuantExportCommand, ExportCommand)]
    except Exception as _error:  # surfaced when the command runs, see below
        _message = f"{type(_error).__name__}: {_error}"
        try:
            import argparse as _argparse
            import sys as _sys

            from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

            class _BrokenONNXQuantExportCommand(BaseOptimumCLICommand):
                COMMAND = CommandInfo(
                    name="onnx-quant", help="(unavailable: optimum-adaround failed to import)"
                )

                @staticmethod
                def parse_args(parser):
                    parser.add_argument("args", nargs=_argparse.REMAINDER)

                def run(self):
                    print(
                        "optimum-cli export onnx-quant: error: optimum-adaround failed to import "
                        f"({_message}); reinstall it with `pip install optimum-adaround`",
                        file=_sys.stderr,
                    )
                    _sys.exit(2)

            REGISTER_COMMANDS = [(_BrokenONNXQuantExportCommand, ExportCommand)]
        except Exception:  # even the stand-in failed: register nothing
            REGISTER_COMMANDS = []
