"""The packer interface: how a :class:`QuantizedWeight` becomes tensors and nodes of one output format.

A packer is pure. ``pack``/``unpack`` convert between the package's ``[N, K]`` records and the arrays a
format stores (NumPy only, exact both ways); ``build`` constructs the replacement nodes and initializer
values for one weight site but never touches a graph: the rewrite pass (``graph_passes/rewrite.py``)
inserts what it returns and reroutes the old MatMul/Gemm output to ``ReplacementNodes.output``.
``read`` is the inverse of ``build``: it finds the stored weight of one node of the format in a graph
(:func:`read_stored_weight` dispatches on the node's op), so evaluation reads every format through
``unpack``.

Packers are registered per :class:`WeightFormat` (``@register_packer``) and instantiated with their
options through :func:`get_packer`; dispatch is by registry lookup, never by string ``if``s.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np
import onnx_ir as ir

from ..errors import InternalError, UnsupportedSchemeError
from ..records import QuantizedWeight, WeightSite
from ..scheme import QuantScheme, WeightFormat

__all__ = [
    "PACKERS",
    "PackedWeight",
    "Packer",
    "ReplacementNodes",
    "StoredWeight",
    "activation_dtype",
    "get_packer",
    "initializer",
    "pack_lsb",
    "read_stored_weight",
    "register_packer",
    "unpack_lsb",
]


@dataclasses.dataclass
class PackedWeight:
    """What goes into the graph for one site: named arrays (by role) and node attributes."""

    tensors: dict[str, np.ndarray]
    """Role -> array, e.g. ``{"B": ..., "scales": ..., "zero_points": ...}`` (roles are format-specific)."""
    attributes: dict[str, int | float | str]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.tensors.values())


@dataclasses.dataclass
class ReplacementNodes:
    """The subgraph that replaces one MatMul/Gemm, not yet inserted anywhere.

    ``initializers`` are values with ``const_value`` set, to register as graph initializers. ``output``
    is the value that takes the place of the old node's output. ``opset_imports`` lists the domains and
    minimum versions the nodes need (``{"com.microsoft": 1}``, ``{"": 21}``).
    """

    nodes: list[ir.Node]
    initializers: list[ir.Value]
    output: ir.Value
    opset_imports: dict[str, int]


@dataclasses.dataclass
class StoredWeight:
    """A packed weight found in a graph (what a packer's ``build`` wrote), its tensors not yet read."""

    node: ir.Node
    """The node that computes with the weight (for a DequantizeLinear weight, the MatMul/Gemm it feeds)."""
    packer: Packer
    scheme: QuantScheme
    k: int
    n: int
    tensors: dict[str, ir.TensorProtocol]
    """Role -> stored tensor, the roles of :attr:`PackedWeight.tensors`."""

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())

    def unpack(self) -> QuantizedWeight:
        arrays = {role: np.asarray(t.numpy()) for role, t in self.tensors.items()}
        return self.packer.unpack(PackedWeight(arrays, {}), self.scheme, self.k, self.n)


class Packer(Protocol):
    """What every output format provides (see module docstring)."""

    format: ClassVar[WeightFormat]
    reads: ClassVar[tuple[tuple[str, str], ...]]
    """The ``(domain, op_type)`` of the nodes ``read`` takes (``""`` is the default ONNX domain)."""

    def supports(self, scheme: QuantScheme, k: int, n: int) -> str | None:
        """None when this format can store a ``[n, k]`` weight under ``scheme``, else the reason why not."""
        ...

    def pack(self, qw: QuantizedWeight) -> PackedWeight: ...

    def unpack(self, packed: PackedWeight, scheme: QuantScheme, k: int, n: int) -> QuantizedWeight: ...

    def build(
        self, site: WeightSite, x: ir.Value, packed: PackedWeight, bias: ir.Value | None, name: str
    ) -> ReplacementNodes:
        """Nodes computing ``x @ W^T (+ bias)`` from ``packed``; names start with ``name``."""
        ...

    def read(self, node: ir.Node) -> StoredWeight | None:
        """The weight a node of :attr:`reads` stores, or None when its weight inputs are not constants
        or are laid out in a way ``unpack`` does not take."""
        ...


PACKERS: dict[WeightFormat, Callable[..., Packer]] = {}


