"""load() / session_options(): custom ops registered when (and only when) needed, Phi-3 GQA fix, errors."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch

from optimum.adaround import custom_ops, load, session_options
from optimum.adaround.graph_passes.errors import InvalidModelError, UserError
from optimum.adaround.loading import _REGISTERED, uses_custom_domain

try:
    custom_ops.library_path()
    HAVE_LIB = True
except FileNotFoundError:
    HAVE_LIB = False


def test_session_options_sets_attributes_and_entries():
    so = session_options(intra_op_num_threads=1, accuracy_level=0, custom_ops=False)
    assert so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert so not in _REGISTERED


@pytest.mark.parametrize("bad", [{"intra_op_threads": 1}, {"accuracy_level": 7}])
def test_session_options_rejects_unknown_options(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        session_options(**bad)


@pytest.fixture(scope="module")
def lowbit_folder(tiny_hf_onnx, tmp_path_factory):
    if not HAVE_LIB:
        pytest.skip("custom-op library not built")
    from optimum.adaround import export

    return export(
        tiny_hf_onnx("llama"),
        tmp_path_factory.mktemp("lb") / "w3",
        scheme="w3-g32",
        method="rtn",
        format="lowbit",
        progress=False,
    )


def _generate(model):
    ids = torch.tensor([[3, 4, 5]])
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
    )


@pytest.mark.parametrize(
    "make_options",
    [
        lambda: None,  # load() builds its own options with the library registered
        lambda: ort.SessionOptions(),  # plain options: load() registers the library on them
        lambda: custom_ops.session_options(),  # already registered elsewhere: not registered twice
        lambda: session_options(),  # ours: registered once, tracked
    ],
    ids=["default", "plain", "custom_ops", "ours"],
)
def test_load_registers_custom_ops_when_the_model_needs_them(lowbit_folder, make_options):
    assert uses_custom_domain(lowbit_folder / "model.onnx")
    model = load(lowbit_folder, session_options=make_options())
    assert _generate(model).shape == (1, 6)


def test_uses_custom_domain(tiny_hf_onnx, tmp_path):
    import onnx
    from onnx import helper

    assert not uses_custom_domain(tiny_hf_onnx("llama") / "model.onnx")
    node = helper.make_node("MatMulLowBit", ["x"], ["y"], domain=custom_ops.DOMAIN)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", 1, [1])],
        [helper.make_tensor_value_info("y", 1, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(custom_ops.DOMAIN, 1)]
    )
    onnx.save(model, tmp_path / "m.onnx")
    assert uses_custom_domain(tmp_path / "m.onnx")


def test_phi3_gqa_fix(tiny_hf_onnx):
    from optimum.onnxruntime import ORTModelForCausalLM

    folder = tiny_hf_onnx("phi3")
    ids = torch.tensor([[3, 4, 5]])
    plain = ORTModelForCausalLM.from_pretrained(folder)
    assert plain.num_key_value_heads == 4  # optimum-onnx 0.1.0 uses the attention-head count for phi3...
    with pytest.raises(Exception, match="past_key_values"):
        plain.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    model = load(folder)
    assert (
        model.num_key_value_heads
        == json.loads((folder / "config.json").read_text())["num_key_value_heads"]
        == 2
    )
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_load_passes_user_session_options(tiny_hf_onnx):
    so = session_options(intra_op_num_threads=1, custom_ops=False)
    model = load(tiny_hf_onnx("llama"), session_options=so)
    assert model.model.get_session_options().intra_op_num_threads == 1


def test_load_errors(tmp_path, tiny_hf_onnx):
    with pytest.raises(InvalidModelError, match="not a folder"):
        load(tmp_path / "missing")
    with pytest.raises(InvalidModelError, match=r"config\.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidModelError, match=r"no \.onnx file"):
        load(tmp_path)
    with pytest.raises(InvalidModelError, match=r"other\.onnx"):
        load(tiny_hf_onnx("llama"), file_name="other.onnx")
