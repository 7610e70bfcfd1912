"""Hostile and foreign inputs: files, external data, protobuf fields, tokenizers and calibration text.

Each case of ``HOSTILE`` runs through the CLI in-process and through the API (the runners of
test_bad_inputs.py): exit 2 with one line naming the file / tensor / node and what to do, nothing written,
the input unchanged, and no hang (pipes and devices are refused by type, never read). A model must never
make the tool read a file outside its own folder: external data that points elsewhere (``..``, an absolute
path, a symlink, a hard link) is refused before anything is opened. docs/ERRORS.md lists every case.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from reliability_helpers import Case, K, N, matmul_model, save, undocumented
from test_bad_inputs import run_api, run_cli

from optimum.adaround import quantize
from optimum.adaround.cli import main
from optimum.adaround.data.text import TextSourceError
from optimum.adaround.graph_passes.errors import InvalidModelError

RNG = np.random.default_rng(11)
W = RNG.standard_normal((K, N)).astype(np.float32)
W2 = RNG.standard_normal((N, N)).astype(np.float32)
Build = Callable[[Path, Path], Case]


def _case(src: Path, tmp: Path, needle: str, error: type[Exception] = InvalidModelError, **kw: Any) -> Case:
    return Case(src, tmp / "out", error, needle, **kw)


# ---- the model file itself ---------------------------------------------------------------------------


def _model_fifo(tmp: Path, llama: Path) -> Case:
    (tmp / "src").mkdir()
    os.mkfifo(tmp / "src" / "model.onnx")  # opening it for reading would wait for a writer forever
    return _case(tmp / "src" / "model.onnx", tmp, "is a named pipe (FIFO), not a regular file")


def _model_device(tmp: Path, llama: Path) -> Case:
    (tmp / "src").mkdir()
    (tmp / "src" / "model.onnx").symlink_to("/dev/zero")  # reading it never ends
    return _case(tmp / "src" / "model.onnx", tmp, "is a device, not a regular file")


def _model_oversized(tmp: Path, llama: Path) -> Case:
    (tmp / "src").mkdir()
    with open(tmp / "src" / "model.onnx", "wb") as fh:
        fh.truncate(2**31 + 4096)  # sparse: no disk used, never read
    return _case(tmp / "src" / "model.onnx", tmp, "over protobuf's 2 GiB limit", stat_only=True)


def _exported_copy(tmp: Path, llama: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(llama, src)
    return src


def _side_file_fifo(tmp: Path, llama: Path) -> Case:
    src = _exported_copy(tmp, llama)
    (src / "tokenizer.json").unlink()
    os.mkfifo(src / "tokenizer.json")
    return _case(src, tmp, "file tokenizer.json is a named pipe")


def _side_file_outside(tmp: Path, llama: Path) -> Case:
    src = _exported_copy(tmp, llama)
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "secret.json").write_text('{"token": "do not publish"}')
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(tmp / "elsewhere" / "secret.json")
    return _case(src, tmp, "config.json resolves through a symlink to", watch=tmp)


# ---- external data -----------------------------------------------------------------------------------


def _external(tmp: Path, mutate: Callable[[onnx.ModelProto, Path], None]) -> Path:
    """A one-weight model with its weight in ``model.onnx_data``, then ``mutate(proto, folder)`` saved over it."""
    src = save(matmul_model([W]), tmp / "src", external=True)
    proto = onnx.load(str(src), load_external_data=False)
    mutate(proto, src.parent)
    onnx.save(proto, str(src))
    return src


def _set_entry(key: str, value: str) -> Callable[[onnx.ModelProto, Path], None]:
    def mutate(proto: onnx.ModelProto, folder: Path) -> None:
        entries = proto.graph.initializer[0].external_data
        for e in entries:
            if e.key == key:
                e.value = value
                return
        entries.add(key=key, value=value)

    return mutate


def _outside_copy(tmp: Path) -> Path:
    """The weight's real bytes in a folder next to the model's: readable, and never to be read."""
    (tmp / "outside").mkdir(exist_ok=True)
    target = tmp / "outside" / "model.onnx_data"
    target.write_bytes(W.tobytes())
    return target


def _ext_case(mutate: Callable[[onnx.ModelProto, Path], None], needle: str, watch_tmp: bool = False) -> Build:
    def build(tmp: Path, llama: Path) -> Case:
        _outside_copy(tmp)
        return _case(_external(tmp, mutate), tmp, needle, watch=tmp if watch_tmp else None)

    return build


def _replace_data(make: Callable[[Path, Path], None]) -> Callable[[onnx.ModelProto, Path], None]:
    def mutate(proto: onnx.ModelProto, folder: Path) -> None:
        data = folder / "model.onnx_data"
        data.unlink()
        make(data, folder)

    return mutate


def _hardlink(data: Path, folder: Path) -> None:
    data.write_bytes(W.tobytes())
    os.link(data, folder.parent / "second_name")


def _no_location(proto: onnx.ModelProto, folder: Path) -> None:
    entries = [e for e in proto.graph.initializer[0].external_data if e.key != "location"]
    del proto.graph.initializer[0].external_data[:]
    proto.graph.initializer[0].external_data.extend(entries)


def _constant_outside(tmp: Path, llama: Path) -> Case:
    """A Constant node's tensor (not an initializer) whose external data lives outside the folder."""
    outside = _outside_copy(tmp)
    bias = onnx.TensorProto(name="b", data_type=onnx.TensorProto.FLOAT, dims=[N])
    bias.data_location = onnx.TensorProto.EXTERNAL
    bias.external_data.add(key="location", value=f"../{outside.parent.name}/{outside.name}")
    bias.external_data.add(key="length", value=str(4 * N))
    const = onnx.helper.make_node("Constant", [], ["bias"], name="/model/bias/Constant", value=bias)
    add = onnx.helper.make_node("Add", ["h0", "bias"], ["z"], name="/model/bias/Add")
    model = matmul_model([W], extra_nodes=[const, add])
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["b", N]))
    return _case(save(model, tmp / "src"), tmp, "points to", watch=tmp)


