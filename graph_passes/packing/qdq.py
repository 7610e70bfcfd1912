"""Blockwise QDQ: a quantized initializer -> ``DequantizeLinear`` (opset 21) -> the original MatMul/Gemm.

Stored orientation: ``[K, N]`` (the orientation ONNX ``MatMul`` consumes), blocks along axis 0:

- ``q``: ``[K, N]``, int4/int8 for symmetric schemes (``code - 2**(bits-1)``, no zero point) and
  uint4/uint8 with a zero point for asymmetric ones (ml_dtypes arrays; ONNX INT4/UINT4 on save).
- ``scales`` (and ``zero_points``): ``[k_blocks, N]`` with ``axis=0, block_size=B``; a short last block is
  allowed (DequantizeLinear takes ``ceil(K / B)`` scales). Per-channel schemes use per-axis DQ instead:
  ``scales[N]`` with ``axis=1`` and no ``block_size``.

``[K, N]`` needs no Transpose in front of MatMul (even for a Transpose-fed tied head, whose float weight
was ``[N, K]``) and is the pattern onnxruntime fuses into MatMulNBits (DQ with axis 0 -> MatMul); a Gemm
site keeps its Gemm with ``transB=0``.

Only 4 and 8 bits are ONNX types. With ``emulate_low_bits=True`` narrower grids are stored in the next
container (2/3 bits in int4/uint4, 5..7 bits in int8/uint8): the codes, scales and zero points are
unchanged, so the graph computes exactly ``QuantizedWeight.dequantize()``. It costs the container's size
(no memory saving) and is meant for evaluating e.g. 3-bit accuracy with stock onnxruntime.
"""

from __future__ import annotations

from typing import ClassVar

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..errors import UnsupportedSchemeError
from ..records import QuantizedWeight, WeightSite
from ..scheme import PER_CHANNEL, DataType, QuantScheme, WeightFormat
from . import base
from .base import PackedWeight, ReplacementNodes, StoredWeight, register_packer

__all__ = ["QDQPacker"]

# (container bits, symmetric) -> numpy dtype of the stored codes
_CONTAINERS = {
    (4, True): ml_dtypes.int4,
    (4, False): ml_dtypes.uint4,
    (8, True): np.int8,
    (8, False): np.uint8,
}


_BITS_OF = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}
_SIGNED = (ir.DataType.INT4, ir.DataType.INT8)


