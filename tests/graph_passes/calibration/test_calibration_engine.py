"""The calibration engine against an independent oracle: X^T X of activations fetched from the full model
run in onnxruntime (with, for the sequential checks, earlier blocks' weights replaced by hand)."""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import weight_sites

from optimum.adaround.graph_passes.calibration import engine
from optimum.adaround.graph_passes.calibration.engine import (
    CalibrationOptions,
    resolve_providers,
    run_calibration,
)
from optimum.adaround.graph_passes.errors import CalibrationError, InvalidOptionError
from optimum.adaround.graph_passes.records import QuantizedWeight, WeightSite
from optimum.adaround.graph_passes.rounding.grid import blockwise_minmax, codes_from_weight, grid_params
from optimum.adaround.graph_passes.scheme import QuantScheme
from optimum.adaround.graph_passes.tune.block import TuneSettings
from optimum.adaround.graph_passes.tune.torch_graph import TorchGraph

W2 = QuantScheme(bits=2, group_size=16, symmetric=False)


def rtn(w: np.ndarray, scheme: QuantScheme = W2) -> QuantizedWeight:
    lo, hi = blockwise_minmax(w, scheme)
    scales, zps = grid_params(lo, hi, scheme)
    return QuantizedWeight(codes_from_weight(w, scales, zps, scheme), scales, zps, scheme)


def weight_nk(model: ir.Model, site: WeightSite) -> np.ndarray:
    return model.graph.initializers[site.weight_name].const_value.numpy().T.copy()


def llama_feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Written out by hand (not with the engine's feeds module): tiny Llama, 2 layers, 2 kv heads of 16."""
    b, t = ids.shape
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((b, t), np.int64),
        "position_ids": np.tile(np.arange(t, dtype=np.int64), (b, 1)),
    }
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((b, 2, 0, 16), np.float32)
    return feeds


def reference_hessians(
    model: ir.Model,
    activations: list[str],
    feeds: dict[str, np.ndarray],
    replace: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """sum X^T X (float64) of each activation, fetched from the full model in one onnxruntime run."""
    proto = ir.to_proto(model)
    for init in proto.graph.initializer:
        if replace and init.name in replace:
            init.CopyFrom(onnx.numpy_helper.from_array(replace[init.name], init.name))
    for a in activations:
        proto.graph.output.append(onnx.ValueInfoProto(name=a))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(activations, feeds)
    xs = [x.reshape(-1, x.shape[-1]).astype(np.float64) for x in outs]
    return {a: x.T @ x for a, x in zip(activations, xs, strict=True)}


class Recorder:
    """on_block that keeps copies of the stats and returns given quantized weights (default: none)."""

    def __init__(self, quantize=None) -> None:
        self.calls: list[list[str]] = []
        self.hessians: dict[str, np.ndarray] = {}
        self.n_tokens: dict[str, int] = {}
        self.shared: list[bool] = []
        self.quantize = quantize
        self.returned: dict[str, QuantizedWeight] = {}

    def __call__(self, sites, stats):
        self.calls.append([s.name for s in sites])
        by_act: dict[str, object] = {}
        for s in sites:
            self.hessians[s.name] = stats[s.name].hessian.copy()
            self.n_tokens[s.name] = stats[s.name].n_tokens
            self.shared.append(by_act.setdefault(s.activation, stats[s.name]) is stats[s.name])
        if self.quantize is None:
            return {}
        out = {s.name: qw for s in sites if (qw := self.quantize(s)) is not None}
        self.returned.update(out)
        return out


@pytest.fixture()
def ids() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (5, 12), dtype=np.int64)


def test_one_pass_matches_full_model_oracle(tiny_llama, ids):
    sites = weight_sites(tiny_llama)
    rec = Recorder()
    report = run_calibration(tiny_llama, sites, ids, rec, sequential=False, batch_size=2, progress=False)
    ref = reference_hessians(tiny_llama, sorted({s.activation for s in sites}), llama_feeds(ids))
    assert rec.calls == [[s.name for s in sites]]
    for s in sites:
        np.testing.assert_allclose(rec.hessians[s.name], ref[s.activation], rtol=1e-6, atol=1e-9)
        assert rec.n_tokens[s.name] == ids.size
    assert all(rec.shared)  # q/k/v and gate/up share one SiteStats object
    assert report.n_tokens == ids.size and report.n_activations == 8


