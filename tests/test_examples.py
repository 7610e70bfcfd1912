"""The examples/ scripts run as documented, on tiny random-init models (data-free rtn to stay fast)."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import onnx_ir as ir
import pytest
import yaml

from optimum.adaround.evaluation import quantized_sites
from optimum.adaround.graph_passes.config import ModuleOverride, QuantConfig
from optimum.adaround.recipes import load_config, save_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str):
    """Run a Python example in-process, as ``python examples/NAME args``; return what its main() returned."""
    argv = sys.argv
    sys.argv = [str(EXAMPLES / name), *args]
    try:
        namespace = runpy.run_path(str(EXAMPLES / name), run_name="example")
        return namespace["main"](list(args))
    finally:
        sys.argv = argv


def test_examples_exist():
    assert {"cli_one_liner.sh", "python_api.py", "recipe.yaml", "load_and_generate.py"} <= {
        p.name for p in EXAMPLES.iterdir()
    }


def test_recipe_example_is_valid(tmp_path):
    config = load_config(EXAMPLES / "recipe.yaml")
    assert config.scheme.label.startswith("w4-g128") and config.scheme.format.value == "matmulnbits"
    assert config.method.name == "gptq" and config.calibration.calib_samples == 128
    assert config.selection.overrides == (ModuleOverride("mlp\\.down_proj", "w8-g128"),)
    # it is the record save_config writes (comments aside), so it stays in step with the config's fields
    text = (EXAMPLES / "recipe.yaml").read_text()
    assert text.startswith("#") and yaml.safe_load(text) == config.to_dict()
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    written = save_config(config, tmp_path / "r.yaml").read_text().splitlines()
    assert body == [ln for ln in written if not ln.startswith("#")]
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_python_api_with_recipe_then_load_and_generate(tiny_hf_model, tmp_path, capsys):
    text = (
        tmp_path / "eval.txt"
    )  # short evaluation text: the tiny byte-level tokenizer is slow on the full split
    text.write_text(" ".join(f"Paragraph {i} is about a quick brown fox." for i in range(50)))
    out = run_example(
        "python_api.py", str(tiny_hf_model("llama")), str(tmp_path / "q"),
        "--recipe", str(EXAMPLES / "recipe.yaml"), "--method", "rtn", "--eval-data", str(text),
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "perplexity:" in printed and "bits per weight" in printed
    # one weight per module (q/k/v and gate/up run fused), the output projection at 8 bits by default
    bits = {s.name: s.stored.scheme.bits for s in quantized_sites(ir.load(str(out / "model.onnx")))[0]}
    assert len(bits) == 15
    assert {b for n, b in bits.items() if "down_proj" in n} == {8}  # the recipe's override
    assert bits["lm_head"] == 8
    assert {b for n, b in bits.items() if "down_proj" not in n and n != "lm_head"} == {4}
    assert json.loads((out / "quantization_config.json").read_text())["method"]["name"] == "rtn"

    text = run_example("load_and_generate.py", str(out), "The quick brown", "--max-new-tokens", "5")
    assert text.startswith("The quick brown") and len(text) > len("The quick brown")


@pytest.mark.slow
def test_cli_one_liner(tiny_hf_model, tmp_path):
    env = {
        **os.environ,
        "METHOD": "rtn",
        "GROUP": "32",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    res = subprocess.run(
        ["bash", str(EXAMPLES / "cli_one_liner.sh"), str(tiny_hf_model("mistral")), str(tmp_path / "m")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "m"
    assert (out / "eval_results.json").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "quantization_config.json").read_text())["n_sites"] == 15


def test_cli_one_liner_usage_error():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    res = subprocess.run(["bash", str(EXAMPLES / "cli_one_liner.sh")], capture_output=True, text=True)
    assert res.returncode == 2 and "usage:" in res.stderr
