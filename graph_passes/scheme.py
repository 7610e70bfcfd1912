"""The quantization scheme: a small frozen, versioned record.

A scheme says *what* the stored weight looks like (bits, block size, symmetry, data type) and *how* it is
emitted in the graph (format). It says nothing about how the codes were chosen (that is the rounding
method's business, see ``rounding/``).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from .errors import UnsupportedSchemeError
from .options import option

__all__ = ["PER_CHANNEL", "DataType", "QuantScheme", "WeightFormat"]

# group_size value meaning "one block spanning the whole K dimension" (per output channel).
PER_CHANNEL = -1


class WeightFormat(str, enum.Enum):
    """How a quantized weight is emitted in the ONNX graph."""

    MATMULNBITS = "matmulnbits"
    """``com.microsoft::MatMulNBits``: packed uint8 codes, onnxruntime runs bits 2/4/8."""
    QDQ = "qdq"
    """``DequantizeLinear`` (opset 21, ``block_size``) feeding the original MatMul/Gemm: int4/uint4/int8/uint8."""
    LOWBIT = "lowbit"
    """Our own op in ``com.optimum.adaround`` (custom_ops): any bits 2..8 incl. 3, and codebooks."""
    AUTO = "auto"
    """Chosen per run (``pipeline.choose_format``): MatMulNBits where it runs the scheme, else our op."""


class DataType(str, enum.Enum):
    """What an integer code means."""

    INT = "int"
    """Uniform grid: value = (code - zero_point) * scale."""
    NF4 = "nf4"
    """4-bit NormalFloat codebook (QLoRA), scaled per block by absmax."""
    FP4 = "fp4"
    """FP4 e2m1 codebook, scaled per block."""
    CODEBOOK = "codebook"
    """A learned per-tensor codebook of 2**bits entries."""


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """Bits, granularity, symmetry, data type and output format of a quantized weight.

    ``group_size`` is the block length along K (the reduction dimension); ``PER_CHANNEL`` (-1) means one
    block per output channel. ``symmetric`` schemes store no zero point: the implied zero point is
    ``2**(bits-1)`` (unsigned codes), i.e. signed values in ``[-2**(bits-1), 2**(bits-1)-1]``.
    """

    VERSION = 1

    bits: int = option(4, "bits per weight, 2..8 (3 runs through our MatMulLowBit op)")
    group_size: int = option(128, "block length along the input dimension; -1 = per channel")
    symmetric: bool = option(True, "symmetric grid, no zero points")
    format: WeightFormat = option(  # noqa: RUF009 (an enum member, immutable)
        WeightFormat.MATMULNBITS,
        "graph format: auto (MatMulNBits where it runs the scheme, else our op), matmulnbits, qdq, lowbit",
    )
    data_type: DataType = option(  # noqa: RUF009 (an enum member, immutable)
        DataType.INT, "code meaning: int (uniform grid), nf4, fp4, codebook (lowbit format)"
    )
    scale_dtype: str = option("float32", "data type of the stored block scales")

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", WeightFormat(self.format))
        object.__setattr__(self, "data_type", DataType(self.data_type))
        self.validate()

    # -- derived quantities ---------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def implied_zero_point(self) -> int:
        """Zero point of a symmetric scheme (codes are unsigned, centred on this value)."""
        return 1 << (self.bits - 1)

    @property
    def per_channel(self) -> bool:
        return self.group_size == PER_CHANNEL

    def block_size(self, k: int) -> int:
        """Effective block length along K for a weight with ``k`` input features."""
        return k if self.per_channel else self.group_size

    def n_blocks(self, k: int) -> int:
        b = self.block_size(k)
        return (k + b - 1) // b

    @property
    def label(self) -> str:
        """Short human label, e.g. ``w4-g128-sym`` or ``w3-pc-asym``."""
        g = "pc" if self.per_channel else f"g{self.group_size}"
        dt = "" if self.data_type is DataType.INT else f"-{self.data_type.value}"
        return f"w{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}{dt}"

    # -- validation (format-independent; packers add their own format limits) -------------------------
    def validate(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UnsupportedSchemeError(f"bits={self.bits!r}: supported bit widths are 2..8")
        if self.group_size != PER_CHANNEL and (
            not isinstance(self.group_size, int)
            or self.group_size < 16
            or self.group_size & (self.group_size - 1)
        ):
            raise UnsupportedSchemeError(
                f"group_size={self.group_size!r}: use a power of two >= 16, or -1 for per-channel"
            )
        if self.scale_dtype not in ("float32", "float16"):
            raise UnsupportedSchemeError(f"scale_dtype={self.scale_dtype!r}: use float32 or float16")
        if self.data_type in (DataType.NF4, DataType.FP4) and self.bits != 4:
            raise UnsupportedSchemeError(
                f"data_type={self.data_type.value} needs bits=4, got bits={self.bits}"
            )
        if self.data_type is not DataType.INT and self.format not in (WeightFormat.LOWBIT, WeightFormat.AUTO):
            raise UnsupportedSchemeError(
                f"data_type={self.data_type.value} runs only through format=lowbit (our custom op), "
                f"not format={self.format.value}"
            )

    # -- serialisation: {type, version, data}, like torchao configs -----------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["format"] = self.format.value
        data["data_type"] = self.data_type.value
        return {"type": "QuantScheme", "version": self.VERSION, "data": data}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        if d.get("type") != "QuantScheme":
            raise UnsupportedSchemeError(f"not a QuantScheme record: type={d.get('type')!r}")
        if d.get("version") != cls.VERSION:
            raise UnsupportedSchemeError(f"QuantScheme version {d.get('version')!r} is not supported")
        data = dict(d["data"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UnsupportedSchemeError(f"unknown QuantScheme keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def parse(cls, text: str, **overrides: Any) -> QuantScheme:
        """Parse a preset label such as ``w4-g128``, ``w3-g64-asym``, ``w4-pc``, ``w4-g64-nf4``."""
        parts = text.lower().split("-")
        kw: dict[str, Any] = {}
        for p in parts:
            if p.startswith("w") and p[1:].isdigit():
                kw["bits"] = int(p[1:])
            elif p.startswith("g") and p[1:].isdigit():
                kw["group_size"] = int(p[1:])
            elif p in ("pc", "perchannel"):
                kw["group_size"] = PER_CHANNEL
            elif p in ("sym", "asym"):
                kw["symmetric"] = p == "sym"
            elif p in {d.value for d in DataType}:
                kw["data_type"] = p
            else:
                raise UnsupportedSchemeError(f"cannot parse scheme {text!r}: unknown part {p!r}")
        kw.update(overrides)
        return cls(**kw)
