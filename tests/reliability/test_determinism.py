"""Determinism: same input, options and seed -> byte-identical model files, across runs and across thread
counts (torch intra-op threads for the rounding math, onnxruntime intra-op threads in the calibration
engine's sessions).

quantization_config.json is a report: its date and timings change from run to run by design. Apart from
those it is identical between runs with the same thread counts; across thread counts the metrics
(``proxy_loss``, ``sqnr_db``, float64 reductions in torch) may differ in the last bit while the codes, and
so the model bytes, do not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from optimum.adaround import quantize
from optimum.adaround.graph_passes.calibration import engine

VOLATILE = {"created", "timings", "seconds", "time_s", "calibration_report"}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    words = ["quick", "slow", "red", "lazy", "brown"]
    body = " ".join(f"The {w} fox number {i} jumps over the dog." for i, w in enumerate(words * 30))
    path = tmp_path_factory.mktemp("det-text") / "calib.txt"
    path.write_text(body)
    return path


def _with_threads(monkeypatch: pytest.MonkeyPatch, torch_threads: int, ort_threads: int) -> None:
    torch.set_num_threads(torch_threads)  # the `threads` fixture restores the previous count
    real = ort.SessionOptions

    def options() -> ort.SessionOptions:
        opts = real()
        opts.intra_op_num_threads = ort_threads
        return opts

    monkeypatch.setattr(engine.ort, "SessionOptions", options)


@pytest.fixture
def threads(monkeypatch) -> Iterator[Any]:
    """``threads(torch_n, ort_n)`` sets both thread counts for the next quantize call; restored after."""
    previous = torch.get_num_threads()
    yield lambda t, o: _with_threads(monkeypatch, t, o)
    torch.set_num_threads(previous)


def _files(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.name.startswith("model")
    }


def _stable(record: Any) -> Any:
    if isinstance(record, dict):
        return {k: _stable(v) for k, v in record.items() if k not in VOLATILE}
    if isinstance(record, list):
        return [_stable(v) for v in record]
    return record


def _config(out: Path) -> dict[str, Any]:
    return json.loads((out / "quantization_config.json").read_text())


def _metrics(record: dict[str, Any]) -> np.ndarray:
    return np.array([v for s in record["sites"] for k, v in sorted(s["metrics"].items()) if k != "time_s"])


def test_rtn_is_byte_identical_across_runs_and_threads(llama, tmp_path, threads):
    outs = []
    for i, (t, o) in enumerate([(1, 1), (1, 1), (2, 2)]):
        threads(t, o)
        outs.append(quantize(llama, tmp_path / f"q{i}", scheme="w4-g32", method="rtn", progress=False))
    assert _files(outs[0]) == _files(outs[1]) == _files(outs[2])
    assert _stable(_config(outs[0])) == _stable(_config(outs[1])) == _stable(_config(outs[2]))


@pytest.mark.parametrize(
    ("method", "options"),
    # threads=None: the methods pin torch to 1 thread by default; None lets the global count (1 or 2) apply.
    [("gptq", {"threads": None}), ("adaround", {"iters": 20, "rounds": 1, "threads": None})],
    ids=["gptq", "adaround"],
)
def test_calibrated_methods_are_byte_identical_across_runs_and_threads(
    llama, text, tmp_path, threads, method, options
):
    def run(tag: str, torch_threads: int, ort_threads: int, seed: int = 0) -> Path:
        threads(torch_threads, ort_threads)
        return quantize(
            llama, tmp_path / tag, scheme="w4-g32", method=method, method_options=options, calib_data=str(text),
            calib_samples=4, seq_len=32, seed=seed, progress=False,
        )  # fmt: skip

    a, b, c = run("a", 1, 1), run("b", 1, 1), run("c", 2, 2)
    assert _files(a) == _files(b) == _files(c)
    assert _stable(_config(a)) == _stable(_config(b))
    # Across thread counts the report's float64 metrics may move in the last bit; the codes may not.
    np.testing.assert_allclose(_metrics(_config(c)), _metrics(_config(a)), rtol=1e-9, atol=0)
    # The seed matters (calibration windows), so the equalities above are not vacuous.
    if method == "gptq":
        assert _files(run("seed1", 1, 1, seed=1)) != _files(a)
