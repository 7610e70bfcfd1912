"""quantize_model: data-free and calibrated paths, early scheme validation, spilled packed arrays."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from optimum.adaround.graph_passes.config import QuantConfig
from optimum.adaround.graph_passes.errors import (
    CalibrationError,
    InvalidOptionError,
    NoQuantizableWeightsError,
    UnsupportedSchemeError,
)
from optimum.adaround.graph_passes.model_io import load_model, read_weight
from optimum.adaround.graph_passes.pipeline import choose_format, prepare_sites, quantize_model
from optimum.adaround.graph_passes.rounding import base
from optimum.adaround.graph_passes.rounding.base import MethodConfig, SiteStats, get_method
from optimum.adaround.graph_passes.scheme import QuantScheme, WeightFormat

RNG = np.random.default_rng(2)
K = 64


def _proto(layers: int = 2) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        for j, proj in enumerate(("up_proj", "down_proj")):
            out = f"h{i}_{j}"
            nodes.append(
                helper.make_node(
                    "MatMul", [x, f"W{i}{j}"], [out], name=f"/model/layers.{i}/mlp/{proj}/MatMul"
                )
            )
            inits.append(numpy_helper.from_array(RNG.standard_normal((K, K)).astype(np.float32), f"W{i}{j}"))
            x = out
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", K])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )


def test_rtn_pipeline_matches_method_reference():
    model = load_model(_proto()).model
    report = prepare_sites(model)
    scheme = QuantScheme.parse("w4-g32")
    rtn = get_method("rtn")
    reference = [rtn.quantize(read_weight(model, s), scheme).dequantize() for s in report.sites]
    # accuracy_level 0: MatMulNBits computes in float, so the output is the reference's up to rounding
    config = QuantConfig().with_overrides(scheme="w4-g32", method="rtn", accuracy_level=0)
    assert config.scheme.format is WeightFormat.AUTO
    result = quantize_model(model, config, sites=report, progress=False)
    with result:
        assert result.config == config.with_overrides(format="matmulnbits")  # auto chose MatMulNBits
        assert result.scheme == scheme
        assert [s.name for s in result.sites] == [s.name for s in report.sites]
        assert all("sqnr_db" in s.metrics and s.packed_bytes < s.float_bytes for s in result.sites)
        spilled = sorted(p.name for p in result.spill_dir.iterdir())
        assert len(spilled) == 2 * len(report.sites)  # B + scales per site, on disk
        assert set(result.timings) >= {"find_sites", "quantize", "rewrite", "total"}
        assert [n.op_type for n in model.graph].count("MatMulNBits") == 4
        x = RNG.standard_normal((3, K)).astype(np.float32)
        got = _session(model).run(None, {"x": x})[0]
        spill_dir = result.spill_dir
    assert not spill_dir.exists()  # close() removed the scratch folder
    ref = x
    for w in reference:
        ref = ref @ w.T
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


class _Recorder:
    """A local stand-in rounding method that records calls (tests only)."""

    calls: ClassVar[list[tuple[int, int, SiteStats | None]]] = []

    def __init__(self, config):
        self.config = config

    def quantize(self, weight, scheme, stats=None, *, site="?"):
        type(self).calls.append((*weight.shape, stats))
        return get_method("rtn").quantize(weight, scheme)


def _recorder(monkeypatch, name: str, needs: frozenset[str] = frozenset()) -> QuantConfig:
    """Register the recorder as method ``name`` (for this test only); returns a run config using it."""
    cfg = dataclasses.dataclass(frozen=True)(
        type(f"{name}Config", (MethodConfig,), {"name": name, "needs": needs, "__annotations__": {}})
    )
    monkeypatch.setitem(base.METHODS, name, cfg)
    monkeypatch.setitem(base._IMPLEMENTATIONS, cfg, _Recorder)
    _Recorder.calls = []
    return QuantConfig(method=cfg())


def test_unsupported_scheme_fails_before_any_work(monkeypatch):
    config = _recorder(monkeypatch, "recorder").with_overrides(scheme="w3-g32", format="matmulnbits")
    model = load_model(_proto()).model
    with pytest.raises(UnsupportedSchemeError, match=r"model\.layers\.0\.mlp\.up_proj \(64x64\)"):
        quantize_model(model, config, progress=False)
    assert _Recorder.calls == []
    assert [n.op_type for n in model.graph].count("MatMul") == 4  # untouched


def test_auto_format_is_matmulnbits_where_it_stores_the_scheme_else_our_op():
    def chosen(label, shapes=((64, 64),), **changes):
        scheme = QuantConfig().with_overrides(scheme=label, **changes).scheme
        return choose_format(scheme, list(shapes)).format

    assert chosen("w4-g32") is WeightFormat.MATMULNBITS
    assert chosen("w8-g128", [(4096, 11008)]) is WeightFormat.MATMULNBITS
    assert chosen("w3-g32") is WeightFormat.LOWBIT  # MatMulNBits runs 2/4/8 bits only
    assert chosen("w4-g512", [(1024, 64)]) is WeightFormat.LOWBIT  # MatMulNBits blocks are 16..256
    assert chosen("w4-g32", data_type="nf4") is WeightFormat.LOWBIT
    assert chosen("w3-g32", format="qdq") is WeightFormat.QDQ  # an explicit format is kept


def test_three_bits_default_to_our_op(monkeypatch):
    config = _recorder(monkeypatch, "recorder3").with_overrides(scheme="w3-g32")
    model = load_model(_proto()).model
    with quantize_model(model, config, progress=False) as result:
        assert result.scheme.format is WeightFormat.LOWBIT and len(_Recorder.calls) == 4
        assert {n.op_type for n in model.graph} == {"MatMulLowBit", "Identity"}


def test_method_needing_statistics_requires_tokens(monkeypatch):
    config = _recorder(monkeypatch, "needy", frozenset({"hessian"}))
    with pytest.raises(CalibrationError, match="needs calibration data"):
        quantize_model(load_model(_proto()).model, config, progress=False)
    assert _Recorder.calls == []


def test_already_quantized_and_weightless_models_are_refused(tmp_path):
    model = load_model(_proto()).model
    config = QuantConfig().with_overrides(scheme="w4-g32", method="rtn")
    with quantize_model(model, config, progress=False) as result:
        proto = ir.serde.serialize_model(result.model)
    with pytest.raises(NoQuantizableWeightsError, match="already quantized"):
        prepare_sites(load_model(proto).model)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    with pytest.raises(NoQuantizableWeightsError, match="no quantizable weight"):
        prepare_sites(load_model(helper.make_model(graph)).model)


def test_calibrated_pipeline_on_tiny_llama(tiny_hf_onnx, monkeypatch):
    """A method with ``needs`` runs the real calibration engine: per-block Hessians of the right size."""
    config = _recorder(monkeypatch, "needy_cal", frozenset({"hessian"}))
    config = config.with_overrides(scheme="w4-g32", sink_weight=1)  # every token counted once
    model = load_model(tiny_hf_onnx("llama")).model
    report = prepare_sites(model)
    ids = RNG.integers(0, 300, (4, 16))
    result = quantize_model(model, config, sites=report, token_ids=ids, progress=False)
    with result:
        assert len(result.sites) == len(report.sites) == 14
        for (n, k, stats), site in zip(_Recorder.calls, report.sites, strict=True):
            assert (n, k) == (site.n, site.k)
            assert stats is not None and stats.hessian.shape == (k, k) and stats.n_tokens == 4 * 16
        assert "MatMul" not in {n.op_type for n in model.graph if n.name and "proj" in n.name}
    assert dataclasses.asdict(result.sites[0])["name"] == "model.layers.0.self_attn.q_proj"


def test_sink_weight_reaches_only_the_qkv_projections(tiny_hf_onnx, monkeypatch):
    """sink_weight: q/k/v get the weighted statistics (one record shared by the three), the other
    sites the engine's own; weight 1 hands every site the engine's record."""
    from optimum.adaround.graph_passes.rounding.base import first_position_hessian

    config = _recorder(monkeypatch, "needy_sink", frozenset({"hessian"})).with_overrides(scheme="w4-g32")
    ids = RNG.integers(0, 300, (4, 16))
    runs = {}
    for weight in (1.0, 8.0):
        _Recorder.calls = []
        model = load_model(tiny_hf_onnx("llama")).model
        report = prepare_sites(model)
        run = config.with_overrides(sink_weight=weight)
        with quantize_model(model, run, sites=report, token_ids=ids, progress=False):
            runs[weight] = {s.name: st for s, (_, _, st) in zip(report.sites, _Recorder.calls, strict=True)}
    plain, weighted = runs[1.0], runs[8.0]
    qkv = [n for n in plain if re.search(r"\.(q|k|v)_proj$", n)]
    assert len(qkv) == 6  # 2 layers x q, k, v
    for name, st in weighted.items():
        base = plain[name]
        if name in qkv:
            first = first_position_hessian(base)
            np.testing.assert_allclose(st.hessian, base.hessian + 7.0 * first, rtol=1e-10)
            assert st.n_tokens == base.n_tokens + 7 * 4
        else:
            np.testing.assert_array_equal(st.hessian, base.hessian)
            assert st.n_tokens == base.n_tokens == 4 * 16
    layer0 = [weighted[n] for n in qkv if ".layers.0." in n]
    assert layer0[0] is layer0[1] is layer0[2]  # weighted once per shared record


def test_sink_weight_out_of_range_is_refused():
    # the config refuses it when it is built, before a model is loaded or touched
    with pytest.raises(InvalidOptionError, match=r"sink_weight=0\.5"):
        QuantConfig().with_overrides(sink_weight=0.5)


def test_output_projection_block_is_the_runs_halved_until_it_divides_k():
    from optimum.adaround.graph_passes.config import QuantConfig
    from optimum.adaround.graph_passes.pipeline import head_scheme

    run = QuantConfig()  # w4-g128, lm_head 8
    assert [head_scheme(run, k).group_size for k in (4096, 576, 64, 100)] == [128, 64, 64, 128]
    assert head_scheme(run, 576).bits == 8 and head_scheme(run, 576).symmetric
    assert head_scheme(run.with_overrides(group_size=-1), 2880).group_size == 64  # per-channel run: from 128
    assert head_scheme(run.with_overrides(lm_head="scheme"), 576) is None  # the run's own scheme
