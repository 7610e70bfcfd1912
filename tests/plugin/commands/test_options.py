"""plugin/commands/options.py: every quantization flag and API keyword comes from QuantConfig's fields."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import subprocess
import sys

import pytest
from optimum.commands.register import adaround_onnx_quant as hook

from optimum.adaround import api, export
from optimum.adaround.cli import build_parser
from optimum.adaround.commands import export_onnx_quant, options
from optimum.adaround.graph_passes.config import QuantConfig, flat_fields, override_keys
from optimum.adaround.graph_passes.errors import InvalidOptionError


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_leaf_option_has_a_flag_in_each_cli():
    leaf = {f.name for f in flat_fields()} - {"overrides"}  # overrides: recipe files only
    wanted = leaf | {"scheme", "method", "method_options", "recipe"}
    for command in ("quantize", "run", "export"):
        dests = _dests(_subparser(command))
        missing = wanted - dests
        # optimum-cli's own --device is the export's and calibration's device
        assert missing <= ({"device"} if command == "export" else set()), (command, missing)


def test_the_hook_static_flags_equal_the_generated_ones():
    # The optimum-cli hook may not import optimum.adaround: it keeps the specs as data. A flag added to the
    # config (or a help text changed) without updating the hook fails here.
    assert export_onnx_quant.hook_specs() == hook.QUANT_FLAGS


def test_flags_follow_a_new_config_field(monkeypatch):
    # Add a field to OutputConfig: the derived flags and the accepted API keywords pick it up, the hook's
    # static copy then differs (the test above would fail).
    from optimum.adaround.graph_passes import config as cfg

    @dataclasses.dataclass(frozen=True)
    class Extended(cfg.OutputConfig):
        new_knob: int = cfg.option(3, "a new option")

    monkeypatch.setitem(cfg._GROUPS, "output", Extended)
    specs = options.flag_specs()
    assert any(flags == ("--new-knob",) and kw["dest"] == "new_knob" for flags, kw in specs)
    assert "new_knob" in override_keys()
    assert export_onnx_quant.hook_specs() != hook.QUANT_FLAGS


def test_help_states_the_config_defaults():
    text = _subparser("quantize").format_help()
    defaults = QuantConfig()
    assert f"(default {defaults.method.name})" in text
    assert "(default 4)" in text and "(default 128)" in text and "(default auto)" in text
    assert f"(default {defaults.calibration.seq_len})" in text


def test_api_keywords_are_the_config_keys():
    sig = inspect.signature(api.quantize)
    assert set(sig.parameters) == {"model", "output", "config", "overwrite", "progress", "overrides"}
    for key in override_keys():  # every flat option is an accepted keyword
        QuantConfig().with_overrides(**{key: None})
    with pytest.raises(InvalidOptionError, match=r"no option .quantize_lm_head.*lm_head"):
        api.run_config(quantize_lm_head=True)
    assert "overrides" in inspect.signature(export).parameters


def test_given_flags_become_overrides_and_absent_ones_do_not():
    parser = argparse.ArgumentParser()
    options.add_config_arguments(parser)
    args = parser.parse_args(["--bits", "3", "--asym", "--one-pass", "--method-option", "percdamp=0.05"])
    got = options.overrides_from_args(args)
    assert got == {"bits": 3, "symmetric": False, "sequential": False, "method_options": {"percdamp": 0.05}}
    config = options.config_from_args(args)
    assert (config.scheme.bits, config.scheme.symmetric, config.calibration.sequential) == (3, False, False)
    assert config.method.percdamp == 0.05


def test_cli_and_api_build_the_same_config():
    parser = argparse.ArgumentParser()
    options.add_config_arguments(parser)
    argv = [
        "--method",
        "adaround",
        "--calib-samples",
        "16",
        "--lm-head",
        "scheme",
        "--embeddings",
        "4",
        "--accuracy-level",
        "0",
        "--exclude",
        "mlp",
        "--workers",
        "1",
    ]
    from_cli = options.config_from_args(parser.parse_args(argv))
    # lm_head=True (the 0.7 switch) reads as "scheme"; bit counts given as numbers read as their labels
    from_api = api.run_config(
        method="adaround", calib_samples=16, lm_head=True, embeddings=4, accuracy_level=0, exclude=("mlp",),
        workers=1,
    )  # fmt: skip
    assert from_cli == from_api
    assert (from_api.selection.lm_head, from_api.selection.embeddings) == ("scheme", "4")
    assert QuantConfig.from_dict(from_api.to_dict()) == from_api


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["--method", "gptq", "--method-option", "damp=0.1"],
            "gptq has no option 'damp'; accepted: act_order",
        ),
        (["--seed", "-1"], "seed=-1"),
        (["--bits", "9"], "bits=9"),
        (["--workers", "0"], "workers=0"),
        (["--method-option", "novalue"], "use KEY=VALUE"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(tmp_path, argv, needle):
    model = tmp_path / "missing.onnx"  # options are checked before the model is read
    proc = subprocess.run(
        [sys.executable, "-m", "optimum.adaround.cli", "quantize", str(model), str(tmp_path / "out"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