def test_sequential_without_substitution_equals_one_pass(tiny_llama, ids):
    sites = weight_sites(tiny_llama)
    one, seq = Recorder(), Recorder()
    run_calibration(tiny_llama, sites, ids, one, sequential=False, batch_size=3, progress=False)
    report = run_calibration(tiny_llama, sites, ids, seq, sequential=True, batch_size=3, progress=False)
    # one call per decoder block, in order, each with exactly that block's sites
    assert seq.calls == [[s.name for s in sites if s.layer == i] for i in (0, 1)]
    for s in sites:
        np.testing.assert_allclose(seq.hessians[s.name], one.hessians[s.name], rtol=1e-6, atol=1e-9)
    assert [p.label for p in report.parts] == ["prologue", "block 0", "block 1"]  # epilogue not needed
    assert report.peak_cache_bytes > 0


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["whole", "row-by-row"])
def test_sequential_sees_quantized_earlier_blocks(tiny_llama, ids, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:  # the dequantized weights are written to their file a row at a time
        monkeypatch.setattr(engine, "DEQUANT_CHUNK_BYTES", chunk_bytes)
    sites = weight_sites(tiny_llama)
    before = {s.weight_name: weight_nk(tiny_llama, s) for s in sites}
    fp, q = Recorder(), Recorder(lambda s: rtn(weight_nk(tiny_llama, s)))
    run_calibration(tiny_llama, sites, ids, fp, progress=False, batch_size=2)
    report = run_calibration(tiny_llama, sites, ids, q, progress=False, batch_size=2)
    assert report.n_quantized == len(sites)

    block0 = [s for s in sites if s.layer == 0]
    block1 = [s for s in sites if s.layer == 1]
    replaced = {s.weight_name: q.returned[s.name].dequantize().T.copy() for s in block0}
    ref = reference_hessians(tiny_llama, [s.activation for s in block1], llama_feeds(ids), replaced)
    for s in block0:  # block 0 reads the fp prologue: unchanged
        np.testing.assert_allclose(q.hessians[s.name], fp.hessians[s.name], rtol=1e-6, atol=1e-9)
    for s in block1:
        h_fp, h_q = fp.hessians[s.name], q.hessians[s.name]
        assert np.abs(h_q - h_fp).max() > 1e-2 * np.abs(h_fp).max()
        np.testing.assert_allclose(h_q, ref[s.activation], rtol=1e-6, atol=1e-6 * np.abs(h_fp).max())
    # the caller's model is untouched
    for s in sites:
        np.testing.assert_array_equal(weight_nk(tiny_llama, s), before[s.weight_name])


def test_handmade_graph_with_lm_head_in_epilogue(handmade):
    sites = weight_sites(handmade, lm_head=True)
    assert [s.name for s in sites][-1] == "lm_head"
    ids = np.random.default_rng(2).integers(0, 16, (3, 7), dtype=np.int64)
    one = Recorder()
    run_calibration(handmade, sites, ids, one, sequential=False, batch_size=2, progress=False)
    ref = reference_hessians(handmade, [s.activation for s in sites], {"input_ids": ids})
    for s in sites:
        np.testing.assert_allclose(one.hessians[s.name], ref[s.activation], rtol=1e-6)

    q = Recorder(lambda s: rtn(weight_nk(handmade, s)))
    report = run_calibration(handmade, sites, ids, q, batch_size=2, progress=False)
    assert q.calls == [
        ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
        ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"],
        ["lm_head"],
    ]
    replaced = {s.weight_name: q.returned[s.name].dequantize().T.copy() for s in sites if s.layer is not None}
    ref_q = reference_hessians(handmade, [sites[-1].activation], {"input_ids": ids}, replaced)
    np.testing.assert_allclose(q.hessians["lm_head"], ref_q[sites[-1].activation], rtol=1e-6)
    assert report.parts[-1].label == "epilogue" and report.parts[-1].requant_s == 0.0


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["whole", "row-by-row"])
def test_transposed_site_substitution(handmade, chunk_bytes, monkeypatch):
    """A site stored [N, K] (transposed=True) gets its dequantized weight back without transposing."""
    if chunk_bytes is not None:
        monkeypatch.setattr(engine, "DEQUANT_CHUNK_BYTES", chunk_bytes)
    proto = ir.to_proto(handmade)
    # store block 0's up weight as [N, K] behind a Transpose, as Gemm(transB) and tied heads do
    w_kn = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w_up0"))
    for init in proto.graph.initializer:
        if init.name == "w_up0":
            init.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(w_kn.T), "w_up0_nk"))
    proto.graph.node.insert(0, onnx.helper.make_node("Transpose", ["w_up0_nk"], ["w_up0"], name="T0"))
    model = ir.from_proto(proto)
    up0, _, _, down1 = weight_sites(handmade)
    up0_t = WeightSite(**{**up0.__dict__, "weight_name": "w_up0_nk", "transposed": True})
    qw = rtn(np.ascontiguousarray(w_kn.T))
    rec = Recorder(lambda s: qw if s.name == up0_t.name else None)
    ids = np.random.default_rng(3).integers(0, 16, (2, 5), dtype=np.int64)
    run_calibration(model, [up0_t, down1], ids, rec, progress=False)
    assert rec.calls == [[up0_t.name], [down1.name]]
    replaced = {"w_up0": np.ascontiguousarray(qw.dequantize().T)}
    ref = reference_hessians(handmade, [down1.activation], {"input_ids": ids}, replaced)
    np.testing.assert_allclose(rec.hessians[down1.name], ref[down1.activation], rtol=1e-6)