def _unknown_key(proto: onnx.ModelProto, folder: Path) -> None:
    proto.graph.initializer[0].external_data.add(key="loc\u0081tion", value="x")  # onnxruntime refuses it


def _in_memory_external(tmp: Path, llama: Path) -> Case:
    src = save(matmul_model([W]), tmp / "src", external=True)
    proto = onnx.load(str(src), load_external_data=False)
    return _case(src, tmp, "pass the .onnx path instead", cli=None, model=proto)


# ---- protobuf fields ---------------------------------------------------------------------------------


def _inline(mutate: Callable[[onnx.ModelProto], None], needle: str, two: bool = False) -> Build:
    def build(tmp: Path, llama: Path) -> Case:
        model = matmul_model([W, W2] if two else [W])
        mutate(model)
        return _case(save(model, tmp / "src"), tmp, needle)

    return build


def _raw(change: Callable[[bytes], bytes]) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        t = model.graph.initializer[0]
        t.raw_data = change(t.raw_data)

    return mutate


def _float_data_short(model: onnx.ModelProto) -> None:
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.float_data.extend([1.0] * 10)


def _set(field: str, value: Any) -> Callable[[onnx.ModelProto], None]:
    def mutate(model: onnx.ModelProto) -> None:
        setattr(model.graph.initializer[0], field, value)

    return mutate


def _negative_dim(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].dims[0] = -K


def _double_weight(model: onnx.ModelProto) -> None:
    t = model.graph.initializer[0]
    t.data_type, t.dims[0] = onnx.TensorProto.DOUBLE, K // 2  # same bytes, a double [32, 32] tensor


def _swap_dims(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].dims[:] = [N, K]


def _drop_node(model: onnx.ModelProto) -> None:
    del model.graph.node[0]


def _drop_initializer(model: onnx.ModelProto) -> None:
    del model.graph.initializer[1]


