"""Sensitivity probes through onnxruntime on tiny Optimum exports."""

from __future__ import annotations

import numpy as np
import pytest

from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.pipeline import prepare_sites
from optimum.adaround.graph_passes.predict import probe
from optimum.adaround.graph_passes.predict.estimate import estimate_errors
from optimum.adaround.graph_passes.predict.units import LOOKUP, lookup_error, units_of
from optimum.adaround.graph_passes.rounding.base import method_config


def _setup(folder, n=4, t=16):
    loaded = load_model(str(folder))
    sites = prepare_sites(loaded.model, quantize_lm_head=True).sites
    vocab = max(s.n for s in sites if s.kind == "lm_head")
    ids = np.random.default_rng(0).integers(0, vocab, size=(n, t))
    errs = estimate_errors(loaded.model, sites, {}, method_config("rtn"), ids, progress=False)
    return loaded, sites, ids, errs.energy


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_every_unit_is_probed_and_the_model_is_left_as_it_was(arch, tiny_hf_onnx):
    loaded, sites, ids, energy = _setup(tiny_hf_onnx(arch))
    before = {k: np.array(v.const_value.numpy()) for k, v in loaded.model.graph.initializers.items()}
    units = units_of(sites)
    sens = probe.probe_sensitivity(
        loaded.model, sites, units, energy, ids, levels=(0.05, 0.5), progress=False
    )
    lookup = [(LOOKUP,)] if arch == "llama_tied" else []  # the tied table's lookup is probed apart
    assert [u.sites for u in sens.units] == [u.sites for u in units] + lookup
    assert all(np.isfinite(u.alpha) and np.isfinite(u.alpha_se) for u in sens.units)
    assert [p.level for p in sens.link] == [0.05, 0.5]
    assert abs(sens.link[1].delta) > abs(sens.link[0].delta)  # a random model need not sit at a minimum
    after = loaded.model.graph.initializers
    assert all(np.array_equal(before[k], after[k].const_value.numpy()) for k in before)


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_noise_fed_to_each_unit_reaches_the_model(arch, tiny_hf_onnx):
    """Overridable initializers: a unit's weights fed with large noise change the loss, including the
    output projection read through a Transpose of the tied embedding."""
    loaded, sites, ids, energy = _setup(tiny_hf_onnx(arch))
    prober = probe._Prober(loaded.model, sites, ids, ["CPUExecutionProvider"], None)
    base = prober.nll()
    by_name = {s.name: s for s in sites}
    rng = np.random.default_rng(0)
    for unit in units_of(sites):
        noise = probe._noise(prober, [by_name[n] for n in unit.sites], energy, 4.0, rng)
        plus = prober.nll({k: prober.weights[k] + d for k, d in noise.items()})
        assert np.abs(plus - base).max() > 1e-4, unit.name


def test_a_trained_models_units_lose_loss_to_noise():
    """SmolLM2 (trained): noise on its first blocks' units raises the loss (in sum: one unit's estimate from
    256 tokens may fall either side of a small value), and more noise raises it more."""
    from optimum.adaround.data.default_model import default_onnx_dir

    loaded = load_model(str(default_onnx_dir()))
    sites = [s for s in prepare_sites(loaded.model).sites if s.layer in (0, 1)]
    from optimum.adaround.data.text import calibration_token_ids

    ids = calibration_token_ids(loaded.folder, None, 4, 64, seed=0)
    energy = estimate_errors(loaded.model, sites, {}, method_config("rtn"), ids, progress=False).energy
    sens = probe.probe_sensitivity(
        loaded.model, sites, units_of(sites), energy, ids, levels=(0.02, 0.2), progress=False
    )
    assert len(sens.units) == 8 and sum(u.alpha for u in sens.units) > 0
    assert sens.link[1].delta > sens.link[0].delta > 0


def test_the_two_sided_response_is_second_order(tiny_hf_onnx):
    """Same noise pattern at t and t/4: the response per unit of t stays about the same (no first-order
    term, which would make it grow as 1/sqrt(t))."""
    loaded, sites, ids, energy = _setup(tiny_hf_onnx("llama"), n=6, t=24)
    prober = probe._Prober(loaded.model, sites, ids, ["CPUExecutionProvider"], None)
    base = prober.nll()
    pattern = probe._noise(prober, sites, energy, 1.0, np.random.default_rng(1))
    per_t = []
    for t in (0.02, 0.005):
        scaled = {k: (d * np.float32(np.sqrt(t))).astype(d.dtype) for k, d in pattern.items()}
        per_t.append(probe._response(prober, base, scaled).mean() / t)
    assert per_t[0] > 0 and per_t[1] > 0
    assert 0.7 < per_t[1] / per_t[0] < 1.4


