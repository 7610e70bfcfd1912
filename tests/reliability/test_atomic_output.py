"""Atomic output: a failure or Ctrl-C at any stage leaves the destination absent (or, when replacing an old
output with --overwrite, untouched), no temporary sibling, no scratch folder of spilled weights, and the
input unchanged."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reliability_helpers import leftovers, matmul_model, save

from optimum.adaround import api, output
from optimum.adaround.cli import main
from optimum.adaround.graph_passes import pipeline
from optimum.adaround.graph_passes.config import QuantConfig
from optimum.adaround.graph_passes.model_io import LoadedModel
from optimum.adaround.graph_passes.rounding.gptq import GPTQ

STAGES = ("mid_sites", "save", "side_files", "config", "rename", "calibration")
FAILURES: dict[str, Callable[[], BaseException]] = {
    "ctrl_c": KeyboardInterrupt,
    "enospc": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "bug": lambda: RuntimeError("injected bug"),
}
EXPECTED_RC = {"ctrl_c": 130, "enospc": 2, "bug": 1}


def _inject(monkeypatch: pytest.MonkeyPatch, stage: str, make: Callable[[], BaseException]) -> dict[str, int]:
    """Make ``stage`` raise ``make()``; return a counter of how often the patched code ran."""
    calls = {"n": 0}

    def after_real(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            real(*args, **kwargs)  # the stage has written its part: fail after it, the worst moment
            raise make()

        return wrapper

    if stage == "mid_sites":  # the 5th of 14 sites fails while spilling its packed weight to scratch
        real_spill = pipeline._spill

        def spill(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 5:
                raise make()
            return real_spill(*args, **kwargs)

        monkeypatch.setattr(pipeline, "_spill", spill)
    elif stage == "calibration":  # the 5th of 14 sites (in the 2nd decoder block) fails inside gptq
        real_quantize = GPTQ.quantize

        def quantize(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 5:
                raise make()
            return real_quantize(self, *args, **kwargs)

        monkeypatch.setattr(GPTQ, "quantize", quantize)
    elif stage == "save":
        monkeypatch.setattr(api, "save_model", after_real(api.save_model))
    elif stage == "side_files":
        monkeypatch.setattr(output, "copy_side_files", after_real(output.copy_side_files))
    elif stage == "config":
        monkeypatch.setattr(output, "write_quantization_config", after_real(output.write_quantization_config))
    elif stage == "rename":
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            if ".tmp-" in Path(src).name:  # the final rename of the finished temporary folder
                calls["n"] += 1
                raise make()
            real_replace(src, dst)

        monkeypatch.setattr(output.os, "replace", replace)
    return calls


def _argv(llama: Path, out: Path, stage: str) -> list[str]:
    argv = ["quantize", str(llama), str(out), "--group-size", "32", "--no-progress"]
    if stage == "calibration":
        return [*argv, "--method", "gptq", "--seq-len", "16", "--calib-samples", "2"]
    return [*argv, "--method", "rtn"]  # the other stages are about the output, not calibration (fast)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Route tempfile (the pipeline's spill folder) into a folder of our own, to see what is left there."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("failure", list(FAILURES))
def test_failure_at_any_stage_leaves_no_output(
    llama, tmp_path, scratch, monkeypatch, capsys, tree_hash, stage, failure
):
    if stage == "calibration" and failure != "ctrl_c":
        pytest.skip("one calibrated case is enough (slow); ctrl_c covers it")
    if stage == "calibration":
        monkeypatch.setattr(api, "calibration_ids", _fixed_tokens)
    before = tree_hash(llama)
    calls = _inject(monkeypatch, stage, FAILURES[failure])
    out = tmp_path / "out"
    rc = main(_argv(llama, out, stage))
    err = capsys.readouterr().err.strip()
    assert calls["n"] >= 1, "the failure was not injected"
    assert rc == EXPECTED_RC[failure], err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert list(scratch.iterdir()) == [], "spilled weights left behind"
    assert tree_hash(llama) == before


@pytest.mark.parametrize("stage", ["mid_sites", "save", "config", "rename"])
def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(
    llama, tmp_path, scratch, monkeypatch, capsys, stage
):
    out = tmp_path / "out"
    assert main(_argv(llama, out, "save")) == 0
    old = _tree(out)
    _inject(monkeypatch, stage, KeyboardInterrupt)
    assert main([*_argv(llama, out, stage), "--bits", "8", "--overwrite"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _tree(out) == old
    assert leftovers(tmp_path) == []
    assert list(scratch.iterdir()) == []


def test_api_reraises_ctrl_c_and_leaves_nothing(llama, tmp_path, scratch, monkeypatch):
    _inject(monkeypatch, "save", KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(llama, tmp_path / "out", scheme="w4-g32", method="rtn", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [] and list(scratch.iterdir()) == []


def test_success_leaves_only_the_output(llama, tmp_path, scratch):
    out = api.quantize(llama, tmp_path / "out", scheme="w4-g32", method="rtn", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "scratch"]
    assert list(scratch.iterdir()) == []
    assert (out / "model.onnx").is_file() and (out / "quantization_config.json").is_file()


def _fixed_tokens(config: QuantConfig, loaded: LoadedModel, given: Any) -> tuple[np.ndarray, dict]:
    """Calibration ids without text (fast): a deterministic pattern over the tiny vocabulary."""
    n, seq_len, seed = config.calib_samples, config.calibration.seq_len, config.calibration.seed
    ids = (np.arange(n * seq_len, dtype=np.int64).reshape(n, seq_len) * 7 + seed) % 300
    return ids, {"source": "test ids", "n_samples": n, "seq_len": seq_len}


def _default_sigint() -> None:
    """Ctrl-C as a terminal delivers it: a test run started in the background of a non-interactive shell
    inherits SIGINT ignored (so does every child, and Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_real_sigint_in_a_subprocess_mid_quantization(tmp_path):
    """A real Ctrl-C (SIGINT) to the console script while sites are being quantized: exit 130, nothing left."""
    rng = np.random.default_rng(0)
    src = save(
        # enough sites that the signal lands while they are rounded even when the test process is starved
        # of CPU by a parallel test run
        matmul_model([rng.standard_normal((768, 768)).astype(np.float32) for _ in range(64)]),
        tmp_path / "src",
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    exe = Path(sys.executable).with_name("optimum-adaround")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "optimum.adaround.cli"]
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen(
        [*cmd, "quantize", str(src), str(tmp_path / "out"), "--no-progress", "--method", "rtn", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list(scratch.glob("adaround-spill-*/*.bin"))) < 4 and proc.poll() is None:  # rounding sites
        assert time.monotonic() < deadline, "quantization never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert list(scratch.iterdir()) == []
