"""--tune-steps through a whole calibrated run: each decoder block tuned, recorded, and refused with rtn."""

from __future__ import annotations

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


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_every_block_is_tuned_and_its_error_recorded(tiny_hf_onnx, arch):
    report, sites = _run(tiny_hf_onnx(arch), tune_steps=8)
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


def test_tuning_needs_a_calibrated_method():
    with pytest.raises(InvalidOptionError, match="tune_steps=5: block tuning needs a calibrated method"):
        QuantConfig().with_overrides(method="rtn", tune_steps=5)


@pytest.mark.parametrize(("key", "value"), [("tune_steps", -1), ("tune_lr", 0.0)])
def test_bad_tuning_options_are_named(key, value):
    with pytest.raises(InvalidOptionError, match=f"tune option {key}"):
        QuantConfig().with_overrides(**{key: value})