def register_packer(cls: type) -> type:
    """Class decorator: ``@register_packer class MatMulNBitsPacker: format = WeightFormat.MATMULNBITS``."""
    fmt = WeightFormat(cls.format)  # type: ignore[attr-defined]
    if fmt in PACKERS:
        raise ValueError(f"packer for format {fmt.value!r} registered twice")
    PACKERS[fmt] = cls
    return cls


# Modules holding the built-in packers; imported on first lookup so that importing one packer never
# drags in the others.
_BUILTIN_MODULES = ("matmulnbits", "qdq", "lowbit")


def _load_builtin_packers() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def get_packer(format: WeightFormat | str, **options: Any) -> Packer:
    """Instantiate the packer of ``format`` with its options (e.g. ``accuracy_level=4``)."""
    _load_builtin_packers()
    try:
        fmt = WeightFormat(format)
    except ValueError:
        raise UnsupportedSchemeError(
            f"unknown weight format {format!r}; choose one of {[f.value for f in WeightFormat]}"
        ) from None
    if fmt not in PACKERS:
        raise UnsupportedSchemeError(
            f"no packer registered for format {fmt.value!r} (registered: {sorted(f.value for f in PACKERS)})"
        )
    return PACKERS[fmt](**options)


def read_stored_weight(node: ir.Node) -> StoredWeight | None:
    """The quantized weight ``node`` computes with, read by the packer of its format (None for any other
    node, and for a node of a known format whose weight is not a constant of that format's layout)."""
    _load_builtin_packers()
    key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    for cls in PACKERS.values():
        if key in cls.reads:  # type: ignore[attr-defined]
            return cls().read(node)
    return None


def const_inputs(node: ir.Node, roles: tuple[str, ...]) -> dict[str, ir.TensorProtocol]:
    """``role -> constant tensor`` of a node's inputs, in input order (absent or computed inputs left out)."""
    out = {}
    for role, value in zip(roles, node.inputs, strict=False):
        if value is not None and value.const_value is not None:
            out[role] = value.const_value
    return out


