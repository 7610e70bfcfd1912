"""The main job (``optimum-adaround`` with no arguments) end to end on the real embedded model."""

import json

import pytest

from optimum.adaround import cli


@pytest.mark.slow
def test_main_job_quantizes_and_evaluates_the_default_model(tmp_path, capsys):
    out = tmp_path / "job"
    # RTN and a short evaluation keep this test at a couple of minutes; the README's command runs the
    # default (calibrated) method with the full evaluation.
    rc = cli.main(["run", "--method", "rtn", "--eval-tokens", "1024", "--quiet", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| fp32 |" in printed and "w4-g128-sym rtn" in printed and str(out) in printed
    summary = json.loads((out / "main_job.json").read_text())
    fp32, q = summary["fp32"], summary["quantized"]
    assert fp32["perplexity"]["tokens"] == q["perplexity"]["tokens"] >= 1000
    # A real trained model: fp32 perplexity on Wikipedia is tens, not tens of thousands (random weights).
    assert 5 < fp32["perplexity"]["perplexity"] < 60
    assert (
        fp32["perplexity"]["perplexity"]
        < q["perplexity"]["perplexity"]
        < 3 * fp32["perplexity"]["perplexity"]
    )
    assert q["sites"] == 210  # 30 layers x 7 linear layers; the tied lm_head stays fp32 by default
    assert 4.0 < q["bits_per_weight"] < 5.0
    assert q["model_bytes"] < fp32["model_bytes"] / 2
    assert (out / "sqnr_per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "quantization_config.json").is_file()
    # A second run into its own earlier output replaces it without --overwrite.
    assert cli.main(["run", "--method", "rtn", "--no-eval", "--quiet", "--output", str(out)]) == 0
