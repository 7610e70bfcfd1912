"""``optimum.adaround.quantize``: folder/file/ModelProto/gs.Graph inputs, output folder contents, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from optimum.adaround import quantize
from optimum.adaround.graph_passes.errors import (
    CalibrationError,
    InvalidModelError,
    NoQuantizableWeightsError,
    OutputPathError,
    UnsupportedSchemeError,
)
from optimum.adaround.graph_passes.rounding.base import METHODS, get_method


@pytest.fixture(scope="module")
def llama(tiny_hf_onnx) -> Path:
    return tiny_hf_onnx("llama")


def test_folder_input_writes_complete_output(llama, tmp_path, tree_hash):
    before = tree_hash(llama)
    out = quantize(llama, tmp_path / "q", scheme="w4-g32", progress=False)
    assert out == tmp_path / "q"
    names = {p.name for p in out.iterdir()}
    assert {
        "model.onnx",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "quantization_config.json",
    } <= names
    record = json.loads((out / "quantization_config.json").read_text())
    assert record["version"] == 1 and record["method"] == {"name": "rtn", "options": {}}
    assert record["scheme"]["data"]["group_size"] == 32 and record["format"] == "matmulnbits"
    assert record["n_sites"] == len(record["sites"]) == 14
    assert [s["node_name"] for s in record["skipped"]] == ["/lm_head/MatMul"]
    assert all(s["metrics"]["sqnr_db"] > 10 for s in record["sites"])
    assert record["quantized_bytes"] < record["float_bytes"]
    assert {"onnx", "onnx-ir", "onnxruntime", "python"} <= set(record["versions"])
    assert tree_hash(llama) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp folder left behind


def test_file_input_default_output_and_lm_head(llama, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "model.onnx").write_bytes((llama / "model.onnx").read_bytes())
    out = quantize(src / "model.onnx", scheme="w4-g64-asym", quantize_lm_head=True, progress=False)
    assert out == src / "model-w4-g64-asym-rtn"  # a sibling of the file
    record = json.loads((out / "quantization_config.json").read_text())
    assert record["n_sites"] == 15 and record["skipped"] == []
    assert not (out / "config.json").exists()  # only a folder input brings config/tokenizer files


def test_in_memory_inputs_come_back_in_their_kind(llama):
    proto = onnx.load(llama / "model.onnx")
    out = quantize(proto, scheme="w4-g32", format="qdq", progress=False)
    assert isinstance(out, onnx.ModelProto)
    assert sum(n.op_type == "DequantizeLinear" for n in out.graph.node) == 14
    assert {o.domain: o.version for o in out.opset_import}[""] == 21
    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = quantize(gs.import_onnx(proto), scheme="w8-g32", progress=False)
    assert isinstance(graph, gs.Graph)
    assert sum(n.op == "MatMulNBits" for n in graph.nodes) == 14


def test_calibrated_method_reads_text_through_the_tokenizer(llama, tmp_path, monkeypatch):
    seen: list[int] = []

    class Needy:  # local stand-in for a calibrated method (tests only)
        name = "needy_api"
        needs = frozenset({"hessian"})

        def quantize(self, weight, scheme, stats=None, *, site="?"):
            seen.append(stats.n_tokens)
            return get_method("rtn").quantize(weight, scheme)

    monkeypatch.setitem(METHODS, "needy_api", Needy)
    out = quantize(llama, tmp_path / "q", method="needy_api", calib_samples=2, seq_len=32, progress=False)
    record = json.loads((out / "quantization_config.json").read_text())
    assert record["calibration"]["n_samples"] == 2 and record["calibration"]["seq_len"] == 32
    # q/k/v count each sequence's first position 64 times by default (2 sequences: 64 + 2 * 63 tokens)
    assert record["calibration"]["sink_weight"] == 64.0
    assert sorted(seen) == [64] * 8 + [64 + 2 * 63] * 6
    seen.clear()
    quantize(
        llama, tmp_path / "q1", method="needy_api", calib_samples=2, seq_len=32, sink_weight=1, progress=False
    )
    assert seen == [64] * 14
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
        ("inside", OutputPathError, "inside"),
        ("nonempty", OutputPathError, "not empty"),
        ("no_weights", NoQuantizableWeightsError, "no quantizable weight"),
        ("bad_method", UnsupportedSchemeError, "unknown rounding method"),
    ],
)
def test_bad_input_leaves_no_output(llama, tmp_path, tree_hash, case, error, match):
    src, out, kw = llama, tmp_path / "out", {}
    if case == "not_onnx":
        src = tmp_path / "junk.onnx"
        src.write_text("not a model")
    elif case == "bits3":
        kw = {"scheme": "w3-g32"}
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


def test_a_cuda_run_refines_on_the_gpu_only_where_torch_sees_one(monkeypatch):
    import torch

    from optimum.adaround import api

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert api._method_options("adaround", None, 0, "cuda") == {"seed": 0, "device": "cuda"}
    assert api._method_options("adaround_ls", None, 0, "cpu") == {"seed": 0}
    assert "device" not in api._method_options("gptq", None, 0, "cuda")  # GPTQ rounds on the CPU
    assert api._method_options("adaround", {"device": "cpu"}, 0, "cuda")["device"] == "cpu"  # the user's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "device" not in api._method_options("adaround", None, 0, "cuda")
