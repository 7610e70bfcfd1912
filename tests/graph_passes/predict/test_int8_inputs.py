"""The probes' model of ``accuracy_level`` 4: each quantized layer's input rounded to int8 per block."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from optimum.adaround import quantize
from optimum.adaround.evaluation import quantized_sites
from optimum.adaround.graph_passes.calibration.feeds import feed_specs, make_feeds, window_capacities
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.pipeline import prepare_sites
from optimum.adaround.graph_passes.predict.int8_inputs import input_blocks, round_site_inputs
from optimum.adaround.graph_passes.predict.law import int8_floor
from optimum.adaround.graph_passes.predict.probe import Sensitivity, UnitSensitivity
from optimum.adaround.graph_passes.predict.units import LOOKUP, SiteEnergy


def _logits(model: ir.Model, folder, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    specs = feed_specs(model.graph.inputs, folder=folder, capacities=window_capacities(model.graph))
    return sess.run(["logits"], make_feeds(specs, ids))[0]


def test_rounded_inputs_compute_what_matmulnbits_computes_at_level_4(tiny_hf_onnx, tmp_path):
    """The float model with the quantized weights and rounded inputs gives the logits of the level-4 model
    far more closely than the same model with float inputs (the level-0 model) does."""
    src = tiny_hf_onnx("llama")
    got = {}
    ids = np.random.default_rng(0).integers(0, 320, size=(2, 12))
    for level in (0, 4):
        out = tmp_path / f"level{level}"
        quantize(str(src), str(out), method="rtn", scheme="w8-g16", accuracy_level=level, embeddings="none",
                 progress=False)  # fmt: skip
        got[level] = _logits(load_model(str(out)).model, src, ids)
        found, _ = quantized_sites(load_model(str(out)).model)
    ref = load_model(str(src)).model
    sites = prepare_sites(ref, quantize_lm_head=True).sites
    by_name = {s.name: s for s in sites}
    for q in found:
        site, w = by_name[q.name], q.dequantize()
        init = ref.graph.initializers[site.weight_name]
        init.const_value = ir.tensor(np.ascontiguousarray(w if site.transposed else w.T, np.float32))
    assert round_site_inputs(ref.graph, sites, 16) == len({s.activation for s in sites})
    emulated = _logits(ref, src, ids)
    ignored = np.abs(got[4] - got[0]).max()
    assert ignored > 0  # the kernel does round its input at level 4
    assert np.abs(got[4] - emulated).max() < 0.1 * ignored


@pytest.mark.parametrize(("k", "block"), [(16, 8), (20, 8), (5, 8)])
def test_each_block_is_rounded_on_its_own_scale(k, block):
    """A one-MatMul graph: the rewritten input equals per-block ``round(x / s) * s``, ``s = max|x| / 127``,
    a shorter last block when ``block`` does not divide K."""
    from onnx import TensorProto, helper

    w = np.eye(k, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, k])],
        [helper.make_tensor("w", TensorProto.FLOAT, [k, k], w.ravel())],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    from optimum.adaround.graph_passes.records import WeightSite

    site = WeightSite("mm", "mm", "MatMul", "w", k, k, False, "x")
    assert round_site_inputs(model.graph, [site], block) == 1
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32) * np.linspace(
        0.1, 10, k, dtype=np.float32
    )
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    want = np.empty_like(x)
    for start in range(0, k, block):
        part = x[..., start : start + block]
        s = np.abs(part).max(axis=-1, keepdims=True) / 127
        want[..., start : start + block] = np.round(part / s) * s
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(y, x)


def test_input_blocks_follow_the_labels_and_the_level(tiny_hf_onnx):
    sites = prepare_sites(load_model(str(tiny_hf_onnx("llama"))).model, quantize_lm_head=True).sites
    a, b = sites[0].name, sites[1].name
    labels = {a: "w4-g32-sym", b: "float"}
    assert input_blocks(labels, sites, 4) == {a: 32}
    assert input_blocks(labels, sites, 0) == {}
    assert input_blocks({a: "w4-g-1"}, sites, 4) in ({a: sites[0].k}, {})


def _sens(int8):
    units = (UnitSensitivity("u0", ("a",), 1.0, 0.1), UnitSensitivity("u1", ("b",), 3.0, 0.1),
             UnitSensitivity(LOOKUP, (LOOKUP,), 50.0, 1.0))  # fmt: skip
    energy = {s: SiteEnergy(1.0, 1.0, 4) for s in ("a", "b", LOOKUP)}
    return Sensitivity(0.02, units, (), energy, 3.0, 100, 1.0, int8_inputs=int8)


def test_int8_floor_is_the_units_sensitivity_share_of_each_blocks_probe():
    sens = _sens({64: (0.01, 0.001), 128: (0.02, 0.002)})
    assert int8_floor(sens, {"a": 64, "b": 64})[0] == pytest.approx(0.01)
    assert int8_floor(sens, {"a": 64, "b": 128})[0] == pytest.approx(0.25 * 0.01 + 0.75 * 0.02)
    assert int8_floor(sens, {"b": 128})[0] == pytest.approx(0.75 * 0.02)
    assert int8_floor(sens, {}) == (0.0, 0.0)
    with pytest.raises(ValueError, match="block 32"):
        int8_floor(sens, {"a": 32})


def test_blocks_per_site_round_only_the_sites_named(tiny_hf_onnx):
    """A mapping of site -> block rounds the inputs of the sites it names (at their block), no other."""
    model = load_model(str(tiny_hf_onnx("llama"))).model
    sites = prepare_sites(model, quantize_lm_head=True).sites
    head = next(s for s in sites if s.kind == "lm_head")
    downs = [s for s in sites if s.name.endswith("down_proj")]
    blocks = {head.name: 32, **{s.name: 16 for s in downs}}
    assert round_site_inputs(model.graph, sites, blocks) == 1 + len(downs)
    by_node = {n.name: n for n in model.graph}

    def reads_rounded(site):
        producer = by_node[site.node_name].inputs[0].producer()
        return producer is not None and producer.name.startswith("optimum_adaround.int8_input")

    rounded = {s.name for s in sites if reads_rounded(s)}
    assert rounded == set(blocks)
