"""The configuration of a quantization run: one typed, versioned record, the only carrier of options.

``QuantConfig`` = the ``QuantScheme`` (bits, block, symmetry, data type, format) + the rounding method's
config (``rounding.base.MethodConfig``) + ``CalibrationConfig`` + ``SelectionConfig`` + ``OutputConfig``.
It serialises as ``{type, version, data}`` (a recipe file is that serialisation, and it is written next to
every output). The API keywords and the command-line flags are derived from its fields (``flat_fields``):
each leaf option has one flat name (``bits``, ``calib_samples``, ``workers``...) used as the keyword, the
flag (``--calib-samples``) and the key of ``QuantConfig.with_overrides``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from . import rounding  # noqa: F401  (registers the methods)
from .errors import InvalidOptionError
from .options import Options, check_keys, option
from .rounding.base import MethodConfig, method_class, method_config
from .scheme import DataType, QuantScheme, WeightFormat

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_METHOD",
    "AllocationConfig",
    "CalibrationConfig",
    "FlatField",
    "ModuleOverride",
    "OutputConfig",
    "QuantConfig",
    "SelectionConfig",
    "TuneConfig",
    "flat_fields",
]

DEFAULT_METHOD = "gptq"
"""The one default rounding method of every entry point: calibrated, and within a few minutes on a 135M
model on 2 CPU cores (benchmarks/results/quantize_time.md); adaround_ls is better and slower."""


def _check_regex(owner: str, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise InvalidOptionError(f"{owner} option {key}: {pattern!r} is not a valid regex ({e})") from None


@dataclasses.dataclass(frozen=True)
class CalibrationConfig(Options):
    """Where the calibration statistics come from (methods that need none ignore it)."""

    OWNER = "calibration"

    calib_data: str | None = option(
        None, "calibration text: a file, folder, source name or hf:NAME (default: embedded Wikipedia text)"
    )
    calib_samples: int | None = option(
        None,
        "calibration sequences (default: the method's, 32; 128 for adaround and adaround_ls and with --tune-steps)",
    )
    seq_len: int = option(256, "tokens per calibration sequence")
    sequential: bool = option(
        True,
        "calibrate block by block with earlier blocks quantized",
    )
    sink_weight: float = option(
        64.0,
        "times each sequence's first position counts for the attention q/k/v projections, 1 = off "
        "(benchmarks/results/option_defaults.md)",
    )
    seed: int = option(0, "seed of the calibration sampling")
    device: Literal["cpu", "cuda"] = option(
        "cpu",
        "cuda: calibrate through onnxruntime's CUDA provider and round (every calibrated method) on the GPU",
    )

    def validate(self) -> None:
        for key in ("calib_samples", "seq_len"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                self.reject(key, "must be a positive integer")
        if not 1.0 <= self.sink_weight <= 1e6:
            self.reject("sink_weight", "must be a number in [1, 1e6] (1 = off)")
        if not 0 <= self.seed < 2**32:
            self.reject("seed", "must be an integer in [0, 2**32)")


@dataclasses.dataclass(frozen=True)
class ModuleOverride(Options):
    """Sites whose name matches ``pattern`` (``re.search``) use ``scheme`` (a label) instead of the run's."""

    OWNER = "overrides"

    pattern: str = option("", "regex on the site (module) name")
    scheme: str = option("w8-g128", "scheme label for the matching sites")

    def validate(self) -> None:
        if not self.pattern:
            self.reject("pattern", "give the regex of the sites this scheme is for")
        _check_regex(self.OWNER, "pattern", self.pattern)
        QuantScheme.parse(self.scheme)


