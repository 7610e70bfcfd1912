"""The CLI dispatcher: subcommands, default job, exit codes and one-line errors."""

import argparse

import pytest

from optimum.adaround import cli
from optimum.adaround.graph_passes.errors import InternalError, InvalidModelError


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    _, names = cli.build_parser()
    assert names == {"run", "quantize", "predict", "eval", "export"}
    for name in names:
        assert f"    {name} " in out


def _fake_command(monkeypatch, behaviour):
    """Replace the default job's function so dispatch can be observed without running the real job."""
    calls = []

    def fake(args: argparse.Namespace) -> int:
        calls.append(args)
        return behaviour(args)

    real_build = cli.build_parser

    def build():
        parser, names = real_build()
        parser._subparsers._group_actions[0].choices["run"].set_defaults(func=fake)  # type: ignore[union-attr]
        return parser, names

    monkeypatch.setattr(cli, "build_parser", build)
    return calls


def test_bare_invocation_runs_the_default_job(monkeypatch):
    calls = _fake_command(monkeypatch, lambda a: 0)
    assert cli.main([]) == 0
    assert len(calls) == 1 and calls[0].command == "run"
    assert cli.main(["--debug", "--method", "rtn"]) == 0
    assert calls[1].method == "rtn" and calls[1].debug


@pytest.mark.parametrize(
    ("message", "printed"),
    [
        ("model.onnx: not an ONNX file", "model.onnx: not an ONNX file"),
        # a damaged model can name a data file with a line break in it: still one line, escaped
        (
            "model.onnx: external data file mode\n.onnx_data or \x0c.bin is missing",
            "model.onnx: external data file mode\\n.onnx_data or \\x0c.bin is missing",
        ),
    ],
)
def test_user_error_is_one_line_exit_2(message, printed, monkeypatch, capsys):
    def boom(args):
        raise InvalidModelError(message)

    _fake_command(monkeypatch, boom)
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"optimum-adaround: error: {printed}"]


def test_internal_error_exit_1_and_debug_reraises(monkeypatch, capsys):
    def boom(args):
        raise InternalError("invariant broke")

    _fake_command(monkeypatch, boom)
    assert cli.main(["run"]) == 1
    assert "internal error: invariant broke" in capsys.readouterr().err
    with pytest.raises(InternalError):
        cli.main(["--debug", "run"])


def test_ctrl_c_exit_130(monkeypatch, capsys):
    def interrupt(args):
        raise KeyboardInterrupt

    _fake_command(monkeypatch, interrupt)
    assert cli.main(["run"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_missing_input_is_a_user_error(tmp_path, capsys):
    rc = cli.main(["quantize", str(tmp_path / "missing.onnx"), str(tmp_path / "out")])
    assert rc == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