def test_nan_activation_is_named(handmade):
    embed = handmade.graph.initializers["embed"].const_value.numpy().copy()
    embed[0, 3] = np.nan
    handmade.graph.initializers["embed"].const_value = ir.tensor(embed)
    sites = weight_sites(handmade)
    with pytest.raises(CalibrationError, match="'h0' contains NaN or Inf"):
        run_calibration(handmade, sites, np.zeros((1, 4), np.int64), Recorder(), progress=False)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (np.zeros((0, 8), np.int64), "empty"),
        (np.zeros((2, 1), np.int64), "too short"),
        (np.zeros(8, np.int64), "2-D"),
        (np.zeros((2, 4), np.float32), "integers"),
    ],
)
def test_bad_token_ids(handmade, ids, match):
    with pytest.raises(CalibrationError, match=match):
        run_calibration(handmade, weight_sites(handmade), ids, Recorder(), progress=False)


def test_options_record_and_keywords_are_one_configuration(handmade):
    """A CalibrationOptions record, keywords over it, and keywords alone run the same calibration."""
    sites = weight_sites(handmade)
    ids = np.random.default_rng(5).integers(0, 16, (3, 6), dtype=np.int64)
    opts = CalibrationOptions(sequential=False, batch_size=2, progress=False)
    runs = [Recorder(), Recorder(), Recorder()]
    reports = [
        run_calibration(handmade, sites, ids, runs[0], opts),
        run_calibration(
            handmade,
            sites,
            ids,
            runs[1],
            CalibrationOptions(batch_size=5),
            sequential=False,
            batch_size=2,
            progress=False,
        ),
        run_calibration(handmade, sites, ids, runs[2], sequential=False, batch_size=2, progress=False),
    ]
    assert [(r.sequential, r.batch_size) for r in reports] == [(False, 2)] * 3
    for rec in runs[1:]:
        assert rec.calls == runs[0].calls
        for name, h in runs[0].hessians.items():
            np.testing.assert_array_equal(rec.hessians[name], h)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"fp_target": True}, InvalidOptionError, "no option 'fp_target'; accepted: sequential, batch_size"),
        ({"batch_size": 0}, InvalidOptionError, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, InvalidOptionError, "batch_size must be an integer >= 1, got 2.5"),
        ({"providers": "CPUExecutionProvider"}, InvalidOptionError, "list of execution provider names"),
        ({"hessian_precision": "float16"}, InvalidOptionError, "use 'float64' or 'float32'"),
    ],
)
def test_bad_options_are_one_line_errors(handmade, options, error, match):
    rec = Recorder()
    with pytest.raises(error, match=re.escape(match)):
        run_calibration(handmade, weight_sites(handmade), np.zeros((1, 4), np.int64), rec, **options)
    assert rec.calls == []  # refused before any work


