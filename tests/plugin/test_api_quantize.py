"""``optimum.adaround.quantize``: folder/file/ModelProto/gs.Graph inputs, output folder contents, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest

from optimum.adaround import quantize
from optimum.adaround.graph_passes.config import QuantConfig
from optimum.adaround.graph_passes.errors import (
    CalibrationError,
    InvalidModelError,
    InvalidOptionError,
    NoQuantizableWeightsError,
    OutputPathError,
    UnsupportedSchemeError,
)
from optimum.adaround.graph_passes.rounding import base
from optimum.adaround.graph_passes.rounding.base import MethodConfig, get_method
from optimum.adaround.recipes import load_config


@pytest.fixture(scope="module")
def llama(tiny_hf_onnx) -> Path:
    return tiny_hf_onnx("llama")


def test_folder_input_writes_complete_output(llama, tmp_path, tree_hash):
    before = tree_hash(llama)
    out = quantize(llama, tmp_path / "q", scheme="w4-g32", method="rtn", progress=False)
    assert out == tmp_path / "q"
    names = {p.name for p in out.iterdir()}
    assert {
        "model.onnx",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "quantization_config.json",
        "quantization_recipe.yaml",
    } <= names
    record = json.loads((out / "quantization_config.json").read_text())
    rtn = get_method("rtn").config
    assert record["version"] == 1 and record["method"] == {"name": "rtn", "options": rtn.to_data()}
    assert record["scheme"]["data"]["group_size"] == 32 and record["format"] == "matmulnbits"
    # the config as asked (format auto) is both in the record and the recipe written next to the model
    asked = QuantConfig().with_overrides(scheme="w4-g32", method="rtn")
    assert QuantConfig.from_dict(record["config"]) == asked == load_config(out / "quantization_recipe.yaml")
    # by default the output projection is quantized too, at 8 bits with the run's block and symmetry
    assert record["n_sites"] == len(record["sites"]) == 15 and record["skipped"] == []
    schemes = {s["name"]: s["scheme"] for s in record["sites"]}
    assert schemes.pop("lm_head") == "w8-g32-sym" and set(schemes.values()) == {"w4-g32-sym"}
    # the separate (untied) token embedding becomes an 8-bit GatherBlockQuantized table
    [table] = record["embeddings"]
    assert (table["table"], table["shared_with"], table["bits"]) == ("model.embed_tokens.weight", None, 8)
    assert table["packed_bytes"] < table["float_bytes"] / 3
    assert all(s["metrics"]["sqnr_db"] > 10 for s in record["sites"])
    assert record["quantized_bytes"] < record["float_bytes"]
    assert {"onnx", "onnx-ir", "onnxruntime", "python"} <= set(record["versions"])
    assert tree_hash(llama) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp folder left behind


def test_file_input_default_output_and_lm_head(llama, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "model.onnx").write_bytes((llama / "model.onnx").read_bytes())
    out = quantize(src / "model.onnx", scheme="w4-g64-asym", method="rtn", lm_head=True, progress=False)
    assert out == src / "model-w4-g64-asym-rtn"  # a sibling of the file
    record = json.loads((out / "quantization_config.json").read_text())
    assert record["n_sites"] == 15 and record["skipped"] == []
    assert not (out / "config.json").exists()  # only a folder input brings config/tokenizer files


def test_in_memory_inputs_come_back_in_their_kind(llama):
    proto = onnx.load(llama / "model.onnx")
    out = quantize(proto, scheme="w4-g32", method="rtn", format="qdq", progress=False)
    assert isinstance(out, onnx.ModelProto)
    assert sum(n.op_type == "DequantizeLinear" for n in out.graph.node) == 15  # 14 linear + lm_head
    assert {o.domain: o.version for o in out.opset_import}[""] == 21
    # the default method (gptq) calibrates: an in-memory model has no tokenizer to read text with
    with pytest.raises(CalibrationError, match="token-id array"):
        quantize(proto, progress=False)
    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = quantize(gs.import_onnx(proto), scheme="w8-g32", method="rtn", progress=False)
    assert isinstance(graph, gs.Graph)
    assert sum(n.op == "MatMulNBits" for n in graph.nodes) == 15


@dataclasses.dataclass(frozen=True)
class NeedyConfig(MethodConfig):
    """A calibrated stand-in method (tests only): records the tokens each site's statistics count."""

    name: ClassVar[str] = "needy_api"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})


