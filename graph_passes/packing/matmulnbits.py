"""``com.microsoft::MatMulNBits``: packed uint8 codes that onnxruntime multiplies directly.

Layout (onnxruntime 1.31, checked by the tests against the CPU kernel):

- ``B``: uint8 ``[N, k_blocks, block_size * bits / 8]``; within a block the codes along K are packed
  LSB first (for 4 bits: element 2i in the low nibble, 2i+1 in the high nibble). The tail of the last
  block (K not a multiple of the block) is padded with the block's zero point, so it dequantizes to 0.
- ``scales``: ``[N * k_blocks]``, row-major ``[N, k_blocks]`` flattened.
- ``zero_points`` (asymmetric only): uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed LSB first per row;
  unused slots of the last byte hold ``2**(bits-1)`` (as onnxruntime's quantizer writes them). Without
  the input the kernel implies ``2**(bits-1)``, which is exactly our symmetric convention.
- Attributes ``K``, ``N``, ``bits`` (2/4/8 run on CPU), ``block_size`` (16..256), ``accuracy_level``
  (0 = compute in the activation type, exact; 4 = int8 activations, fast but approximate).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from ..errors import UnsupportedSchemeError
from ..records import QuantizedWeight, WeightSite
from ..scheme import DataType, QuantScheme, WeightFormat
from . import base
from .base import PackedWeight, ReplacementNodes, StoredWeight, pack_lsb, register_packer, unpack_lsb

__all__ = ["MatMulNBitsPacker"]

_BITS = (2, 4, 8)
_BLOCKS = (16, 32, 64, 128, 256)


@register_packer
class MatMulNBitsPacker:
    """Packs codes for ``MatMulNBits``.

    ``accuracy_level`` is written as the node attribute. ``ort_padding=True`` fills the tail of the last
    block with code 0, as onnxruntime's own quantizer does (its bytes, bit for bit); by default the tail
    holds the zero point, so even a kernel that read it would add exact zeros. The kernel ignores the
    tail either way (tested), so both give the same outputs.
    """

    format: ClassVar[WeightFormat] = WeightFormat.MATMULNBITS
    reads: ClassVar[tuple[tuple[str, str], ...]] = (("com.microsoft", "MatMulNBits"),)

    def __init__(self, accuracy_level: int = 0, ort_padding: bool = False) -> None:
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise UnsupportedSchemeError(f"accuracy_level={accuracy_level!r}: MatMulNBits accepts 0..4")
        self.accuracy_level = accuracy_level
        self.ort_padding = ort_padding

    def supports(self, scheme: QuantScheme, k: int, n: int) -> str | None:
        if scheme.data_type is not DataType.INT:
            return f"MatMulNBits stores uniform integer grids only, not data_type={scheme.data_type.value}"
        if scheme.bits not in _BITS:
            return f"MatMulNBits runs bits {'/'.join(map(str, _BITS))} only, not {scheme.bits} (use format=lowbit)"
        block = scheme.block_size(k)
        if block not in _BLOCKS:
            if scheme.per_channel:
                return (
                    f"per-channel needs one block of K={k}, but MatMulNBits blocks are "
                    f"{'/'.join(map(str, _BLOCKS))} only (use a group size, or format=qdq)"
                )
            return f"MatMulNBits block sizes are {'/'.join(map(str, _BLOCKS))} only, not {block}"
        return None

    def pack(self, qw: QuantizedWeight) -> PackedWeight:
        base.check_packable(self, qw)
        scheme, n, k = qw.scheme, qw.n, qw.k
        block, nb, bits = qw.block_size, scheme.n_blocks(k), scheme.bits
        codes = qw.codes
        pad = nb * block - k
        if pad:
            if self.ort_padding:
                fill = np.zeros((n, pad), np.uint8)
            elif qw.zero_points is None:
                fill = np.full((n, pad), scheme.implied_zero_point, np.uint8)
            else:
                fill = np.repeat(qw.zero_points[:, -1:], pad, axis=1)
            codes = np.concatenate([codes, fill], axis=1)
        b = pack_lsb(codes.reshape(n, nb, block), bits)
        tensors = {"B": b, "scales": base.stored_scales(qw).reshape(n * nb)}
        if qw.zero_points is not None:
            zp = qw.zero_points
            per_byte = 8 // bits
            if nb % per_byte:
                mid = np.full((n, per_byte - nb % per_byte), scheme.implied_zero_point, np.uint8)
                zp = np.concatenate([zp, mid], axis=1)
            tensors["zero_points"] = pack_lsb(zp, bits)
        attributes: dict[str, int | float | str] = {
            "K": k,
            "N": n,
            "bits": bits,
            "block_size": block,
            "accuracy_level": self.accuracy_level,
        }
        return PackedWeight(tensors, attributes)

    def unpack(self, packed: PackedWeight, scheme: QuantScheme, k: int, n: int) -> QuantizedWeight:
        base.check_supported(self, scheme, k, n)
        block, nb, bits = scheme.block_size(k), scheme.n_blocks(k), scheme.bits
        b = packed.tensors["B"]
        if b.shape != (n, nb, block * bits // 8):
            raise UnsupportedSchemeError(
                f"MatMulNBits B has shape {b.shape}, expected {(n, nb, block * bits // 8)}"
            )
        codes = unpack_lsb(b, bits, block).reshape(n, nb * block)[:, :k]
        scales = packed.tensors["scales"].astype(np.float32).reshape(n, nb)
        zp = packed.tensors.get("zero_points")
        zero_points = None if zp is None else unpack_lsb(zp, bits, nb)  # drops the unused slots
        if (zero_points is None) != scheme.symmetric:
            raise UnsupportedSchemeError(
                f"MatMulNBits weight {'lacks' if zero_points is None else 'has'} zero points but the scheme "
                f"is {'asymmetric' if zero_points is None else 'symmetric'}"
            )
        return QuantizedWeight(np.ascontiguousarray(codes), scales, zero_points, scheme)

    def build(
        self, site: WeightSite, x: ir.Value, packed: PackedWeight, bias: ir.Value | None, name: str
    ) -> ReplacementNodes:
        """One ``MatMulNBits`` node; a Gemm's 1-D ``[N]`` bias becomes its ``bias`` input, any other bias
        shape (``[1, N]``, ``[M, N]``, unknown) an ``Add`` after it.

        Assumes a Gemm site has ``alpha = beta = 1`` and ``transA = 0`` (site discovery's job).
        """
        dtype = base.activation_dtype(x)
        # MatMulNBits ties `scales` to A's element type (type constraint T1 covers A, scales and bias):
        # float16 scales with float32 activations are rejected at session creation. float16 -> float32
        # is exact, so fp16-rounded scales are stored as float32 for float32 graphs (a few % more
        # bytes, the same numbers); a float16 graph gets float16 scales.
        scales = packed.tensors["scales"].astype(base.numpy_float(dtype))
        arrays = PackedWeight({**packed.tensors, "scales": scales}, packed.attributes)
        inits = base.initializers(name, arrays, ("B", "scales", "zero_points"))
        inputs: list[ir.Value | None] = [x, *inits]
        node_bias, add_bias = base.split_bias(bias, site, dtype)
        if node_bias is not None:
            inputs += [None] * (4 - len(inputs)) + [None, node_bias]  # zero_points?, g_idx, bias
        nodes, out = base.node_then_add(
            "MatMulNBits", inputs, dict(packed.attributes), "com.microsoft", x, site, name, add_bias
        )
        return ReplacementNodes(nodes, inits, out, {"com.microsoft": 1})

    def build_gather(
        self, head: ReplacementNodes, packed: PackedWeight, indices: ir.Value, name: str
    ) -> ReplacementNodes | None:
        """The lookup of an embedding table tied to this weight, reading the same stored arrays (no copy):
        ``GatherBlockQuantized`` over ``B`` viewed as ``[N, k_blocks * block * bits / 8]`` and the scales
        as ``[N, k_blocks]`` (two Reshapes), then a Slice of the padded tail when K is not a multiple of
        the block. ``head``: what :meth:`build` returned for the weight."""
        n, k, bits, block = (int(packed.attributes[a]) for a in ("N", "K", "bits", "block_size"))
        width = -(-k // block) * block
        # the MatMulNBits node's own inputs: A, B, scales[, zero_points]
        stored = dict(zip(("A", "B", "scales", "zero_points"), head.nodes[0].inputs, strict=False))
        views = {"data": [n, width * bits // 8], "scales": [n, width // block]}
        inits, nodes, inputs = [], [], {}
        for role, source in (("data", stored["B"]), ("scales", stored["scales"])):
            shape = base.initializer(f"{name}.{role}_shape", np.array(views[role], np.int64))
            view = ir.Value(name=f"{name}/{role}", type=source.type, shape=ir.Shape(views[role]))
            nodes.append(ir.node("Reshape", [source, shape], outputs=[view], name=f"{name}/Reshape_{role}"))
            inits.append(shape)
            inputs[role] = view
        dtype = stored["scales"].dtype or ir.DataType.FLOAT
        dims = list(indices.shape) if indices.shape is not None else None
        out = ir.Value(
            name=f"{name}/output",
            type=ir.TensorType(dtype),
            shape=None if dims is None else ir.Shape([*dims, width]),
        )
        gather_inputs = [inputs["data"], indices, inputs["scales"]]
        if stored.get("zero_points") is not None:  # absent, or an empty slot before a bias input
            gather_inputs.append(stored["zero_points"])
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}
        nodes.append(
            ir.node("GatherBlockQuantized", gather_inputs, attributes, domain="com.microsoft", outputs=[out],
                    name=f"{name}/GatherBlockQuantized")
        )  # fmt: skip
        if width != k:  # the padded tail of each row holds zeros: drop it
            ends = [base.initializer(f"{name}.slice_{r}", np.array([v], np.int64)) for r, v in
                    (("starts", 0), ("ends", k), ("axes", -1))]  # fmt: skip
            sliced = ir.Value(name=f"{name}/sliced", type=ir.TensorType(dtype),
                              shape=None if dims is None else ir.Shape([*dims, k]))  # fmt: skip
            nodes.append(ir.node("Slice", [out, *ends], outputs=[sliced], name=f"{name}/Slice"))
            inits += ends
            out = sliced
        return ReplacementNodes(nodes, inits, out, {"com.microsoft": 1})

    def read(self, node: ir.Node) -> StoredWeight | None:
        """Also reads float zero points (onnxruntime's HQQ): ``unpack`` refuses them, the caller applies them."""
        tensors = base.const_inputs(node, ("A", "B", "scales", "zero_points"))
        tensors.pop("A", None)
        if "B" not in tensors or "scales" not in tensors:
            return None
        scheme = QuantScheme(
            bits=int(base.attribute(node, "bits", 4)),
            group_size=int(base.attribute(node, "block_size")),
            symmetric="zero_points" not in tensors,
            scale_dtype=base.scale_dtype(tensors["scales"]),
            format=WeightFormat.MATMULNBITS,
        )
        k, n = int(base.attribute(node, "K")), int(base.attribute(node, "N"))
        return StoredWeight(node, self, scheme, k, n, tensors)