def _duplicate_initializer(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(model.graph.initializer[0])


def _duplicate_output(model: onnx.ModelProto) -> None:
    model.graph.node.insert(1, model.graph.node[0])


def _unknown_op(model: onnx.ModelProto) -> None:
    model.graph.node[0].op_type = "MatMulz"


def _future_ir(model: onnx.ModelProto) -> None:
    model.ir_version = 99


def _no_opset(model: onnx.ModelProto) -> None:
    del model.opset_import[:]


def _cycle(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = "y"


def _output_not_produced(model: onnx.ModelProto) -> None:
    model.graph.output[0].name = "nothing_makes_this"


def _undefined_output_type(model: onnx.ModelProto) -> None:
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED  # the checker allows it


def _undefined_value_info(model: onnx.ModelProto) -> None:
    model.graph.value_info.add(name="h0").type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED


# ---- tokenizers and calibration text -----------------------------------------------------------------


def _calib_cli(text: Path) -> tuple[list[str], dict[str, Any]]:
    cli = ["--method", "gptq", "--calib-data", str(text), "--seq-len", "16", "--group-size", "32"]
    return cli, {"method": "gptq", "calib_data": str(text), "seq_len": 16, "scheme": "w4-g32"}


def _tokenizer_case(remove: tuple[str, ...], garble: str | None = None) -> Build:
    def build(tmp: Path, llama: Path) -> Case:
        src = _exported_copy(tmp, llama)
        for name in remove:
            (src / name).unlink(missing_ok=True)
        if garble:
            (src / garble).write_text("{ this is not a tokenizer")
        (tmp / "text.txt").write_text("some words " * 200)
        cli, api = _calib_cli(tmp / "text.txt")
        return _case(src, tmp, "no loadable tokenizer", TextSourceError, cli=cli, api=api)

    return build


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def _text_case(make: Callable[[Path], Path], needle: str) -> Build:
    def build(tmp: Path, llama: Path) -> Case:
        cli, api = _calib_cli(make(tmp))
        return _case(llama, tmp, needle, TextSourceError, cli=cli, api=api)

    return build


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _text_folder(files: dict[str, bytes]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / "texts").mkdir()
        for name, data in files.items():
            (tmp / "texts" / name).write_bytes(data)
        return tmp / "texts"

    return make


def _text_fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "text.txt")
    return tmp / "text.txt"


def _text_device(tmp: Path) -> Path:
    (tmp / "text.txt").symlink_to("/dev/zero")
    return tmp / "text.txt"


HOSTILE: dict[str, Build] = {
    "model_fifo": _model_fifo,
    "model_device": _model_device,
    "model_oversized": _model_oversized,
    "side_file_fifo": _side_file_fifo,
    "side_file_outside": _side_file_outside,
    "external_dotdot": _ext_case(_set_entry("location", "../outside/model.onnx_data"), "points to", True),
    "external_absolute": _ext_case(
        lambda p, f: _set_entry("location", str(f.parent / "outside" / "model.onnx_data"))(p, f),
        "is not a relative path inside the model folder",
        True,
    ),
    "external_system_file": _ext_case(_set_entry("location", "/etc/passwd"), "'/etc/passwd'"),
    "external_symlink": _ext_case(
        _replace_data(lambda d, f: d.symlink_to(f.parent / "outside" / "model.onnx_data")),
        "resolves through a symlink to",
        True,
    ),
    "external_fifo": _ext_case(_replace_data(lambda d, f: os.mkfifo(d)), "is a named pipe (FIFO)"),
    "external_folder": _ext_case(_replace_data(lambda d, f: d.mkdir()), "is a folder, not a regular file"),
    "external_hardlink": _ext_case(_replace_data(_hardlink), "has 2 hard links", True),
    "external_length_long": _ext_case(_set_entry("length", "9000"), "says length 9000"),
    "external_length_short": _ext_case(_set_entry("length", "100"), "says length 100"),
    "external_negative_offset": _ext_case(_set_entry("offset", "-8"), "offset must be non-negative, got -8"),
    "external_bad_offset": _ext_case(_set_entry("offset", "abc"), "not a readable ONNX model"),
    "external_offset_past_end": _ext_case(_set_entry("offset", "4096"), "is truncated"),
    "external_no_location": _ext_case(_no_location, "'' (needed by W0) is not a relative path"),
    "external_nul_location": _ext_case(
        _set_entry("location", "model.onnx\0data"),
        "'model.onnx\\x00data' (needed by W0) is not a relative path",
    ),
    "external_unknown_key": _ext_case(
        _unknown_key, "unknown external data key(s) ['loc\\x81tion'] for tensor 'W0'"
    ),
    "external_in_constant": _constant_outside,
    "external_in_memory_proto": _in_memory_external,
    "raw_data_short": _inline(_raw(lambda b: b[:100]), "holds 100 bytes of raw_data"),
    "raw_data_long": _inline(_raw(lambda b: b + b"1234"), "holds 8196 bytes of raw_data"),
    "float_data_short": _inline(_float_data_short, "does not fit its dims [64, 32]"),
    "negative_dim": _inline(_negative_dim, "has dims [-64, 32]"),
    "undefined_dtype": _inline(_set("data_type", 0), "UNDEFINED"),
    "unknown_dtype": _inline(_set("data_type", 99), "not a readable ONNX model"),
    "weight_type_mismatch": _inline(_double_weight, "onnx.checker"),
    "weight_dims_mismatch": _inline(_swap_dims, "Incompatible dimensions"),
    "dangling_input": _inline(_drop_node, "input 'h0'", two=True),
    "missing_initializer": _inline(_drop_initializer, "input 'W1'", two=True),
    "duplicate_initializer": _inline(_duplicate_initializer, "initializer 'W0' is defined twice", two=True),
    "duplicate_output": _inline(_duplicate_output, "not a readable ONNX model", two=True),
    "unknown_op": _inline(_unknown_op, "No Op registered for MatMulz"),
    "future_ir_version": _inline(_future_ir, "ir_version 99"),
    "no_opset_import": _inline(_no_opset, "opset_import"),
    "cycle": _inline(_cycle, "input 'y'"),
    "output_not_produced": _inline(_output_not_produced, "nothing_makes_this"),
    "undefined_output_type": _inline(_undefined_output_type, "value 'y' has element type UNDEFINED (0)"),
    "undefined_value_info_type": _inline(
        _undefined_value_info, "value 'h0' has element type UNDEFINED (0)", two=True
    ),
    "calib_config_no_tokenizer": _tokenizer_case(_TOKENIZER_FILES),
    "calib_broken_tokenizer": _tokenizer_case((), garble="tokenizer.json"),
    "calib_not_utf8": _text_case(_write("text.txt", b"caf\xe9 " * 100), "not UTF-8 text (byte 3)"),
    "calib_jsonl_bad_json": _text_case(
        _write("t.jsonl", b'{"text": "a"}\n{oops\n'), "t.jsonl:2: not valid JSON"
    ),
    "calib_jsonl_no_text": _text_case(_write("t.jsonl", b'{"body": "a"}\n'), 'needs a string "text" field'),
    "calib_folder_no_txt": _text_case(_text_folder({"a.md": b"words"}), "folder holds no .txt files"),
    "calib_folder_not_utf8": _text_case(_text_folder({"a.txt": b"\xff\xfe"}), "a.txt: not UTF-8"),
    "calib_fifo": _text_case(_text_fifo, "not a regular file"),
    "calib_device": _text_case(_text_device, "not a regular file"),
}


@pytest.fixture(autouse=True)
def no_hang():
    """A case that blocks (a pipe opened for reading) fails after 120 s instead of hanging the suite."""

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError("the case blocked for 120 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_cli_one_line_exit_2(name, llama, tmp_path, capsys, tree_hash):
    run_cli(HOSTILE[name](tmp_path, llama), capsys, tree_hash)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_api_raises_the_documented_error(name, llama, tmp_path, tree_hash):
    run_api(HOSTILE[name](tmp_path, llama), tree_hash)


def test_catalogue_is_documented():
    """docs/ERRORS.md names every hostile-input case (one table row each)."""
    missing = undocumented(HOSTILE)
    assert not missing, f"cases not in docs/ERRORS.md: {missing}"


# ---- handled, not refused ----------------------------------------------------------------------------


@pytest.mark.parametrize("names", ["duplicate", "empty"])
def test_repeated_or_missing_node_names_are_quantized(tmp_path, names):
    """Node names are free-form in ONNX: two MatMuls with one name, or none, quantize and run."""
    model = matmul_model([W, W2])
    for node in model.graph.node:
        node.name = "/model/layers.0/mlp/proj/MatMul" if names == "duplicate" else ""
    src = save(model, tmp_path / "src")
    out = quantize(src, tmp_path / "out", scheme="w4-g32", method="rtn", progress=False)
    proto = onnx.load(str(out / "model.onnx"))
    assert [n.op_type for n in proto.graph.node].count("MatMulNBits") == 2
    x = RNG.standard_normal((3, K)).astype(np.float32)
    got = ort.InferenceSession(str(out / "model.onnx")).run(["y"], {"x": x})[0]
    ref = np.maximum(x @ W @ W2, 0)
    assert np.abs(got - ref).max() < 0.2 * np.abs(ref).max()


def test_external_data_inside_a_subfolder_is_read(tmp_path, capsys):
    """A location in a subfolder of the model's folder (``weights/w.bin``) is inside it: quantized."""
    src = save(matmul_model([W]), tmp_path / "src", external=True)
    (src.parent / "weights").mkdir()
    (src.parent / "model.onnx_data").rename(src.parent / "weights" / "w.bin")
    proto = onnx.load(str(src), load_external_data=False)
    _set_entry("location", "weights/w.bin")(proto, src.parent)
    onnx.save(proto, str(src))
    assert (
        main(
            [
                "quantize",
                str(src),
                str(tmp_path / "out"),
                "--group-size",
                "32",
                "--no-progress",
                "--method",
                "rtn",
            ]
        )
        == 0
    )
    ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