def test_a_tied_table_is_probed_as_lookup_and_projection_apart(tiny_hf_onnx, monkeypatch):
    """The probe part starts after the lookup and is fed its rows: with no change it computes the model's
    loss, and a change of the table given to both halves (the projection's weight, the looked-up rows)
    is exactly the change of the one stored table."""
    loaded, sites, ids, _ = _setup(tiny_hf_onnx("llama_tied"))
    cut = probe._Prober(loaded.model, sites, ids, ["CPUExecutionProvider"], None)
    monkeypatch.setattr(probe._Lookup, "of", classmethod(lambda cls, *a: None))
    whole = probe._Prober(loaded.model, sites, ids, ["CPUExecutionProvider"], None)
    assert cut.lookup is not None and whole.lookup is None
    base = whole.nll()
    np.testing.assert_allclose(cut.nll(), base, rtol=1e-6)
    head = next(s for s in sites if s.kind == "lm_head")
    table = whole.weights[head.weight_name]
    d = (np.random.default_rng(0).standard_normal(table.shape) * 0.05 * table.std()).astype(table.dtype)
    both = probe._response(cut, base, {head.weight_name: d, LOOKUP: d[ids]})
    np.testing.assert_allclose(both, probe._response(whole, base, {head.weight_name: d}), atol=1e-5)
    alone = probe._response(cut, base, {head.weight_name: d})
    assert np.abs(alone - both).max() > 1e-4  # the projection alone leaves the lookup as it was


@pytest.mark.parametrize("kind", ["rounding", "gaussian"])
def test_lookup_noise_has_the_asked_relative_error_over_the_probe_text(kind, tiny_hf_onnx):
    loaded, sites, ids, _ = _setup(tiny_hf_onnx("llama_tied"))
    lookup = probe._Prober(loaded.model, sites, ids, ["CPUExecutionProvider"], None).lookup
    d = lookup.noise(0.03, kind, np.random.default_rng(0))
    assert d.shape == lookup.looked_up.shape
    flat, rows = lookup.looked_up.reshape(-1, d.shape[-1]), d.reshape(-1, d.shape[-1])
    assert lookup_error(flat, flat + rows, np.ones(len(flat))) == pytest.approx(0.03, rel=1e-4)


def test_int8_input_probes_measure_each_block_size(tiny_hf_onnx):
    loaded, sites, ids, _ = _setup(tiny_hf_onnx("llama_tied"))
    found = probe.probe_int8_inputs(loaded.model, sites, ids, [8, 32])
    assert sorted(found) == [8, 32]
    assert all(np.isfinite(v) and np.isfinite(se) and se >= 0 for v, se in found.values())
    assert found[8] != found[32]  # the rounding differs with the block, so does the loss
    assert probe.probe_int8_inputs(loaded.model, sites, ids, []) == {}


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_a_switchable_prober_is_the_float_and_the_int8_prober_in_one_session(arch, tiny_hf_onnx):
    """Gate 0: the float model's losses; gate 1: those of a prober built with the inputs rounded; the
    first sequences alone: the first values of the full run, noise on the tied lookup included."""
    loaded, sites, ids, energy = _setup(tiny_hf_onnx(arch))
    cpu = ["CPUExecutionProvider"]
    both = probe._Prober(loaded.model, sites, ids, cpu, None, 8, switchable=True)
    plain = probe._Prober(loaded.model, sites, ids, cpu, None)
    rounded = probe._Prober(loaded.model, sites, ids, cpu, None, 8)
    np.testing.assert_allclose(both.nll(int8=False), plain.nll(), rtol=1e-6)
    np.testing.assert_allclose(both.nll(), rounded.nll(), rtol=1e-5)
    assert np.abs(rounded.nll() - plain.nll()).max() > 1e-6  # the rounding is there to switch
    noise = probe._noise(both, sites, energy, 1.0, np.random.default_rng(0))
    fed = {k: d if k == LOOKUP else both.weights[k] + d for k, d in noise.items()}
    np.testing.assert_allclose(both.nll(fed, sequences=2), both.nll(fed)[:8], rtol=1e-5)