@dataclasses.dataclass(frozen=True)
class SelectionConfig(Options):
    """Which weights are quantized, and with which scheme."""

    OWNER = "selection"

    include: tuple[str, ...] = option((), "quantize only matching modules (regex; repeatable)")
    exclude: tuple[str, ...] = option((), "leave matching modules in float (regex, repeatable)")
    lm_head: Literal["8", "4", "2", "scheme", "none"] = option(
        "8",
        "output projection: its bits (8 = 1/4 of float, no measurable loss), scheme = the run's scheme, "
        "none = float (benchmarks/results/small_fast_defaults.md)",
    )
    embeddings: Literal["8", "4", "2", "none"] = option(
        "8",
        "token embedding tables: GatherBlockQuantized at these bits (round to nearest); a table tied to a "
        "quantized output projection shares its codes instead; none = float",
    )
    overrides: tuple[ModuleOverride, ...] = option(
        (), "per-module schemes, first match wins (recipe files only)", flag=None
    )

    def __post_init__(self) -> None:
        # True/False (the lm_head switch of 0.7) and bit counts given as numbers read as their labels
        for key, on in (("lm_head", "scheme"), ("embeddings", "8")):
            value = getattr(self, key)
            if isinstance(value, bool) or value is None:
                object.__setattr__(self, key, on if value else "none")
            elif isinstance(value, int):
                object.__setattr__(self, key, str(value))
        super().__post_init__()

    @property
    def quantize_lm_head(self) -> bool:
        return self.lm_head != "none"

    def validate(self) -> None:
        for key in ("include", "exclude"):
            for pattern in getattr(self, key):
                _check_regex(self.OWNER, key, pattern)


@dataclasses.dataclass(frozen=True)
class OutputConfig(Options):
    """How the output is written."""

    OWNER = "output"

    accuracy_level: int = option(
        4,
        "MatMulNBits/MatMulLowBit accuracy_level: 4 int8 activations (the fast CPU path; CUDA ignores it), "
        "0 exact float accumulation (benchmarks/results/small_fast_defaults.md)",
    )
    fuse: bool = option(
        True,
        "one MatMulNBits (and a Split) for the projections that read the same input, such as q/k/v and "
        "gate/up: fewer kernel calls (benchmarks/results/small_fast_defaults.md)",
    )
    share_shapes: bool = option(
        True,
        "shape reads as constants or one shared value per symbolic dimension, repeated computations kept "
        "once: same outputs, fewer nodes per decode step (benchmarks/results/small_fast_defaults.md)",
    )
    ort_fusions: bool = option(
        False,
        "run onnxruntime's transformer fusions (rotary embedding, skip + RMSNorm) on the written model: "
        "faster decode of Optimum exports (benchmarks/results/small_fast_defaults.md); models up to 2 GB",
    )
    workers: int | None = option(
        None,
        "processes (or Ray tasks) that round a decoder block's sites side by side (same output; default: one per "
        "CPU, at most 4, for models of 16M+ weights; with Ray one per GPU, else per CPU, of the cluster; 1 = none)",
    )
    max_memory: float | None = option(
        None,
        "GB (1e9 bytes) the whole process tree may hold: sites are rounded in row chunks and fewer at once to "
        "fit (same output bytes; default: what the run holds at its start plus 9/10 of the available memory; "
        "with Ray, per task; benchmarks/results/rounding_memory.md)",
        metavar="GB",
    )
    executor: Literal["local", "ray"] = option(
        "local",
        "where the sites are rounded: local processes, or Ray workers (extra [ray]; one GPU each where "
        "there are GPUs); same output bytes",
    )
    ray_address: str | None = option(
        None, "the Ray cluster to join (ray.init's address); default: a local Ray instance", metavar="ADDR"
    )

    def validate(self) -> None:
        if not 0 <= self.accuracy_level <= 4:
            self.reject("accuracy_level", "use 0..4")
        if self.workers is not None and self.workers < 1:
            self.reject("workers", "use a positive number of processes (1 = round in this process)")
        if self.max_memory is not None and not 0.05 <= self.max_memory <= 1e5:
            self.reject("max_memory", "use a number of GB in [0.05, 100000]")
        if self.ray_address is not None and self.executor != "ray":
            self.reject("ray_address", "is for executor='ray' (--executor ray)")


@dataclasses.dataclass(frozen=True)
class TransformConfig(Options):
    """Equivalent transforms applied to the float graph before calibration and rounding."""

    OWNER = "transform"

    transform: tuple[Literal["rotate", "rotate_down", "awq"], ...] = option(
        (),
        "rotate: fold RMSNorm scales and rotate the residual stream by an orthogonal matrix in the weights; "
        "rotate_down: a block-Hadamard rotation of the down projection's input, computed online; awq: scale "
        "the input channels of the layers an RMSNorm feeds by their activations (folded into the norm); same "
        "float model (checked on logits), outliers tamed before rounding (benchmarks/results/transforms.md)",
        metavar="NAME",
    )
    rotation_seed: int = option(0, "seed of the rotation's random signs and orthogonal factor")


