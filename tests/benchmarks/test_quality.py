"""benchmarks/quality.py (a script, imported by path): real runs on a tiny model write one JSON file per row,
RESULTS.md is rendered from those files alone, and ``--resume`` measures only the rows not written yet."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
_TABLE_HEAD = "| scheme | tool | method |"


def _table(md: str) -> list[str]:
    """The perplexity table's row lines."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(_TABLE_HEAD)) + 2
    return lines[start : lines.index("", start)]


def test_the_stored_rows_render_the_committed_results_md(quality, tmp_path):
    # RESULTS.md is rendered from benchmarks/results/ alone: rendering them again changes no byte
    shutil.copytree(_BENCHMARKS / "results", tmp_path / "results")
    assert quality.main(["--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "RESULTS.md").read_text() == (_BENCHMARKS / "RESULTS.md").read_text()


@pytest.fixture(scope="module")
def tiny_run(quality, tiny_hf_onnx, tmp_path_factory):
    """A whole run on the tiny Llama: onnxruntime's default quantizer, our rtn and gptq, the speed table."""
    from optimum.adaround.data.text import evaluation_text

    root = tmp_path_factory.mktemp("quality")
    argv = ["--schemes", "w4-g64", "--ort", "default", "--ours", "rtn", "gptq", "--eval-tokens", "256"]
    argv += ["--context", "64", "--calib-samples", "4", "--calib-seq-len", "32", "--new-tokens", "4"]
    argv += ["--prompt-tokens", "8", "--no-progress", "--keep", "--work", str(root / "work")]
    argv += ["--out", str(root / "out")]
    model, text = tiny_hf_onnx("llama"), evaluation_text()
    quality.run(quality.parse_args(argv), model, text, quality.recorded_command(argv))
    return root, argv, model, text


def test_a_run_writes_one_file_per_row_and_renders_them(quality, tiny_run):
    root = tiny_run[0]
    rows_dir = root / "out" / "results" / "quality"
    names = sorted(p.name for p in rows_dir.glob("row_*.json"))
    assert names == [
        "row_fp32_fp32_fp32.json",
        "row_w4-g64_onnxruntime_default.json",
        "row_w4-g64_ours_gptq.json",
        "row_w4-g64_ours_rtn.json",
    ]
    rows = quality.Store(root / "out" / "results").planned_rows()
    assert [(r.method, r.status) for r in rows] == [
        ("fp32", "ok"),
        ("default", "ok"),
        ("rtn", "ok"),
        ("gptq", "ok"),
    ]
    assert all(r.perplexity and r.perplexity > 1 and r.measured["commit"] for r in rows)
    # a process with onnxruntime (and torch for ours) loaded holds tens of MB at least
    assert all(r.quant_seconds > 0 and r.peak_rss_anon_mb > 50 for r in rows[1:])
    gptq = rows[3]
    assert gptq.site_counts["below_rtn_of"] == len(gptq.weight_sqnr_db) > 0  # from its quantization record
    md = (root / "out" / "RESULTS.md").read_text()
    table = _table(md)
    assert [line.split(" | ")[2] for line in table] == ["fp32", "default", "rtn", "gptq"]
    assert f"{gptq.perplexity:.3f}" in table[3]
    assert "rtn_mse" not in md and "not reached" not in md  # the command's rows, all finished
    speed = quality.Store(root / "out" / "results").read_speed()
    assert [s["model"].split(" ")[0] for s in speed] == [
        "3-bit",
        "fp32",
        "int4",
        "int4",
    ]  # no 3-bit row asked
    assert all(s["decode_tokens_per_s"] > 0 for s in speed[1:])
    assert "--work" not in md and "--keep" not in md  # flags that change no number are not recorded
    # rendering alone reproduces the file the run wrote
    written = md
    assert quality.main(["--render", "--out", str(root / "out")]) == 0
    assert (root / "out" / "RESULTS.md").read_text() == written


def test_resume_measures_only_the_rows_not_written(quality, tiny_run):
    root, argv, model, text = tiny_run
    rows_dir = root / "out" / "results" / "quality"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in rows_dir.glob("*_*.json")}
    (rows_dir / "row_w4-g64_ours_gptq.json").unlink()  # as if the run had stopped during this row
    resumed = [*argv, "--resume"]
    quality.run(quality.parse_args(resumed), model, text, quality.recorded_command(resumed))
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in rows_dir.glob("*_*.json")}
    assert after.keys() == before.keys()
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed == ["row_w4-g64_ours_gptq.json"]  # the other rows and the speed rows were skipped
    table = _table((root / "out" / "RESULTS.md").read_text())
    assert len(table) == 4 and "| gptq |" in table[3] and "not reached" not in table[3]


def test_resume_refuses_rows_measured_with_other_settings(quality, tiny_run):
    _, argv, model, text = tiny_run
    other = [*argv, "--resume", "--eval-tokens", "128"]
    with pytest.raises(
        SystemExit, match=r"row_fp32_fp32_fp32\.json .* was measured with .*'eval_tokens': 256"
    ):
        quality.run(quality.parse_args(other), model, text, quality.recorded_command(other))
