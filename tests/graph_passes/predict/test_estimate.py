"""Per-site error estimates from the float calibration pass, and packed sizes."""

from __future__ import annotations

import numpy as np
import pytest

from optimum.adaround.graph_passes.calibration.engine import run_calibration
from optimum.adaround.graph_passes.model_io import load_model, read_weight
from optimum.adaround.graph_passes.packing.base import get_packer
from optimum.adaround.graph_passes.pipeline import choose_format, prepare_sites
from optimum.adaround.graph_passes.predict.estimate import FLOAT, estimate_errors, packed_bytes, site_kind
from optimum.adaround.graph_passes.predict.units import LOOKUP, lookup_error, lookup_site
from optimum.adaround.graph_passes.rounding.base import get_method, method_config
from optimum.adaround.graph_passes.rounding.metrics import quadratic_form
from optimum.adaround.graph_passes.scheme import QuantScheme, WeightFormat


def _model(tiny_hf_onnx):
    loaded = load_model(str(tiny_hf_onnx("llama")))
    sites = prepare_sites(loaded.model, quantize_lm_head=True).sites
    vocab = max(s.n for s in sites if s.kind == "lm_head")
    return loaded.model, sites, np.random.default_rng(0).integers(0, vocab, size=(4, 16))


def _schemes(labels, sites):
    shapes = [(s.k, s.n) for s in sites]
    return {lab: choose_format(QuantScheme.parse(lab, format=WeightFormat.AUTO), shapes) for lab in labels}


def test_round_to_nearest_errors_are_exact_under_the_float_statistics(tiny_hf_onnx):
    model, sites, ids = _model(tiny_hf_onnx)
    schemes = _schemes(["w4-g16", "w3-g16"], sites)
    est = estimate_errors(model, sites, {**schemes, FLOAT: None}, method_config("rtn"), ids, progress=False)
    stats = {}
    run_calibration(model, sites, ids, lambda b, st: stats.update(st) or {}, progress=False)
    rtn = get_method("rtn")
    for site in sites:
        w = read_weight(model, site)
        h = stats[site.name].hessian
        err, sig = (
            quadratic_form(rtn.quantize(w, schemes["w3-g16"]).dequantize() - w, h),
            quadratic_form(w, h),
        )
        assert est.errors["w3-g16"][site.name] == pytest.approx(err / sig, rel=1e-5)
        assert est.errors[FLOAT][site.name] == 0.0
        assert est.energy[site.name].signal == pytest.approx(sig / stats[site.name].n_tokens, rel=1e-5)
        assert est.errors["w3-g16"][site.name] > est.errors["w4-g16"][site.name]
    assert est.ratios == {}  # round to nearest is its own estimate


def test_gptq_estimate_is_below_round_to_nearest_for_every_kind(tiny_hf_onnx):
    model, sites, ids = _model(tiny_hf_onnx)
    schemes = _schemes(["w3-g16"], sites)
    near = estimate_errors(model, sites, schemes, method_config("rtn"), ids, progress=False)
    gptq = estimate_errors(model, sites, schemes, method_config("gptq"), ids, sample_rows=8, progress=False)
    assert set(gptq.ratios["w3-g16"]) == {site_kind(s) for s in sites}
    assert all(0 < r < 1 for r in gptq.ratios["w3-g16"].values())
    own = {s.name: gptq.errors["w3-g16"][s.name] / near.errors["w3-g16"][s.name] for s in sites}
    assert all(0 < r < 1 for r in own.values())  # every site's own ratio (its rows sampled)
    pooled = [gptq.ratios["w3-g16"][site_kind(s)] for s in sites]
    assert any(abs(r - p) > 1e-3 * p for r, p in zip(own.values(), pooled, strict=True))
    first = estimate_errors(model, sites, schemes, method_config("gptq"), ids, sample_rows=8, sample_blocks=1,
                            progress=False)  # fmt: skip
    unsampled = [s for s in sites if s.layer not in (None, 0)]  # one block: the first (and the head)
    assert unsampled
    for s in unsampled:  # their kind's ratio, pooled over the sampled block
        ratio = first.ratios["w3-g16"][site_kind(s)]
        assert first.errors["w3-g16"][s.name] == pytest.approx(near.errors["w3-g16"][s.name] * ratio)


@pytest.mark.parametrize(
    "label", ["w4-g32", "w4-g64-asym", "w2-g32-asym", "w3-g32", "w8-g128", "w3-g64-asym"]
)
@pytest.mark.parametrize("shape", [(64, 48), (96, 200)])
def test_packed_bytes_match_the_packers_output(label, shape):
    k, n = shape
    scheme = _schemes([label], [type("S", (), {"k": k, "n": n})()])[label]
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    qw = get_method("rtn").quantize(w, scheme)
    options = {"accuracy_level": 4} if scheme.format is not WeightFormat.QDQ else {}
    assert packed_bytes(scheme, k, n) == get_packer(scheme.format, **options).pack(qw).nbytes


def test_a_tied_tables_lookup_error_is_that_of_its_codes_over_the_rows_read(tiny_hf_onnx):
    """Round to nearest: exactly ``lookup_error`` of the table's rows the calibration text reads, weighted
    by their counts; gptq: the same, times its own error ratio on the table's sampled rows."""
    loaded = load_model(str(tiny_hf_onnx("llama_tied")))
    model, sites = loaded.model, prepare_sites(loaded.model, quantize_lm_head=True).sites
    head = next(s for s in sites if s.kind == "lm_head")
    ids = np.random.default_rng(0).integers(0, head.n // 4, size=(4, 16))  # rows read unevenly
    schemes = _schemes(["w4-g16", "w2-g16"], sites)
    near = estimate_errors(model, sites, {**schemes, FLOAT: None}, method_config("rtn"), ids, progress=False)
    table = read_weight(model, head)
    unique, counts = np.unique(ids, return_counts=True)
    for label, scheme in schemes.items():
        rows = table[unique]
        want = lookup_error(rows, get_method("rtn").quantize(rows, scheme).dequantize(), counts)
        assert near.errors[label][LOOKUP] == pytest.approx(want, rel=1e-6)
    assert near.errors[FLOAT][LOOKUP] == 0.0
    assert near.errors["w2-g16"][LOOKUP] > near.errors["w4-g16"][LOOKUP] > 0
    gptq = estimate_errors(model, sites, schemes, method_config("gptq"), ids, progress=False)
    assert all(gptq.errors[label][LOOKUP] > 0 for label in schemes)
    untied = prepare_sites(load_model(str(tiny_hf_onnx("llama"))).model, quantize_lm_head=True).sites
    assert lookup_site(untied) is None
