"""benchmarks/transforms.py: its table, and its result written where asked."""

from __future__ import annotations

import json

import pytest


def _result():
    rows = [{"scheme": "w3-g128", "transform": t, "size_mb": 158.1 + i, "ppl_wikipedia": 40.0 - i,
             "ppl_news": 50.0 + i} for i, t in enumerate(("none", "rotate"))]  # fmt: skip
    return {"provenance": {"date": "D", "machine": "M", "commit": "C"}, "eval_tokens": 16384,
            "fp32": {"ppl_wikipedia": 25.0, "ppl_news": 40.0}, "rows": rows}  # fmt: skip


def test_the_table_shows_each_row_against_fp32(transforms):
    text = transforms.render(_result())
    assert "fp32: Wikipedia 25.00, news 40.00" in text and "commit C" in text
    assert "| w3-g128 | gptq | none | - | - | 158.1 | - | 40.00 | +60.0% | 50.00 | +25.0% |" in text
    assert "| w3-g128 | gptq | rotate | - | - | 159.1 | - | 39.00 | +56.0% | 51.00 | +27.5% |" in text


def test_a_tuned_row_shows_its_steps_and_the_blocks_error(transforms):
    result = _result()
    result["rows"][0].update(tune_steps=200, quantize_seconds=1234.5, calib_samples=128,
                             tune_error={"error_before": 0.0123, "error_after": 0.0081})  # fmt: skip
    text = transforms.render(result)
    assert "| w3-g128 | gptq | none | 128 | 200 steps (0.0123 -> 0.0081) | 158.1 | 1234 | 40.00 |" in text


def test_the_blocks_tuning_error_is_averaged_from_the_record(transforms):
    parts = [{"label": "prologue", "tune": None}, {"label": "block 0", "tune": {"error_before": 0.2, "error_after": 0.1}},
             {"label": "block 1", "tune": {"error_before": 0.4, "error_after": 0.2}}]  # fmt: skip
    got = transforms.tuned_blocks({"calibration_report": {"parts": parts}})
    assert got == {"error_before": pytest.approx(0.3), "error_after": pytest.approx(0.15)}
    assert transforms.tuned_blocks({"calibration_report": None}) == {}


def test_emit_writes_json_and_markdown(measure, tmp_path, capsys):
    result = _result()
    measure.emit(result, "TABLE", tmp_path / "r.json", tmp_path / "r.md")
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert (tmp_path / "r.md").read_text() == "TABLE\n" and "TABLE" in capsys.readouterr().out


def test_the_decode_table_shows_each_variants_speed_and_ratio(transforms):
    rows = [{"scheme": "w4-g128", "transform": t, "size_mb": 90.0 + i, "decode_tokens_per_s": v,
             "ratio_to_none": v / 40.0, "rounds": [v]} for i, (t, v) in enumerate((("none", 40.0), ("rotate", 38.0)))]  # fmt: skip
    text = transforms.render_decode({"provenance": {"date": "D", "machine": "M", "commit": "C"}, "rounds": 5,
                                     "new_tokens": 64, "rows": rows})  # fmt: skip
    assert "median of 5 interleaved rounds" in text and "64 new tokens" in text
    assert "| w4-g128 | none | 90.0 | 40.0 | 1.000 |" in text
    assert "| w4-g128 | rotate | 91.0 | 38.0 | 0.950 |" in text


def test_a_run_with_an_nncf_row_says_how_its_own_rows_store_the_head(transforms):
    result = _result()
    result["head"] = "8"
    result["rows"].append({"scheme": "w4-g128", "method": "NNCF int4-g128-awq-se", "transform": "-",
                           "size_mb": 117.9, "ppl_wikipedia": 32.0, "ppl_news": 44.0})  # fmt: skip
    text = transforms.render(result)
    assert "embedding of our rows: 8 bits (as NNCF stores them)" in text
    assert (
        "| w4-g128 | NNCF int4-g128-awq-se | - | - | - | 117.9 | - | 32.00 | +28.0% | 44.00 | +10.0% |"
        in text
    )
    assert "embedding of our rows: float" in transforms.render(_result())


def test_the_tokens_scored_are_shown_when_the_fp32_row_counted_them(transforms):
    result = _result()
    result["fp32"] |= {"tokens_wikipedia": 119291, "tokens_news": 20804}
    assert "evaluation tokens scored: wikipedia 119291, news 20804." in transforms.render(result)
    assert "16384 evaluation tokens per domain." in transforms.render(_result())


def test_each_calibration_count_and_tuning_is_a_row_of_its_own(transforms, monkeypatch, tmp_path):
    import optimum.adaround.data.default_model as default_model

    calls = []
    monkeypatch.setattr(default_model, "default_onnx_dir", lambda: tmp_path)
    monkeypatch.setattr(
        transforms, "measure", lambda folder, tokens: {"ppl_wikipedia": 25.0, "ppl_news": 40.0}
    )
    monkeypatch.setattr(transforms, "provenance", lambda: {"date": "D", "machine": "M", "commit": "C"})

    def fake_row(source, work, scheme, variant, tokens, method, head, tune_steps, calib_samples, targets):
        calls.append((scheme, tune_steps, calib_samples, targets))
        return {"scheme": scheme, "transform": variant, "tune_steps": tune_steps, "calib_samples": calib_samples,
                "tune_targets": targets, "size_mb": 1.0, "ppl_wikipedia": 30.0, "ppl_news": 50.0}  # fmt: skip

    monkeypatch.setattr(transforms, "row", fake_row)
    md = tmp_path / "r.md"
    argv = [
        "--schemes",
        "w3-g128",
        "--variants",
        "none",
        "--calib-samples",
        "32",
        "128",
        "--tune-steps",
        "0",
        "200",
        "--tune-targets",
        "quantized",
        "float",
    ]
    assert transforms.main([*argv, "--work", str(tmp_path / "w"), "--md", str(md)]) == 0
    q, f = "quantized", "float"
    assert calls == [("w3-g128", 0, 32, q), ("w3-g128", 200, 32, q), ("w3-g128", 200, 32, f),
                     ("w3-g128", 0, 128, q), ("w3-g128", 200, 128, q), ("w3-g128", 200, 128, f)]  # fmt: skip
    text = md.read_text()
    assert "| w3-g128 | gptq | none | 128 | 200 steps (0.0000 -> 0.0000) |" in text
    assert "| w3-g128 | gptq | none | 128 | 200 steps, float targets (0.0000 -> 0.0000) |" in text
