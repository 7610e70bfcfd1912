"""``target_bits``: per-layer-group schemes chosen by predicted loss within a size, in one pass."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from optimum.adaround import quantize
from optimum.adaround.cli import main
from optimum.adaround.evaluation import quantized_sites
from optimum.adaround.graph_passes.calibration.feeds import feed_specs, make_feeds, window_capacities
from optimum.adaround.graph_passes.errors import InvalidOptionError
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.sites import find_weight_sites

CANDIDATES = ("w2-g16-asym", "w4-g32", "w8-g32", "float")
OPTIONS = {"method": "rtn", "candidates": CANDIDATES, "embeddings": "none", "accuracy_level": 0,
           "calib_samples": 4, "seq_len": 32}  # fmt: skip


@pytest.fixture(scope="module")
def mixed(tiny_hf_onnx, tmp_path_factory):
    src = tiny_hf_onnx("llama")
    out = quantize(
        str(src), str(tmp_path_factory.mktemp("alloc") / "q"), target_bits=5.0, progress=False, **OPTIONS
    )
    return src, out


def test_allocation_stays_within_the_budget_and_mixes_schemes(mixed):
    _, out = mixed
    record = json.loads((out / "quantization_config.json").read_text())
    alloc = record["allocation"]
    packed = sum(s["packed_bytes"] for s in record["sites"])
    assert alloc["bytes"] <= alloc["budget_bytes"] == int(5.0 * alloc["weights"] // 8)
    schemes = {s["scheme"] for s in record["sites"]}
    assert len(set(alloc["units"].values())) >= 2  # a real mix, not one scheme everywhere
    assert packed + alloc["float_bytes"] == alloc["bytes"]  # what was chosen is what was written
    kept = [u for u, label in alloc["units"].items() if label == "float"]
    assert len(record["sites"]) + sum(len(u.split(",")) for u in kept) == 15
    assert schemes <= {"w2-g16-asym", "w4-g32-sym", "w8-g32-sym"}
    assert np.isfinite(alloc["predicted_delta_nll"]) and alloc["predicted_delta_nll_se"] >= 0


def test_mixed_model_computes_with_its_dequantized_weights(mixed):
    src, out = mixed
    ref = load_model(str(src)).model
    sites = {s.name: s for s in find_weight_sites(ref, quantize_lm_head=True).sites}
    found, unreadable = quantized_sites(load_model(str(out)).model)
    assert not unreadable and found
    for q in found:
        site, w = sites[q.name], q.dequantize()
        init = ref.graph.initializers[site.weight_name]
        arr = w if site.transposed else w.T
        init.const_value = ir.tensor(np.ascontiguousarray(arr, dtype=init.const_value.dtype.numpy()))
    ids = np.random.default_rng(0).integers(0, 320, size=(2, 12))
    want = _logits(ir.to_proto(ref).SerializeToString(), ref, src, ids)
    got = _logits(str(out / "model.onnx"), load_model(str(out)).model, src, ids)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def _logits(model, graph_model, folder, ids):
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    specs = feed_specs(
        graph_model.graph.inputs, folder=folder, capacities=window_capacities(graph_model.graph)
    )
    return sess.run(["logits"], make_feeds(specs, ids))[0]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--target-bits", "1.2", "below the smallest allocation"), ("--target-bits", "32", "at or above the"),
    ("--max-size", "0.05", "nothing is left for the quantized layers"),
    ("--max-size", "0.15", "below the smallest allocation"), ("--max-size", "0.6", "at or above the"),
])  # fmt: skip
def test_a_budget_out_of_reach_is_a_one_line_error(flag, value, message, tiny_hf_onnx, tmp_path, capsys):
    """The tiny model: 0.13 MB counted outside its layers, 0.38 MB of layers in float."""
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_hf_onnx("llama")), str(out), flag, value, "--method", "rtn",
            "--calib-samples", "4", "--seq-len", "32", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_target_bits_and_scheme_overrides_do_not_mix(tiny_hf_onnx, tmp_path):
    from optimum.adaround.graph_passes.config import ModuleOverride
    from optimum.adaround.graph_passes.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="target_bits chooses every layer"):
        quantize(str(tiny_hf_onnx("llama")), str(tmp_path / "q"), target_bits=4.0,
                 overrides=(ModuleOverride("mlp", "w8-g32"),), progress=False, **OPTIONS)  # fmt: skip
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("mb", [0.25, 0.35])
def test_max_size_bounds_the_written_model(mb, tiny_hf_onnx, tmp_path):
    """The model files come in at or under ``max_size``; the layers got what the rest of the model left."""
    out = tmp_path / "q"
    quantize(str(tiny_hf_onnx("llama")), str(out), max_size=mb, progress=False, **OPTIONS)
    record = json.loads((out / "quantization_config.json").read_text())
    written = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))
    assert written == record["quantized_bytes"] <= mb * 1e6
    alloc = record["allocation"]
    assert alloc["bytes"] <= alloc["budget_bytes"] < mb * 1e6
    assert written > 0.6 * mb * 1e6  # the budget is spent, not left unused


def test_a_written_model_over_max_size_is_refused():
    from optimum.adaround.api import _check_size
    from optimum.adaround.graph_passes.predict.allocate import AllocationError

    _check_size(1_000_000, 1.0)
    _check_size(5, None)
    with pytest.raises(AllocationError, match="takes 1000001 bytes, 1 over"):
        _check_size(1_000_001, 1.0)


def test_max_size_and_target_bits_do_not_mix(tiny_hf_onnx, tmp_path):
    from optimum.adaround.graph_passes.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="not both"):
        quantize(str(tiny_hf_onnx("llama")), str(tmp_path / "q"), target_bits=4.0, max_size=0.3,
                 progress=False, **OPTIONS)  # fmt: skip
    assert not (tmp_path / "q").exists()


def test_sensitivities_of_an_earlier_run_are_reused(mixed, tiny_hf_onnx, tmp_path):
    src, out = mixed
    again = quantize(str(src), str(tmp_path / "q"), target_bits=5.0, progress=False,
                     sensitivity=str(out / "quantization_config.json"), **OPTIONS)  # fmt: skip
    first = json.loads((out / "quantization_config.json").read_text())["allocation"]
    second = json.loads((again / "quantization_config.json").read_text())["allocation"]
    assert second["sensitivity"] == first["sensitivity"]
    assert second["seconds"]["probe"] < 0.05 * first["seconds"]["probe"]  # read, not probed again
    assert second["seconds"]["estimate"] < 0.05 * first["seconds"]["estimate"]  # errors kept with them too
    assert second["units"] == first["units"]
    with pytest.raises(InvalidOptionError, match="probed another model"):
        quantize(str(tiny_hf_onnx("qwen2")), str(tmp_path / "w"), target_bits=5.0, progress=False,
                 sensitivity=str(out / "quantization_config.json"), **OPTIONS)  # fmt: skip
    assert not (tmp_path / "w").exists()


def test_eval_prints_the_prediction_beside_the_measurement(mixed, capsys):
    _, out = mixed
    assert main(["eval", str(out), "--no-progress", "--max-tokens", "64", "--text", "news"]) == 0
    text = capsys.readouterr().out
    assert "perplexity " in text and "predicted       +" in text and "before the run" in text


def test_a_tied_output_projection_keeps_a_format_its_lookup_shares(tiny_hf_onnx, tmp_path):
    """3 bits run through our own op, whose codes the embedding lookup cannot read: the tied head is
    offered MatMulNBits schemes (or float) only, so no second copy of the table appears."""
    options = {**OPTIONS, "candidates": ("w3-g32", "w4-g32", "w8-g32", "float"), "embeddings": "8"}
    out = quantize(
        str(tiny_hf_onnx("llama_tied")), str(tmp_path / "q"), target_bits=4.5, progress=False, **options
    )
    record = json.loads((out / "quantization_config.json").read_text())
    head = next(label for unit, label in record["allocation"]["units"].items() if "lm_head" in unit)
    assert head in ("w4-g32-sym", "w8-g32-sym", "float")
    assert all(t["shared_with"] for t in record["embeddings"]) or head == "float"
