"""Small typed records shared by every layer of graph_passes.

Orientation convention used everywhere in this package: a weight is handled as ``W[N, K]`` (output
channels x input features, torch ``nn.Linear`` layout); blocks run along K. ONNX ``MatMul`` stores the
constant as ``[K, N]``; the site records whether the graph holds it transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from .errors import InternalError
from .scheme import DataType, QuantScheme

__all__ = ["QuantizedWeight", "SiteReport", "SkippedSite", "WeightSite"]

SiteKind = Literal["linear", "lm_head"]


@dataclasses.dataclass(frozen=True)
class WeightSite:
    """One quantizable weight: a MatMul/Gemm whose second operand is a constant 2-D tensor.

    ``activation`` is the name of the ONNX value multiplied by the weight; sites fed by the same
    activation (q/k/v, gate/up) share one Hessian ``H = X^T X``.
    """

    name: str
    """Module path, e.g. ``model.layers.0.self_attn.q_proj`` (from the node name, else the node name)."""
    node_name: str
    """Name of the MatMul/Gemm node that consumes the weight."""
    op_type: Literal["MatMul", "Gemm"]
    weight_name: str
    """Name of the initializer holding the weight (before any Transpose)."""
    k: int
    """Input features (reduction dimension)."""
    n: int
    """Output features."""
    transposed: bool
    """True when the initializer is stored ``[N, K]`` (reached through Transpose, or Gemm ``transB=1``)."""
    activation: str
    """Name of the value that feeds the MatMul/Gemm (the X in X @ W)."""
    layer: int | None = None
    """Decoder layer index parsed from the module path; None outside the decoder stack."""
    kind: SiteKind = "linear"
    transpose_node: str | None = None
    """Name of the Transpose node between initializer and MatMul, if any."""
    bias_name: str | None = None
    """Gemm's C input (kept as is), if any."""
    tied: bool = False
    """The weight initializer is also used elsewhere (e.g. a tied embedding feeding Gather)."""


@dataclasses.dataclass(frozen=True)
class SkippedSite:
    """A MatMul/Gemm that looked like a candidate but is not quantized, and why (never silent)."""

    node_name: str
    reason: str


@dataclasses.dataclass
class SiteReport:
    """Result of weight-site discovery."""

    sites: list[WeightSite]
    skipped: list[SkippedSite]

    def by_activation(self) -> dict[str, list[WeightSite]]:
        groups: dict[str, list[WeightSite]] = {}
        for s in self.sites:
            groups.setdefault(s.activation, []).append(s)
        return groups


@dataclasses.dataclass
class QuantizedWeight:
    """Integer codes + scales (+ zero points) of one weight, in the ``[N, K]`` orientation.

    - ``codes``: uint8 ``[N, K]``, unsigned, in ``[0, 2**bits - 1]``.
    - ``scales``: float32 ``[N, n_blocks]``.
    - ``zero_points``: uint8 ``[N, n_blocks]``; None for symmetric schemes (implied ``2**(bits-1)``).
    - ``codebook``: float32 ``[2**bits]`` for non-uniform data types (value = codebook[code] * scale).

    Dequantization is defined here once (``dequantize``); every packer must reproduce exactly these
    numbers and every kernel is tested against them.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    scheme: QuantScheme
    codebook: np.ndarray | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def k(self) -> int:
        return int(self.codes.shape[1])

    @property
    def block_size(self) -> int:
        return self.scheme.block_size(self.k)

    def check(self) -> None:
        """Raise InternalError unless the shape/dtype/range invariants hold (cheap; used by packers and tests).
        A method that returns a record breaking them has a bug: explicit raises, so ``python -O`` checks too."""
        n, k = self.codes.shape
        nb = self.scheme.n_blocks(k)
        problems = [
            (self.codes.dtype != np.uint8, f"codes dtype {self.codes.dtype}, expected uint8"),
            (int(self.codes.max(initial=0)) > self.scheme.qmax, f"a code above {self.scheme.qmax}"),
            (self.scales.shape != (n, nb), f"scales shape {self.scales.shape}, expected {(n, nb)}"),
        ]
        if self.zero_points is not None:
            zp = self.zero_points
            problems.append(
                (zp.shape != (n, nb) or zp.dtype != np.uint8, f"zero points {zp.dtype}{zp.shape}")
            )
            problems.append(
                (int(zp.max(initial=0)) > self.scheme.qmax, f"a zero point above {self.scheme.qmax}")
            )
        if self.scheme.data_type is not DataType.INT:
            book = self.codebook
            problems.append(
                (book is None or book.shape != (1 << self.scheme.bits,), "codebook missing or mis-sized")
            )
        for broken, what in problems:
            if broken:
                raise InternalError(f"quantized weight [{n}, {k}] under {self.scheme.label}: {what}")

    def rows(self, r0: int, r1: int) -> QuantizedWeight:
        """Rows ``r0:r1`` (views of the arrays, no metrics)."""
        zps = None if self.zero_points is None else self.zero_points[r0:r1]
        return QuantizedWeight(self.codes[r0:r1], self.scales[r0:r1], zps, self.scheme, self.codebook)

    @classmethod
    def empty_like(cls, part: QuantizedWeight, n: int) -> QuantizedWeight:
        """An ``n``-row weight of ``part``'s scheme and dtypes with unset arrays, to fill chunk by chunk
        (``put``): the chunks are copied in as they come, never all held beside the whole."""
        zps = (
            None
            if part.zero_points is None
            else np.empty((n, *part.zero_points.shape[1:]), part.zero_points.dtype)
        )
        codes = np.empty((n, *part.codes.shape[1:]), part.codes.dtype)
        return cls(
            codes, np.empty((n, *part.scales.shape[1:]), part.scales.dtype), zps, part.scheme, part.codebook
        )

    def put(self, r0: int, part: QuantizedWeight) -> None:
        """Write ``part``'s rows at row ``r0``."""
        r1 = r0 + part.n
        self.codes[r0:r1], self.scales[r0:r1] = part.codes, part.scales
        if self.zero_points is not None and part.zero_points is not None:
            self.zero_points[r0:r1] = part.zero_points

    def expand(self, per_block: np.ndarray) -> np.ndarray:
        """Repeat a ``[N, n_blocks]`` array along K to ``[N, K]``."""
        return np.repeat(per_block, self.block_size, axis=1)[:, : self.k]

    def dequantize(self) -> np.ndarray:
        """The float32 ``[N, K]`` weight these codes stand for (the reference every format must match)."""
        scales = self.expand(self.scales.astype(np.float32))
        if self.scheme.data_type is not DataType.INT:
            self.check()  # a codebook scheme needs its codebook
            return (self.codebook.astype(np.float32)[self.codes] * scales).astype(np.float32)
        if self.zero_points is None:
            zp = np.float32(self.scheme.implied_zero_point)
        else:
            zp = self.expand(self.zero_points).astype(np.float32)
        return ((self.codes.astype(np.float32) - zp) * scales).astype(np.float32)
