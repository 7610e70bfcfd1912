"""Property-based tests of the weight-site pass and the rewrite on random small graphs (hypothesis).

A graph is a random chain over a [3, K] activation: MatMul/Gemm with constant or computed weights reached
in every supported and unsupported way, activation x activation products, biases, shared weights, weights
held by Constant nodes (lifted above 1024 elements), and initializers also listed as graph inputs; shapes
include 1 and odd sizes. The test keeps its own record of which nodes are eligible and checks that:
``find_weight_sites`` returns exactly the eligible ones, every other candidate is in ``skipped`` with a
reason, non-candidates are in neither; quantizing (rtn, random scheme and format) never crashes (it either
works or refuses with the documented error), and the written model passes ``onnx.checker`` and runs in
onnxruntime with outputs equal to the float graph evaluated with the dequantized reference weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from optimum.adaround import quantize
from optimum.adaround.graph_passes.errors import NoQuantizableWeightsError, UnsupportedSchemeError
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.packing.base import get_packer
from optimum.adaround.graph_passes.pipeline import prepare_sites
from optimum.adaround.graph_passes.rounding.base import get_method
from optimum.adaround.graph_passes.scheme import QuantScheme

ROWS = 3
LIFT_MIN_ELEMENTS = 1024  # prepare_sites lifts Constant-node tensors of at least this many elements
OPS = (
    "mm",  # MatMul(x, W[K, N])                       -> site
    "mm_t",  # MatMul(x, Transpose(W[N, K]))          -> site
    "mm_t_perm01",  # MatMul(x, Transpose(W, [0, 1])) -> skipped (perm)
    "gemm",  # Gemm(x, W, [C]) transB, alpha, beta    -> site iff alpha == 1 and (no C or beta == 1)
    "first_const",  # MatMul(W, x)                    -> skipped (constant first operand / computed weight)
    "act_act",  # MatMul(x, Transpose(x))             -> not a candidate
    "input_weight",  # MatMul(x, graph input)         -> not a candidate
    "const_node",  # MatMul(x, Constant(W))           -> site if lifted, else skipped
    "add",  # Add(x, b)                               -> not a candidate
    "shared",  # MatMul(x, W) + MatMul(x, W)          -> two sites, one weight
    "init_input",  # W is an initializer and a graph input -> site
)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclasses.dataclass
class Holder:
    """Where a site's float weight lives in the proto, so the reference can swap in its dequantized copy."""

    name: str
    constant_node: bool
    transposed: bool  # stored as [N, K]
    k: int
    n: int


@dataclasses.dataclass
class Built:
    model: onnx.ModelProto
    expected: dict[str, str]  # node name -> "site" | "skip" | "none"
    holders: dict[str, Holder]  # site node name -> its weight
    feeds: dict[str, np.ndarray]