def test_calibrated_method_reads_text_through_the_tokenizer(llama, tmp_path, monkeypatch):
    seen: list[int] = []

    class Needy:
        def __init__(self, config):
            self.config = config

        def quantize(self, weight, scheme, stats=None, *, site="?"):
            seen.append(stats.n_tokens)
            return get_method("rtn").quantize(weight, scheme)

    monkeypatch.setitem(base.METHODS, "needy_api", NeedyConfig)
    monkeypatch.setitem(base._IMPLEMENTATIONS, NeedyConfig, Needy)
    out = quantize(llama, tmp_path / "q", method="needy_api", calib_samples=2, seq_len=32, progress=False)
    record = json.loads((out / "quantization_config.json").read_text())
    assert record["calibration"]["n_samples"] == 2 and record["calibration"]["seq_len"] == 32
    # q/k/v count each sequence's first position 64 times by default (2 sequences: 64 + 2 * 63 tokens);
    # o/gate/up/down of both layers and the output projection count each token once
    assert record["calibration"]["sink_weight"] == 64.0
    assert sorted(seen) == [64] * 9 + [64 + 2 * 63] * 6
    seen.clear()
    quantize(
        llama, tmp_path / "q1", method="needy_api", calib_samples=2, seq_len=32, sink_weight=1, progress=False
    )
    assert seen == [64] * 15
    ids = np.arange(40, dtype=np.int64).reshape(2, 20)
    quantize(llama, tmp_path / "q2", method="needy_api", calib_data=ids, progress=False)
    assert seen[-1] == 40
    with pytest.raises(CalibrationError, match="token ids"):
        quantize(
            llama, tmp_path / "q3", method="needy_api", calib_data=np.zeros((3,), np.int64), progress=False
        )
    assert not (tmp_path / "q3").exists()


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("not_onnx", InvalidModelError, "not a readable ONNX model"),
        ("bits3", UnsupportedSchemeError, "MatMulNBits runs bits"),
        ("bad_option", InvalidOptionError, "'damp'"),
        ("bad_key", InvalidOptionError, "'quantize_lm_head'"),
        ("inside", OutputPathError, "inside"),
        ("nonempty", OutputPathError, "not empty"),
        ("no_weights", NoQuantizableWeightsError, "no quantizable weight"),
        ("bad_method", InvalidOptionError, "unknown rounding method"),
    ],
)
def test_bad_input_leaves_no_output(llama, tmp_path, tree_hash, case, error, match):
    src, out, kw = llama, tmp_path / "out", {}
    if case == "not_onnx":
        src = tmp_path / "junk.onnx"
        src.write_text("not a model")
    elif case == "bits3":
        kw = {"scheme": "w3-g32", "format": "matmulnbits"}
    elif case == "bad_option":
        kw = {"method_options": {"damp": 0.1}}
    elif case == "bad_key":
        kw = {"quantize_lm_head": True}
    elif case == "inside":
        out = llama / "q"
    elif case == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "no_weights":
        kw = {"include": [r"no_such_module"]}
    else:
        kw = {"method": "no_such_method"}
    before = tree_hash(llama)
    with pytest.raises(error, match=match) as err:
        quantize(src, out, progress=False, **kw)
    assert "\n" not in str(err.value)
    assert tree_hash(llama) == before
    if case == "nonempty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_a_recipe_file_reproduces_the_same_output_bytes(llama, tmp_path):
    """The recipe written next to an output, given back as the config, quantizes to the same bytes."""
    kw = dict(method="gptq", scheme="w4-g32-asym", calib_samples=2, seq_len=32, exclude=[r"layers\.1\.mlp"])
    first = quantize(llama, tmp_path / "a", progress=False, **kw)
    again = quantize(llama, tmp_path / "b", config=first / "quantization_recipe.yaml", progress=False)
    assert (first / "model.onnx").read_bytes() == (again / "model.onnx").read_bytes()
    assert load_config(again / "quantization_recipe.yaml") == load_config(first / "quantization_recipe.yaml")
    record = json.loads((again / "quantization_config.json").read_text())
    assert record["n_sites"] == 12 and record["calibration"]["n_samples"] == 2  # 11 linear + lm_head
    # keywords next to a config replace only what they name
    third = quantize(llama, tmp_path / "c", config=first / "quantization_recipe.yaml", bits=8, progress=False)
    changed = load_config(third / "quantization_recipe.yaml")
    assert changed == load_config(first / "quantization_recipe.yaml").with_overrides(bits=8)


