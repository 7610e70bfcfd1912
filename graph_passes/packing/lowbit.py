"""Format ``lowbit``: our own ops ``com.optimum.adaround::MatMulLowBit`` / ``MatMulCodebook`` (custom_ops/).

Runs any bit width 2..8 (3 included), block sizes that are powers of two >= 16 or one block per channel,
symmetric or with zero points, and non-uniform codebooks (NF4, FP4 e2m1, learned) in onnxruntime once the
library is registered (``optimum.adaround.custom_ops.session_options()``).

This module defines the stored layout ("lowbit v1"); the op library's NumPy reference
(``optimum.adaround.custom_ops.reference``, the kernels' test oracle) is tested to read and write the same
bytes. Layout:

- ``B``: uint8 ``[N, ceil(K/32), 4*bits]``: each row's codes along K are zero-padded to whole chunks of 32
  values; a chunk stores bit planes of widths 4, 2, 1 (the binary digits of ``bits``, widest first; 8 bits
  is one plane); plane ``i`` holds the next ``w`` bits of every code, starting at bit 0, and takes ``4*w``
  bytes, in which the bits of value j sit in byte ``j % 4w`` at offset ``w*(j // 4w)``.
  3 bits: 12 bytes per 32 values (8 bytes of low bit pairs, then 4 bytes of high bits). Why: one plane
  becomes 32 code bytes with a broadcast, a per-lane variable shift and a mask in AVX2, and a CUDA thread
  reads a chunk as ``bits`` aligned 32-bit words.
- ``scales``: ``[N, n_blocks]`` in the scheme's ``scale_dtype`` (float32 or float16, whatever X's type).
- ``zero_points`` (asymmetric int only): uint8 ``[N, n_blocks]``, one code per byte.
- ``codebook`` (nf4/fp4/codebook data types): float32 ``[2**bits]``.
- Attributes ``K``, ``N``, ``bits``, ``block_size`` (== K per channel), and for ``MatMulLowBit``
  ``accuracy_level`` (0 = exact fp32 accumulation, 4 = int8 activations in the decode path).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from ..errors import UnsupportedSchemeError
from ..records import QuantizedWeight, WeightSite
from ..scheme import PER_CHANNEL, DataType, QuantScheme, WeightFormat
from . import base
from .base import PackedWeight, ReplacementNodes, StoredWeight, pack_lsb, register_packer, unpack_lsb

__all__ = ["CHUNK", "DOMAIN", "LowbitPacker", "pack_codes", "packed_shape", "plane_widths", "unpack_codes"]

DOMAIN = "com.optimum.adaround"
"""The op library's domain (version 1)."""
CHUNK = 32
"""Values per chunk of ``B``."""


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes of a ``bits``-bit code, widest first (``3 -> (2, 1)``)."""
    return (8,) if bits == 8 else tuple(w for w in (4, 2, 1) if bits & w)


def packed_shape(n: int, k: int, bits: int) -> tuple[int, int, int]:
    """Shape of ``B`` for an ``[N, K]`` weight: ``(N, ceil(K / 32), 4 * bits)``."""
    return (n, -(-k // CHUNK), 4 * bits)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``B`` of unsigned codes ``uint8[N, K]`` (each ``< 2**bits``)."""
    n, k = codes.shape
    n_chunks = packed_shape(n, k, bits)[1]
    v = np.zeros((n, n_chunks * CHUNK), np.uint8)
    v[:, :k] = codes
    v = v.reshape(n, n_chunks, CHUNK)
    planes, shift = [], 0
    for w in plane_widths(bits):
        part = (v >> shift) & ((1 << w) - 1)
        # value j = i * 4w + p goes to bit offset w * i of byte p: LSB-first packing of [.., p, i]
        grouped = part.reshape(n, n_chunks, 8 // w, 4 * w).swapaxes(-1, -2)
        planes.append(pack_lsb(grouped, w)[..., 0])
        shift += w
    return np.concatenate(planes, axis=-1)


def unpack_codes(b: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``uint8[N, K]`` codes of ``B[N, ceil(K/32), 4*bits]``."""
    n, n_chunks, _ = b.shape
    codes = np.zeros((n, n_chunks, CHUNK), np.uint8)
    offset = shift = 0
    for w in plane_widths(bits):
        grouped = unpack_lsb(b[:, :, offset : offset + 4 * w, None], w, 8 // w)
        codes |= grouped.swapaxes(-1, -2).reshape(n, n_chunks, CHUNK) << shift
        offset += 4 * w
        shift += w
    return codes.reshape(n, n_chunks * CHUNK)[:, :k]


@register_packer
class LowbitPacker:
    """Packs codes for our custom ops; ``accuracy_level`` goes on ``MatMulLowBit`` nodes."""

    format: ClassVar[WeightFormat] = WeightFormat.LOWBIT
    reads: ClassVar[tuple[tuple[str, str], ...]] = ((DOMAIN, "MatMulLowBit"), (DOMAIN, "MatMulCodebook"))

    def __init__(self, accuracy_level: int = 0) -> None:
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise UnsupportedSchemeError(f"accuracy_level={accuracy_level!r}: MatMulLowBit accepts 0..4")
        self.accuracy_level = accuracy_level

    def supports(self, scheme: QuantScheme, k: int, n: int) -> str | None:
        # QuantScheme.validate already limits bits to 2..8 and blocks to powers of two >= 16 / per channel,
        # which is exactly what the kernels take.
        if k < 1 or n < 1:
            return f"weight [{n}, {k}] is empty"
        if scheme.data_type is not DataType.INT and not scheme.symmetric:
            return f"data_type={scheme.data_type.value} has no zero points (use a symmetric scheme)"
        return None

    def pack(self, qw: QuantizedWeight) -> PackedWeight:
        base.check_packable(self, qw)
        scheme, n, k = qw.scheme, qw.n, qw.k
        tensors = {"B": pack_codes(qw.codes, scheme.bits), "scales": base.stored_scales(qw)}
        attributes: dict[str, int | float | str] = {
            "K": k,
            "N": n,
            "bits": scheme.bits,
            "block_size": qw.block_size,
        }
        if scheme.data_type is DataType.INT:
            if qw.zero_points is not None:
                tensors["zero_points"] = np.ascontiguousarray(qw.zero_points, dtype=np.uint8)
            attributes["accuracy_level"] = self.accuracy_level
        else:
            tensors["codebook"] = np.ascontiguousarray(qw.codebook, dtype=np.float32)
        return PackedWeight(tensors, attributes)

    def unpack(self, packed: PackedWeight, scheme: QuantScheme, k: int, n: int) -> QuantizedWeight:
        base.check_supported(self, scheme, k, n)
        b = packed.tensors["B"]
        if b.shape != packed_shape(n, k, scheme.bits):
            raise UnsupportedSchemeError(
                f"lowbit B has shape {b.shape}, expected {packed_shape(n, k, scheme.bits)}"
            )
        codes = unpack_codes(b, k, scheme.bits)
        nb = scheme.n_blocks(k)
        scales = packed.tensors["scales"].astype(np.float32).reshape(n, nb)
        zp = packed.tensors.get("zero_points")
        zero_points = None if zp is None else np.asarray(zp, dtype=np.uint8).reshape(n, nb)
        if scheme.data_type is DataType.INT and (zero_points is None) != scheme.symmetric:
            raise UnsupportedSchemeError(
                f"lowbit weight {'lacks' if zero_points is None else 'has'} zero points but the scheme "
                f"is {'asymmetric' if zero_points is None else 'symmetric'}"
            )
        cb = packed.tensors.get("codebook")
        if (cb is None) != (scheme.data_type is DataType.INT):
            raise UnsupportedSchemeError(
                f"lowbit weight {'lacks' if cb is None else 'has'} a codebook but data_type={scheme.data_type.value}"
            )
        codebook = None if cb is None else np.asarray(cb, dtype=np.float32)
        return QuantizedWeight(np.ascontiguousarray(codes), scales, zero_points, scheme, codebook=codebook)

    def build(
        self, site: WeightSite, x: ir.Value, packed: PackedWeight, bias: ir.Value | None, name: str
    ) -> ReplacementNodes:
        """One ``MatMulLowBit`` (int) or ``MatMulCodebook`` node; a 1-D ``[N]`` bias of X's type becomes its
        ``bias`` input, any other bias an ``Add`` after it."""
        op_type = "MatMulCodebook" if "codebook" in packed.tensors else "MatMulLowBit"
        inits = base.initializers(name, packed, ("B", "scales", "codebook", "zero_points"))
        inputs: list[ir.Value | None] = [x, *inits]
        node_bias, add_bias = base.split_bias(bias, site, base.activation_dtype(x))
        if node_bias is not None:
            inputs += [None] * (4 - len(inputs)) + [node_bias]
        nodes, out = base.node_then_add(
            op_type, inputs, dict(packed.attributes), DOMAIN, x, site, name, add_bias
        )
        return ReplacementNodes(nodes, inits, out, {DOMAIN: 1})

    def read(self, node: ir.Node) -> StoredWeight | None:
        fourth = "codebook" if node.op_type == "MatMulCodebook" else "zero_points"
        tensors = base.const_inputs(node, ("A", "B", "scales", fourth))
        tensors.pop("A", None)
        if "B" not in tensors or "scales" not in tensors:
            return None
        k, block = int(base.attribute(node, "K")), int(base.attribute(node, "block_size"))
        scheme = QuantScheme(
            bits=int(base.attribute(node, "bits")),
            group_size=PER_CHANNEL if block == k else block,
            symmetric="zero_points" not in tensors,
            scale_dtype=base.scale_dtype(tensors["scales"]),
            format=WeightFormat.LOWBIT,
            data_type=DataType.CODEBOOK if fourth == "codebook" else DataType.INT,
        )
        return StoredWeight(node, self, scheme, k, int(base.attribute(node, "N")), tensors)
