"""``optimum-cli export onnx-quant``: registration through the hook, flags, exit codes, a real run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from optimum.adaround.api import run_config
from optimum.adaround.commands.export_onnx_quant import build_parser, hook_specs, quantize_options, run_export
from optimum.adaround.commands.options import overrides_from_args
from optimum.adaround.graph_passes.config import QuantConfig
from optimum.adaround.recipes import save_config

OPTIMUM_CLI = shutil.which("optimum-cli") or str(Path(sys.executable).with_name("optimum-cli"))
QUANT_FLAGS = [
    "--weight-bits", "--group-size", "--sym", "--asym", "--method", "--format", "--calib-data",
    "--calib-samples", "--seq-len", "--include", "--exclude", "--lm-head", "--embeddings", "--recipe", "--eval",
    "--overwrite", "--push-to-hub", "--scheme", "--method-option", "--data-type", "--scale-dtype", "--sequential",
    "--one-pass", "--sink-weight", "--seed", "--accuracy-level", "--workers",
]  # fmt: skip
OPTIMUM_FLAGS = ["--model", "--task", "--opset", "--device", "--trust-remote-code", "--dtype"]


def run(args, *, env=None, cwd=None, timeout=300):
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}
    )


def run_python(code: str, **kw):
    return run([sys.executable, "-c", textwrap.dedent(code)], **kw)


def test_help_lists_optimum_and_quantization_flags():
    res = run([OPTIMUM_CLI, "export", "onnx-quant", "--help"])
    assert res.returncode == 0, res.stderr
    for flag in QUANT_FLAGS + OPTIMUM_FLAGS:
        assert flag in res.stdout, flag


def test_export_help_lists_both_subcommands():
    res = run([OPTIMUM_CLI, "export", "--help"])
    assert res.returncode == 0, res.stderr
    assert "onnx-quant" in res.stdout and "onnx" in res.stdout.replace("onnx-quant", "")


def test_hook_import_is_light():
    res = run_python(
        """
        import sys
        import optimum.commands.register.adaround_onnx_quant as hook
        assert hook.REGISTER_COMMANDS, "command not registered"
        heavy = sorted(m for m in sys.modules if m.startswith("optimum.adaround") or m == "torch")
        print(heavy)
        assert not heavy, heavy
        """
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_broken_package_does_not_break_optimum_cli():
    # optimum.adaround cannot be imported: every other command still works, onnx-quant says why (exit 2).
    res = run_python(
        """
        import sys
        sys.modules["optimum.adaround"] = None
        sys.modules["optimum.adaround.commands.export_onnx_quant"] = None
        from optimum.commands.optimum_cli import main
        sys.argv = ["optimum-cli", "export", "onnx-quant", "--model", "x", "out"]
        main()
        """
    )
    assert res.returncode == 2, res.stderr
    assert "optimum-adaround failed to import" in res.stderr and "Traceback" not in res.stderr


def test_help_without_optimum_onnx_parser():
    res = run_python(
        """
        import sys, types
        # as if optimum-onnx were not installed: no `export onnx` parser, no register_export module
        sys.modules["optimum.commands.export.onnx"] = None
        sys.modules["optimum.commands.register.register_export"] = types.ModuleType("register_export")
        from optimum.commands.optimum_cli import main
        sys.argv = ["optimum-cli", "export", "onnx-quant", "--help"]
        main()
        """
    )
    assert "--weight-bits" in res.stdout and "--model" in res.stdout, res.stderr[-2000:]


def test_hook_without_optimum_cli_classes_registers_nothing():
    res = run_python(
        """
        import sys
        sys.modules["optimum.commands.export.base"] = None
        import optimum.commands.register.adaround_onnx_quant as hook
        assert hook.REGISTER_COMMANDS == []
        """
    )
    assert res.returncode == 0, res.stderr


def test_flags_map_to_export_arguments():
    args = build_parser().parse_args(
        ["--model", "m", "out", "--weight-bits", "3", "--group-size", "64", "--asym", "--method", "gptq",
         "--format", "lowbit", "--calib-data", "news", "--calib-samples", "16", "--exclude", "lm_head",
         "--exclude", "down_proj", "--eval", "--overwrite", "--push-to-hub", "me/x", "--opset", "21",
         "--workers", "3"]
    )  # fmt: skip
    kw = quantize_options(args)
    assert (kw["bits"], kw["group_size"], kw["symmetric"]) == (3, 64, False)
    assert kw["method"] == "gptq" and kw["format"] == "lowbit" and kw["config"] is None
    assert "scheme" not in kw and "lm_head" not in kw  # not given
    assert kw["calib_data"] == "news" and kw["calib_samples"] == 16
    assert kw["exclude"] == ("lm_head", "down_proj")
    assert kw["eval"] and kw["overwrite"] and kw["push_to_hub"] == "me/x" and kw["opset"] == 21
    assert kw["task"] == "text-generation-with-past"  # onnx-quant's default, not Optimum's "auto"
    assert kw["workers"] == 3
    assert "seq_len" not in kw and "seed" not in kw  # not given: recipe / quantize defaults apply
    assert kw["export_options"]["do_constant_folding"] is True and "optimize" not in kw["export_options"]


def test_optimum_export_flags_reach_main_export():
    args = build_parser().parse_args(
        ["-m", "m", "o", "--optimize", "O1", "--monolith", "--no-constant-folding", "--sequence_length", "32",
         "--dtype", "fp16", "--trust-remote-code"]
    )  # fmt: skip
    kw = quantize_options(args)
    opts = kw["export_options"]
    assert opts["optimize"] == "O1" and opts["monolith"] is True and opts["do_constant_folding"] is False
    assert opts["sequence_length"] == 32 and opts["dtype"] == "fp16" and kw["trust_remote_code"] is True


def test_flags_override_recipe_only_when_given(tmp_path):
    written = QuantConfig().with_overrides(scheme="w3-g64-asym", method="rtn", calib_samples=7, format="qdq")
    recipe = save_config(written, tmp_path / "r.yaml")

    def config(*flags):
        args = build_parser().parse_args(["--model", "m", "o", "--recipe", str(recipe), *flags])
        kw = quantize_options(args)
        assert kw["config"] == str(recipe)
        return run_config(kw["config"], **overrides_from_args(args, hook_specs()))

    assert config() == written  # no flag given: nothing of the recipe is replaced by a default
    four = config("--weight-bits", "4", "--lm-head", "scheme", "--embeddings", "none")
    # only the bits, lm_head and embeddings change; group size, symmetry, format and the rest from the recipe
    assert four == written.with_overrides(bits=4, lm_head="scheme", embeddings="none")
    assert (four.scheme.bits, four.scheme.group_size, four.scheme.symmetric) == (4, 64, False)


def cli(argv, capsys):
    """Run the command in-process (same code path as optimum-cli after parsing): (exit code, stderr)."""
    code = run_export(build_parser().parse_args(argv))
    return code, capsys.readouterr().err


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    model, busy = tmp_path / "model", tmp_path / "busy"
    model.mkdir()
    busy.mkdir()
    (busy / "x").write_text("x")
    code, err = cli(["--model", str(model), str(busy), "--method", "rtn"], capsys)
    assert code == 2 and err.startswith("optimum-cli export onnx-quant: error:") and "overwrite" in err
    assert len(err.strip().splitlines()) == 1

    code, err = cli(["-m", str(tmp_path), str(tmp_path / "o2"), "--recipe", "w4-g128-nope"], capsys)
    assert code == 2 and "neither a preset" in err

    code, err = cli(["-m", str(tmp_path), str(tmp_path / "o3"), "--weight-bits", "9"], capsys)
    assert code == 2 and "bits=9" in err

    code, err = cli(["-m", str(tmp_path), str(tmp_path / "o4"), "--method-option", "damp=1"], capsys)
    assert code == 2 and "'damp'" in err and "percdamp" in err and len(err.strip().splitlines()) == 1
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_offline_hub_id_through_the_real_cli(tmp_path):
    res = run(
        [OPTIMUM_CLI, "export", "onnx-quant", "-m", "someone/uncached", str(tmp_path / "o")],
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "Hub cannot be reached" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_in_process_on_tiny_qwen2(tiny_hf_model, tmp_path, capsys):
    out = tmp_path / "q"
    code, err = cli(
        ["--model", str(tiny_hf_model("qwen2")), str(out), "--method", "rtn", "--weight-bits", "4",
         "--group-size", "32", "--asym", "--exclude", r"layers\.1\.mlp", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    qconfig = json.loads((out / "quantization_config.json").read_text())
    # layer 1 keeps gate/up/down in float; the output projection is quantized at 8 bits by default
    assert qconfig["n_sites"] == 7 + 4 + 1
    assert {s["name"]: s["scheme"] for s in qconfig["sites"]}["lm_head"] == "w8-g32-asym"
    assert qconfig["scheme"]["data"] == {
        **qconfig["scheme"]["data"],
        "bits": 4,
        "group_size": 32,
        "symmetric": False,
    }
    recipe = yaml.safe_load((out / "quantization_recipe.yaml").read_text())
    assert recipe["data"]["selection"]["exclude"] == [r"layers\.1\.mlp"]
    assert QuantConfig.from_dict(recipe) == QuantConfig.from_dict(qconfig["config"])
    assert "optimum-cli export onnx-quant" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.slow
def test_real_optimum_cli_end_to_end(tiny_hf_model, tmp_path):
    out = tmp_path / "g"
    res = run(
        [OPTIMUM_CLI, "export", "onnx-quant", "--model", str(tiny_hf_model("gpt2")), str(out), "--method", "rtn",
         "--format", "qdq", "--no-progress"]
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Quantized ONNX model written to" in res.stdout
    assert json.loads((out / "quantization_config.json").read_text())["format"] == "qdq"


@pytest.mark.parametrize("flag", ["--sym", "--asym"])
def test_sym_and_asym_set_symmetric(flag):
    assert build_parser().parse_args(["--model", "m", "o", flag]).symmetric is (flag == "--sym")
    assert "symmetric" not in vars(build_parser().parse_args(["--model", "m", "o"]))


def test_sym_and_asym_are_exclusive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "o", "--sym", "--asym"])


def test_same_command_in_optimum_adaround_cli(tmp_path, capsys):
    from optimum.adaround.cli import main

    assert main(["export", "--model", str(tmp_path / "missing"), str(tmp_path / "o"), "--method", "rtn"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_sigterm_cleans_up_like_ctrl_c(tiny_hf_onnx, tmp_path, capsys, monkeypatch):
    import importlib
    import signal

    api = importlib.import_module("optimum.adaround.api")
    previous = signal.getsignal(signal.SIGTERM)

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. `timeout` expiring in the middle of quantization

    monkeypatch.setattr(api, "quantize_into", terminated)
    try:
        code, err = cli(
            ["--model", str(tiny_hf_onnx("llama")), str(tmp_path / "o"), "--method", "rtn"], capsys
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary siblings
