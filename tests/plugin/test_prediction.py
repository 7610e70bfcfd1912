"""``optimum-adaround predict`` / ``predict()``: a prediction without a run, consistent with the run."""

from __future__ import annotations

import json
import math

import pytest

from optimum.adaround import quantize
from optimum.adaround.cli import main
from optimum.adaround.graph_passes.errors import UserError

FLAGS = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--calib-samples", "4", "--seq-len", "32"]


def test_predict_prints_the_increase_and_matches_the_runs_size(tiny_hf_onnx, tmp_path, capsys):
    src = tiny_hf_onnx("llama")
    out = tmp_path / "p.json"
    assert main(["predict", str(src), *FLAGS, "--no-progress", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted perplexity increase: " in text and "on the probe tokens" in text
    pred = json.loads(out.read_text())
    assert math.isfinite(pred["delta_nll"]) and pred["delta_nll_se"] >= 0
    assert pred["schemes"] == ["w4-g32-sym", "w8-g32-sym"]  # the run's scheme and the 8-bit head
    q = quantize(str(src), str(tmp_path / "q"), method="rtn", scheme="w4-g32", calib_samples=4, seq_len=32,
                 progress=False)  # fmt: skip
    record = json.loads((q / "quantization_config.json").read_text())
    written = (
        8 * sum(s["packed_bytes"] for s in record["sites"]) / sum(s["k"] * s["n"] for s in record["sites"])
    )
    assert pred["bits_per_weight"] == written


def test_predict_under_target_bits_reports_the_allocation(tiny_hf_onnx, tmp_path, capsys):
    src = tiny_hf_onnx("llama")
    argv = ["predict", str(src), *FLAGS, "--target-bits", "5", "--candidates", "w2-g16-asym",
            "--candidates", "w4-g32", "--candidates", "w8-g32", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "allocation at " in text and "predicted perplexity" in text
    header = next(line for line in text.splitlines() if line.strip().startswith("block"))
    assert header.split() == ["block", "self_attn.{q,k,v}", "self_attn.o", "mlp.{gate,up}", "mlp.down"]
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"] and all(len(r) == 5 for r in rows)
    assert any(line.split()[0] == "lm_head" for line in text.splitlines() if line.strip())


def test_one_configuration_is_predicted_by_the_joint_probe(tiny_hf_onnx):
    from optimum.adaround.prediction import predict

    src = tiny_hf_onnx("llama")
    found = predict(str(src), method="gptq", scheme="w3-g32", calib_samples=4, seq_len=32, progress=False)
    assert "sensitivity" not in found and found["joint"]["tokens"] == 4 * 31
    assert found["joint"]["factor"] > 0 and found["schemes"] == ["w3-g32-sym", "w8-g32-sym"]
    assert found["seconds"]["estimate"] > 0 and found["seconds"]["probe"] > 0


def test_a_prediction_from_a_kept_profile_needs_no_calibration(tiny_hf_onnx, tmp_path):
    """An allocation's prediction keeps its sensitivities and errors; a later prediction of one of its
    candidates from them runs no calibration pass and no probe (and is refused for another method)."""
    from optimum.adaround.prediction import predict

    src = tiny_hf_onnx("llama")
    options = {"method": "gptq", "calib_samples": 4, "seq_len": 32, "progress": False}
    first = predict(str(src), target_bits=5, candidates=("w3-g32", "w8-g32"), **options)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(first))
    again = predict(str(src), sensitivity=str(profile), scheme="w3-g32", **options)
    assert math.isfinite(again["delta_nll"]) and again["sensitivity"]["method"] == "gptq"
    assert again["seconds"]["estimate"] < 0.05 * first["seconds"]["estimate"]
    assert again["seconds"]["probe"] < 0.05 * first["seconds"]["probe"]
    assert first["sensitivity"]["method_factors"]
    with pytest.raises(UserError, match="measured for method 'gptq'"):
        predict(str(src), sensitivity=str(profile), **{**options, "scheme": "w3-g32", "method": "rtn"})
