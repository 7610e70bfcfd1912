"""Model I/O: the four input kinds, one-line errors for broken files, external-data save, weight reads."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from optimum.adaround.graph_passes.errors import InvalidModelError
from optimum.adaround.graph_passes.model_io import (
    find_model_file,
    load_model,
    read_weight,
    save_model,
    to_source_kind,
)
from optimum.adaround.graph_passes.sites import find_weight_sites

RNG = np.random.default_rng(0)
W = RNG.standard_normal((64, 48)).astype(np.float32)  # [K, N]
C = RNG.standard_normal((48,)).astype(np.float32)  # a Constant node's value, big enough to go external


def _proto() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Constant", [], ["c"], name="const", value=numpy_helper.from_array(C, "c")),
        helper.make_node("Add", ["a", "c"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 48])],
        [numpy_helper.from_array(W, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def external_model(tmp_path):
    """A model whose initializer *and* Constant attribute live in model.onnx_data."""
    folder = tmp_path / "src"
    folder.mkdir()
    onnx.save(
        _proto(),
        folder / "model.onnx",
        save_as_external_data=True,
        location="model.onnx_data",
        size_threshold=0,
    )
    # onnx.save leaves attribute tensors inline; Optimum's large exports put them in the data file too.
    proto = onnx.load(folder / "model.onnx", load_external_data=False)
    data = folder / "model.onnx_data"
    offset = data.stat().st_size
    with data.open("ab") as f:
        f.write(C.tobytes())
    t = next(n for n in proto.graph.node if n.op_type == "Constant").attribute[0].t
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "model.onnx_data"), ("offset", str(offset)), ("length", str(C.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, folder / "model.onnx")
    return folder


def test_load_file_folder_proto_and_gs(tmp_path, external_model):
    by_file = load_model(external_model / "model.onnx")
    by_folder = load_model(external_model)
    assert by_file.kind == by_folder.kind == "path"
    assert by_folder.folder == external_model and by_folder.path == external_model / "model.onnx"
    assert by_file.external and by_folder.external  # so the quantized copy is saved with external data too
    # The weight stays on disk: an ExternalTensor (memory-mapped on read), not a loaded array.
    assert isinstance(by_file.model.graph.initializers["W"].const_value, ir.ExternalTensor)

    proto = _proto()
    loaded = load_model(proto)
    assert loaded.kind == "proto" and not loaded.external
    back = to_source_kind(loaded.model, "proto")
    assert isinstance(back, onnx.ModelProto)
    np.testing.assert_array_equal(numpy_helper.to_array(back.graph.initializer[0]), W)

    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = gs.import_onnx(proto)
    loaded = load_model(graph)
    assert loaded.kind == "gs"
    assert isinstance(to_source_kind(loaded.model, "gs"), gs.Graph)
    assert to_source_kind(loaded.model, "path") is loaded.model


def test_save_with_external_data_rewrites_constants(tmp_path, external_model):
    """Known trap: Constant attributes must not keep pointing at the old data file."""
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    expected = x @ W + C
    model = load_model(external_model).model
    const = next(n for n in model.graph if n.op_type == "Constant")
    assert isinstance(const.attributes["value"].value, ir.ExternalTensor)
    out = tmp_path / "out"
    out.mkdir()
    files = save_model(model, out / "model.onnx")  # external input -> external output, decided automatically
    assert [f.name for f in files] == ["model.onnx", "model.onnx_data"]
    shutil.rmtree(external_model)  # the copy must not need the input's data file any more
    np.testing.assert_allclose(_run(out / "model.onnx", x), expected, rtol=1e-5, atol=1e-5)


def test_save_small_model_inline_or_forced_external(tmp_path):
    model = load_model(_proto()).model
    assert save_model(model, tmp_path / "a.onnx") == [tmp_path / "a.onnx"]
    forced = save_model(load_model(_proto()).model, tmp_path / "b.onnx", external_data=True)
    assert [f.name for f in forced] == ["b.onnx", "b.onnx_data"]
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "a.onnx", x), _run(tmp_path / "b.onnx", x))


def test_read_weight_orientation():
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="/m/layers.0/a/MatMul"),
        helper.make_node("Transpose", ["V"], ["Vt"], name="t"),
        helper.make_node("MatMul", ["h", "Vt"], ["y"], name="/m/layers.0/b/MatMul"),
    ]
    v = RNG.standard_normal((16, 48)).astype(np.float16)  # [N, K], float16 read as float32
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64]),
            helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT16, ["b", 48]),
        ],
        [
            helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None),
            helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, None),
        ],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(v, "V")],
    )
    model = load_model(helper.make_model(graph)).model
    a, b = find_weight_sites(model).sites
    wa, wb = read_weight(model, a), read_weight(model, b)
    assert wa.dtype == wb.dtype == np.float32 and wa.flags.c_contiguous
    np.testing.assert_array_equal(wa, W.T)
    np.testing.assert_array_equal(wb, v.astype(np.float32))


@pytest.mark.parametrize("kind", ["not_onnx", "truncated", "missing_data", "short_data", "empty"])
def test_broken_inputs_give_one_line_errors(tmp_path, external_model, kind):
    path = external_model / "model.onnx"
    if kind == "not_onnx":
        path = tmp_path / "notes.onnx"
        path.write_text("this is not a model\n")
    elif kind == "truncated":
        data = (external_model / "model.onnx").read_bytes()
        path = tmp_path / "cut.onnx"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "missing_data":
        (external_model / "model.onnx_data").unlink()
    elif kind == "short_data":
        data_file = external_model / "model.onnx_data"
        data_file.write_bytes(data_file.read_bytes()[:100])
    else:
        path = tmp_path / "empty.onnx"
        path.write_bytes(b"")
    with pytest.raises(InvalidModelError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    if kind in ("missing_data", "short_data"):
        assert "model.onnx_data" in message


def test_folder_discovery(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModelError, match=r"no \.onnx file"):
        find_model_file(tmp_path / "empty")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("encoder_model.onnx", "other.onnx"):
        (two / name).write_bytes(b"")
    with pytest.raises(InvalidModelError, match=r"several \.onnx files"):
        find_model_file(two)
    (two / "decoder_model_merged.onnx").write_bytes(b"")
    assert find_model_file(two).name == "decoder_model_merged.onnx"
    with pytest.raises(InvalidModelError, match="cannot read a model from"):
        load_model(42)
