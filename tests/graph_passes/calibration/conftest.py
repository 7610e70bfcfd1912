"""Fixtures of the calibration-engine tests: a tiny random Llama exported with Optimum, a handmade graph,
and WeightSite records built by the simple rule the engine relies on (until sites.py is used here)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from optimum.adaround.graph_passes.records import WeightSite

_PROJ = re.compile(r"^/(.+)/MatMul$")
_LAYER = re.compile(r"layers\.(\d+)")


def weight_sites(model: ir.Model, lm_head: bool = False) -> list[WeightSite]:
    """MatMul nodes named ``/<module path>/MatMul`` whose input 1 is a 2-D initializer ``[K, N]``."""
    sites = []
    inits = model.graph.initializers
    for node in model.graph:
        m = _PROJ.match(node.name or "")
        if node.op_type != "MatMul" or m is None:
            continue
        w = node.inputs[1]
        if w is None or w.name not in inits or len(inits[w.name].const_value.shape) != 2:
            continue
        path = m.group(1).replace("/", ".")
        if path.startswith("lm_head") and not lm_head:
            continue
        k, n = inits[w.name].const_value.shape
        layer = _LAYER.search(path)
        sites.append(
            WeightSite(
                name=path,
                node_name=node.name,
                op_type="MatMul",
                weight_name=w.name,
                k=int(k),
                n=int(n),
                transposed=False,
                activation=node.inputs[0].name,
                layer=int(layer.group(1)) if layer else None,
                kind="lm_head" if path.startswith("lm_head") else "linear",
            )
        )
    return sites


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random-init Llama (hidden 64, 2 layers, GQA 4/2 heads) exported by Optimum, with past."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from optimum.exporters.onnx import main_export

    root = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm weights so nothing degenerates to ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(root / "hf"), str(root / "onnx"), task="text-generation-with-past")
    return root / "onnx"


@pytest.fixture()
def tiny_llama(tiny_llama_dir) -> ir.Model:
    return ir.load(tiny_llama_dir / "model.onnx")


HANDMADE = """
<ir_version: 8, opset_import: ["" : 17]>
handmade (int64[B, T] input_ids) => (float[B, T, 16] logits)
{
    h0 = Gather <axis = 0> (embed, input_ids)
    u0 = MatMul (h0, w_up0)
    a0 = Tanh (u0)
    d0 = MatMul (a0, w_down0)
    h1 = Add (h0, d0)
    u1 = MatMul (h1, w_up1)
    a1 = Tanh (u1)
    d1 = MatMul (a1, w_down1)
    h2 = Add (h1, d1)
    logits = MatMul (h2, w_head)
}
"""
# the text format has no node names: exported-style names are set in order
HANDMADE_NODE_NAMES = [
    "/model/embed/Gather",
    "/model/layers.0/mlp/up_proj/MatMul",
    "/model/layers.0/mlp/act/Tanh",
    "/model/layers.0/mlp/down_proj/MatMul",
    "/model/layers.0/Add",
    "/model/layers.1/mlp/up_proj/MatMul",
    "/model/layers.1/mlp/act/Tanh",
    "/model/layers.1/mlp/down_proj/MatMul",
    "/model/layers.1/Add",
    "/lm_head/MatMul",
]

HANDMADE_WEIGHTS = {
    "embed": (16, 8),
    "w_up0": (8, 12),
    "w_down0": (12, 8),
    "w_up1": (8, 12),
    "w_down1": (12, 8),
    "w_head": (8, 16),
}


@pytest.fixture()
def handmade() -> ir.Model:
    """Embedding -> two residual tanh-MLP blocks -> lm_head; random weights, no past."""
    proto = onnx.parser.parse_model(HANDMADE)
    for node, name in zip(proto.graph.node, HANDMADE_NODE_NAMES, strict=True):
        node.name = name
    rng = np.random.default_rng(0)
    for name, shape in HANDMADE_WEIGHTS.items():
        w = rng.standard_normal(shape).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(w, name))
    return ir.from_proto(proto)
