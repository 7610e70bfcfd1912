"""Format ``lowbit``: our own ops ``com.optimum.adaround::MatMulLowBit`` / ``MatMulCodebook`` (custom_ops/).

Runs any bit width 2..8 (3 included), block sizes that are powers of two >= 16 or one block per channel,
symmetric or with zero points, and non-uniform codebooks (NF4, FP4 e2m1, learned) in onnxruntime once the
library is registered (``optimum.adaround.custom_ops.session_options()``).

Layout (byte by byte in :mod:`optimum.adaround.custom_ops.reference`, which holds the pure pack/unpack):

- ``B``: uint8 ``[N, ceil(K/32), 4*bits]``: each row's codes along K are zero-padded to whole chunks of 32
  values; a chunk stores bit planes of widths 4, 2, 1 (the binary digits of ``bits``, widest first; 8 bits
  is one plane); in a plane of width w the bits of value j sit in byte ``j % 4w`` at offset ``w*(j // 4w)``.
  3 bits: 12 bytes per 32 values (8 bytes of low bit pairs, then 4 bytes of high bits).
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

from ...custom_ops import DOMAIN
from ...custom_ops.reference import pack_lowbit, packed_shape, unpack_lowbit
from ..errors import UnsupportedSchemeError
from ..records import QuantizedWeight, WeightSite
from ..scheme import DataType, QuantScheme, WeightFormat
from .base import (
    PackedWeight,
    ReplacementNodes,
    activation_dtype,
    check_record,
    check_supported,
    initializer,
    output_value,
    register_packer,
    stored_scales,
)

__all__ = ["LowbitPacker"]


@register_packer
class LowbitPacker:
    """Packs codes for our custom ops; ``accuracy_level`` goes on ``MatMulLowBit`` nodes."""

    format: ClassVar[WeightFormat] = WeightFormat.LOWBIT

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
        check_record(qw)
        scheme, n, k = qw.scheme, qw.n, qw.k
        check_supported(self, scheme, k, n)
        tensors = {"B": pack_lowbit(qw.codes, scheme.bits), "scales": stored_scales(qw)}
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
            assert qw.codebook is not None  # check_record guarantees it
            tensors["codebook"] = np.ascontiguousarray(qw.codebook, dtype=np.float32)
        return PackedWeight(tensors, attributes)

    def unpack(self, packed: PackedWeight, scheme: QuantScheme, k: int, n: int) -> QuantizedWeight:
        check_supported(self, scheme, k, n)
        b = packed.tensors["B"]
        if b.shape != packed_shape(n, k, scheme.bits):
            raise UnsupportedSchemeError(
                f"lowbit B has shape {b.shape}, expected {packed_shape(n, k, scheme.bits)}"
            )
        codes = unpack_lowbit(b, k, scheme.bits)
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
        dtype = activation_dtype(x)
        codebook = "codebook" in packed.tensors
        op_type = "MatMulCodebook" if codebook else "MatMulLowBit"
        inits = [
            initializer(f"{name}.B", packed.tensors["B"]),
            initializer(f"{name}.scales", packed.tensors["scales"]),
        ]
        inputs: list[ir.Value | None] = [x, *inits]
        if codebook:
            cb = initializer(f"{name}.codebook", packed.tensors["codebook"])
            inits.append(cb)
            inputs.append(cb)
        elif "zero_points" in packed.tensors:
            zp = initializer(f"{name}.zero_points", packed.tensors["zero_points"])
            inits.append(zp)
            inputs.append(zp)
        add_bias = None
        if bias is not None:
            if bias.shape is not None and list(bias.shape) == [site.n] and bias.dtype in (None, dtype):
                inputs += [None] * (4 - len(inputs)) + [bias]
            else:
                add_bias = bias
        out = output_value(x, site.n, f"{name}/{op_type}_output" if add_bias else f"{name}/output", dtype)
        node = ir.node(
            op_type, inputs, dict(packed.attributes), domain=DOMAIN, outputs=[out], name=f"{name}/{op_type}"
        )
        nodes = [node]
        if add_bias is not None:
            final = output_value(x, site.n, f"{name}/output", dtype)
            nodes.append(ir.node("Add", [out, add_bias], outputs=[final], name=f"{name}/Add"))
            out = final
        return ReplacementNodes(nodes, inits, out, {DOMAIN: 1})
