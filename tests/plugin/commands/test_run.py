"""The main job (``optimum-adaround`` with no arguments) end to end on the real embedded model."""

import argparse
import json
import types

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
    assert "| fp32 |" in printed and str(out) in printed
    rows = [line for line in printed.splitlines() if line.startswith("| w4")]
    assert len(rows) == 1 and "rtn" in rows[0] and "g128" in rows[0]
    summary = json.loads((out / "main_job.json").read_text())
    assert (summary["scheme"], summary["method"]) == ("w4-g128-sym", "rtn")
    fp32, q = summary["fp32"], summary["quantized"]
    assert fp32["perplexity"]["tokens"] == q["perplexity"]["tokens"] >= 1000
    # A real trained model: fp32 perplexity on Wikipedia is tens, not tens of thousands (random weights).
    assert 5 < fp32["perplexity"]["perplexity"] < 60
    assert (
        fp32["perplexity"]["perplexity"]
        < q["perplexity"]["perplexity"]
        < 3 * fp32["perplexity"]["perplexity"]
    )
    assert q["sites"] == 211  # 30 layers x 7 linear layers and the tied lm_head (8 bits by default)
    # fp32 scales per block of 128; rows of K = 576 are stored padded to 5 blocks (640): 79.6M weights at
    # (4 * 640 + 5 * 32) / 576 = 4.72 bits, down_proj's 26.5M (K = 1536) at 4.25, the head's 28.3M at 8.5
    # (8 bits, blocks of 64: the run's 128 halved to divide K = 576): 5.42 in all
    assert 5.38 < q["bits_per_weight"] < 5.46
    assert q["model_bytes"] < fp32["model_bytes"] / 2
    assert (out / "sqnr_per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "quantization_config.json").is_file()
    # A second run into its own earlier output replaces it without --overwrite.
    assert cli.main(["run", "--method", "rtn", "--no-eval", "--quiet", "--output", str(out)]) == 0


def test_the_table_row_names_scheme_and_method(tmp_path, monkeypatch, capsys):
    from optimum.adaround import evaluation, plots
    from optimum.adaround.commands import run

    report = types.SimpleNamespace(
        perplexity=None, bits_per_weight=4.25, model_bytes=10**6, weight_sqnr_db={}, to_dict=dict
    )
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: report)
    monkeypatch.setattr(plots, "plot_sqnr_bars", lambda *a, **k: None)
    args = argparse.Namespace(context_length=512, eval_tokens=None, no_eval=True)
    summary = run._evaluate(args, tmp_path, tmp_path, "w4-g128-sym-rtn", 1.0, False)
    assert (summary["scheme"], summary["method"]) == ("w4-g128-sym", "rtn")
    assert "| w4-g128-sym rtn |" in capsys.readouterr().out
