"""Helpers for the custom-op tests: one-node models (onnx.helper, tests only) and sessions."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from optimum.adaround import custom_ops
from optimum.adaround.custom_ops import CustomOpsNotBuiltError

try:
    LIB = custom_ops.library_path()
except CustomOpsNotBuiltError:  # pragma: no cover - depends on the checkout
    LIB = None

needs_lib = pytest.mark.skipif(LIB is None, reason="custom-op library not built (cmake -B build/custom_ops)")

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def op_model(
    op: str,
    *,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    x_dtype: type = np.float32,
    scale_dtype: type = np.float32,
    zero_points: bool = False,
    bias: bool = False,
    x_rank: int = 2,
    symbolic_k: bool = False,
    **extra_attrs: int,
) -> onnx.ModelProto:
    """``Y = op(X, B, scales, [zero_points | codebook], [bias])`` with all operands as graph inputs."""
    xt = NP_TO_ONNX[x_dtype]
    x_shape = [f"d{i}" for i in range(x_rank - 1)] + ["k" if symbolic_k else k]
    inputs = [
        helper.make_tensor_value_info("X", xt, x_shape),
        helper.make_tensor_value_info("B", TensorProto.UINT8, None),
        helper.make_tensor_value_info("scales", NP_TO_ONNX[scale_dtype], None),
    ]
    names = ["X", "B", "scales"]
    if op == "MatMulCodebook":
        inputs.append(helper.make_tensor_value_info("codebook", TensorProto.FLOAT, None))
        names.append("codebook")
    elif zero_points:
        inputs.append(helper.make_tensor_value_info("zero_points", TensorProto.UINT8, None))
        names.append("zero_points")
    if bias:
        inputs.append(helper.make_tensor_value_info("bias", xt, None))
        names += [""] * (4 - len(names)) + ["bias"]
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block_size, **extra_attrs}
    node = helper.make_node(op, names, ["Y"], domain=custom_ops.DOMAIN, name="node0", **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", xt, None)])
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(custom_ops.DOMAIN, 1)],
        ir_version=10,
    )


def session(
    model: onnx.ModelProto, threads: int = 1, provider: str = "CPUExecutionProvider"
) -> ort.InferenceSession:
    so = custom_ops.session_options(intra_op_num_threads=threads, log_severity_level=4)
    return ort.InferenceSession(model.SerializeToString(), so, providers=[provider])


@functools.cache
def cached_session(key: tuple, threads: int = 1) -> ort.InferenceSession:
    op, kw = key[0], dict(key[1])
    return session(op_model(op, **kw), threads)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-12))