def test_bad_sites_are_named(handmade):
    sites = weight_sites(handmade)
    ids = np.zeros((1, 4), np.int64)
    with pytest.raises(
        CalibrationError, match=re.escape("duplicate names, e.g. 'model.layers.0.mlp.up_proj'")
    ):
        run_calibration(handmade, [sites[0], *sites], ids, Recorder(), progress=False)
    with pytest.raises(CalibrationError, match="no weight sites"):
        run_calibration(handmade, [], ids, Recorder(), progress=False)
    gone = WeightSite(**{**sites[0].__dict__, "node_name": "/model/layers.0/missing/MatMul"})
    with pytest.raises(
        CalibrationError, match=re.escape("node '/model/layers.0/missing/MatMul' is not in the model")
    ):
        run_calibration(handmade, [gone], ids, Recorder(), progress=False)


def test_unavailable_provider_falls_back_to_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        chosen = resolve_providers(("NoSuchExecutionProvider", "CPUExecutionProvider"))
    assert chosen == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider" in caplog.text


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gpt2", "llama_tied"])
def test_optimum_architectures(tiny_hf_onnx, arch):
    """Feeds, block split and sequential substitution on each Optimum export (GPT-2: Gemm, Phi-3: fused
    qkv/gate_up, tied head: MatMul(Transpose(embed))), with the project's own weight-site discovery."""
    from optimum.adaround.graph_passes.sites import find_weight_sites

    model = ir.load(tiny_hf_onnx(arch) / "model.onnx")
    sites = find_weight_sites(model, quantize_lm_head=True).sites
    assert sites[-1].kind == "lm_head"
    ids = np.random.default_rng(4).integers(0, 320, (3, 9), dtype=np.int64)
    one, fp = Recorder(), Recorder()
    run_calibration(model, sites, ids, one, sequential=False, batch_size=2, progress=False)
    report = run_calibration(model, sites, ids, fp, batch_size=2, progress=False)
    assert [c[0].split(".")[-1] for c in fp.calls][-1] == "lm_head"
    assert len(fp.calls) == 3  # block 0, block 1, epilogue
    for s in sites:
        np.testing.assert_allclose(fp.hessians[s.name], one.hessians[s.name], rtol=1e-6, atol=1e-9)

    def rtn_site(s: WeightSite) -> QuantizedWeight:
        w = model.graph.initializers[s.weight_name].const_value.numpy()
        return rtn(np.ascontiguousarray(w if s.transposed else w.T))

    q = Recorder(rtn_site)
    report = run_calibration(model, sites, ids, q, batch_size=2, progress=False)
    assert report.n_quantized == len(sites)
    last = sites[-1]  # the head reads the final norm of the quantized stack
    assert (
        np.abs(q.hessians[last.name] - fp.hessians[last.name]).max()
        > 1e-3 * np.abs(fp.hessians[last.name]).max()
    )


def test_float32_hessian_precision(tiny_llama, ids):
    sites = weight_sites(tiny_llama)
    f64, f32 = Recorder(), Recorder()
    run_calibration(tiny_llama, sites, ids, f64, sequential=False, progress=False)
    run_calibration(
        tiny_llama, sites, ids, f32, sequential=False, progress=False, hessian_precision="float32"
    )
    for s in sites:
        h = f64.hessians[s.name]
        assert f32.hessians[s.name].dtype == np.float64
        np.testing.assert_allclose(f32.hessians[s.name], h, rtol=0, atol=1e-5 * np.abs(h).max())
    with pytest.raises(InvalidOptionError, match="precision 'float16'"):
        run_calibration(tiny_llama, sites, ids, f32, progress=False, hessian_precision="float16")


def test_callback_results_are_checked(handmade):
    from optimum.adaround.graph_passes.errors import InternalError

    sites = weight_sites(handmade)
    ids = np.zeros((1, 4), np.int64)
    stray = Recorder(lambda s: None)
    with pytest.raises(InternalError, match="not in this block"):
        run_calibration(
            handmade, sites, ids, lambda b, st: {"nope": rtn(np.ones((4, 16), np.float32))}, progress=False
        )
    with pytest.raises(InternalError, match="expected"):
        run_calibration(
            handmade, sites, ids, lambda b, st: {b[0].name: rtn(np.ones((4, 16), np.float32))}, progress=False
        )
    run_calibration(handmade, sites, ids, stray, progress=False)  # returning nothing keeps fp weights
    assert len(stray.calls) == 2


