"""ort_fusions: onnxruntime's transformer fusions on the written output, and the graphs it leaves alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

from optimum.adaround import quantize

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "genai"
# Architectures whose rotary embedding and RMSNorm onnxruntime's GPT-2 fusions recognise in Optimum's export
# (Gemma-3's scaled embedding/norm and GPT-2's learned positions are left as they are; outputs still match).
ROTARY_FUSED = ("llama", "qwen2", "mistral", "phi3", "llama_tied")


def _logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig

    model = ORTModelForCausalLM.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type == "phi3":  # Optimum misreads Phi-3's KV head count (GQA): set it after loading
        model.num_key_value_heads = config.num_key_value_heads
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.int64))
    return out.logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma3_text", "gpt2", "llama_tied"])
def test_fusions_rewrite_an_optimum_export_and_keep_its_outputs(arch, tiny_hf_onnx, tmp_path):
    src = tiny_hf_onnx(arch)
    kw = {"method": "rtn", "scheme": "w4-g32", "accuracy_level": 0, "progress": False}
    plain = quantize(src, tmp_path / "plain", **kw)
    fused = quantize(src, tmp_path / "fused", ort_fusions=True, **kw)
    record = json.loads((fused / "quantization_config.json").read_text())["ort_fusions"]
    assert record["applied"] and record["nodes_after"] < record["nodes_before"]
    assert record["shapes"]["applied"]  # shape sharing runs after the fusions, on the fused graph
    ops = [n.op_type for n in ir.load(fused / "model.onnx").graph]
    if arch in ROTARY_FUSED:
        assert ops.count("RotaryEmbedding") == record["fused"]["RotaryEmbedding"] > 0
        assert ops.count("SkipSimplifiedLayerNormalization") > 0
        # rotary caches cut to max_position_embeddings (256 positions on the tiny model)
        caches = [
            v for v in ir.load(fused / "model.onnx").graph.initializers.values() if "cache" in str(v.name)
        ]
        assert caches and all(v.shape[0] == 256 for v in caches)
    ids = np.array([[5, 17, 42, 7, 99, 3, 11]])
    want, got = _logits(plain, ids), _logits(fused, ids)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))


def test_graphs_with_fused_attention_are_left_alone(tmp_path):
    out = quantize(FIXTURES / "llama-fp32", tmp_path / "q", method="rtn", group_size=16, ort_fusions=True,
                   progress=False)  # fmt: skip
    record = json.loads((out / "quantization_config.json").read_text())["ort_fusions"]
    assert not record["applied"] and "GroupQueryAttention" in record["reason"]
