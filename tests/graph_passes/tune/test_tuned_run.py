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


def test_tuning_needs_a_calibrated_method():
    with pytest.raises(InvalidOptionError, match="tune_steps=5: block tuning needs a calibrated method"):
        QuantConfig().with_overrides(method="rtn", tune_steps=5)


@pytest.mark.parametrize(("key", "value"), [("tune_steps", -1), ("tune_lr", 0.0)])
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