TUNE_CALIB_SAMPLES = 128
"""Calibration sequences of a tuned run unless given: on 32, the tuned codes fit the training sequences and
lose on held-out ones (SmolLM2-135M W2 g64: held-out block error 0 to -18% against -30 to -35% on the
training sequences; docs/DESIGN.md, "Block tuning after rounding")."""


@dataclasses.dataclass(frozen=True)
class TuneConfig(Options):
    """Block-wise tuning after rounding: each decoder block's codes and scales refined on the block's output."""

    OWNER = "tune"

    tune_steps: int = option(
        0,
        "Adam steps per decoder block that refine the rounded codes and scales so the block's output matches "
        "the float model's (0 = off; calibrated methods; ~5x a gptq run on CPU): W2 g64 gptq 142.0 -> 102.5 "
        "(benchmarks/results/block_tune_targets.md)",
        metavar="STEPS",
    )
    tune_lr: float = option(5e-3, "Adam's step size for the block tuning (grid steps and scale factors)")
    tune_targets: Literal["float", "quantized"] = option(
        "float",
        "what each tuned block's output is fitted to: the float model's own values there (also makes up for "
        "the blocks before it), or the float block on the quantized inputs: W2 g64 102.5 against 119.7 "
        "(benchmarks/results/block_tune_targets.md)",
    )

    def validate(self) -> None:
        if self.tune_steps < 0:
            self.reject("tune_steps", "use 0 (off) or a positive number of steps")
        if not 0 < self.tune_lr <= 1:
            self.reject("tune_lr", "use a step size in (0, 1]")


