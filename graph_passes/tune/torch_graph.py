"""Run an ONNX graph (a decoder block as ``calibration.blocks`` extracts it) as torch operations, so that a
loss on its outputs has gradients with respect to chosen weights.

Only the operator set of exported decoder blocks is covered (the ops of Optimum's Llama/Qwen2/Gemma/Phi-3
exports); ``TorchGraph`` refuses a graph with any other op, naming it, before anything runs, so a caller
can leave that block untuned. Integer tensors (shapes, indices) are torch tensors too: the whole graph is
evaluated eagerly in node order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

__all__ = ["TorchGraph", "UnsupportedGraphError", "supported_ops"]


class UnsupportedGraphError(ValueError):
    """The graph holds an operator (or attribute value) this interpreter does not run."""


_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}


def _tensor(t: Any) -> torch.Tensor:
    arr = np.asarray(t.numpy())
    return torch.from_numpy(arr.copy())


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


def _gather(node: ir.Node, data: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    axis = _attr(node, "axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


def _reshape(node: ir.Node, data: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    dims = _ints(shape)
    if not _attr(node, "allowzero", 0):
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)


def _unsqueeze(data: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    rank = data.dim() + axes.numel()
    for a in sorted(v % rank for v in _ints(axes)):
        data = data.unsqueeze(a)
    return data


def _slice(data: torch.Tensor, starts, ends, axes=None, steps=None) -> torch.Tensor:
    axes_l = list(range(len(_ints(starts)))) if axes is None else _ints(axes)
    steps_l = [1] * len(axes_l) if steps is None else _ints(steps)
    index: list[Any] = [slice(None)] * data.dim()
    for a, s, e, st in zip(axes_l, _ints(starts), _ints(ends), steps_l, strict=True):
        if st != 1:
            raise UnsupportedGraphError(f"Slice with step {st}")
        n = data.shape[a]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        index[a % data.dim()] = slice(s, e)
    return data[tuple(index)]


def _reduce_mean(node: ir.Node, data: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    dims = _ints(axes) if axes is not None else list(_attr(node, "axes", ()) or range(data.dim()))
    return data.mean(dim=dims, keepdim=bool(_attr(node, "keepdims", 1)))


def _expand(data: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    target = torch.broadcast_shapes(tuple(data.shape), tuple(_ints(shape)))
    return data.expand(target)


def _constant_of_shape(node: ir.Node, shape: torch.Tensor) -> torch.Tensor:
    value = _attr(node, "value")
    fill = _tensor(value).reshape(-1) if value is not None else torch.zeros(1)
    return fill.expand(_ints(shape)).clone() if shape.numel() else fill.reshape(()).clone()


def _shape(node: ir.Node, data: torch.Tensor) -> torch.Tensor:
    dims = list(data.shape)[_attr(node, "start", 0) : _attr(node, "end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _cast(node: ir.Node, data: torch.Tensor) -> torch.Tensor:
    to = ir.DataType(_attr(node, "to"))
    if to not in _DTYPES:
        raise UnsupportedGraphError(f"Cast to {to.name}")
    return data.to(_DTYPES[to])


def _softmax(node: ir.Node, data: torch.Tensor) -> torch.Tensor:
    return torch.softmax(data, dim=_attr(node, "axis", -1))


def _concat(node: ir.Node, *xs: torch.Tensor) -> torch.Tensor:
    return torch.cat(xs, dim=_attr(node, "axis"))


def _transpose(node: ir.Node, data: torch.Tensor) -> torch.Tensor:
    perm = _attr(node, "perm") or tuple(reversed(range(data.dim())))
    return data.permute(*perm)


def _flatten(node: ir.Node, data: torch.Tensor) -> torch.Tensor:
    axis = _attr(node, "axis", 1) % (data.dim() + 1) if data.dim() else 0
    return data.reshape(int(np.prod(data.shape[:axis], dtype=np.int64)), -1)


def _range(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


_PLAIN: dict[str, Callable[..., torch.Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": torch.pow,
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Exp": torch.exp,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sigmoid": torch.sigmoid,
    "Cos": torch.cos,
    "Sin": torch.sin,
    "MatMul": torch.matmul,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Where": torch.where,
    "Max": torch.maximum,
    "Min": torch.minimum,
    "Identity": lambda x: x,
    "Relu": torch.relu,
    "Unsqueeze": _unsqueeze,
    "Slice": _slice,
    "Expand": _expand,
    "Range": _range,
}
_WITH_NODE: dict[str, Callable[..., torch.Tensor]] = {
    "Gather": _gather,
    "Reshape": _reshape,
    "ReduceMean": _reduce_mean,
    "ConstantOfShape": _constant_of_shape,
    "Shape": _shape,
    "Cast": _cast,
    "Softmax": _softmax,
    "Concat": _concat,
    "Transpose": _transpose,
    "Flatten": _flatten,
}


def supported_ops() -> set[str]:
    return {*_PLAIN, *_WITH_NODE, "Constant"}


class TorchGraph:
    """``graph`` evaluated with torch; ``run(feeds, weights)`` returns its outputs in order.

    ``weights`` replaces initializers by name (e.g. fake-quantized weights that carry gradients); every
    other initializer and constant is converted once, here.
    """

    def __init__(self, graph: ir.Graph) -> None:
        unsupported = sorted(
            {n.op_type for n in graph if n.domain not in ("", "ai.onnx")}
            | {n.op_type for n in graph if n.op_type not in supported_ops()}
        )
        if unsupported:
            raise UnsupportedGraphError(f"no torch form for op {unsupported[0]}")
        self.graph = graph
        self.constants: dict[str, torch.Tensor] = {
            name: _tensor(v.const_value)
            for name, v in graph.initializers.items()
            if v.const_value is not None
        }
        self.inputs = [v.name for v in graph.inputs]
        self.outputs = [v.name for v in graph.outputs]

    def run(
        self, feeds: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = {**self.constants, **(weights or {}), **feeds}
        for node in self.graph:
            if node.op_type == "Constant":
                env[node.outputs[0].name] = _tensor(_attr(node, "value"))
                continue
            args = [None if v is None or not v.name else env[v.name] for v in node.inputs]
            while args and args[-1] is None:
                args.pop()
            if node.op_type in _PLAIN:
                out = _PLAIN[node.op_type](*args)
            else:
                out = _WITH_NODE[node.op_type](node, *args)
            env[node.outputs[0].name] = out
        return [env[name] for name in self.outputs]
