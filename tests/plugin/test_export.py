"""export(): tiny random-init models of six architectures -> quantized, loadable, generating folders; bad inputs.

Every test uses round-to-nearest (data-free, fast) except the calibration tests, which run gptq.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
import yaml

from optimum.adaround import export, load
from optimum.adaround.graph_passes.config import QuantConfig
from optimum.adaround.graph_passes.errors import (
    InvalidModelError,
    NoQuantizableWeightsError,
    OutputPathError,
    UserError,
)
from optimum.adaround.model_card import read_front_matter
from optimum.adaround.recipes import load_config, save_config

export_mod = importlib.import_module("optimum.adaround.export")
ARCHS = ["llama", "qwen2", "mistral", "phi3", "gemma3_text", "gpt2"]
PUBLISH_FILES = {
    "model.onnx",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "quantization_config.json",
    "quantization_recipe.yaml",
    "README.md",
}


def linear_count(model_dir: Path) -> int:
    """Linear layers of the torch model, lm_head excluded (GPT-2 uses transformers' Conv1D)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(
        isinstance(m, (torch.nn.Linear, Conv1D)) and not name.endswith("lm_head")
        for name, m in model.named_modules()
    )


def op_counts(model_file: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.load(str(model_file)).graph.all_nodes():
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def quantized_bits(model_file: Path) -> dict[str, int]:
    """Module path -> bits of every quantized linear weight, read back as evaluation reads them (a fused
    q/k/v or gate/up node counts as its modules)."""
    from optimum.adaround.evaluation import quantized_sites

    sites, unreadable = quantized_sites(ir.load(str(model_file)))
    assert not unreadable
    return {s.name: s.stored.scheme.bits for s in sites}


def generate(folder: Path, n: int = 4) -> torch.Tensor:
    model = load(folder)
    ids = torch.tensor([[5, 17, 42, 8]])
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
    )


@pytest.fixture(scope="module")
def exported(tiny_hf_model, tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"export-{arch}") / "out"
            cache[arch] = export(tiny_hf_model(arch), out, scheme="w4-g32", method="rtn", progress=False)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_one_liner_quantizes_every_linear_layer_and_generates(arch, exported, tiny_hf_model):
    out = exported(arch)
    assert {p.name for p in out.iterdir()} >= PUBLISH_FILES
    expected = linear_count(tiny_hf_model(arch)) + 1  # and the output projection, 8-bit by default
    qconfig = json.loads((out / "quantization_config.json").read_text())
    assert qconfig["n_sites"] == expected
    bits = quantized_bits(out / "model.onnx")
    assert set(bits) == {s["name"] for s in qconfig["sites"]} and bits["lm_head"] == 8
    # the token embedding (tied to the head or not) is looked up in 8-bit blocks: no float Gather of it
    [table] = qconfig["embeddings"]
    assert table["bits"] == 8 and op_counts(out / "model.onnx").get("GatherBlockQuantized", 0) == 1
    assert qconfig["source"]["model"] == str(tiny_hf_model(arch))
    assert qconfig["source"]["task"] == "text-generation-with-past"
    tokens = generate(out)
    assert tokens.shape == (1, 8)
    assert int(tokens.max()) < 320


def test_output_has_no_leftovers_and_recipe_reloads(exported):
    out = exported("llama")
    siblings = [p.name for p in out.parent.iterdir()]
    assert siblings == ["out"], siblings  # temp export / staging folders are gone
    recipe = yaml.safe_load((out / "quantization_recipe.yaml").read_text())
    assert (recipe["type"], recipe["version"]) == ("QuantConfig", 1)
    assert QuantConfig.from_dict(recipe) == QuantConfig().with_overrides(scheme="w4-g32", method="rtn")
    qconfig = json.loads((out / "quantization_config.json").read_text())
    assert qconfig["config"] == recipe and qconfig["format"] == "matmulnbits"


