"""Atomic output folders: success renames into place, failures and Ctrl-C leave nothing, bad paths refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optimum.adaround.graph_passes.config import QuantConfig
from optimum.adaround.graph_passes.errors import OutputPathError
from optimum.adaround.output import (
    CONFIG_NAME,
    RECIPE_NAME,
    atomic_output,
    check_output_path,
    copy_side_files,
    write_output,
    write_quantization_config,
)
from optimum.adaround.recipes import load_config


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_success_renames_into_place(tmp_path):
    out = tmp_path / "a" / "out"
    with atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp != out and not out.exists()
        (tmp / "model.onnx").write_bytes(b"x")
    assert (out / "model.onnx").read_bytes() == b"x"
    assert _siblings(out) == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_leaves_nothing(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(type(exc)), atomic_output(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"partial")
        raise exc
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_old_output_until_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputPathError, match="not empty"):
        check_output_path(out)
    with pytest.raises(RuntimeError), atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("fail")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # failed overwrite: old output intact
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _siblings(out) == ["out"]


def test_refused_paths(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"")
    for bad in (src, src / "q", src / "q" / "deeper"):
        with pytest.raises(OutputPathError, match="input folder"):
            check_output_path(bad, [src])
    with pytest.raises(OutputPathError, match="or its folder"):
        check_output_path(src, [src / "model.onnx"])
    with pytest.raises(OutputPathError, match="would delete the input"):
        check_output_path(tmp_path, [src], overwrite=True)
    with pytest.raises(OutputPathError, match="is a file"):
        check_output_path(src / "model.onnx")
    # A file input's sibling folder is fine, and so is an empty existing folder.
    assert check_output_path(tmp_path / "q", [src / "model.onnx"]) == (tmp_path / "q").resolve()
    (tmp_path / "empty").mkdir()
    assert check_output_path(tmp_path / "empty", [src]) == (tmp_path / "empty").resolve()


def test_side_files_and_config(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "generation_config.json", "model.onnx", "notes.txt"):
        (src / name).write_text("{}")
    assert sorted(copy_side_files(src, dst)) == ["config.json", "generation_config.json", "tokenizer.json"]
    path = write_quantization_config(dst, {"scheme": {"bits": 4}, "sqnr": np.float32(1.5), "where": dst})
    record = json.loads(path.read_text())
    assert record["sqnr"] == 1.5 and record["where"] == str(dst)
    assert path.name == CONFIG_NAME
    assert record["version"] == 1 and record["scheme"] == {"bits": 4}
    assert {"python", "onnx", "onnx-ir", "numpy"} <= set(record["versions"])


def test_write_output_writes_model_record_and_recipe_once_then_commits(tmp_path):
    config = QuantConfig().with_overrides(method="rtn", bits=8, exclude=["lm_head"])
    seen = []

    def fill(tmp):
        (tmp / "model.onnx").write_bytes(b"model")
        return {"config": config.to_dict(), "n_sites": 3}

    def after(tmp):  # e.g. the model card: reads what was written before the commit
        seen.append(sorted(p.name for p in tmp.iterdir()))

    out = write_output(tmp_path / "o", [], False, fill, after)
    assert seen == [sorted(["model.onnx", CONFIG_NAME, RECIPE_NAME])]
    assert load_config(out / RECIPE_NAME) == config
    record = json.loads((out / CONFIG_NAME).read_text())
    assert record["recipe_file"] == RECIPE_NAME and QuantConfig.from_dict(record["config"]) == config
    assert _siblings(out) == ["o"]

    def broken(tmp):
        raise RuntimeError("card failed")

    with pytest.raises(RuntimeError, match="card failed"):
        write_output(tmp_path / "p", [], False, fill, broken)
    assert _siblings(out) == ["o"]  # nothing of the failed output is left
