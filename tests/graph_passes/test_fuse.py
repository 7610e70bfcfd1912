"""Sibling MatMulNBits fusion: one node over the stacked rows and a Split compute exactly what the siblings did."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from optimum.adaround.evaluation import quantized_sites
from optimum.adaround.graph_passes.fuse import FuseSiblingMatMulNBitsPass, fused_parts
from optimum.adaround.graph_passes.packing.base import get_packer
from optimum.adaround.graph_passes.rewrite import ReplaceWeightSitesPass, SiteRewrite
from optimum.adaround.graph_passes.rounding.rtn import RTN, RTNConfig
from optimum.adaround.graph_passes.scheme import QuantScheme
from optimum.adaround.graph_passes.sites import find_weight_sites

RNG = np.random.default_rng(5)
K = 96
OUTS = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "up_proj": 48}


def _quantized(labels: dict[str, str], accuracy_level: int) -> ir.Model:
    """x -> q/k/v (and up_proj on another input) -> Relu -> outputs, each weight packed as MatMulNBits."""
    nodes = [helper.make_node("Relu", ["x"], ["x2"], name="/model/layers.0/act/Relu")]
    inits, outputs = [], []
    for mod, n in OUTS.items():
        src = "x2" if mod == "up_proj" else "x"
        scope = f"/model/layers.0/{'mlp' if mod == 'up_proj' else 'self_attn'}/{mod}"
        nodes += [
            helper.make_node("MatMul", [src, f"W_{mod}"], [f"{mod}_y"], name=f"{scope}/MatMul"),
            helper.make_node("Relu", [f"{mod}_y"], [f"{mod}_out"], name=f"{scope}/Relu"),
        ]
        inits.append(numpy_helper.from_array(RNG.standard_normal((K, n)).astype(np.float32), f"W_{mod}"))
        outputs.append(helper.make_tensor_value_info(f"{mod}_out", onnx.TensorProto.FLOAT, None))
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", K])
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=8)  # fmt: skip
    model = ir.serde.deserialize_model(proto)
    packer = get_packer("matmulnbits", accuracy_level=accuracy_level)
    rewrites = []
    for site in find_weight_sites(model).sites:
        w = model.graph.initializers[site.weight_name].const_value.numpy().T
        qw = RTN(RTNConfig()).quantize(
            np.ascontiguousarray(w), QuantScheme.parse(labels.get(site.name, "w4-g32"))
        )
        rewrites.append(SiteRewrite(site, packer.pack(qw), packer))
    ReplaceWeightSitesPass(rewrites)(model)
    return model


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model).SerializeToString()
    sess = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return sess.run([f"{m}_out" for m in OUTS], {"x": x})


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_fused_siblings_give_the_same_outputs(accuracy_level):
    model = _quantized({}, accuracy_level)
    x = RNG.standard_normal((3, K)).astype(np.float32)
    before = _run(model, x)
    sites_before = {s.name: s.dequantize() for s in quantized_sites(model)[0]}
    fuse = FuseSiblingMatMulNBitsPass()
    fuse(model)
    assert fuse.fused == 1  # q/k/v read x; up_proj reads another input
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 2 and ops.count("Split") == 1
    (fused,) = [n for n in model.graph if fused_parts(n)]
    assert [r for _, r in fused_parts(fused)] == [64, 32, 32]
    assert fused.attributes["N"].value == 128
    assert not any("q_proj/MatMulNBits" in name for name in model.graph.initializers)  # no second copy
    for got, want in zip(_run(model, x), before, strict=True):
        np.testing.assert_array_equal(got, want)
    # evaluation still reads one weight per module, row for row the same
    sites_after = {s.name: s.dequantize() for s in quantized_sites(model)[0]}
    assert sites_after.keys() == sites_before.keys()
    for name, w in sites_before.items():
        np.testing.assert_array_equal(sites_after[name], w)


def test_siblings_that_differ_are_not_fused():
    model = _quantized(
        {"model.layers.0.self_attn.k_proj": "w8-g32", "model.layers.0.self_attn.v_proj": "w4-g64"}, 0
    )
    fuse = FuseSiblingMatMulNBitsPass()
    fuse(model)
    assert fuse.fused == 0
    assert [n.op_type for n in model.graph].count("MatMulNBits") == 4
