"""``optimum-adaround quantize``: summary on success; exit code 2, one line and no output on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from optimum.adaround.cli import main
from optimum.adaround.commands.options import parse_method_options
from optimum.adaround.graph_passes.config import QuantConfig


@pytest.fixture(scope="module")
def llama(tiny_hf_onnx):
    return tiny_hf_onnx("llama")


def test_quantize_command_prints_summary(llama, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(
        ["quantize", str(llama), str(out), "--method", "rtn", "--bits", "4", "--group-size", "32", "--asym",
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    # 14 linear layers and the output projection (8 bits by default); nothing is left in float
    assert "quantized 15 weights with rtn w4-g32-asym, format matmulnbits (chosen by --format auto)" in text
    assert "left in float" not in text
    assert f"output: {out}" in text and "smaller" in text
    record = json.loads((out / "quantization_config.json").read_text())
    assert record["scheme"]["data"]["symmetric"] is False
    assert (
        record["format"] == "matmulnbits" and record["config"]["data"]["scheme"]["data"]["format"] == "auto"
    )
    assert (out / "quantization_recipe.yaml").is_file()
    shapes = record["shapes"]
    assert f"graph: {shapes['nodes_before']} -> {shapes['nodes_after']} nodes (shape reads shared)" in text


def test_summary_says_why_shape_sharing_did_not_apply(capsys):
    from optimum.adaround.commands.quantize import print_summary

    record = {"scheme": {"type": "QuantScheme", "version": 1, "data": {"bits": 4, "group_size": 32}},
              "format": "matmulnbits", "n_sites": 1, "method": {"name": "rtn"}, "sites": [], "skipped": [],
              "float_bytes": 10, "shapes": {"applied": False, "reason": "symbolic shape inference failed: x"}}  # fmt: skip
    print_summary(Path("out"), record)
    assert "shape sharing not applied: symbolic shape inference failed: x" in capsys.readouterr().out


def test_lm_head_exclude_and_format_flags(llama, tmp_path, capsys):
    out = tmp_path / "q"
    argv = [
        "quantize",
        str(llama),
        str(out),
        "--method",
        "rtn",
        "--format",
        "qdq",
        "--lm-head",
        "scheme",
        "--exclude",
        r"mlp\.down",
        "--no-progress",
    ]
    assert main(argv) == 0
    record = json.loads((out / "quantization_config.json").read_text())
    schemes = {s["name"]: s["scheme"] for s in record["sites"]}
    assert not any("down_proj" in n for n in schemes) and len(schemes) == 13
    assert schemes["lm_head"] == "w4-g128-sym"  # --lm-head scheme: the run's own scheme
    assert record["format"] == "qdq" and QuantConfig.from_dict(record["config"]).selection.lm_head == "scheme"
    assert "(chosen by --format auto)" not in capsys.readouterr().out
    # --lm-head none --embeddings none: the head and its table stay float, and the summary says so
    argv = ["quantize", str(llama), str(tmp_path / "f"), "--method", "rtn", "--lm-head", "none", "--embeddings",
            "none", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "1 x lm_head left in float" in capsys.readouterr().out
    record = json.loads((tmp_path / "f" / "quantization_config.json").read_text())
    assert len(record["sites"]) == 14 and record["embeddings"] == []


def test_summary_warns_of_the_slow_exact_8_bit_kernel(llama, tmp_path, capsys):
    """accuracy_level 0 with the default 8-bit output projection: onnxruntime's exact 8-bit MatMulNBits is far
    slower than the float MatMul it replaces, and the summary says so (and not at the default level)."""
    for level, warned in (("0", True), ("4", False)):
        argv = ["quantize", str(llama), str(tmp_path / level), "--method", "rtn", "--accuracy-level", level,
                "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        text = capsys.readouterr().out
        assert ("8 bits with accuracy_level 0 (lm_head" in text) is warned
        assert "1 at w8-" in text and "8 bits, GatherBlockQuantized" in text  # a separate table here


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("not_onnx", "not a readable ONNX model"),
        ("no_weights", "no quantizable weight"),
        ("bad_block", "block sizes are"),
        ("inside", "inside"),
        ("bad_workers", "workers=0"),
        ("bad_option", "'damp'"),
        ("bad_recipe", "r.yaml"),
    ],
)
def test_bad_input_exits_2_with_one_line(llama, tmp_path, capsys, tree_hash, case, needle):
    src, out, extra = str(llama), tmp_path / "out", []
    if case == "not_onnx":
        junk = tmp_path / "junk.onnx"
        junk.write_bytes(b"\x00\x01 definitely not protobuf")
        src = str(junk)
    elif case == "no_weights":
        extra = ["--include", "nothing_matches_this"]
    elif case == "bad_block":
        extra = ["--group-size", "512", "--format", "matmulnbits"]
    elif case == "bad_workers":
        extra = ["--workers", "0"]
    elif case == "bad_option":
        extra = ["--method", "gptq", "--method-option", "damp=0.1"]
    elif case == "bad_recipe":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("version: 1\nbitz: 3\n")
        extra = ["--recipe", str(recipe)]
    else:
        out = llama / "nested"
    before = tree_hash(llama)
    rc = main(["quantize", src, str(out), "--method", "rtn", "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("optimum-adaround: error:") and needle in err and "\n" not in err
    assert not out.exists()
    assert tree_hash(llama) == before


def test_console_script_exit_code(tmp_path):
    """The installed entry point maps a user error to exit 2 (a subprocess, as a user would run it)."""
    junk = tmp_path / "junk.onnx"
    junk.write_text("nope")
    proc = subprocess.run(
        [sys.executable, "-m", "optimum.adaround.cli", "quantize", str(junk), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("optimum-adaround: error:")
    assert not (tmp_path / "o").exists()


def test_method_options_parsing():
    assert parse_method_options(["percdamp=0.01", "act_order=true", "name=abc"]) == {
        "percdamp": 0.01,
        "act_order": True,
        "name": "abc",
    }
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_method_options(["oops"])
