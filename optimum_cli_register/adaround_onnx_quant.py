"""optimum-cli hook: registers ``optimum-cli export onnx-quant``.

optimum-cli imports every module of the ``optimum.commands.register`` namespace; an exception here would
break the whole CLI, so any import failure is swallowed and reported only when the command is used.
"""

REGISTER_COMMANDS: list = []