def build(k0: int, steps: list[tuple[str, int, int]]) -> Built:
    rng = np.random.default_rng(len(steps) * 1000 + k0)
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, k0])]
    feeds = {"x": rng.standard_normal((ROWS, k0)).astype(np.float32)}
    expected: dict[str, str] = {}
    holders: dict[str, Holder] = {}
    cur, rows, cols = "x", ROWS, k0

    def weight(name: str, shape: tuple[int, int]) -> str:
        w = (rng.standard_normal(shape) / np.sqrt(max(shape))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, name))
        return name

    for i, (op, n, flags) in enumerate(steps):
        p, out = f"/model/layers.{i}/{op}", f"t{i}"
        name = f"{p}/MatMul"
        if op == "mm":
            nodes.append(helper.make_node("MatMul", [cur, weight(f"W{i}", (cols, n))], [out], name=name))
            expected[name], holders[name] = "site", Holder(f"W{i}", False, False, cols, n)
            cols = n
        elif op == "mm_t":
            perm = {"perm": [1, 0]} if flags & 1 else {}
            nodes.append(
                helper.make_node("Transpose", [weight(f"W{i}", (n, cols))], [f"T{i}"], name=f"{p}/T", **perm)
            )
            nodes.append(helper.make_node("MatMul", [cur, f"T{i}"], [out], name=name))
            expected[name], holders[name] = "site", Holder(f"W{i}", False, True, cols, n)
            cols = n
        elif op == "mm_t_perm01":
            nodes.append(
                helper.make_node(
                    "Transpose", [weight(f"W{i}", (cols, n))], [f"T{i}"], name=f"{p}/T", perm=[0, 1]
                )
            )
            nodes.append(helper.make_node("MatMul", [cur, f"T{i}"], [out], name=name))
            expected[name] = "skip"
            cols = n
        elif op == "gemm":
            name = f"{p}/Gemm"
            trans_b, bias = bool(flags & 1), bool(flags & 2)
            alpha, beta = (0.5 if flags & 4 else 1.0), (0.5 if flags & 8 else 1.0)
            ins = [cur, weight(f"W{i}", (n, cols) if trans_b else (cols, n))]
            if bias:
                ins.append(weight(f"C{i}", (1, n)))
            nodes.append(
                helper.make_node("Gemm", ins, [out], name=name, transB=int(trans_b), alpha=alpha, beta=beta)
            )
            ok = alpha == 1.0 and (not bias or beta == 1.0)
            expected[name] = "site" if ok else "skip"
            if ok:
                holders[name] = Holder(f"W{i}", False, trans_b, cols, n)
            cols = n
        elif op == "first_const":
            nodes.append(helper.make_node("MatMul", [weight(f"W{i}", (n, rows)), cur], [out], name=name))
            expected[name] = "skip"
            rows = n
        elif op == "act_act":
            nodes.append(helper.make_node("Transpose", [cur], [f"T{i}"], name=f"{p}/T"))
            nodes.append(helper.make_node("MatMul", [cur, f"T{i}"], [out], name=name))
            expected[name] = "none"
            cols = rows
        elif op == "input_weight":
            inputs.append(helper.make_tensor_value_info(f"I{i}", TensorProto.FLOAT, [cols, n]))
            feeds[f"I{i}"] = (rng.standard_normal((cols, n)) / np.sqrt(cols)).astype(np.float32)
            nodes.append(helper.make_node("MatMul", [cur, f"I{i}"], [out], name=name))
            expected[name] = "none"
            cols = n
        elif op == "const_node":
            w = (rng.standard_normal((cols, n)) / np.sqrt(cols)).astype(np.float32)
            value = numpy_helper.from_array(w, f"V{i}")
            nodes.append(helper.make_node("Constant", [], [f"K{i}"], name=f"{p}/Constant", value=value))
            nodes.append(helper.make_node("MatMul", [cur, f"K{i}"], [out], name=name))
            lifted = cols * n >= LIFT_MIN_ELEMENTS
            expected[name] = "site" if lifted else "skip"
            if lifted:
                holders[name] = Holder(f"{p}/Constant", True, False, cols, n)
            cols = n
        elif op == "add":
            nodes.append(helper.make_node("Add", [cur, weight(f"B{i}", (1, cols))], [out], name=f"{p}/Add"))
        elif op == "shared":
            w = weight(f"W{i}", (cols, n))
            a, b = f"{p}/a/MatMul", f"{p}/b/MatMul"
            nodes.append(helper.make_node("MatMul", [cur, w], [f"A{i}"], name=a))
            nodes.append(helper.make_node("MatMul", [cur, w], [f"B{i}"], name=b))
            nodes.append(helper.make_node("Add", [f"A{i}", f"B{i}"], [out], name=f"{p}/Add"))
            for m in (a, b):
                expected[m], holders[m] = "site", Holder(w, False, False, cols, n)
            cols = n
        elif op == "init_input":
            w = weight(f"W{i}", (cols, n))
            inputs.append(helper.make_tensor_value_info(w, TensorProto.FLOAT, [cols, n]))
            nodes.append(helper.make_node("MatMul", [cur, w], [out], name=name))
            expected[name], holders[name] = "site", Holder(w, False, False, cols, n)
            cols = n
        cur = out
    graph = helper.make_graph(
        nodes, "fuzz", inputs, [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [rows, cols])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return Built(model, expected, holders, feeds)


# what these properties compare: every site at the run's scheme, exact float math, nothing else touched
EXACT = {"lm_head": "none", "embeddings": "none", "accuracy_level": 0}


def reference(built: Built, scheme: QuantScheme) -> onnx.ModelProto:
    """The float graph with every site's weight replaced by the rtn method's dequantized weight."""
    ref = onnx.ModelProto()
    ref.CopyFrom(built.model)
    inits = {t.name: t for t in ref.graph.initializer}
    consts = {n.name: n for n in ref.graph.node if n.op_type == "Constant"}
    rtn = get_method("rtn")
    done: set[str] = set()
    for h in built.holders.values():
        if h.name in done:
            continue
        done.add(h.name)
        tensor = consts[h.name].attribute[0].t if h.constant_node else inits[h.name]
        stored = numpy_helper.to_array(tensor)
        w_nk = stored if h.transposed else stored.T
        deq = rtn.quantize(np.ascontiguousarray(w_nk), scheme).dequantize().astype(np.float32)
        tensor.CopyFrom(
            numpy_helper.from_array(deq if h.transposed else np.ascontiguousarray(deq.T), tensor.name)
        )
    return ref


def run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # exact fp32 math for QDQ
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


shapes = st.one_of(st.integers(1, 9), st.integers(10, 70), st.sampled_from([16, 32, 33, 48, 64]))
step = st.tuples(st.sampled_from(OPS), shapes, st.integers(0, 15))
chains = st.tuples(shapes, st.lists(step, min_size=1, max_size=6))
schemes = st.one_of(
    st.builds(
        lambda bits, g, sym: QuantScheme(bits=bits, group_size=g, symmetric=sym, format="matmulnbits"),
        st.sampled_from([2, 4, 8]), st.sampled_from([16, 32, 64, -1]), st.booleans(),
    ),
    st.builds(
        lambda bits, g, sym: QuantScheme(bits=bits, group_size=g, symmetric=sym, format="qdq"),
        st.sampled_from([4, 8]), st.sampled_from([16, 32, 64, -1]), st.booleans(),
    ),
)  # fmt: skip


@SETTINGS
@given(chain=chains)
def test_find_weight_sites_returns_exactly_the_eligible_sites(chain):
    built = build(*chain)
    model = load_model(built.model).model
    want_sites = {n for n, e in built.expected.items() if e == "site"}
    want_skipped = {n for n, e in built.expected.items() if e == "skip"}
    if not want_sites:
        with pytest.raises(NoQuantizableWeightsError):
            prepare_sites(model)
        return
    report = prepare_sites(model)
    assert {s.node_name for s in report.sites} == want_sites
    assert {s.node_name for s in report.skipped} == want_skipped
    assert all(isinstance(s.reason, str) and s.reason for s in report.skipped)
    for s in report.sites:
        h = built.holders[s.node_name]
        assert (s.k, s.n, s.transposed) == (h.k, h.n, h.transposed), s
    assert len({s.name for s in report.sites}) == len(report.sites)  # unique site names


@SETTINGS
@given(chain=chains, scheme=schemes)
def test_quantized_graph_is_valid_and_matches_the_dequantized_reference(chain, scheme, tmp_path_factory):
    built = build(*chain)
    onnx.checker.check_model(built.model, full_check=True)  # the generator itself makes valid graphs
    folder = tmp_path_factory.mktemp("fuzz")
    src = folder / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(built.model, str(src))
    out = folder / "out"
    packer = get_packer(scheme.format)
    reasons = [packer.supports(scheme, h.k, h.n) for h in built.holders.values()]
    if not built.holders:
        with pytest.raises(NoQuantizableWeightsError):
            quantize(src, out, scheme=scheme, method="rtn", progress=False, **EXACT)
        assert not out.exists()
        event("refused: no site")
        return
    if any(reasons):
        with pytest.raises(UnsupportedSchemeError):
            quantize(src, out, scheme=scheme, method="rtn", progress=False, **EXACT)
        assert not out.exists()
        event("refused: unsupported scheme for a shape")
        return
    quantize(src, out, scheme=scheme, method="rtn", progress=False, **EXACT)
    event("quantized and compared")
    written = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(written, full_check=True)
    got = run(out / "model.onnx", built.feeds)
    want = run(reference(built, scheme), built.feeds)
    assert got.shape == want.shape
    scale = float(np.abs(want).max()) + 1e-6
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-4 * scale)