DEFAULT_CANDIDATES = (
    "w2-g32-asym", "w2-g64-asym", "w2-g128-asym", "w3-g64", "w3-g128", "w4-g32", "w4-g64", "w4-g128", "w8-g128",
    "float",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class AllocationConfig(Options):
    """A size to meet instead of one scheme: each group of layers gets the candidate scheme that costs the
    least predicted perplexity for its bytes (``predict/``)."""

    OWNER = "allocation"

    target_bits: float | None = option(
        None,
        "average bits per weight over the quantized layers (codes, scales, zero points): each layer group "
        "gets the candidate scheme of least predicted loss within it (benchmarks/results/predictor.md)",
        metavar="BITS",
    )
    max_size: float | None = option(
        None,
        "the written model's size in MB (10^6 bytes; its .onnx and external data): the quantized layers get "
        "what the rest of the model leaves, allocated as under --target-bits (benchmarks/results/predictor.md)",
        metavar="MB",
    )
    candidates: tuple[str, ...] = option(
        DEFAULT_CANDIDATES,
        "schemes a layer group may get under --target-bits or --max-size ('float' keeps it unquantized)",
        metavar="LABEL",
    )
    probe_samples: int = option(
        2, "calibration sequences the sensitivity probes run on (two onnxruntime runs per layer group)"
    )
    sensitivity: str | None = option(
        None,
        "reuse the sensitivities of an earlier --target-bits/--max-size run or prediction (its "
        "quantization_config.json or predict --json file) instead of probing again; same model only",
        metavar="FILE",
    )

    @property
    def allocates(self) -> bool:
        """Each layer group's scheme is chosen for a size (``target_bits`` or ``max_size``)."""
        return self.target_bits is not None or self.max_size is not None

    @property
    def asked_name(self) -> str:
        return "max_size" if self.max_size is not None else "target_bits"

    def validate(self) -> None:
        if self.target_bits is not None and not 1.0 <= self.target_bits <= 32.0:
            self.reject("target_bits", "use a number of bits per weight in [1, 32]")
        if self.max_size is not None and not self.max_size > 0:
            self.reject("max_size", "use a size in MB above 0")
        if self.target_bits is not None and self.max_size is not None:
            self.reject("max_size", "give target_bits or max_size, not both")
        if not self.candidates:
            self.reject("candidates", "give at least one candidate scheme")
        for label in self.candidates:
            if label != "float":
                QuantScheme.parse(label)
        if self.probe_samples < 2:
            self.reject(
                "probe_samples", "use 2 or more sequences (the spread between them is the uncertainty)"
            )


@dataclasses.dataclass(frozen=True)
class FlatField:
    """One leaf option as the API and the CLIs see it: its flat name, the record it lives in, its field."""

    name: str
    group: str
    field: dataclasses.Field
    owner: type


_SCHEME_FIELDS = tuple(f.name for f in dataclasses.fields(QuantScheme))
_GROUPS: dict[str, type] = {
    "transform": TransformConfig,
    "calibration": CalibrationConfig,
    "selection": SelectionConfig,
    "output": OutputConfig,
    "allocation": AllocationConfig,
    "tune": TuneConfig,
}


def flat_fields() -> list[FlatField]:
    """Every leaf option of QuantConfig with its flat name (the API keyword and the CLI flag's name)."""
    out = [FlatField(f.name, "scheme", f, QuantScheme) for f in dataclasses.fields(QuantScheme)]
    for group, cls in _GROUPS.items():
        out += [FlatField(f.name, group, f, cls) for f in dataclasses.fields(cls)]
    return out


@dataclasses.dataclass(frozen=True)
class QuantConfig(Options):
    """Everything a quantization run needs besides its input and output paths."""

    OWNER = "config"

    scheme: QuantScheme = option(  # noqa: RUF009 (frozen records)
        QuantScheme(format=WeightFormat.AUTO), "bits, block, symmetry, data type and graph format"
    )
    method: MethodConfig = option(None, f"rounding method and its options (default {DEFAULT_METHOD})")  # noqa: RUF009 (frozen records)
    transform: TransformConfig = option(TransformConfig(), "equivalent transforms before rounding")  # noqa: RUF009 (frozen records)
    calibration: CalibrationConfig = option(CalibrationConfig(), "calibration data")  # noqa: RUF009 (frozen records)
    selection: SelectionConfig = option(SelectionConfig(), "which weights, which scheme")  # noqa: RUF009 (frozen records)
    output: OutputConfig = option(OutputConfig(), "how the output is written")  # noqa: RUF009 (frozen records)
    allocation: AllocationConfig = option(AllocationConfig(), "a size to meet with per-layer schemes")  # noqa: RUF009 (frozen records)
    tune: TuneConfig = option(TuneConfig(), "block-wise tuning after rounding")  # noqa: RUF009 (frozen records)

    def __post_init__(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", method_config(DEFAULT_METHOD))
        if not isinstance(self.method, MethodConfig):
            raise InvalidOptionError(f"method={self.method!r}: expected a method config or a method name")
        if not isinstance(self.scheme, QuantScheme):
            raise InvalidOptionError(f"scheme={self.scheme!r}: expected a QuantScheme")
        super().__post_init__()
        if self.tune.tune_steps and not self.method.needs:
            raise InvalidOptionError(
                f"tune_steps={self.tune.tune_steps}: block tuning needs a calibrated method (gptq, adaround, "
                f"...), not {self.method.name}"
            )

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        return bool(self.method.needs)

    @property
    def calib_samples(self) -> int:
        """The calibration sequences to draw: the option, else the method's default."""
        given = self.calibration.calib_samples
        if given is not None:
            return given
        if self.tune.tune_steps:  # the offsets fit 32 sequences' noise (TUNE_CALIB_SAMPLES)
            return max(self.method.default_calib_samples, TUNE_CALIB_SAMPLES)
        return self.method.default_calib_samples

    # -- serialisation (nested records by their own to_dict) -------------------------------------------------
    def to_data(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme.to_dict(),
            "method": self.method.to_dict(),
            "transform": self.transform.to_data(),
            "calibration": self.calibration.to_data(),
            "selection": self.selection.to_data(),
            "output": self.output.to_data(),
            "allocation": self.allocation.to_data(),
            "tune": self.tune.to_data(),
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> QuantConfig:
        if not isinstance(data, Mapping):
            raise InvalidOptionError(f"config: expected a mapping of options, got {data!r}")
        check_keys(cls.OWNER, data, cls.names())
        kw: dict[str, Any] = {}
        if "scheme" in data:
            kw["scheme"] = _scheme_from(data["scheme"])
        if "method" in data:
            kw["method"] = _method_from(data["method"])
        for group, sub in _GROUPS.items():
            if group in data:
                kw[group] = sub.from_data(data[group] or {})
        return cls(**kw)

    # -- flat overrides: the API keywords and CLI flags ------------------------------------------------------
    def with_overrides(self, **flat: Any) -> QuantConfig:
        """A copy with flat options replaced: ``scheme`` (label, QuantScheme or record), ``method`` (name or
        config), ``method_options`` (a mapping for the chosen method), and any leaf option by its flat name.
        An unknown key is an InvalidOptionError naming the accepted ones."""
        check_keys("quantize", flat, override_keys())
        scheme = self.scheme
        if flat.get("scheme") is not None:
            given = _scheme_from(flat["scheme"])
            # a label says nothing of the format: keep the config's unless a record/QuantScheme gives one
            keep_format = isinstance(flat["scheme"], str)
            scheme = dataclasses.replace(given, format=scheme.format) if keep_format else given
        scheme_changes = {k: flat[k] for k in _SCHEME_FIELDS if flat.get(k) is not None}
        if scheme_changes:
            scheme = _replace_scheme(scheme, scheme_changes)
        method = self.method
        if flat.get("method") is not None:
            method = _method_from(flat["method"])
        options = flat.get("method_options")
        if options is not None and not isinstance(options, Mapping):
            raise InvalidOptionError(
                f"method_options={options!r}: expected a mapping of the method's options"
            )
        if options:
            base = (
                method.to_data()
                if flat.get("method") is None or isinstance(flat["method"], MethodConfig)
                else {}
            )
            method = type(method).from_data({**base, **dict(options)})
        groups = {group: _replace_group(getattr(self, group), flat) for group in _GROUPS}
        return QuantConfig(scheme=scheme, method=method, **groups)

    def flat(self) -> Iterator[tuple[str, Any]]:
        """(flat name, value) of every leaf option."""
        for f in flat_fields():
            record = self.scheme if f.group == "scheme" else getattr(self, f.group)
            yield f.name, getattr(record, f.name)


def override_keys() -> list[str]:
    """The flat keys ``with_overrides`` (and so the API) accepts."""
    return ["scheme", "method", "method_options", *(f.name for f in flat_fields())]


def _scheme_from(value: Any) -> QuantScheme:
    if isinstance(value, QuantScheme):
        return value
    if isinstance(value, str):
        return QuantScheme.parse(value, format=WeightFormat.AUTO)
    if isinstance(value, Mapping):
        if "type" in value:
            return QuantScheme.from_dict(dict(value))
        return _replace_scheme(QuantScheme(format=WeightFormat.AUTO), dict(value))
    raise InvalidOptionError(f"scheme={value!r}: give a label like 'w4-g128', a QuantScheme or its record")


def _replace_scheme(scheme: QuantScheme, changes: Mapping[str, Any]) -> QuantScheme:
    check_keys("scheme", changes, list(_SCHEME_FIELDS))
    values = {"format": scheme.format, "data_type": scheme.data_type, **changes}
    for key, enum_cls in (("format", WeightFormat), ("data_type", DataType)):
        try:
            values[key] = enum_cls(values[key])
        except ValueError:
            names = ", ".join(m.value for m in enum_cls)
            raise InvalidOptionError(f"{key}={values[key]!r}: choose one of {names}") from None
    return dataclasses.replace(scheme, **values)


def _method_from(value: Any) -> MethodConfig:
    if isinstance(value, MethodConfig):
        return value
    if isinstance(value, str):
        return method_class(value)()
    if isinstance(value, Mapping):
        return MethodConfig.from_dict(value)
    raise InvalidOptionError(f"method={value!r}: give a method name or a method config")


def _replace_group(record: Options, flat: Mapping[str, Any]) -> Options:
    changes = {k: flat[k] for k in record.names() if k in flat and flat[k] is not None}
    if "overrides" in changes:
        changes["overrides"] = tuple(
            o if isinstance(o, ModuleOverride) else ModuleOverride.from_data(o) for o in changes["overrides"]
        )
    return record.replace(**changes) if changes else record
