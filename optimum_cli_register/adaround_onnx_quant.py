"""optimum-cli hook: registers ``optimum-cli export onnx-quant``.

optimum-cli imports every module of the ``optimum.commands.register`` namespace on *every* invocation, and a
module that raises breaks the whole CLI. So this module imports nothing of optimum-adaround (whose import
pulls in torch, onnx-ir...): it only declares the command and its flags; the work is imported in ``run``,
where an import failure becomes a one-line error of this command alone.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

REGISTER_COMMANDS: list = []

PROG = "optimum-cli export onnx-quant"
DEFAULT_TASK = "text-generation-with-past"


# The quantization flags, as derived from optimum.adaround's QuantConfig by
# ``optimum.adaround.commands.export_onnx_quant.hook_specs()`` (kept here as data so that this module imports
# nothing of ours; tests/plugin/commands/test_options.py fails when the two differ).
QUANT_FLAGS: list = [
    (
        ("--recipe",),
        {
            "dest": "recipe",
            "default": "==SUPPRESS==",
            "metavar": "RECIPE",
            "help": "a recipe file (YAML/JSON) or preset name; the flags given override it",
        },
    ),
    (
        ("--scheme",),
        {
            "dest": "scheme",
            "default": "==SUPPRESS==",
            "metavar": "LABEL",
            "help": "scheme label such as w4-g128, w3-g64-asym, w4-pc (flags below override its parts)",
        },
    ),
    (
        ("--method",),
        {
            "dest": "method",
            "default": "==SUPPRESS==",
            "metavar": "METHOD",
            "help": "rounding method: adaround, adaround_ls, gptq, rtn (default gptq)",
        },
    ),
    (
        ("--method-option",),
        {
            "dest": "method_options",
            "default": "==SUPPRESS==",
            "action": "append",
            "metavar": "KEY=VALUE",
            "help": "an option of the rounding method (repeatable; VALUE read as JSON when it can be)",
        },
    ),
    (
        ("--weight-bits",),
        {
            "dest": "bits",
            "default": "==SUPPRESS==",
            "help": "bits per weight, 2..8 (3 runs through our MatMulLowBit op) (default 4)",
            "type": "int",
        },
    ),
    (
        ("--group-size",),
        {
            "dest": "group_size",
            "default": "==SUPPRESS==",
            "help": "block length along the input dimension; -1 = per channel (default 128)",
            "type": "int",
        },
    ),
    (
        ("--sym",),
        {
            "dest": "symmetric",
            "default": "==SUPPRESS==",
            "action": "store_true",
            "help": "symmetric grid, no zero points (default)",
            "exclusive": "symmetric",
        },
    ),
    (
        ("--asym",),
        {
            "dest": "symmetric",
            "default": "==SUPPRESS==",
            "action": "store_false",
            "help": "asymmetric grid with zero points",
            "exclusive": "symmetric",
        },
    ),
    (
        ("--format",),
        {
            "dest": "format",
            "default": "==SUPPRESS==",
            "help": "graph format: auto (MatMulNBits where it runs the scheme, else our op), matmulnbits, qdq, lowbit "
            "(default auto)",
            "choices": ["matmulnbits", "qdq", "lowbit", "auto"],
        },
    ),
    (
        ("--data-type",),
        {
            "dest": "data_type",
            "default": "==SUPPRESS==",
            "help": "code meaning: int (uniform grid), nf4, fp4, codebook (lowbit format) (default int)",
            "choices": ["int", "nf4", "fp4", "codebook"],
        },
    ),
    (
        ("--scale-dtype",),
        {
            "dest": "scale_dtype",
            "default": "==SUPPRESS==",
            "help": "data type of the stored block scales (default float32)",
            "type": "str",
        },
    ),
    (
        ("--transform",),
        {
            "dest": "transform",
            "default": "==SUPPRESS==",
            "action": "append",
            "metavar": "NAME",
            "help": "rotate: fold RMSNorm scales and rotate the residual stream by an orthogonal matrix in the "
            "weights; rotate_down: a block-Hadamard rotation of the down projection's input, computed online; "
            "awq: scale the input channels of the layers an RMSNorm feeds by their activations (folded into "
            "the norm); same float model (checked on logits), outliers tamed before rounding "
            "(benchmarks/results/transforms.md)",
        },
    ),
    (
        ("--rotation-seed",),
        {
            "dest": "rotation_seed",
            "default": "==SUPPRESS==",
            "help": "seed of the rotation's random signs and orthogonal factor (default 0)",
            "type": "int",
        },
    ),
    (
        ("--calib-data",),
        {
            "dest": "calib_data",
            "default": "==SUPPRESS==",
            "help": "calibration text: a file, folder, source name or hf:NAME (default: embedded Wikipedia text)",
            "type": "str",
        },
    ),
    (
        ("--calib-samples",),
        {
            "dest": "calib_samples",
            "default": "==SUPPRESS==",
            "help": "calibration sequences (default: the method's, 32; 128 for adaround and adaround_ls and with "
            "--tune-steps)",
            "type": "int",
        },
    ),
    (
        ("--seq-len",),
        {
            "dest": "seq_len",
            "default": "==SUPPRESS==",
            "help": "tokens per calibration sequence (default 256)",
            "type": "int",
        },
    ),
    (
        ("--sequential",),
        {
            "dest": "sequential",
            "default": "==SUPPRESS==",
            "action": "store_true",
            "help": "calibrate block by block with earlier blocks quantized (default)",
            "exclusive": "sequential",
        },
    ),
    (
        ("--one-pass",),
        {
            "dest": "sequential",
            "default": "==SUPPRESS==",
            "action": "store_false",
            "help": "calibrate the float model in one pass",
            "exclusive": "sequential",
        },
    ),
    (
        ("--sink-weight",),
        {
            "dest": "sink_weight",
            "default": "==SUPPRESS==",
            "help": "times each sequence's first position counts for the attention q/k/v projections, 1 = off "
            "(benchmarks/results/option_defaults.md) (default 64.0)",
            "type": "float",
        },
    ),
    (
        ("--seed",),
        {
            "dest": "seed",
            "default": "==SUPPRESS==",
            "help": "seed of the calibration sampling (default 0)",
            "type": "int",
        },
    ),
    (
        ("--include",),
        {
            "dest": "include",
            "default": "==SUPPRESS==",
            "action": "append",
            "metavar": "REGEX",
            "help": "quantize only matching modules (regex; repeatable)",
        },
    ),
    (
        ("--exclude",),
        {
            "dest": "exclude",
            "default": "==SUPPRESS==",
            "action": "append",
            "metavar": "REGEX",
            "help": "leave matching modules in float (regex, repeatable)",
        },
    ),
    (
        ("--lm-head",),
        {
            "dest": "lm_head",
            "default": "==SUPPRESS==",
            "help": "output projection: its bits (8 = 1/4 of float, no measurable loss), scheme = the run's scheme, "
            "none = float (benchmarks/results/small_fast_defaults.md) (default 8)",
            "choices": ["8", "4", "2", "scheme", "none"],
        },
    ),
    (
        ("--embeddings",),
        {
            "dest": "embeddings",
            "default": "==SUPPRESS==",
            "help": "token embedding tables: GatherBlockQuantized at these bits (round to nearest); a table tied to a "
            "quantized output projection shares its codes instead; none = float (default 8)",
            "choices": ["8", "4", "2", "none"],
        },
    ),
    (
        ("--accuracy-level",),
        {
            "dest": "accuracy_level",
            "default": "==SUPPRESS==",
            "help": "MatMulNBits/MatMulLowBit accuracy_level: 4 int8 activations (the fast CPU path; CUDA ignores "
            "it), 0 exact float accumulation (benchmarks/results/small_fast_defaults.md) (default 4)",
            "type": "int",
        },
    ),
    (
        ("--fuse",),
        {
            "dest": "fuse",
            "default": "==SUPPRESS==",
            "action": "store_true",
            "help": "one MatMulNBits (and a Split) for the projections that read the same input, such as q/k/v and "
            "gate/up: fewer kernel calls (benchmarks/results/small_fast_defaults.md) (default)",
            "exclusive": "fuse",
        },
    ),
    (
        ("--no-fuse",),
        {
            "dest": "fuse",
            "default": "==SUPPRESS==",
            "action": "store_false",
            "help": "keep one MatMulNBits per projection",
            "exclusive": "fuse",
        },
    ),
    (
        ("--share-shapes",),
        {
            "dest": "share_shapes",
            "default": "==SUPPRESS==",
            "action": "store_true",
            "help": "shape reads as constants or one shared value per symbolic dimension, repeated computations kept "
            "once: same outputs, fewer nodes per decode step (benchmarks/results/small_fast_defaults.md) "
            "(default)",
            "exclusive": "share_shapes",
        },
    ),
    (
        ("--no-share-shapes",),
        {
            "dest": "share_shapes",
            "default": "==SUPPRESS==",
            "action": "store_false",
            "help": "keep the graph's own shape computations",
            "exclusive": "share_shapes",
        },
    ),
    (
        ("--ort-fusions",),
        {
            "dest": "ort_fusions",
            "default": "==SUPPRESS==",
            "action": "store_true",
            "help": "run onnxruntime's transformer fusions (rotary embedding, skip + RMSNorm) on the written model: "
            "faster decode of Optimum exports (benchmarks/results/small_fast_defaults.md); models up to 2 GB "
            "(default off)",
        },
    ),
    (
        ("--workers",),
        {
            "dest": "workers",
            "default": "==SUPPRESS==",
            "help": "processes (or Ray tasks) that round a decoder block's sites side by side (same output; default: "
            "one per CPU, at most 4, for models of 16M+ weights; with Ray one per GPU, else per CPU, of the "
            "cluster; 1 = none)",
            "type": "int",
        },
    ),
    (
        ("--max-memory",),
        {
            "dest": "max_memory",
            "default": "==SUPPRESS==",
            "help": "GB (1e9 bytes) the whole process tree may hold: sites are rounded in row chunks and fewer at "
            "once to fit (same output bytes; default: what the run holds at its start plus 9/10 of the "
            "available memory; with Ray, per task; benchmarks/results/rounding_memory.md)",
            "type": "float",
        },
    ),
    (
        ("--executor",),
        {
            "dest": "executor",
            "default": "==SUPPRESS==",
            "help": "where the sites are rounded: local processes, or Ray workers (extra [ray]; one GPU each where "
            "there are GPUs); same output bytes (default local)",
            "choices": ["local", "ray"],
        },
    ),
    (
        ("--ray-address",),
        {
            "dest": "ray_address",
            "default": "==SUPPRESS==",
            "help": "the Ray cluster to join (ray.init's address); default: a local Ray instance",
            "type": "str",
        },
    ),
    (
        ("--target-bits",),
        {
            "dest": "target_bits",
            "default": "==SUPPRESS==",
            "help": "average bits per weight over the quantized layers (codes, scales, zero points): each layer group "
            "gets the candidate scheme of least predicted loss within it (benchmarks/results/predictor.md)",
            "type": "float",
        },
    ),
    (
        ("--max-size",),
        {
            "dest": "max_size",
            "default": "==SUPPRESS==",
            "help": "the written model's size in MB (10^6 bytes; its .onnx and external data): the quantized layers "
            "get what the rest of the model leaves, allocated as under --target-bits "
            "(benchmarks/results/predictor.md)",
            "type": "float",
        },
    ),
    (
        ("--candidates",),
        {
            "dest": "candidates",
            "default": "==SUPPRESS==",
            "action": "append",
            "metavar": "LABEL",
            "help": "schemes a layer group may get under --target-bits or --max-size ('float' keeps it unquantized)",
        },
    ),
    (
        ("--probe-samples",),
        {
            "dest": "probe_samples",
            "default": "==SUPPRESS==",
            "help": "calibration sequences the sensitivity probes run on (two onnxruntime runs per layer group) "
            "(default 2)",
            "type": "int",
        },
    ),
    (
        ("--sensitivity",),
        {
            "dest": "sensitivity",
            "default": "==SUPPRESS==",
            "help": "reuse the sensitivities of an earlier --target-bits/--max-size run or prediction (its "
            "quantization_config.json or predict --json file) instead of probing again; same model only",
            "type": "str",
        },
    ),
    (
        ("--tune-steps",),
        {
            "dest": "tune_steps",
            "default": "==SUPPRESS==",
            "help": "Adam steps per decoder block that refine the rounded codes and scales so the block's output "
            "matches the float model's (0 = off; calibrated methods; ~5x a gptq run on CPU): W2 g64 gptq "
            "142.0 -> 102.5 (benchmarks/results/block_tune_targets.md) (default 0)",
            "type": "int",
        },
    ),
    (
        ("--tune-lr",),
        {
            "dest": "tune_lr",
            "default": "==SUPPRESS==",
            "help": "Adam's step size for the block tuning (grid steps and scale factors) (default 0.005)",
            "type": "float",
        },
    ),
    (
        ("--tune-targets",),
        {
            "dest": "tune_targets",
            "default": "==SUPPRESS==",
            "help": "what each tuned block's output is fitted to: the float model's own values there (also makes up "
            "for the blocks before it), or the float block on the quantized inputs: W2 g64 102.5 against "
            "119.7 (benchmarks/results/block_tune_targets.md) (default float)",
            "choices": ["float", "quantized"],
        },
    ),
]

# Flags of this command that are not quantization options.
COMMAND_FLAGS: list = [
    (("--eval",), {"action": "store_true", "help": "measure perplexity before/after and add it to the model card"}),
    (("--eval-data",), {"default": None, "help": "evaluation text (default: embedded Wikipedia eval split)"}),
    (("--eval-tokens",), {"type": "int", "default": None, "help": "evaluate on the first N tokens of the text only"}),
    (("--overwrite",), {"action": "store_true", "help": "replace a non-empty output folder"}),
    (("--push-to-hub",), {"default": None, "metavar": "REPO_ID", "help": "upload the finished folder to this Hub repo"}),
    (("--no-progress",), {"action": "store_true", "help": "hide progress bars"}),
]  # fmt: skip

_TYPES = {"int": int, "float": float, "str": str}


def add_flag_specs(container: Any, specs: Any) -> None:
    """Add flags given as ``(flags, argparse kwargs)`` data to ``container`` (a parser or group): ``type`` is a
    builtin's name, and an ``exclusive`` key names the mutually exclusive pair a flag belongs to
    (``--sym``/``--asym``). optimum-adaround's own commands add their flags through here too."""
    pairs: dict[str, Any] = {}
    for flags, kw in specs:
        kw = dict(kw)
        if "type" in kw:
            kw["type"] = _TYPES[kw["type"]]
        # the data holds a string equal to argparse.SUPPRESS; argparse compares by identity
        if kw.get("default") == argparse.SUPPRESS:
            kw["default"] = argparse.SUPPRESS
        target = container
        if "exclusive" in kw:
            key = kw.pop("exclusive")
            if key not in pairs:  # not setdefault: that would leave an empty group behind each time
                pairs[key] = container.add_mutually_exclusive_group()
            target = pairs[key]
        target.add_argument(*flags, **kw)


def add_quant_arguments(parser: Any) -> None:
    """Quantization flags (every default SUPPRESS: a ``--recipe`` value is overridden only by a given flag)."""
    g = parser.add_argument_group("Weight quantization (optimum-adaround)")
    add_flag_specs(g, (*QUANT_FLAGS, *COMMAND_FLAGS))


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
