"""benchmarks/quantize_time.py (a script, imported by path): whole CLI runs timed, failures kept as rows."""

from __future__ import annotations


def test_each_method_runs_as_the_user_command_and_is_reported(quantize_time, tiny_hf_onnx, tmp_path):
    model = tiny_hf_onnx("llama")
    extra = ["--calib-samples", "4", "--seq-len", "32"]
    rows = quantize_time.time_methods(model, ["rtn", "gptq"], 4, 32, extra, timeout_s=600)
    assert [(r["method"], r["ok"], r["error"]) for r in rows] == [("rtn", True, None), ("gptq", True, None)]
    assert rows[0]["calib_samples"] is None and rows[1]["calib_samples"] == 4  # read back from the output
    assert all(r["wall_seconds"] > 0 and r["peak_rss_anon_mb"] > 0 for r in rows)
    assert (
        rows[1]["command"].startswith("optimum-adaround quantize ") and "--method gptq" in rows[1]["command"]
    )
    meta = {"model": "tiny", "date": "today", "machine": "here", "bits": 4, "group_size": 32, "command": "c"}
    table = quantize_time.markdown(meta, rows)
    assert table[0] == "# Whole quantization runs, each method at its defaults (tiny, today)"
    assert table[-1].startswith("| `gptq` | 4 | ") and table[-1].endswith(" | ok |")


def test_a_failing_run_is_a_row_with_the_cli_error(quantize_time, tmp_path):
    rows = quantize_time.time_methods(tmp_path / "missing", ["rtn"], 4, 128, [], timeout_s=120)
    assert rows[0]["ok"] is False and rows[0]["error"].startswith("exit code ")
    assert "missing" in rows[0]["error"]  # the CLI's one-line error, naming the input
    assert quantize_time.markdown(
        {"model": "m", "date": "d", "machine": "x", "bits": 4, "group_size": 128, "command": "c"}, rows
    )[-1].endswith("| **error** " + rows[0]["error"] + " |")
