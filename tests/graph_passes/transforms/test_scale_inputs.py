"""``--transform awq``: activation-aware scaling folded into the RMSNorms, on tiny exports and on the math."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from optimum.adaround.graph_passes.scheme import QuantScheme
from optimum.adaround.graph_passes.transforms import apply_transforms
from optimum.adaround.graph_passes.transforms.scale import choose_scale

W2 = QuantScheme.parse("w2-g16-asym")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "llama_tied", "gemma3_text", "gpt2"])
def test_scaling_keeps_the_float_model_of_each_architecture(arch, tiny_hf_onnx):
    folder = tiny_hf_onnx(arch)
    model = ir.load(folder / "model.onnx")
    ids = np.random.default_rng(1).integers(0, 60, size=(4, 24))
    records = apply_transforms(model, ["awq"], ids[:2], folder=folder, calibration=ids, scheme=W2)
    awq, check = records
    assert check["max_relative_logit_error"] <= 1e-4
    if arch == "gpt2":  # LayerNorm, not RMSNorm: left as it was
        assert not awq["applied"] and awq["reason"] and check["max_relative_logit_error"] == 0.0
    else:
        assert awq["applied"] and awq["norms"] >= 4, awq  # two blocks: q/k/v and gate/up after each norm
        assert all(0.0 < r <= 1.0 for r in awq["error_ratios"])  # never worse than alpha = 0 under H


def test_without_calibration_text_nothing_is_scaled(tiny_hf_onnx):
    model = ir.load(tiny_hf_onnx("llama") / "model.onnx")
    ids = np.random.default_rng(1).integers(0, 60, size=(2, 24))
    awq, check = apply_transforms(model, ["awq"], ids, calibration=None, scheme=W2)
    assert not awq["applied"] and "calibration" in awq["reason"] and check["max_relative_logit_error"] == 0.0


def test_an_outlier_channel_is_scaled_up_and_lowers_the_error():
    """Inputs whose channel 0 is 30x the others: the chosen exponent is positive, s is largest there, and
    the output error under H falls below round to nearest's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 64))
    x[:, 0] *= 30
    h = x.T @ x
    w = rng.standard_normal((32, 64)).astype(np.float32)
    alpha, s, ratio = choose_scale([w], h, W2)
    assert alpha > 0 and int(np.argmax(s)) == 0 and ratio < 0.9


def test_equal_channels_give_no_scaling():
    h = np.eye(64) * 5.0
    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    _, s, ratio = choose_scale([w], h, W2)
    np.testing.assert_allclose(s, 1.0, rtol=1e-6)
    assert ratio == pytest.approx(1.0)


def test_the_exponent_is_chosen_for_gptq_when_the_run_uses_it():
    """With gptq in the objective (on sampled rows) the choice is never worse than no scaling for it."""
    from optimum.adaround.graph_passes.rounding.base import method_config
    from optimum.adaround.graph_passes.transforms.scale import calibrated

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 64))
    x[:, 3] *= 20
    w = rng.standard_normal((96, 64)).astype(np.float32)
    gptq = method_config("gptq")
    assert calibrated(gptq) and not calibrated(method_config("rtn")) and not calibrated(None)
    _, _, ratio = choose_scale([w], x.T @ x, W2, method=gptq)
    assert 0 < ratio <= 1.0
