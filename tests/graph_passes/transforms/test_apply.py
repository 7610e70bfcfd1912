"""apply_transforms: the check on logits, and --transform through the API on Optimum exports."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from optimum.adaround import quantize
from optimum.adaround.graph_passes import transforms
from optimum.adaround.graph_passes.transforms import TransformError, apply_transforms, check_ids

ROTATED = ("llama", "qwen2", "mistral", "phi3", "llama_tied")


@pytest.mark.parametrize("arch", [*ROTATED, "gemma3_text", "gpt2"])
def test_rotation_keeps_the_float_model_of_each_architecture(arch, tiny_hf_onnx):
    model = ir.load(tiny_hf_onnx(arch) / "model.onnx")
    ids = np.random.default_rng(1).integers(0, 60, size=(2, 24))
    records = apply_transforms(model, ["rotate"], ids, folder=tiny_hf_onnx(arch))
    rotate, check = records
    assert rotate["applied"] == (arch in ROTATED), rotate
    if arch not in ROTATED:  # Gemma-3's norms after each block, GPT-2's LayerNorm: left as they were
        assert rotate["reason"] and check["max_relative_logit_error"] == 0.0
    assert check["max_relative_logit_error"] <= 1e-4


def test_a_transform_that_changes_the_function_is_refused(tiny_hf_onnx, monkeypatch):
    class Scale:
        """Doubles the output projection: not an equivalent transform."""

        def __init__(self, seed: int = 0) -> None:
            self.record = {"applied": True}

        def __call__(self, model: ir.Model) -> None:
            head = next(n for n in model.graph if n.name == "/lm_head/MatMul")
            w = head.inputs[1]
            w.const_value = ir.tensor(w.const_value.numpy() * 2)

    monkeypatch.setitem(transforms.TRANSFORMS, "scale", Scale)
    model = ir.load(tiny_hf_onnx("llama") / "model.onnx")
    with pytest.raises(
        TransformError, match=r"differ from the original's by .* after scale; nothing was written"
    ):
        apply_transforms(model, ["scale"], check_ids(model, None))


def test_transform_option_rotates_before_rounding_and_is_recorded(tiny_hf_onnx, tmp_path):
    src = tiny_hf_onnx("llama")
    out = quantize(src, tmp_path / "q", method="gptq", scheme="w4-g32", transform=["rotate"],
                   calib_data=np.random.default_rng(0).integers(0, 60, (4, 16)), progress=False)  # fmt: skip
    record = json.loads((out / "quantization_config.json").read_text())
    assert record["config"]["data"]["transform"] == {"transform": ["rotate"], "rotation_seed": 0}
    rotate, check = record["transforms"]
    assert rotate["applied"] and rotate["width"] == 64 and check["token_ids"] == [2, 16]
    assert check["max_relative_logit_error"] <= 1e-4
    # the embedding is no longer the output projection's transpose: it is its own 8-bit table
    assert [t["table"] for t in record["embeddings"]] and not record["embeddings"][0].get("shared_with")