def attribute(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def scale_dtype(t: ir.TensorProtocol) -> str:
    """The scheme's ``scale_dtype`` of stored scales."""
    return "float16" if t.dtype == ir.DataType.FLOAT16 else "float32"


# -- helpers shared by the packers ---------------------------------------------------------------------


def pack_lsb(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-wide integers along the last axis into bytes, LSB first.

    ``uint8[..., L] -> uint8[..., ceil(L * bits / 8)]``; the unused high bits of the last byte are 0.
    Any width 1..8 works (a continuous bit stream); 1/2/4/8 take a fast path.
    """
    v = np.asarray(values, dtype=np.uint8)
    length = v.shape[-1]
    n_bytes = (length * bits + 7) // 8
    if bits == 8:
        return v.copy()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-length) % per
        if pad:
            v = np.concatenate([v, np.zeros((*v.shape[:-1], pad), np.uint8)], axis=-1)
        v = v.reshape(*v.shape[:-1], -1, per)
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        return np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint8)
    # Generic bit stream: explode to bits (little end first), then let packbits regroup them.
    bit_planes = (v[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = bit_planes.reshape(*v.shape[:-1], length * bits)
    return np.packbits(stream, axis=-1, bitorder="little")[..., :n_bytes]


def unpack_lsb(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_lsb`: ``uint8[..., n_bytes] -> uint8[..., length]``."""
    p = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return p[..., :length].copy()
    if 8 % bits == 0:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        mask = np.uint8((1 << bits) - 1)
        v = (p[..., None] >> shifts) & mask
        return v.reshape(*p.shape[:-1], -1)[..., :length].astype(np.uint8)
    stream = np.unpackbits(p, axis=-1, bitorder="little")[..., : length * bits]
    planes = stream.reshape(*p.shape[:-1], length, bits).astype(np.uint8)
    return np.bitwise_or.reduce(planes << np.arange(bits, dtype=np.uint8), axis=-1).astype(np.uint8)


def initializers(name: str, packed: PackedWeight, roles: tuple[str, ...]) -> list[ir.Value]:
    """Initializers ``{name}.{role}`` of the packed tensors present among ``roles``, in that order."""
    return [initializer(f"{name}.{role}", packed.tensors[role]) for role in roles if role in packed.tensors]


def initializer(name: str, array: np.ndarray) -> ir.Value:
    """A graph-free initializer value (``const_value`` set, type and shape taken from the array).

    ml_dtypes ``int4``/``uint4`` arrays become ONNX INT4/UINT4 tensors (packed two per byte on save).
    """
    # ascontiguousarray would turn a 0-d array (a scalar constant) into 1-d
    tensor = ir.Tensor(array if array.flags.c_contiguous else np.ascontiguousarray(array), name=name)
    return ir.Value(
        name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor
    )


_NP_FLOAT = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def activation_dtype(x: ir.Value) -> ir.DataType:
    """Element type of the activation feeding a site (float32 when the graph does not say)."""
    dtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
    if dtype not in _NP_FLOAT:
        raise UnsupportedSchemeError(
            f"activation {x.name!r} has element type {dtype.name}: packers handle float32 and float16 only"
        )
    return dtype


def numpy_float(dtype: ir.DataType) -> type[np.floating]:
    return _NP_FLOAT[dtype]


def output_value(x: ir.Value, n: int, name: str, dtype: ir.DataType) -> ir.Value:
    """The replacement output: ``x.shape[:-1] + [n]`` when x's shape is known."""
    shape = ir.Shape([*list(x.shape)[:-1], n]) if x.shape is not None else None
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=shape)


def check_supported(packer: Packer, scheme: QuantScheme, k: int, n: int) -> None:
    """Raise the packer's reason (naming the scheme and shape) when it cannot store this weight."""
    reason = packer.supports(scheme, k, n)
    if reason is not None:
        raise UnsupportedSchemeError(f"{scheme.label}, weight [{n}, {k}]: {reason}")


def check_packable(packer: Packer, qw: QuantizedWeight) -> None:
    """What every ``pack`` checks first: a well-formed record (``InternalError`` otherwise: a bug upstream,
    not user input) of a scheme and shape the format stores."""
    qw.check()
    check_supported(packer, qw.scheme, qw.k, qw.n)


def split_bias(
    bias: ir.Value | None, site: WeightSite, dtype: ir.DataType
) -> tuple[ir.Value | None, ir.Value | None]:
    """``(bias input of the node, bias of an Add after it)``: a 1-D ``[N]`` bias of the activation type is
    one of the op's inputs; any other shape (``[1, N]``, ``[M, N]``, unknown) or type needs an Add."""
    if bias is None:
        return None, None
    if bias.shape is not None and list(bias.shape) == [site.n] and bias.dtype in (None, dtype):
        return bias, None
    return None, bias


def node_then_add(
    op_type: str,
    inputs: list[ir.Value | None],
    attributes: dict[str, int | float | str],
    domain: str,
    x: ir.Value,
    site: WeightSite,
    name: str,
    add_bias: ir.Value | None,
) -> tuple[list[ir.Node], ir.Value]:
    """One ``op_type`` node computing the site's output, then ``Add(add_bias)`` when a bias is left over;
    the last output is named ``{name}/output``."""
    dtype = activation_dtype(x)
    out = output_value(x, site.n, f"{name}/{op_type}_output" if add_bias else f"{name}/output", dtype)
    nodes = [ir.node(op_type, inputs, attributes, domain=domain, outputs=[out], name=f"{name}/{op_type}")]
    if add_bias is None:
        return nodes, out
    final = output_value(x, site.n, f"{name}/output", dtype)
    nodes.append(ir.node("Add", [out, add_bias], outputs=[final], name=f"{name}/Add"))
    return nodes, final


def stored_scales(qw: QuantizedWeight) -> np.ndarray:
    """``qw.scales`` in the scheme's storage dtype; refuses a lossy float16 cast.

    Rounding methods choose codes for the scale that is actually stored (``grid.grid_params`` rounds
    scales to float16 when ``scale_dtype == "float16"``), so the cast must be exact; if it is not, the
    packed model would not reproduce ``qw.dequantize()``.
    """
    scales = qw.scales.astype(qw.scheme.scale_dtype)
    if not np.array_equal(scales.astype(np.float32), qw.scales.astype(np.float32)):
        raise InternalError(
            f"scales of a {qw.scheme.scale_dtype} scheme are not representable in {qw.scheme.scale_dtype}: "
            "the rounding method must round them before choosing codes"
        )
    return scales