def test_model_card_front_matter(exported):
    text = (exported("llama") / "README.md").read_text()
    front = read_front_matter(text)
    assert front["library_name"] == "onnx"
    assert front["license"] == "apache-2.0"  # carried from the source README
    assert {"onnx", "quantized", "int4", "rtn", "matmulnbits"} <= set(front["tags"])
    assert "Perplexity was not measured" in text


def test_onnx_folder_input_is_quantized_directly(tiny_hf_onnx, tmp_path):
    out = export(tiny_hf_onnx("llama"), tmp_path / "q", scheme="w4-g64-asym", method="rtn", progress=False)
    qconfig = json.loads((out / "quantization_config.json").read_text())
    assert qconfig["scheme"]["data"]["symmetric"] is False
    assert qconfig["source"]["model"] == str(tiny_hf_onnx("llama"))
    assert len(quantized_bits(out / "model.onnx")) == 15  # 14 linear + lm_head


def test_qdq_format_exports_at_opset_21_and_generates(tiny_hf_model, tmp_path):
    out = export(
        tiny_hf_model("llama"), tmp_path / "qdq", scheme="w4-g32", method="rtn", format="qdq", progress=False
    )
    model = ir.load(str(out / "model.onnx"))
    assert model.opset_imports[""] >= 21
    assert op_counts(out / "model.onnx")["DequantizeLinear"] == 15  # 14 linear + lm_head
    assert generate(out).shape == (1, 8)


def test_recipe_overrides_take_their_layers_in_one_pass(tiny_hf_onnx, tmp_path):
    recipe = {"scheme": "w4-g32", "method": "rtn", "overrides": [{"pattern": r"mlp\.", "scheme": "w8-g32"}]}
    out = export(tiny_hf_onnx("llama"), tmp_path / "o", recipe=recipe, progress=False)
    bits = quantized_bits(out / "model.onnx")
    mlp = {b for name, b in bits.items() if ".mlp." in name}
    attn = {b for name, b in bits.items() if ".self_attn." in name}
    # the output projection, which no override matches, takes its own 8-bit default scheme
    assert len(bits) == 15 and mlp == {8} and attn == {4} and bits["lm_head"] == 8
    qconfig = json.loads((out / "quantization_config.json").read_text())
    assert qconfig["n_sites"] == len(qconfig["sites"]) == 15
    eight = [s["node_name"] for s in qconfig["sites"] if s["scheme"].startswith("w8-g32")]
    assert len(eight) == 7 and all("/mlp/" in n for n in eight[:-1])  # gate/up/down x 2 layers
    assert eight[-1] == "/lm_head/MatMul"
    assert sorted(s["scheme"].split("-sym")[0] for s in qconfig["sites"]) == ["w4-g32"] * 8 + ["w8-g32"] * 7


def test_sites_an_override_takes_are_not_listed_as_skipped(tiny_hf_onnx, tmp_path):
    recipe = {
        "scheme": "w4-g32", "method": "rtn", "lm_head": "none",  # the one site no pass quantizes
        "overrides": [{"pattern": r"mlp\.", "scheme": "w8-g32"}],
    }  # fmt: skip
    out = export(tiny_hf_onnx("llama"), tmp_path / "o", recipe=recipe, progress=False)
    qconfig = json.loads((out / "quantization_config.json").read_text())
    assert [s["node_name"] for s in qconfig["skipped"]] == ["/lm_head/MatMul"]


def test_override_matching_nothing_is_a_user_error(tiny_hf_onnx, tmp_path):
    recipe = {"method": "rtn", "overrides": [{"pattern": "no_such_module", "scheme": "w8-g32"}]}
    with pytest.raises(NoQuantizableWeightsError, match="no_such_module"):
        export(tiny_hf_onnx("llama"), tmp_path / "o", recipe=recipe, progress=False)
    assert not (tmp_path / "o").exists()


