"""The bad-input catalogue: every case through the ``optimum-adaround quantize`` CLI and the Python API.

For each case: the CLI exits 2 with exactly one line on stderr (``optimum-adaround: error: ...``, no
traceback) naming the problem; the API raises the documented ``UserError`` subclass with the same one-line
message; the destination is absent (or untouched when it existed); the input's bytes are unchanged; no
temporary sibling is left. docs/ERRORS.md lists the same cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from reliability_helpers import Case, K, N, check_case, leftovers, matmul_model, save, undocumented

from optimum.adaround import api, output, quantize
from optimum.adaround.cli import main
from optimum.adaround.data.text import TextSourceError
from optimum.adaround.evaluation import quantized_sites
from optimum.adaround.graph_passes.errors import (
    CalibrationError,
    InvalidModelError,
    InvalidOptionError,
    NoQuantizableWeightsError,
    OutputPathError,
    UnsupportedSchemeError,
    UserError,
)
from optimum.adaround.graph_passes.rounding.base import get_method
from optimum.adaround.graph_passes.scheme import QuantScheme

RNG = np.random.default_rng(7)
W = RNG.standard_normal((K, N)).astype(np.float32)


def _small(tmp: Path, weights: list[np.ndarray] | None = None, **kw: Any) -> Path:
    return save(matmul_model(weights or [W], **kw), tmp / "src")


def _not_onnx(tmp: Path, llama: Path) -> Case:
    (tmp / "src").mkdir()
    src = tmp / "src" / "model.onnx"
    src.write_bytes(b"\x00\x01 definitely not protobuf")
    return Case(src, tmp / "out", InvalidModelError, "not a readable ONNX model")


def _empty_file(tmp: Path, llama: Path) -> Case:
    (tmp / "src").mkdir()
    src = tmp / "src" / "model.onnx"
    src.write_bytes(b"")
    return Case(src, tmp / "out", InvalidModelError, "not an ONNX model")


def _truncated_onnx(tmp: Path, llama: Path) -> Case:
    src = _small(tmp)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return Case(src, tmp / "out", InvalidModelError, "not a readable ONNX model")


def _missing_input(tmp: Path, llama: Path) -> Case:
    (tmp / "src").mkdir()
    return Case(tmp / "src" / "missing.onnx", tmp / "out", InvalidModelError, "no such file")


def _folder_without_onnx(tmp: Path, llama: Path) -> Case:
    (tmp / "src").mkdir()
    (tmp / "src" / "config.json").write_text("{}")
    return Case(tmp / "src", tmp / "out", InvalidModelError, "no .onnx file")


def _missing_external(tmp: Path, llama: Path) -> Case:
    src = save(matmul_model([W]), tmp / "src", external=True)
    (src.parent / "model.onnx_data").unlink()
    return Case(src, tmp / "out", InvalidModelError, "external data file model.onnx_data is missing")


def _truncated_external(tmp: Path, llama: Path) -> Case:
    src = save(matmul_model([W]), tmp / "src", external=True)
    data = src.parent / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:100])
    return Case(src, tmp / "out", InvalidModelError, "model.onnx_data is truncated")


def _no_weights(tmp: Path, llama: Path) -> Case:
    # Only a MatMul between two activations (attention-score style): nothing to quantize.
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="/scores/MatMul")],
        "g",
        [
            helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [2, K]),
            helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [K, N]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, N])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return Case(save(model, tmp / "src"), tmp / "out", NoQuantizableWeightsError, "no quantizable weight")


def _only_unsupported_weights(tmp: Path, llama: Path) -> Case:
    # A 3-D constant (batched MatMul) is a candidate that cannot be handled: skipped with a reason,
    # and with nothing else left the model is refused, quoting that reason.
    w3 = numpy_helper.from_array(RNG.standard_normal((2, K, N)).astype(np.float32), "W3")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W3"], ["y"], name="/model/bmm/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, K])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, N])],
        [w3],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return Case(save(model, tmp / "src"), tmp / "out", NoQuantizableWeightsError, "3-D")


def _include_nothing(tmp: Path, llama: Path) -> Case:
    return Case(
        llama, tmp / "out", NoQuantizableWeightsError, "no quantizable weight",
        ["--include", "no_such_module"], {"include": ["no_such_module"]},
    )  # fmt: skip


def _nan_weight(tmp: Path, llama: Path) -> Case:
    w = W.copy()
    w[3, 5] = np.nan
    return Case(_small(tmp, [w]), tmp / "out", InvalidModelError, "model.layers.0.mlp.proj (node")


def _inf_weight(tmp: Path, llama: Path) -> Case:
    w = RNG.standard_normal((N, N)).astype(np.float32)
    w[10, 1] = -np.inf
    return Case(_small(tmp, [W, w]), tmp / "out", InvalidModelError, "model.layers.1.mlp.proj")


def _already_quantized(tmp: Path, llama: Path) -> Case:
    src = tmp / "src"
    quantize(llama, src, scheme="w4-g32", progress=False)
    return Case(src, tmp / "out", NoQuantizableWeightsError, "already quantized", ["--group-size", "32"])


def _flags_case(error: type[UserError]) -> Callable[..., Callable[[Path, Path], Case]]:
    """Cases of the tiny Llama with bad flags / keywords, raising ``error``."""

    def case(
        cli: list[str] | None, api_kw: dict[str, Any] | None, needle: str
    ) -> Callable[[Path, Path], Case]:
        def build(tmp: Path, llama: Path) -> Case:
            return Case(llama, tmp / "out", error, needle, cli, api_kw)

        return build

    return case


_scheme_case = _flags_case(UnsupportedSchemeError)
_option_case = _flags_case(InvalidOptionError)
# format auto stores any valid scheme (our op where MatMulNBits cannot): its limits need format=matmulnbits
MNB = {"format": "matmulnbits"}


def _qdq_old_opset(tmp: Path, llama: Path) -> Case:
    reduce = helper.make_node("ReduceMean", ["y"], ["m"], name="/mean", axes=[1], keepdims=1)
    model = matmul_model([W], opset=17, extra_nodes=[reduce])
    return Case(
        save(model, tmp / "src"), tmp / "out", UnsupportedSchemeError, "model imports opset 17",
        ["--format", "qdq", "--group-size", "32"], {"scheme": "w4-g32", "format": "qdq"},
    )  # fmt: skip


def _bad_regex(tmp: Path, llama: Path) -> Case:
    return Case(
        llama, tmp / "out", InvalidOptionError, "selection option include: '(' is not a valid regex",
        ["--include", "("], {"include": ["("]},
    )  # fmt: skip


def _calib(
    text: str | None, needle: str, error: type[UserError], **extra: Any
) -> Callable[[Path, Path], Case]:
    def build(tmp: Path, llama: Path) -> Case:
        src = tmp / "text.txt"
        if text is not None:
            src.write_text(text)
        seq_len, samples = extra.get("seq_len", 32), extra.get("calib_samples", 2)
        cli = ["--method", "gptq", "--calib-data", str(src), "--seq-len", str(seq_len)]
        cli += ["--calib-samples", str(samples), "--group-size", "32"]
        api_kw = {"method": "gptq", "calib_data": str(src), "seq_len": seq_len, "calib_samples": samples}
        return Case(llama, tmp / "out", error, needle, cli, {**api_kw, "scheme": "w4-g32"})

    return build


def _max_memory_too_small(tmp: Path, llama: Path) -> Case:
    """A budget below what the run already holds: refused before any site is rounded, nothing written."""
    case = _calib("a b c " * 50, "max_memory=0.05 GB is too small: the run holds", UserError)(tmp, llama)
    return dataclasses.replace(
        case, cli=[*(case.cli or []), "--max-memory", "0.05"], api={**(case.api or {}), "max_memory": 0.05}
    )


def _no_tokenizer(tmp: Path, llama: Path) -> Case:
    (tmp / "text.txt").write_text("some words " * 100)
    cli = ["--method", "gptq", "--calib-data", str(tmp / "text.txt"), "--seq-len", "16", "--group-size", "32"]
    api_kw = {"method": "gptq", "calib_data": str(tmp / "text.txt"), "seq_len": 16, "scheme": "w4-g32"}
    return Case(_small(tmp), tmp / "out", TextSourceError, "no loadable tokenizer", cli, api_kw)


def _out_is_input(tmp: Path, llama: Path) -> Case:
    return Case(llama, llama, OutputPathError, "is the input folder")


def _out_inside_input(tmp: Path, llama: Path) -> Case:
    return Case(llama, llama / "quantized", OutputPathError, "inside it")


def _out_is_input_file(tmp: Path, llama: Path) -> Case:
    src = _small(tmp)
    return Case(src, src, OutputPathError, "is the input")


def _out_is_a_file(tmp: Path, llama: Path) -> Case:
    (tmp / "out").write_text("a file, not a folder")
    return Case(llama, tmp / "out", OutputPathError, "exists and is a file")


def _out_not_empty(tmp: Path, llama: Path) -> Case:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return Case(llama, tmp / "out", OutputPathError, "not empty")


CASES: dict[str, Callable[[Path, Path], Case]] = {
    "not_onnx": _not_onnx,
    "empty_file": _empty_file,
    "truncated_onnx": _truncated_onnx,
    "missing_input": _missing_input,
    "folder_without_onnx": _folder_without_onnx,
    "missing_external_data": _missing_external,
    "truncated_external_data": _truncated_external,
    "no_weights": _no_weights,
    "only_unsupported_weights": _only_unsupported_weights,
    "include_nothing": _include_nothing,
    "nan_weight": _nan_weight,
    "inf_weight": _inf_weight,
    "already_quantized": _already_quantized,
    "bits3_matmulnbits": _scheme_case(
        ["--bits", "3", "--format", "matmulnbits"],
        {"scheme": "w3-g128", **MNB},
        "MatMulNBits runs bits 2/4/8",
    ),
    "bits2_qdq": _scheme_case(
        ["--bits", "2", "--format", "qdq"], {"scheme": "w2-g128", "format": "qdq"}, "4- and 8-bit"
    ),
    "bits9": _scheme_case(["--bits", "9"], {"scheme": {"bits": 9}}, "bits=9"),
    "bits1": _scheme_case(["--bits", "1"], {"scheme": {"bits": 1}}, "bits=1"),
    "group17": _scheme_case(["--group-size", "17"], {"scheme": {"group_size": 17}}, "power of two"),
    "group8": _scheme_case(["--group-size", "8"], {"scheme": {"group_size": 8}}, "power of two >= 16"),
    "group512_matmulnbits": _scheme_case(
        ["--group-size", "512", "--format", "matmulnbits"], {"scheme": "w4-g512", **MNB}, "block sizes are"
    ),
    "nf4_matmulnbits": _scheme_case(
        ["--data-type", "nf4", "--group-size", "64", "--format", "matmulnbits"],
        {"scheme": "w4-g64-nf4", **MNB},
        "runs only through format=lowbit",
    ),
    "bad_scheme_label": _scheme_case(None, {"scheme": "w4-x7"}, "unknown part 'x7'"),
    "bad_format": _option_case(None, {"format": "gguf"}, "format='gguf'"),  # CLI: argparse choices
    "unknown_method": _option_case(
        ["--method", "magic"], {"method": "magic"}, "unknown rounding method 'magic'"
    ),
    "unknown_method_option": _option_case(
        ["--method-option", "nosuch=1"], {"method_options": {"nosuch": 1}}, "has no option 'nosuch'"
    ),
    "malformed_method_option": _option_case(["--method-option", "oops"], None, "KEY=VALUE"),  # CLI only
    "bad_device": _option_case(None, {"device": "tpu"}, "device='tpu'"),  # CLI: argparse choices
    "max_memory_zero": _option_case(["--max-memory", "0"], {"max_memory": 0}, "max_memory=0"),
    "ray_address_local": _option_case(
        ["--ray-address", "10.0.0.1:6379"], {"ray_address": "10.0.0.1:6379"}, "is for executor='ray'"
    ),
    "max_memory_too_small": _max_memory_too_small,
    "qdq_opset17": _qdq_old_opset,
    "bad_regex": _bad_regex,
    "calib_empty": _calib("", "is empty", CalibrationError),
    "calib_whitespace": _calib("   \n\n  ", "shorter than one sequence", CalibrationError),
    "calib_short": _calib("hello world", "shorter than one sequence of 64", CalibrationError, seq_len=64),
    "calib_missing": _calib(None, "is neither a file", TextSourceError),
    "calib_zero_samples": _calib(
        "a b c " * 50, "calibration option calib_samples=0", InvalidOptionError, calib_samples=0
    ),
    "calib_seq_len_1": _calib("a b c " * 50, "seq_len=1", CalibrationError, seq_len=1),
    "calib_no_tokenizer": _no_tokenizer,
    "out_is_input": _out_is_input,
    "out_inside_input": _out_inside_input,
    "out_is_input_file": _out_is_input_file,
    "out_is_a_file": _out_is_a_file,
    "out_not_empty": _out_not_empty,
}


def run_cli(case: Case, capsys: pytest.CaptureFixture[str], tree_hash: Callable[[Path], str]) -> None:
    """The CLI in-process: exit 2, exactly one line on stderr, nothing written, the input unchanged."""
    if case.cli is None:
        pytest.skip("not expressible with the CLI flags (argparse choices / no such flag)")

    def run() -> str:
        capsys.readouterr()
        rc = main(["quantize", str(case.src), str(case.out), "--no-progress", "--method", "rtn", *case.cli])
        err = capsys.readouterr().err.strip()
        assert rc == 2, err
        assert err.startswith("optimum-adaround: error: "), err
        return err

    check_case(case, run, tree_hash)


def run_api(case: Case, tree_hash: Callable[[Path], str]) -> None:
    """The API: the documented UserError subclass with the same one line, nothing written."""
    if case.api is None:
        pytest.skip("a CLI-only flag")

    def run() -> str:
        with pytest.raises(case.error) as info:
            quantize(
                case.model if case.model is not None else case.src,
                case.out,
                progress=False,
                **{"method": "rtn", **case.api},
            )
        return str(info.value)

    check_case(case, run, tree_hash)


@pytest.mark.parametrize("name", list(CASES))
def test_cli_one_line_exit_2(name, llama, tmp_path, capsys, tree_hash):
    run_cli(CASES[name](tmp_path, llama), capsys, tree_hash)


@pytest.mark.parametrize("name", list(CASES))
def test_api_raises_the_documented_error(name, llama, tmp_path, tree_hash):
    run_api(CASES[name](tmp_path, llama), tree_hash)


def test_catalogue_is_documented():
    """docs/ERRORS.md names every case of this catalogue (one table row each)."""
    missing = undocumented(CASES)
    assert not missing, f"cases not in docs/ERRORS.md: {missing}"


# ---- full disk: a write error during the save / config write ---------------------------------------


@pytest.mark.parametrize("where", ["save_model", "write_quantization_config"])
def test_enospc_during_output_is_one_line_and_leaves_nothing(
    llama, tmp_path, capsys, tree_hash, monkeypatch, where
):
    module = api if where == "save_model" else output  # the model save, then the one writer's record
    real = getattr(module, where)

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # write part of the output first, then fail like a full disk
        target = next(str(a) for a in args if isinstance(a, Path))
        raise OSError(errno.ENOSPC, "No space left on device", target)

    monkeypatch.setattr(module, where, full_disk)
    before = tree_hash(llama)
    rc = main(["quantize", str(llama), str(tmp_path / "out"), "--no-progress", "--method", "rtn"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "No space left on device" in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert tree_hash(llama) == before


@contextlib.contextmanager
def _tiny_tmpfs(folder: Path, size: str):
    folder.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_real_full_disk_on_a_tiny_tmpfs(llama, tmp_path, capsys, tree_hash):
    """A real ENOSPC: the output goes to a 64 KiB tmpfs (the quantized tiny Llama needs ~200 KB)."""
    with _tiny_tmpfs(tmp_path / "disk", "64k") as disk:
        before = tree_hash(llama)
        rc = main(["quantize", str(llama), str(disk / "out"), "--no-progress", "--method", "rtn"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and "No space left on device" in err, err
        assert list(disk.iterdir()) == []
        assert tree_hash(llama) == before


def test_real_subprocess_console_script(tmp_path):
    """The installed ``optimum-adaround`` script, as a user runs it: exit 2, one line, no traceback."""
    w = W.copy()
    w[0, 0] = np.nan
    src = _small(tmp_path, [w])
    exe = Path(sys.executable).with_name("optimum-adaround")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "optimum.adaround.cli"]
    proc = subprocess.run(
        [*cmd, "quantize", str(src), str(tmp_path / "out"), "--no-progress", "--method", "rtn"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("optimum-adaround: error: ") and "NaN/Inf" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_internal_error_is_exit_1_one_line_and_debug_shows_traceback(llama, tmp_path, capsys, monkeypatch):
    """A bug (an exception nobody raised on purpose) is exit 1 with one line; --debug re-raises it."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(api, "quantize_model", broken)
    rc = main(["quantize", str(llama), str(tmp_path / "out"), "--no-progress", "--method", "rtn"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "internal error: ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "quantize", str(llama), str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()


# ---- inputs that are handled, not refused ------------------------------------------------------------


def test_odd_and_unsupported_shapes_are_skipped_with_reasons(tmp_path, capsys):
    """Odd shapes quantize (short last block); 3-D, Gemm transA and Constant-fed weights are skipped, each
    with its reason in the summary and in quantization_config.json."""
    odd = RNG.standard_normal((33, 7)).astype(np.float32)
    w3 = numpy_helper.from_array(RNG.standard_normal((2, 7, 5)).astype(np.float32), "W3")
    wt = numpy_helper.from_array(RNG.standard_normal((3, 4)).astype(np.float32), "WT")
    small = helper.make_tensor(
        "c", onnx.TensorProto.FLOAT, [7, 3], RNG.standard_normal(21).astype(np.float32)
    )
    extra = [
        helper.make_node("Unsqueeze", ["y", "ax"], ["y3"], name="/u"),
        helper.make_node("Concat", ["y3", "y3"], ["y2"], name="/c", axis=0),
        helper.make_node("MatMul", ["y2", "W3"], ["z3"], name="/model/batched/MatMul"),
        helper.make_node("Gemm", ["y", "WT"], ["zt"], name="/model/gemm_ta/Gemm", transA=1),
        helper.make_node("Constant", [], ["Wc"], name="/model/const/Constant", value=small),
        helper.make_node("MatMul", ["y", "Wc"], ["zc"], name="/model/const/MatMul"),
    ]
    ax = numpy_helper.from_array(np.array([0], np.int64), "ax")
    model = matmul_model([odd], extra_nodes=extra, extra_inits=[w3, wt, ax])
    for name in ("z3", "zt", "zc"):
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    src = save(model, tmp_path / "src")
    out = tmp_path / "out"
    assert (
        main(
            [
                "quantize",
                str(src),
                str(out),
                "--group-size",
                "16",
                "--no-progress",
                "--method",
                "rtn",
                "--accuracy-level",
                "0",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    record = json.loads((out / "quantization_config.json").read_text())
    reasons = {s["node_name"]: s["reason"] for s in record["skipped"]}
    assert record["n_sites"] == 1 and record["sites"][0]["k"] == 33 and record["sites"][0]["n"] == 7
    assert "3-D" in reasons["/model/batched/MatMul"]
    assert "transA=1" in reasons["/model/gemm_ta/Gemm"]
    assert "Constant node" in reasons["/model/const/MatMul"]
    assert "skipped 3:" in text and all(r in text for r in reasons.values())
    # The rewritten model still runs and its output is the dequantized reference.
    x = RNG.standard_normal((3, 33)).astype(np.float32)
    got = ort.InferenceSession(str(out / "model.onnx")).run(["y"], {"x": x})[0]
    ref = get_method("rtn").quantize(odd.T.copy(), QuantScheme(group_size=16)).dequantize()
    np.testing.assert_allclose(got, np.maximum(x @ ref.T, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_blocks_give_exact_zeros(tmp_path, fmt, symmetric):
    """Zero blocks (scale 0) dequantize to exact zeros: no NaN, zero rows/blocks contribute exactly 0."""
    w = W.copy()
    w[:32, :] = 0.0  # the first K-block of every output channel
    w[:, :4] = 0.0  # four whole output channels
    src = _small(tmp_path, [w])
    scheme = QuantScheme(group_size=32, symmetric=symmetric)
    out = quantize(src, tmp_path / "out", scheme=scheme, method="rtn", format=fmt, progress=False)
    proto = onnx.load(str(out / "model.onnx"))
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        assert np.isfinite(arr.astype(np.float64)).all(), init.name
    x = RNG.standard_normal((5, K)).astype(np.float32)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    got = ort.InferenceSession(str(out / "model.onnx"), so).run(["y"], {"x": x})[0]
    assert np.isfinite(got).all()
    assert (got[:, :4] == 0).all()
    x_head = x.copy()
    x_head[:, 32:] = 0  # only the zero block meets a non-zero input: exactly zero out
    head = ort.InferenceSession(str(out / "model.onnx"), so).run(["y"], {"x": x_head})[0]
    assert (head == 0).all()


def test_already_quantized_weights_pass_through_never_twice(llama, tmp_path, capsys):
    """A partly quantized model: the float weights left are quantized, the quantized ones are reported as
    skipped ('already quantized') and never quantized again."""
    first = quantize(llama, tmp_path / "q1", scheme="w4-g32", exclude=[r"mlp\."], progress=False)
    rc = main(
        [
            "quantize",
            str(first),
            str(tmp_path / "q2"),
            "--group-size",
            "32",
            "--no-progress",
            "--method",
            "rtn",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "already quantized (MatMulNBits)" in text
    proto = onnx.load(str(tmp_path / "q2" / "model.onnx"))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    inits = {i.name for i in proto.graph.initializer}
    # 8 attention projections and the output projection from the first run + 6 MLP ones now (q/k/v and
    # gate/up run fused: count modules, as evaluation reads them)
    assert len(quantized_sites(ir.load(str(tmp_path / "q2" / "model.onnx")))[0]) == 15
    assert all(n.input[1] in inits for n in nbits)  # packed B straight from an initializer: no stacking
    assert not [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]


def test_input_folder_is_never_written_even_on_success(llama, tmp_path, tree_hash):
    before = tree_hash(llama)
    names = sorted(p.name for p in llama.iterdir())
    quantize(llama, tmp_path / "ok", scheme="w4-g32", progress=False)
    assert tree_hash(llama) == before and sorted(p.name for p in llama.iterdir()) == names


def test_quantized_lm_head_keeps_the_logits_type_and_shape(llama, tmp_path):
    """Replacing the node that produces a graph output (logits, with --lm-head) keeps the output's type and
    shape: onnx.checker rejects a graph output without them."""
    out = quantize(llama, tmp_path / "q", scheme="w4-g32", method="rtn", lm_head=True, progress=False)
    proto = onnx.load(str(out / "model.onnx"))
    logits = next(o for o in proto.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(logits.type.tensor_type.shape.dim) == 3
    onnx.checker.check_model(proto, full_check=True)
