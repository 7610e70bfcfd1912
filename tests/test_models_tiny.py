"""End to end on tiny random-init exports of real architectures: every linear layer is quantized, and the
result loads in ``ORTModelForCausalLM`` and generates.

Covers Llama (untied and tied lm_head = MatMul(Transpose(embed_tokens))), Qwen2 (q/k/v biases: MatMul + Add),
Mistral, Phi-3 (fused qkv_proj / gate_up_proj) and GPT-2 (Conv1D exported as Gemm with a bias).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from optimum.adaround import quantize
from optimum.adaround.evaluation import quantized_sites

ARCHS = ["llama", "llama_tied", "qwen2", "mistral", "phi3", "gpt2"]


def _torch_linears(model_dir) -> int:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(isinstance(m, (torch.nn.Linear, Conv1D)) for m in model.modules())


def _ort_model(folder):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig

    model = ORTModelForCausalLM.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type == "phi3":  # Optimum misreads Phi-3's KV head count (GQA): set it after loading
        model.num_key_value_heads = config.num_key_value_heads
    return model


def _first_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.int64)
        ).logits.numpy()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("fmt", "scheme", "lm_head"),
    [("matmulnbits", "w4-g32", True), ("qdq", "w8-g32", False)],
    ids=["nbits", "qdq"],
)
def test_quantize_tiny_architecture(arch, fmt, scheme, lm_head, tiny_hf_model, tiny_hf_onnx, tmp_path):
    import torch

    src = tiny_hf_onnx(arch)
    # rtn: data-free; what is checked here is the graph rewrite of each architecture
    out = quantize(
        src, tmp_path / "q", scheme=scheme, method="rtn", format=fmt, lm_head=lm_head, progress=False
    )

    record = json.loads((out / "quantization_config.json").read_text())
    n_linear = _torch_linears(tiny_hf_model(arch))
    assert record["n_sites"] == n_linear - (0 if lm_head else 1)
    assert [s["name"] for s in record["sites"] if s["kind"] == "lm_head"] == (["lm_head"] if lm_head else [])
    assert len(record["skipped"]) == (0 if lm_head else 1)

    loaded = ir.load(out / "model.onnx")
    graph = loaded.graph
    ops = [n.op_type for n in graph]
    if fmt == "matmulnbits":
        # q/k/v and gate/up run fused: evaluation reads one weight per module back
        assert len(quantized_sites(loaded)[0]) == record["n_sites"]
        assert "Gemm" not in ops  # GPT-2's Conv1D Gemms became MatMulNBits with their bias
    else:
        assert ops.count("DequantizeLinear") == record["n_sites"]
    if arch == "llama_tied" and lm_head:  # the tied table is read from the head's packed codes
        assert "model.embed_tokens.weight" not in graph.initializers
        assert [t["shared_with"] for t in record["embeddings"]] == ["lm_head"]
    elif arch == "llama_tied":  # the float head still reads the table: it stays float, once
        assert "model.embed_tokens.weight" in graph.initializers and record["embeddings"] == []

    model = _ort_model(out)
    ids = np.array([[5, 17, 42, 7, 99, 3]])
    generated = model.generate(
        torch.tensor(ids),
        attention_mask=torch.ones(ids.shape, dtype=torch.int64),
        max_new_tokens=4,
        do_sample=False,
    )
    assert generated.shape == (1, ids.shape[1] + 4)
    if fmt == "qdq":  # 8-bit weights: logits stay close to the float model's
        ref = _first_logits(_ort_model(src), ids)
        got = _first_logits(model, ids)
        assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99