def test_calibration_source_and_token_hash_recorded(tiny_hf_onnx, tmp_path):
    from optimum.adaround.data.text import calibration_token_ids

    src = tiny_hf_onnx("llama")
    text = tmp_path / "calib.txt"  # a small user text keeps tokenization cheap
    text.write_text(" ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    out = export(
        src,
        tmp_path / "g",
        scheme="w4-g32",
        method="gptq",
        calib_data=str(text),
        calib_samples=4,
        seq_len=64,
        progress=False,
    )
    calib = json.loads((out / "quantization_config.json").read_text())["calibration"]
    assert calib["source"] == str(text)
    ids = calibration_token_ids(src, str(text), 4, 64, seed=0)
    assert calib["tokens_sha256"] == hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()
    assert calib["n_samples"] == 4


def test_calibration_token_ids_given_as_an_array(tiny_hf_onnx, tmp_path):
    ids = np.random.default_rng(1).integers(0, 320, (2, 32), dtype=np.int64)
    out = export(
        tiny_hf_onnx("llama"), tmp_path / "a", scheme="w4-g32", method="gptq", calib_data=ids, progress=False
    )
    qconfig = json.loads((out / "quantization_config.json").read_text())
    assert qconfig["calibration"]["source"] == "token ids given by the caller"
    assert qconfig["calibration"]["tokens_sha256"] == hashlib.sha256(ids.tobytes()).hexdigest()
    recipe = load_config(out / "quantization_recipe.yaml")
    assert recipe.calibration.calib_data is None  # an array is not written into the recipe


# -- bad inputs -------------------------------------------------------------------------------------------
def test_hub_id_while_offline_is_a_one_line_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InvalidModelError, match="Hub cannot be reached") as info:
        export("someone/not-cached-model", tmp_path / "o", method="rtn")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_missing_local_path(tmp_path):
    with pytest.raises(InvalidModelError, match="no such folder"):
        export(str(tmp_path / "nope" / "model"), tmp_path / "o", method="rtn")


def test_unknown_model_type(tmp_path):
    src = tmp_path / "weird"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "definitely-not-a-model"}))
    with pytest.raises(InvalidModelError, match="cannot read the model config") as info:
        export(src, tmp_path / "o", method="rtn")
    assert "\n" not in str(info.value)


def test_model_without_linear_layers(tmp_path):
    import onnx
    from onnx import helper

    src = tmp_path / "nolinear"
    src.mkdir()
    graph = onnx.parser.parse_graph("g (float[2, 4] x) => (float[2, 4] y) { y = Add(x, x) }")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src / "model.onnx")
    with pytest.raises(NoQuantizableWeightsError):
        export(src, tmp_path / "o", method="rtn", progress=False)
    assert not (tmp_path / "o").exists()


