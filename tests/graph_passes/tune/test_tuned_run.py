"""--tune-steps through a whole calibrated run: each decoder block tuned, recorded, and refused with rtn."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from optimum.adaround.graph_passes.config import QuantConfig
from optimum.adaround.graph_passes.errors import InvalidOptionError
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.pipeline import prepare_sites, quantize_model


def _run(model_dir, **options):
    config = QuantConfig().with_overrides(method="gptq", scheme="w2-g32", workers=1, **options)
    model = load_model(str(model_dir)).model
    ids = np.random.default_rng(0).integers(0, 300, (4, 16))
    with quantize_model(model, config, sites=prepare_sites(model), token_ids=ids, progress=False) as result:
        return result.calibration, {s.name: s for s in result.sites}


@pytest.mark.parametrize(("arch", "targets"), [("llama", "quantized"), ("gemma3_text", "float")])
def test_every_block_is_tuned_and_its_error_recorded(tiny_hf_onnx, arch, targets):
    report, sites = _run(tiny_hf_onnx(arch), tune_steps=8, tune_targets=targets)
    blocks = [p for p in report["parts"] if p["label"].startswith("block")]
    assert len(blocks) == 2
    for part in blocks:
        tune = part["tune"]
        assert tune is not None and tune["seconds"] > 0
        assert 0 < tune["error_after"] <= tune["error_before"]
    assert all(p["tune"] is None for p in report["parts"] if not p["label"].startswith("block"))
    untuned, untuned_sites = _run(tiny_hf_onnx(arch))
    assert all(p["tune"] is None for p in untuned["parts"])
    assert sites.keys() == untuned_sites.keys()


def test_float_targets_reach_the_tuner(tiny_hf_onnx, monkeypatch):
    """``tune_targets="float"`` fits block 1 to the float model's values: its error before tuning then
    includes block 0's, so it exceeds the same block's error against the float block on quantized inputs."""
    from optimum.adaround.graph_passes.calibration import engine

    seen = []
    real = engine.tune_block

    def spy(graph, sites, qws, feeds, targets, settings):
        seen.append(settings.float_targets)
        return real(graph, sites, qws, feeds, targets, settings)

    monkeypatch.setattr(engine, "tune_block", spy)
    before = {}
    for targets in ("quantized", "float"):
        report, _ = _run(tiny_hf_onnx("llama"), tune_steps=1, tune_targets=targets)
        before[targets] = [
            p["tune"]["error_before"] for p in report["parts"] if p["label"].startswith("block")
        ]
    assert seen == [False, False, True, True]
    assert before["float"][0] == pytest.approx(before["quantized"][0], rel=1e-5)  # same inputs at block 0
    assert before["float"][1] > before["quantized"][1]


def test_tuning_needs_a_calibrated_method():
    with pytest.raises(InvalidOptionError, match="tune_steps=5: block tuning needs a calibrated method"):
        QuantConfig().with_overrides(method="rtn", tune_steps=5)


@pytest.mark.parametrize(("key", "value"), [("tune_steps", -1), ("tune_lr", 0.0), ("tune_targets", "both")])
def test_bad_tuning_options_are_named(key, value):
    with pytest.raises(InvalidOptionError, match=f"tune option {key}"):
        QuantConfig().with_overrides(**{key: value})


def test_the_written_model_holds_the_weights_tuning_settled_on(tiny_hf_onnx, monkeypatch):
    """What block tuning returns is what the output stores (a tuned run once wrote the method's codes and
    fed the tuned ones only to the blocks after it): a tuner that halves every scale halves the written
    scales of block 0 (whose inputs are the same in both runs) against an untuned run's."""
    from optimum.adaround.graph_passes.calibration import engine

    def halving(graph, sites, qws, feeds, targets, settings):
        halved = {n: dataclasses.replace(q, scales=q.scales / 2) for n, q in qws.items()}
        return halved, {"error_before": 1.0, "error_after": 0.5, "seconds": 0.0}

    def written(**options):
        config = QuantConfig().with_overrides(method="gptq", scheme="w4-g32", workers=1, **options)
        model = load_model(str(tiny_hf_onnx("llama"))).model
        ids = np.random.default_rng(0).integers(0, 300, (4, 16))
        with quantize_model(
            model, config, sites=prepare_sites(model), token_ids=ids, progress=False
        ) as result:
            inits = result.model.graph.initializers
            return {
                k: np.array(v.const_value.numpy())
                for k, v in inits.items()
                if "layers.0/" in k and k.endswith("scales")
            }

    plain = written()
    monkeypatch.setattr(engine, "tune_block", halving)
    tuned = written(tune_steps=1)
    assert len(plain) >= 2 and tuned.keys() == plain.keys()
    for name in plain:
        np.testing.assert_allclose(
            tuned[name].astype(np.float32), plain[name].astype(np.float32) / 2, rtol=1e-3
        )