@pytest.mark.slow
def test_smollm2_sequential_smoke():
    """The real model: a short sequential pass gives finite, symmetric H with positive diagonals everywhere."""
    from optimum.adaround.data.default_model import default_onnx_dir
    from optimum.adaround.graph_passes.sites import find_weight_sites

    try:
        folder = default_onnx_dir()
    except CalibrationError:  # pragma: no cover
        raise
    except Exception as e:  # the default model's package is optional
        pytest.skip(f"default model unavailable: {e}")
    model = ir.load(folder / "model.onnx")
    sites = find_weight_sites(model).sites
    ids = np.random.default_rng(0).integers(0, 49152, (2, 64), dtype=np.int64)
    rec = Recorder()
    report = run_calibration(model, sites, ids, rec, batch_size=2, progress=False)
    assert len(rec.calls) == 30 and report.n_activations == 120
    for s in sites:
        h = rec.hessians[s.name]
        assert np.isfinite(h).all() and np.allclose(h, h.T) and (np.diag(h) > 0).all()
        assert rec.n_tokens[s.name] == ids.size


def test_first_position_statistics():
    """[batch, seq, K] activations also give sum x_0^T x_0 over each sequence's first position."""
    from optimum.adaround.graph_passes.calibration.stats import HessianAccumulator
    from optimum.adaround.graph_passes.rounding.base import (
        FIRST_POSITION,
        FIRST_POSITION_TOKENS,
        first_position_hessian,
    )

    site = WeightSite("l0.up", "n", "MatMul", "w", k=6, n=4, transposed=False, activation="a", layer=0)
    acc = HessianAccumulator([site])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((b, 5, 6)).astype(np.float32) for b in (3, 2)]
    for x in xs:
        acc.add("a", x)
    st = acc.by_site([site])["l0.up"]
    first = np.concatenate([x[:, 0] for x in xs]).astype(np.float64)
    np.testing.assert_array_equal(st.extra[FIRST_POSITION], first)  # the rows, in order
    np.testing.assert_allclose(first_position_hessian(st), first.T @ first, rtol=1e-12)
    assert int(st.extra[FIRST_POSITION_TOKENS]) == 5 and st.n_tokens == 25
    flat = HessianAccumulator([site])
    flat.add("a", xs[0].reshape(-1, 6))  # no sequence axis: nothing to split
    assert FIRST_POSITION not in flat.by_site([site])["l0.up"].extra


def _token_error(out: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(np.sum((out - target) ** 2, -1) / np.sum(target**2, -1)))


def test_block_tuning_targets_the_float_model_or_the_float_block(tiny_llama):
    """With float targets, a block's error is measured against what the float model computes there (so
    block 1's includes block 0's error); otherwise against the float block on the quantized inputs."""
    ids = np.random.default_rng(3).integers(0, 256, (4, 12), dtype=np.int64)
    sites = weight_sites(tiny_llama)
    plan = engine.plan_parts(tiny_llama.graph)
    hidden = [p.outputs[0] for p in plan.parts if p.label.startswith("block")]
    sub = engine.extract_part(tiny_llama, [v.name for v in tiny_llama.graph.inputs], hidden, name="oracle")
    graph = TorchGraph(sub.graph)
    feeds = {k: torch.from_numpy(v) for k, v in llama_feeds(ids).items() if k in graph.inputs}
    errors = {}
    for float_targets in (False, True):
        q = Recorder(lambda s: rtn(weight_nk(tiny_llama, s)))
        settings = TuneSettings(steps=0, float_targets=float_targets, first_weight=1.0)
        report = run_calibration(tiny_llama, sites, ids, q, progress=False, batch_size=2, tune=settings)
        errors[float_targets] = [p.tune["error_before"] for p in report.parts if p.tune]
    quantized = {s.weight_name: torch.from_numpy(q.returned[s.name].dequantize().T.copy()) for s in sites}
    with torch.no_grad():
        fp = [t.numpy() for t in graph.run(feeds)]
        qd = [t.numpy() for t in graph.run(feeds, quantized)]
    assert errors[True][0] == pytest.approx(errors[False][0], rel=1e-6)  # block 0 reads the float prologue
    assert errors[True][1] > 1.5 * errors[False][1]
    assert errors[True][1] == pytest.approx(_token_error(qd[1], fp[1]), rel=1e-4)
