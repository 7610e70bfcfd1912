"""``com.microsoft::GatherBlockQuantized``: a quantized embedding table (e.g. the tied embedding).

An embedding table ``E[vocab, hidden]`` is already in the package's ``[N, K]`` orientation (one row per
token, blocks along hidden), so the QuantizedWeight of a tied lm_head is packed for the Gather as is.

Layout used (onnxruntime 1.31 schema: uint8 data with a ``bits`` attribute, checked against a float
Gather by the tests):

- ``data``: uint8 ``[vocab, ceil(hidden * bits / 8)]``, codes packed LSB first along the last axis.
- ``scales``: ``[vocab, k_blocks]`` (float32/float16; the output has the scales' type).
- ``zero_points`` (asymmetric only): uint8 ``[vocab, ceil(k_blocks * bits / 8)]``, packed like ``data``
  (an unpacked ``[vocab, k_blocks]`` array is rejected by the kernel for bits < 8). Without it the kernel
  implies ``2**(bits-1)`` for uint8 data, our symmetric convention.
- Attributes ``gather_axis=0``, ``quantize_axis=1``, ``block_size`` (power of two >= 16; a short last block
  is fine), ``bits`` in 2/4/8.

Not a :class:`WeightFormat` of its own (it replaces a Gather, not a MatMul), so it is not in the packer
registry; the rewrite pass instantiates it for embedding tables.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import UnsupportedSchemeError
from ..records import QuantizedWeight
from ..scheme import DataType, QuantScheme
from . import base
from .base import PackedWeight, ReplacementNodes, pack_lsb, unpack_lsb

__all__ = ["GatherBlockQuantizedPacker"]


class GatherBlockQuantizedPacker:
    """Packs an embedding table for ``GatherBlockQuantized`` and builds the node replacing a Gather."""

    def supports(self, scheme: QuantScheme, k: int, n: int) -> str | None:
        if scheme.data_type is not DataType.INT:
            return f"GatherBlockQuantized stores uniform integer grids only, not data_type={scheme.data_type.value}"
        if scheme.bits not in (2, 4, 8):
            return f"GatherBlockQuantized runs bits 2/4/8 only, not {scheme.bits}"
        if scheme.per_channel:
            return "GatherBlockQuantized needs a block size (power of two >= 16), not per-channel"
        if (k * scheme.bits) % 8:
            # the kernel infers the row length from the packed byte count
            return f"hidden size {k} x {scheme.bits} bits does not fill whole bytes"
        return None

    def _check(self, scheme: QuantScheme, k: int, n: int) -> None:
        reason = self.supports(scheme, k, n)
        if reason is not None:
            raise UnsupportedSchemeError(f"{scheme.label}, embedding [{n}, {k}]: {reason}")

    def pack(self, qw: QuantizedWeight) -> PackedWeight:
        qw.check()
        scheme = qw.scheme
        self._check(scheme, qw.k, qw.n)
        tensors = {"data": pack_lsb(qw.codes, scheme.bits), "scales": base.stored_scales(qw)}
        if qw.zero_points is not None:
            tensors["zero_points"] = pack_lsb(qw.zero_points, scheme.bits)
        attributes: dict[str, int | float | str] = {
            "gather_axis": 0,
            "quantize_axis": 1,
            "block_size": scheme.group_size,
            "bits": scheme.bits,
        }
        return PackedWeight(tensors, attributes)

    def unpack(self, packed: PackedWeight, scheme: QuantScheme, k: int, n: int) -> QuantizedWeight:
        self._check(scheme, k, n)
        codes = unpack_lsb(packed.tensors["data"], scheme.bits, k)
        scales = packed.tensors["scales"].astype(np.float32)
        zp = packed.tensors.get("zero_points")
        zero_points = None if zp is None else unpack_lsb(zp, scheme.bits, scheme.n_blocks(k))
        if (zero_points is None) != scheme.symmetric:
            raise UnsupportedSchemeError(
                "GatherBlockQuantized zero points do not match the scheme's symmetry"
            )
        return QuantizedWeight(codes, scales, zero_points, scheme)

    def build(
        self, indices: ir.Value, packed: PackedWeight, name: str, dtype: ir.DataType = ir.DataType.FLOAT
    ) -> ReplacementNodes:
        """One ``GatherBlockQuantized`` node: ``indices[...] -> [..., hidden]`` in ``dtype``.

        The output takes the scales' type, so scales are stored in ``dtype`` (float16 -> float32 exact).
        """
        scales = packed.tensors["scales"].astype(base.numpy_float(dtype))
        arrays = PackedWeight({**packed.tensors, "scales": scales}, packed.attributes)
        inits = base.initializers(name, arrays, ("data", "scales", "zero_points"))
        inputs = [inits[0], indices, *inits[1:]]
        hidden = int(packed.tensors["data"].shape[1]) * 8 // int(packed.attributes["bits"])
        shape = ir.Shape([*list(indices.shape), hidden]) if indices.shape is not None else None
        out = ir.Value(name=f"{name}/output", type=ir.TensorType(dtype), shape=shape)
        node = ir.node(
            "GatherBlockQuantized",
            inputs,
            dict(packed.attributes),
            domain="com.microsoft",
            outputs=[out],
            name=f"{name}/GatherBlockQuantized",
        )
        return ReplacementNodes([node], inits, out, {"com.microsoft": 1})
