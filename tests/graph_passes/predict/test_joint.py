"""The joint probe (one configuration's prediction) on tiny Optimum exports."""

from __future__ import annotations

import numpy as np
import pytest

from optimum.adaround import quantize
from optimum.adaround.api import run_config
from optimum.adaround.graph_passes.model_io import load_model, read_weight
from optimum.adaround.graph_passes.pipeline import plan_schemes, prepare_sites
from optimum.adaround.graph_passes.predict import joint
from optimum.adaround.graph_passes.predict.probe import _Prober
from optimum.adaround.graph_passes.predict.units import LOOKUP
from optimum.adaround.graph_passes.rounding.base import method_config
from optimum.adaround.graph_passes.rounding.rtn import nearest_error

CPU = ["CPUExecutionProvider"]


def _setup(folder, n=6, t=24, **options):
    loaded = load_model(str(folder))
    cfg = run_config(None, **options)
    sites = prepare_sites(loaded.model, quantize_lm_head=cfg.selection.quantize_lm_head).sites
    _, schemes = plan_schemes(cfg, sites)
    vocab = max(s.n for s in sites if s.kind == "lm_head")
    ids = np.random.default_rng(0).integers(0, vocab, size=(n, t))
    return loaded, sites, {s.name: schemes[s.name] for s in sites}, ids


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_round_to_nearest_predicts_the_quantized_models_loss_on_the_probe_text(arch, tiny_hf_onnx, tmp_path):
    """For round to nearest the joint probe is the quantized model itself on the probe sequences: the
    written MatMulNBits model (accuracy_level 0, float products) loses what the prediction says."""
    src = tiny_hf_onnx(arch)
    options = {"method": "rtn", "scheme": "w2-g16-asym", "accuracy_level": 0, "embeddings": "none"}
    loaded, sites, schemes, ids = _setup(src, **options)
    found = joint.predict_joint(loaded.model, sites, schemes, method_config("rtn"), ids)
    out = quantize(str(src), str(tmp_path / "q"), progress=False, **options)
    written = load_model(str(out))
    probed = ids[: joint.JOINT_SEQUENCES]
    base = _Prober(loaded.model, [], probed, CPU, loaded.directory).nll()
    lost = float((_Prober(written.model, [], probed, CPU, written.directory).nll() - base).mean())
    assert abs(lost) > 1e-3  # 2 bits move the loss
    assert found.delta == pytest.approx(lost, rel=1e-3, abs=1e-5)
    assert found.factor == 1.0 and found.seconds["estimate"] < 0.01  # no statistics pass


def test_a_calibrated_method_is_predicted_from_its_sampled_errors(tiny_hf_onnx):
    """gptq: the sampled sites keep the method's own errors (fed as they are), with their ratios to round
    to nearest, the lookup's ratio and a finite factor."""
    loaded, sites, schemes, ids = _setup(tiny_hf_onnx("llama_tied"), method="gptq", scheme="w2-g16-asym")
    gptq = method_config("gptq")
    sample = joint.sample_method(loaded.model, sites, schemes, gptq, ids)
    head = next(s for s in sites if s.kind == "lm_head")
    assert head.n <= joint.WIDE_ROWS  # a small vocabulary: the head is rounded whole too
    assert set(sample.errors) == {s.name for s in sites}  # two blocks: both sampled
    assert all(0 < r < 1.5 for r in sample.site_ratios.values())  # gptq below or near round to nearest
    assert sample.lookup_ratio > 0
    prober = _Prober(loaded.model, sites, ids, CPU, loaded.directory)
    q = sites[0]
    fed = joint.joint_change(prober, loaded.model, sites, schemes, sample, factor=3.0, only={q.name})
    stored = fed[q.weight_name] if q.transposed else fed[q.weight_name].T
    np.testing.assert_array_equal(stored, sample.errors[q.name])  # its own error: no ratio, no factor
    found = joint.predict_joint(loaded.model, sites, schemes, gptq, ids)
    assert np.isfinite(found.delta) and found.delta_se > 0 and np.isfinite(found.factor) and found.factor > 0
    assert {key.split("/")[0] for key in found.ratios} == {x.label for x in schemes.values()}  # 8-bit head


def test_the_change_scales_round_to_nearest_by_the_ratio_and_factor(tiny_hf_onnx):
    """Outside the sampled blocks a site's change is round to nearest's error times sqrt(factor * ratio),
    in the stored layout; the tied table's looked-up rows move with the lookup ratio."""
    loaded, sites, schemes, ids = _setup(tiny_hf_onnx("llama_tied"), method="gptq", scheme="w4-g16")
    prober = _Prober(loaded.model, sites, ids, CPU, loaded.directory)
    head = next(s for s in sites if s.kind == "lm_head")
    sample = joint.MethodSample({}, {head.name: 0.25}, {(schemes[sites[0].name].label, "q_proj"): 0.5}, 4.0)
    change = joint.joint_change(prober, loaded.model, sites, schemes, sample, factor=2.0)
    q = sites[0]
    near = nearest_error(read_weight(loaded.model, q), schemes[q.name])
    stored = change[q.weight_name] if q.transposed else change[q.weight_name].T
    np.testing.assert_allclose(stored, near * np.sqrt(2.0 * 0.5), rtol=1e-5, atol=1e-7)
    near_head = nearest_error(read_weight(loaded.model, head), schemes[head.name])
    rows = near_head[prober.lookup.index][prober.lookup.inverse]
    np.testing.assert_allclose(change[LOOKUP], rows * 2.0, rtol=1e-5, atol=1e-7)  # sqrt(4.0)