def _adaround_sites(llama):
    from optimum.adaround.graph_passes.model_io import load_model
    from optimum.adaround.graph_passes.pipeline import prepare_sites

    return prepare_sites(load_model(llama).model, (), (), False).sites


def test_a_cuda_run_rounds_on_the_gpu_only_where_torch_sees_one(llama, monkeypatch):
    import torch

    from optimum.adaround.graph_passes.pipeline import resolve_config

    sites = _adaround_sites(llama)
    cuda = QuantConfig().with_overrides(method="adaround", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_config(cuda, sites).method.device == "cuda"
    assert resolve_config(cuda.with_overrides(device="cpu"), sites).method.device == "cpu"
    for method in ("gptq", "adaround_ls"):  # every calibrated method rounds on the run's device
        assert resolve_config(cuda.with_overrides(method=method), sites).method.device == "cuda"
    assert not hasattr(resolve_config(cuda.with_overrides(method="rtn"), sites).method, "device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_config(cuda, sites).method.device == "cpu"
    assert resolve_config(cuda.with_overrides(method="gptq"), sites).method.device == "cpu"


def test_a_method_device_given_by_the_user_is_kept(llama, monkeypatch):
    import torch

    from optimum.adaround.graph_passes.pipeline import resolve_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mine = QuantConfig().with_overrides(method="adaround", method_options={"device": "cpu"}, device="cuda")
    assert resolve_config(mine, _adaround_sites(llama)).method.device == "cpu"


def test_shape_sharing_is_on_by_default_and_changes_no_output(llama, tmp_path):
    import onnxruntime as ort

    kw = {"method": "rtn", "scheme": "w4-g32", "progress": False}
    shared = quantize(llama, tmp_path / "shared", **kw)
    plain = quantize(llama, tmp_path / "plain", share_shapes=False, **kw)
    record = json.loads((shared / "quantization_config.json").read_text())
    assert record["config"]["data"]["output"]["share_shapes"] is True
    shapes = record["shapes"]
    assert shapes["applied"] and shapes["nodes_after"] < shapes["nodes_before"]
    assert json.loads((plain / "quantization_config.json").read_text())["shapes"] is None
    nodes = {name: len(onnx.load(d / "model.onnx").graph.node) for name, d in (("s", shared), ("p", plain))}
    assert nodes["s"] == shapes["nodes_after"] < nodes["p"]
    sessions = [
        ort.InferenceSession(d / "model.onnx", providers=["CPUExecutionProvider"]) for d in (shared, plain)
    ]
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 60, (2, 5)), "attention_mask": np.ones((2, 5), np.int64),
             "position_ids": np.tile(np.arange(5), (2, 1))}  # fmt: skip
    for i in sessions[0].get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros([2 if d == "batch_size" else 0 if isinstance(d, str) else d for d in i.shape],
                                     np.float32)  # fmt: skip
    feeds = {k: v.astype(np.int64) if v.dtype.kind == "i" else v for k, v in feeds.items()}
    for x, y in zip(*(s.run(None, feeds) for s in sessions), strict=True):
        np.testing.assert_array_equal(x, y)