def test_non_empty_output_needs_overwrite(tiny_hf_onnx, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    src = tiny_hf_onnx("llama")  # an ONNX folder: no Optimum export needed
    with pytest.raises(OutputPathError, match="overwrite"):
        export(src, out, method="rtn")
    assert (out / "keep.txt").read_text() == "mine"
    export(src, out, scheme="w4-g32", method="rtn", overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()


def test_output_inside_source_is_refused(tiny_hf_onnx):
    src = tiny_hf_onnx("llama")
    with pytest.raises(OutputPathError):
        export(src, src / "quantized", method="rtn")


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_leaves_no_half_written_output(tiny_hf_onnx, tmp_path, monkeypatch, existing):
    api = importlib.import_module("optimum.adaround.api")
    real = api.quantize_into

    def interrupted(folder, model, config, **kw):
        real(folder, model, config, **kw)  # a complete quantized folder exists in staging...
        raise KeyboardInterrupt  # ...and the user presses Ctrl-C before export finishes

    monkeypatch.setattr(api, "quantize_into", interrupted)
    out = tmp_path / "o"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("previous result")
    with pytest.raises(KeyboardInterrupt):
        export(tiny_hf_onnx("llama"), out, scheme="w4-g32", method="rtn", overwrite=existing, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["o"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_unknown_method_fails_before_the_optimum_export(tiny_hf_model, tmp_path, monkeypatch):
    def no_export(*a, **k):
        raise AssertionError("Optimum export must not start")

    monkeypatch.setattr(export_mod, "_optimum_export", no_export)
    with pytest.raises(UserError, match="no-such-method"):
        export(tiny_hf_model("llama"), tmp_path / "o", method="no-such-method")
    with pytest.raises(UserError, match="not 3 bits"):
        export(tiny_hf_model("llama"), tmp_path / "o", scheme="w3-g32", method="rtn", format="qdq")


def test_bad_recipe_fails_before_any_work(tmp_path):
    with pytest.raises(UserError, match="shceme"):
        export("/definitely/missing", tmp_path / "o", recipe={"shceme": "w4"})
    with pytest.raises(UserError, match="'lm_head_too'"):
        export("/definitely/missing", tmp_path / "o", method="rtn", lm_head_too=True)
    with pytest.raises(UserError, match="config or recipe"):
        export("/definitely/missing", tmp_path / "o", config="w4-g128-rtn", recipe="w4-g128-rtn")
    assert not (tmp_path / "o").exists()


def test_a_recipe_file_and_its_config_export_the_same_bytes(tiny_hf_onnx, tmp_path):
    config = QuantConfig().with_overrides(scheme="w4-g32-asym", method="rtn", exclude=[r"layers\.0\."])
    recipe = save_config(config, tmp_path / "r.yaml")
    a = export(tiny_hf_onnx("llama"), tmp_path / "a", config, progress=False)
    b = export(tiny_hf_onnx("llama"), tmp_path / "b", recipe=recipe, progress=False)
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert load_config(b / "quantization_recipe.yaml") == config
    assert json.loads((b / "quantization_config.json").read_text())["n_sites"] == 8  # layer 1 + lm_head


def test_push_to_hub_calls_the_wrapper_with_the_finished_folder(tiny_hf_onnx, tmp_path, monkeypatch):
    hub = importlib.import_module("optimum.adaround.hub")
    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("init", token))

        def create_repo(self, **kw):
            calls.append(("create_repo", kw))
            return f"https://huggingface.co/{kw['repo_id']}"

        def upload_folder(self, **kw):
            assert (Path(kw["folder_path"]) / "README.md").is_file()  # uploaded only once complete
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(hub, "_api_factory", FakeApi)
    out = export(
        tiny_hf_onnx("llama"),
        tmp_path / "pub",
        scheme="w4-g32",
        method="rtn",
        push_to_hub="me/tiny-w4",
        progress=False,
    )
    assert calls[0] == ("init", None)
    assert calls[1] == (
        "create_repo",
        {"repo_id": "me/tiny-w4", "repo_type": "model", "private": None, "exist_ok": True},
    )
    assert calls[2][0] == "upload_folder"
    assert calls[2][1]["folder_path"] == str(out) and calls[2][1]["repo_id"] == "me/tiny-w4"


def test_hub_wrapper_errors(tmp_path, monkeypatch):
    hub = importlib.import_module("optimum.adaround.hub")
    with pytest.raises(OutputPathError, match=r"no \.onnx model"):
        hub.push_to_hub(tmp_path, "me/x")
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(hub.HubUploadError, match="repository id"):
        hub.push_to_hub(tmp_path, "a/b/c")

    class Offline:
        def __init__(self, token):
            pass

        def create_repo(self, **kw):
            raise ConnectionError("Failed to resolve 'huggingface.co'\nlong details")

    monkeypatch.setattr(hub, "_api_factory", Offline)
    with pytest.raises(hub.HubUploadError, match="ConnectionError: Failed to resolve") as info:
        hub.push_to_hub(tmp_path, "me/x", token="t")
    assert "\n" not in str(info.value)
