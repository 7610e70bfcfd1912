"""Peer check against onnxruntime's own weight-only RTN quantizer (``MatMulNBitsQuantizer``, Default config).

What onnxruntime 1.31 does, read from its outputs here:
- asymmetric: the same grid as ours (``s = (max - min) / qmax`` after widening the range to include 0,
  ``z = round(-min / s)``), but codes are ``roundf(w * (1/s) + z)`` (reciprocal, halves away from zero);
- symmetric: ``s = extreme / -2**(b-1)`` where ``extreme`` is the block's value of largest magnitude *with its
  sign*: the extreme lands exactly on code 0 and ``s < 0`` when the extreme is positive. Ours is
  ``s = absmax / 2**(b-1) > 0`` (``+absmax`` clamps to qmax);
- MatMulNBits padding: the tail of a short last block holds code 0 (ours: the zero point); unused
  zero-point slots hold ``2**(b-1)`` (ours too).
``RTN(grid="ort")`` + ``MatMulNBitsPacker(ort_padding=True)`` reproduce its bytes exactly; for our default
grid the tests below assert the exact relation instead.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimum.adaround.graph_passes.packing.base import PackedWeight, get_packer
from optimum.adaround.graph_passes.records import QuantizedWeight
from optimum.adaround.graph_passes.rounding.base import get_method
from optimum.adaround.graph_passes.scheme import QuantScheme

K, N = 200, 40  # K = 200 leaves a short last block for every block size below


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 10  # outliers of both signs
    return w


def _ort_quantize(w: np.ndarray, bits: int, block: int, sym: bool, qdq: bool) -> dict[str, np.ndarray]:
    """onnxruntime's quantizer on a one-MatMul model; returns its initializers by role."""
    root = logging.getLogger()
    level = root.level
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    root.setLevel(level)  # its import switches the root logger to INFO
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    fmt = QuantFormat.QDQ if qdq else QuantFormat.QOperator
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, bits=bits, quant_format=fmt)
    q = MatMulNBitsQuantizer(model, algo_config=cfg)
    q.process()
    out: dict[str, np.ndarray] = {}
    for init in q.model.model.graph.initializer:
        arr = numpy_helper.to_array(init)
        role = (
            "zero_points"
            if init.name.endswith("zero_points")
            else "scales"
            if init.name.endswith("scales")
            else "q"
        )
        out[role] = arr
    op_types = [n.op_type for n in q.model.model.graph.node]
    assert op_types == (["DequantizeLinear", "MatMul"] if qdq else ["MatMulNBits"]), op_types
    return out


CASES = [(b, g, s) for b in (2, 4, 8) for g in (16, 128) for s in (True, False)]


@pytest.mark.parametrize(("bits", "block", "sym"), CASES)
def test_ort_grid_reproduces_onnxruntime_bytes(weight, bits, block, sym):
    ort_out = _ort_quantize(weight, bits, block, sym, qdq=False)
    scheme = QuantScheme(bits=bits, group_size=block, symmetric=sym)
    qw = get_method("rtn", search="minmax", grid="ort").quantize(weight.T, scheme)
    ours = get_packer("matmulnbits", ort_padding=True).pack(qw)
    assert ours.tensors["B"].tobytes() == ort_out["q"].tobytes()
    assert ours.tensors["scales"].tobytes() == ort_out["scales"].astype(np.float32).ravel().tobytes()
    if sym:
        assert "zero_points" not in ort_out and "zero_points" not in ours.tensors
    else:
        assert ours.tensors["zero_points"].tobytes() == ort_out["zero_points"].tobytes()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("block", [16, 128])
def test_ort_grid_reproduces_onnxruntime_qdq(weight, block, sym):
    """onnxruntime emits QDQ for 4 bits only: int4 (sym) / uint4 + zero points (asym), [K, N], axis 0."""
    ort_out = _ort_quantize(weight, 4, block, sym, qdq=True)
    scheme = QuantScheme(bits=4, group_size=block, symmetric=sym, format="qdq")
    qw = get_method("rtn", search="minmax", grid="ort").quantize(weight.T, scheme)
    ours = get_packer("qdq").pack(qw)
    assert ours.tensors["q"].dtype == ort_out["q"].dtype and ours.tensors["q"].shape == ort_out["q"].shape
    assert ours.tensors["q"].tobytes() == ort_out["q"].tobytes()
    assert ours.tensors["scales"].tobytes() == ort_out["scales"].tobytes()
    if not sym:
        assert ours.tensors["zero_points"].tobytes() == ort_out["zero_points"].tobytes()


def _ort_record(ort_out: dict[str, np.ndarray], scheme: QuantScheme) -> QuantizedWeight:
    """Read onnxruntime's MatMulNBits tensors back with our unpacker (same layout)."""
    tensors = {"B" if role == "q" else role: arr for role, arr in ort_out.items()}
    return get_packer("matmulnbits").unpack(PackedWeight(tensors, {}), scheme, K, N)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(("bits", "block"), [(4, 16), (4, 128), (8, 32), (2, 32)])
def test_default_grid_relation(weight, bits, block, sym):
    """Our default min-max grid is onnxruntime's: same scales (signed-extreme when symmetric) and zero
    points; codes equal except where w/s sits on a rounding tie (none in this weight)."""
    scheme = QuantScheme(bits=bits, group_size=block, symmetric=sym)
    theirs = _ort_record(_ort_quantize(weight, bits, block, sym, qdq=False), scheme)
    ours = get_method("rtn", search="minmax").quantize(weight.T, scheme)
    assert ours.scales.tobytes() == theirs.scales.tobytes()
    if sym:
        assert (ours.scales < 0).any() and (ours.scales > 0).any()  # both signs are exercised
    else:
        assert ours.zero_points.tobytes() == theirs.zero_points.tobytes()
    diff = ours.codes != theirs.codes
    if diff.any():  # only allowed at a half-way tie of w / s (division vs reciprocal, even vs away)
        t = weight.T / ours.expand(ours.scales)
        assert np.all(np.abs(np.abs(t - np.trunc(t)) - 0.5)[diff] < 1e-5)
        assert np.all(np.abs(ours.codes.astype(int) - theirs.codes)[diff] == 1)
    assert int(diff.sum()) == 0  # measured: no tie occurs in this weight