@register_packer
class QDQPacker:
    """Emits ``DequantizeLinear`` + the original MatMul/Gemm (see module docstring)."""

    format: ClassVar[WeightFormat] = WeightFormat.QDQ
    reads: ClassVar[tuple[tuple[str, str], ...]] = (("", "DequantizeLinear"),)

    def __init__(self, emulate_low_bits: bool = False) -> None:
        self.emulate_low_bits = emulate_low_bits

    def container_bits(self, bits: int) -> int:
        return 4 if bits <= 4 else 8

    def supports(self, scheme: QuantScheme, k: int, n: int) -> str | None:
        if scheme.data_type is not DataType.INT:
            return f"QDQ stores uniform integer grids only, not data_type={scheme.data_type.value}"
        if scheme.bits not in (4, 8) and not self.emulate_low_bits:
            return (
                f"DequantizeLinear has 4- and 8-bit types only, not {scheme.bits} bits "
                "(emulate_low_bits=True stores them in a wider container; or use format=lowbit)"
            )
        return None

    def pack(self, qw: QuantizedWeight) -> PackedWeight:
        base.check_packable(self, qw)
        scheme = qw.scheme
        qdtype = _CONTAINERS[self.container_bits(scheme.bits), scheme.symmetric]
        if scheme.symmetric:
            q = (qw.codes.T.astype(np.int16) - scheme.implied_zero_point).astype(qdtype)
        else:
            q = qw.codes.T.astype(qdtype)
        scales = base.stored_scales(qw).T  # [nb, N]
        zp = None if qw.zero_points is None else qw.zero_points.T.astype(qdtype)
        attributes: dict[str, int | float | str]
        if scheme.per_channel:
            scales = scales[0]
            zp = None if zp is None else zp[0]
            attributes = {"axis": 1}
        else:
            attributes = {"axis": 0, "block_size": scheme.group_size}
        tensors = {"q": np.ascontiguousarray(q), "scales": np.ascontiguousarray(scales)}
        if zp is not None:
            tensors["zero_points"] = np.ascontiguousarray(zp)
        return PackedWeight(tensors, attributes)

    def unpack(self, packed: PackedWeight, scheme: QuantScheme, k: int, n: int) -> QuantizedWeight:
        """Also takes the DQ weights other tools write: signed codes with zero points (both shifted by
        ``2**(bits-1)``) and unsigned codes without them (zero point 0), as an asymmetric record."""
        base.check_supported(self, scheme, k, n)
        q = packed.tensors["q"]
        if q.shape != (k, n):
            raise UnsupportedSchemeError(f"QDQ weight has shape {q.shape}, expected [K, N] = {(k, n)}")
        nb = scheme.n_blocks(k)
        zp = packed.tensors.get("zero_points")
        signed = np.issubdtype(q.dtype, np.signedinteger) or q.dtype == ml_dtypes.int4
        if (zp is None and signed) != scheme.symmetric:
            raise UnsupportedSchemeError(
                f"QDQ weight of {q.dtype} codes {'without' if zp is None else 'with'} zero points does not "
                f"match the scheme, which is {'symmetric' if scheme.symmetric else 'asymmetric'}"
            )
        shift = scheme.implied_zero_point if signed else 0
        codes = (q.astype(np.int16).T + shift).astype(np.uint8)
        zero_points = None
        if not scheme.symmetric:
            z = np.zeros((nb, n), np.int16) if zp is None else zp.astype(np.int16).reshape(nb, n)
            zero_points = np.ascontiguousarray((z.T + shift).astype(np.uint8))
        scales = packed.tensors["scales"].astype(np.float32).reshape(nb, n).T
        return QuantizedWeight(np.ascontiguousarray(codes), np.ascontiguousarray(scales), zero_points, scheme)

    def build(
        self, site: WeightSite, x: ir.Value, packed: PackedWeight, bias: ir.Value | None, name: str
    ) -> ReplacementNodes:
        """DQ -> MatMul (MatMul sites; + Add if handed a bias) or DQ -> Gemm(transB=0, C=bias) (Gemm sites).

        A Gemm site is assumed to have ``alpha = beta = 1`` and ``transA = 0`` (site discovery's job).
        DequantizeLinear outputs the scales' type: when the stored scales are not the activation type
        (float16 scales in a float32 graph) a Cast of the scales feeds DQ, which keeps the dequantized
        weight exact (float16 -> float32 is exact) and the stored scales small.
        """
        dtype = base.activation_dtype(x)
        inits = base.initializers(name, packed, ("q", "scales", "zero_points"))
        q, scales = inits[:2]
        nodes: list[ir.Node] = []
        scale_in = scales
        if packed.tensors["scales"].dtype != base.numpy_float(dtype):
            scale_in = ir.Value(name=f"{name}.scales_cast", type=ir.TensorType(dtype), shape=scales.shape)
            nodes.append(ir.node("Cast", [scales], {"to": dtype}, outputs=[scale_in], name=f"{name}/Cast"))
        dq_inputs = [q, scale_in, *inits[2:]]
        w = ir.Value(name=f"{name}.dequantized", type=ir.TensorType(dtype), shape=ir.Shape([site.k, site.n]))
        nodes.append(
            ir.node("DequantizeLinear", dq_inputs, dict(packed.attributes), outputs=[w], name=f"{name}/DQ")
        )
        out = base.output_value(x, site.n, f"{name}/output", dtype)
        if site.op_type == "Gemm":
            inputs = [x, w] if bias is None else [x, w, bias]
            nodes.append(ir.node("Gemm", inputs, {"transB": 0}, outputs=[out], name=f"{name}/Gemm"))
        elif bias is None:
            nodes.append(ir.node("MatMul", [x, w], outputs=[out], name=f"{name}/MatMul"))
        else:  # a MatMul site handed a bias (e.g. a following Add folded in by the rewrite pass)
            mm = base.output_value(x, site.n, f"{name}/MatMul_output", dtype)
            nodes.append(ir.node("MatMul", [x, w], outputs=[mm], name=f"{name}/MatMul"))
            nodes.append(ir.node("Add", [mm, bias], outputs=[out], name=f"{name}/Add"))
        return ReplacementNodes(nodes, inits, out, {"": 21})

    def read(self, node: ir.Node) -> StoredWeight | None:
        """A DequantizeLinear of a constant ``[K, N]`` 4/8-bit weight, blocked or per channel along K,
        feeding a MatMul (input B) or a ``transB=0`` Gemm: the layouts this packer and onnxruntime's
        quantizer write. Scales count as stored when constant, or a Cast of a constant (see ``build``)."""
        tensors = base.const_inputs(node, ("q", "scales", "zero_points"))
        cast = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if cast is not None and cast.op_type == "Cast" and cast.inputs[0].const_value is not None:
            tensors["scales"] = cast.inputs[0].const_value  # float16 scales cast to a float32 graph's type
        q = tensors.get("q")
        if q is None or "scales" not in tensors or len(q.shape) != 2 or q.dtype not in _BITS_OF:
            return None
        target = next(
            (u.node for u in node.outputs[0].uses() if u.idx == 1 and u.node.op_type in ("MatMul", "Gemm")),
            None,
        )
        if target is None or base.attribute(target, "transB", 0):
            return None
        k, n = (int(d) for d in q.shape)
        axis, block = int(base.attribute(node, "axis", 1)), int(base.attribute(node, "block_size", 0))
        if (axis, block > 0) not in ((0, True), (1, False)):
            return None  # blocks along N, or one scale per input feature: not a [N, K] record
        try:
            scheme = QuantScheme(
                bits=_BITS_OF[q.dtype],
                group_size=block or PER_CHANNEL,
                symmetric="zero_points" not in tensors and q.dtype in _SIGNED,
                scale_dtype=base.scale_dtype(tensors["scales"]),
                format=WeightFormat.QDQ,
            )
        except UnsupportedSchemeError:
            return None  # a block size our schemes do not take
        return StoredWeight(target, self, scheme, k, n, tensors)
