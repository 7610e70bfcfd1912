"""Helpers for the packer tests (imported by the test modules next to it).

Tiny one-site graphs, the minimal rewrite a test needs, an exact-math onnxruntime session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import strategies as st

from optimum.adaround.graph_passes.packing.base import (
    PackedWeight,
    Packer,
    ReplacementNodes,
    read_stored_weight,
)
from optimum.adaround.graph_passes.records import QuantizedWeight, WeightSite
from optimum.adaround.graph_passes.scheme import QuantScheme

SITE_KINDS = ("matmul", "gemm", "transpose")


def random_qweight(
    rng: np.random.Generator, scheme: QuantScheme, n: int, k: int, hit_extremes: bool = False
) -> QuantizedWeight:
    """A grid-aligned weight built from random codes/scales (scales exact in the scheme's scale dtype).

    ``hit_extremes`` puts code 0 (and code qmax for asymmetric schemes) in every block, so that min-max
    RTN of the dequantized weight must recover exactly this grid.
    """
    nb, block = scheme.n_blocks(k), scheme.block_size(k)
    codes = rng.integers(0, scheme.qmax + 1, (n, k)).astype(np.uint8)
    scales = (rng.uniform(0.5, 1.5, (n, nb)) * 0.02).astype(scheme.scale_dtype).astype(np.float32)
    zp = None if scheme.symmetric else rng.integers(1, scheme.qmax, (n, nb)).astype(np.uint8)
    if hit_extremes:
        for b in range(nb):
            lo = b * block
            hi = min(lo + block, k)
            cols = rng.choice(np.arange(lo, hi), size=2, replace=False)
            codes[:, cols[0]] = 0
            if not scheme.symmetric:
                codes[:, cols[1]] = scheme.qmax
    return QuantizedWeight(codes, scales, zp, scheme)


def _init(name: str, arr: np.ndarray) -> ir.Value:
    t = ir.Tensor(np.ascontiguousarray(arr), name=name)
    return ir.Value(name=name, type=ir.TensorType(t.dtype), shape=ir.Shape(t.shape), const_value=t)


@dataclasses.dataclass
class OneSite:
    model: ir.Model
    site: WeightSite
    bias: np.ndarray | None


def one_site_model(kind: str, w: np.ndarray, bias: np.ndarray | None = None) -> OneSite:
    """``y = x @ W^T (+ bias)`` for ``w[N, K]`` as MatMul on ``[K, N]``, Gemm ``transB=1`` with a bias, or
    MatMul fed by ``Transpose(W[N, K])`` (the tied lm_head pattern)."""
    n, k = w.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["M", k]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["M", n]))
    inits, nodes = [], []
    transpose_node = bias_name = None
    if kind == "matmul":
        wv = _init("W", w.T)
        nodes.append(ir.node("MatMul", [x, wv], outputs=[y], name="lin/MatMul"))
    elif kind == "gemm":
        wv = _init("W", w)
        bv = _init("bias", bias)
        inits.append(bv)
        bias_name = "bias"
        nodes.append(ir.node("Gemm", [x, wv, bv], {"transB": 1}, outputs=[y], name="lin/Gemm"))
    elif kind == "transpose":
        wv = _init("W", w)
        t = ir.node("Transpose", [wv], {"perm": [1, 0]}, name="lin/Transpose")
        transpose_node = "lin/Transpose"
        nodes += [t, ir.node("MatMul", [x, t.outputs[0]], outputs=[y], name="lin/MatMul")]
    else:
        raise ValueError(kind)
    inits.insert(0, wv)
    graph = ir.Graph([x], [y], nodes=nodes, initializers=inits, opset_imports={"": 21})
    site = WeightSite(
        name="lin",
        node_name=nodes[-1].name,
        op_type="Gemm" if kind == "gemm" else "MatMul",
        weight_name="W",
        k=k,
        n=n,
        transposed=kind != "matmul",
        activation="x",
        transpose_node=transpose_node,
        bias_name=bias_name,
    )
    # ORT 1.31 reads IR version <= 13; onnx 1.23 would default to 14.
    return OneSite(ir.Model(graph, ir_version=10), site, bias if kind == "gemm" else None)


def replace_site(m: OneSite, packer: Packer, packed: PackedWeight) -> ir.Model:
    """What the rewrite pass does, minimally: insert build()'s nodes, reroute, drop the old ones."""
    graph = m.model.graph
    node = next(nd for nd in graph if nd.name == m.site.node_name)
    x = node.inputs[0]
    bias = node.inputs[2] if m.site.op_type == "Gemm" and len(node.inputs) > 2 else None
    rep = packer.build(m.site, x, packed, bias, m.site.name)
    for v in rep.initializers:
        graph.register_initializer(v)
    graph.insert_before(node, rep.nodes)
    old_out = node.outputs[0]
    ir.convenience.replace_all_uses_with(old_out, rep.output, replace_graph_outputs=True)
    old_out.name = "y_old"
    rep.output.name = "y"
    graph.remove(node, safe=True)
    if m.site.transpose_node:
        graph.remove(next(nd for nd in graph if nd.name == m.site.transpose_node), safe=True)
    graph.initializers.pop("W")
    for domain, version in rep.opset_imports.items():
        graph.opset_imports[domain] = max(graph.opset_imports.get(domain, version), version)
    return m.model


def exact_session(model: ir.Model) -> ort.InferenceSession:
    """CPU session with exact fp32 math (no int8 activations in fused DQ->MatMulNBits)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"]
    )


def reference(x: np.ndarray, qw: QuantizedWeight, bias: np.ndarray | None) -> np.ndarray:
    y = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    return y if bias is None else y + bias


def assert_close(y: np.ndarray, ref: np.ndarray, rel: float = 1e-5) -> None:
    err = float(np.max(np.abs(y - ref)))
    assert err <= rel * float(np.max(np.abs(ref))), (err, float(np.max(np.abs(ref))))


def assert_same_record(back: QuantizedWeight, qw: QuantizedWeight) -> None:
    """Byte for byte the same codes, scales, zero points and codebook."""
    assert back.codes.tobytes() == qw.codes.tobytes()
    assert back.scales.tobytes() == qw.scales.tobytes()
    assert (back.zero_points is None) == (qw.zero_points is None)
    if qw.zero_points is not None:
        assert back.zero_points.tobytes() == qw.zero_points.tobytes()
    assert (back.codebook is None) == (qw.codebook is None)
    if qw.codebook is not None:
        assert back.codebook.tobytes() == qw.codebook.tobytes()


def check_in_onnxruntime(
    packer: Packer,
    qw: QuantizedWeight,
    kind: str,
    rng: np.random.Generator,
    session: Callable[[ir.Model], ort.InferenceSession] = exact_session,
) -> ir.Model:
    """Pack ``qw`` into a one-site model of ``kind`` and check, in onnxruntime, that it computes
    ``x @ qw.dequantize().T (+ bias)`` for 1 and 5 rows, and that ``read`` + ``unpack`` find ``qw`` again
    (the same record; for narrow grids in a wider QDQ container, the container's record of the same weight)."""
    n, k = qw.n, qw.k
    bias = rng.standard_normal(n).astype(np.float32) if kind == "gemm" else None
    m = one_site_model(kind, rng.standard_normal((n, k)).astype(np.float32), bias)
    model = replace_site(m, packer, packer.pack(qw))
    (stored,) = [w for w in map(read_stored_weight, model.graph) if w is not None]
    assert (stored.k, stored.n, stored.scheme.block_size(k)) == (k, n, qw.block_size)
    back = stored.unpack()
    assert back.dequantize().tobytes() == qw.dequantize().tobytes()
    if stored.scheme.bits == qw.scheme.bits:
        assert_same_record(back, qw)
    sess = session(model)
    for mrows in (1, 5):
        x = rng.standard_normal((mrows, k)).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        assert y.shape == (mrows, n)
        assert_close(y, reference(x, qw, bias))
    return model


def model_of(inputs: Sequence[ir.Value], rep: ReplacementNodes) -> ir.Model:
    """A graph of just the nodes ``build`` returned, its output named ``y``."""
    rep.output.name = "y"
    graph = ir.Graph(
        inputs,
        [rep.output],
        nodes=rep.nodes,
        initializers=rep.initializers,
        opset_imports={"": 21, **rep.opset_imports},
    )
    return ir.Model(graph, ir_version=10)


def int_schemes(
    bits: Sequence[int],
    groups: Sequence[int],
    scale_dtypes: Sequence[str] = ("float32",),
    format: str = "auto",
) -> st.SearchStrategy[QuantScheme]:
    """Integer schemes over bits x group size x symmetry x scale dtype."""
    return st.builds(
        QuantScheme,
        bits=st.sampled_from(bits),
        group_size=st.sampled_from(groups),
        symmetric=st.booleans(),
        scale_dtype=st.sampled_from(scale_dtypes),
        format=st.just(format),
    )
