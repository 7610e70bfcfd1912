"""The rewrite pass with the real packers: onnxruntime output equals x @ dequantize(qw)^T (+ bias)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from optimum.adaround.graph_passes.packing.base import get_packer
from optimum.adaround.graph_passes.records import QuantizedWeight
from optimum.adaround.graph_passes.rewrite import ReplaceWeightSitesPass, SiteRewrite, min_ir_version
from optimum.adaround.graph_passes.rounding import grid
from optimum.adaround.graph_passes.scheme import QuantScheme
from optimum.adaround.graph_passes.sites import find_weight_sites

RNG = np.random.default_rng(1)
V, K, N = 40, 64, 48


def _rtn(w: np.ndarray, scheme: QuantScheme) -> QuantizedWeight:
    lo, hi = grid.blockwise_minmax(w, scheme)
    scales, zp = grid.grid_params(lo, hi, scheme)
    return QuantizedWeight(grid.codes_from_weight(w, scales, zp, scheme), scales, zp, scheme)


def _graph(k: int = K):
    """Embedding (tied to the lm_head through Transpose) -> up (MatMul [K,N]) -> Gemm(transB, bias) -> lm_head."""
    e = RNG.standard_normal((V, k)).astype(np.float32)
    w_up = RNG.standard_normal((k, N)).astype(np.float32)
    w_dn = RNG.standard_normal((k, N)).astype(np.float32)  # Gemm transB: stored [out=k, in=N]
    bias = RNG.standard_normal((k,)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["h", "Wup"], ["a"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Shape", ["a"], ["shp"], name="shape"),
        helper.make_node("Flatten", ["a"], ["a2"], name="flat", axis=2),
        helper.make_node(
            "Gemm", ["a2", "Wdn", "bias"], ["d2"], name="/model/layers.0/mlp/down_proj/Gemm", transB=1
        ),
        helper.make_node("Transpose", ["E"], ["Et"], name="Transpose_7", perm=[1, 0]),
        helper.make_node("MatMul", ["d2", "Et"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "s"])],
        [
            helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None),
            helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(x, n) for n, x in (("E", e), ("Wup", w_up), ("Wdn", w_dn), ("bias", bias))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return proto, e, w_up, w_dn, bias


def _run(model: ir.Model, ids: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    opts = ort.SessionOptions()
    # Keep exact fp32 math: no DQ->MatMulNBits fusion with int8 activations.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits", "h"], {"ids": ids})


@pytest.mark.parametrize(
    ("fmt", "label"), [("matmulnbits", "w4-g32-sym"), ("matmulnbits", "w8-g16-asym"), ("qdq", "w4-g32-asym")]
)
def test_rewrite_matches_dequantized_reference(fmt, label):
    proto, e, w_up, w_dn_nk, bias = _graph()
    model = ir.serde.deserialize_model(proto)
    scheme = QuantScheme.parse(label, format=fmt)
    report = find_weight_sites(model, quantize_lm_head=True)
    assert [s.name for s in report.sites] == [
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "lm_head",
    ]
    packer = get_packer(fmt)
    weights = {"model.layers.0.mlp.up_proj": w_up.T, "model.layers.0.mlp.down_proj": w_dn_nk, "lm_head": e}
    qws = {name: _rtn(np.ascontiguousarray(w), scheme) for name, w in weights.items()}
    rewrites = [SiteRewrite(s, packer.pack(qws[s.name]), packer) for s in report.sites]
    result = ReplaceWeightSitesPass(rewrites)(model)
    assert result.modified

    ops = [n.op_type for n in model.graph]
    assert "Transpose" not in ops
    assert ops.count("MatMulNBits" if fmt == "matmulnbits" else "DequantizeLinear") == 3
    inits = set(model.graph.initializers)
    assert "E" in inits, "the tied embedding table must stay for the Gather"
    assert "Wup" not in inits and "Wdn" not in inits
    assert [v.name for v in model.graph.outputs] == ["logits", "h"]
    if fmt == "qdq":
        assert model.opset_imports[""] == 21 and model.ir_version >= 10
    else:
        assert model.opset_imports["com.microsoft"] == 1 and model.opset_imports[""] == 18

    ids = RNG.integers(0, V, (2, 5))
    logits, h = _run(model, ids)
    ref_h = e[ids]
    np.testing.assert_array_equal(h, ref_h)
    a = ref_h @ qws["model.layers.0.mlp.up_proj"].dequantize().T
    d = a.reshape(-1, N) @ qws["model.layers.0.mlp.down_proj"].dequantize().T + bias
    ref = d @ qws["lm_head"].dequantize().T
    # Logits reach ~1e3 here: float32 sums in another order differ by ~1e-5 of the largest, not of each value.
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize(("label", "k"), [("w8-g32-sym", 64), ("w4-g32-asym", 64), ("w8-g32-sym", 48)])
def test_tied_embedding_shares_the_heads_packed_arrays(label, k):
    """share_embeddings: the Gather of the tied table becomes a GatherBlockQuantized over the head's own
    B/scales/zero points (no float table, no second copy); a row not filling whole blocks is sliced."""
    proto, e, *_ = _graph(k)
    model = ir.serde.deserialize_model(proto)
    (head,) = [s for s in find_weight_sites(model, quantize_lm_head=True).sites if s.kind == "lm_head"]
    packer = get_packer("matmulnbits")
    qw = _rtn(e, QuantScheme.parse(label))
    rewrite = ReplaceWeightSitesPass([SiteRewrite(head, packer.pack(qw), packer)], share_embeddings=True)
    rewrite(model)
    ops = [n.op_type for n in model.graph]
    assert "Gather" not in ops and ops.count("GatherBlockQuantized") == 1
    assert "E" not in model.graph.initializers
    assert sum(v.const_value.dtype == ir.DataType.UINT8 and v.const_value.size >= V * k // 2
               for v in model.graph.initializers.values()) == 1  # fmt: skip
    assert rewrite.shared == [{"table": "E", "node": "/model/embed_tokens/Gather", "shared_with": "lm_head",
                               "bits": qw.scheme.bits, "block_size": 32}]  # fmt: skip
    ids = RNG.integers(0, V, (2, 5))
    _, h = _run(model, ids)
    assert h.shape == (2, 5, k)
    np.testing.assert_allclose(h, qw.dequantize()[ids], rtol=1e-6, atol=1e-6)


def test_untied_transpose_and_weight_are_removed():
    w = RNG.standard_normal((N, K)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], name="/model/layers.0/T"),
        helper.make_node("MatMul", ["x", "Wt"], ["y"], name="/model/layers.0/mlp/up_proj/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", N])],
        [numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    (site,) = find_weight_sites(model).sites
    scheme = QuantScheme.parse("w4-g64")
    packer = get_packer("matmulnbits")
    qw = _rtn(w, scheme)
    ReplaceWeightSitesPass([SiteRewrite(site, packer.pack(qw), packer)])(model)
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    assert "W" not in model.graph.initializers
    x = RNG.standard_normal((3, K)).astype(np.float32)
    sess = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ qw.dequantize().T, rtol=1e-4, atol=1e-4)


def test_min_ir_version():
    assert min_ir_version(18) == 8 and min_ir_version(21) == 10 and min_ir_version(25) == 12
