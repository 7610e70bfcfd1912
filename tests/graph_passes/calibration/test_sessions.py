"""calibration/sessions.py: parts whose weights stay in the input's external data file."""

from __future__ import annotations

import shutil

import numpy as np
import onnx

from optimum.adaround import quantize


def _with_external_data(src, dest):
    shutil.copytree(src, dest)
    model = onnx.load(dest / "model.onnx")
    onnx.save_model(
        model, dest / "model.onnx", save_as_external_data=True, location="model.onnx_data", size_threshold=0
    )
    return dest


def test_calibration_reads_external_data_from_any_working_directory(tiny_hf_onnx, tmp_path, monkeypatch):
    # onnxruntime resolves the external data of a model loaded from bytes against the working directory
    # (and refuses a path escaping it): calibration must work, with the same bytes, from anywhere.
    src = _with_external_data(tiny_hf_onnx("llama"), tmp_path / "model")
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 16))
    outputs = {}
    for name, cwd in (("inside", src), ("elsewhere", tmp_path / "elsewhere")):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        out = quantize(
            src, tmp_path / f"out-{name}", method="gptq", calib_data=ids, progress=False, workers=1
        )
        outputs[name] = {p.name: p.read_bytes() for p in out.glob("model.onnx*")}
    assert set(outputs["inside"]) == {"model.onnx", "model.onnx_data"}
    assert outputs["inside"] == outputs["elsewhere"]


def test_parts_over_the_inline_limit_with_external_data_calibrate_the_same(
    tiny_hf_onnx, tmp_path, monkeypatch
):
    """A part too large for one protobuf goes to onnxruntime through a file with its own data file; its
    weights must not be looked up in the input's folder (an 8B model's embedding part did, and failed)."""
    from optimum.adaround.graph_passes.calibration import sessions

    src = _with_external_data(tiny_hf_onnx("llama"), tmp_path / "model")
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 16))
    inline = quantize(src, tmp_path / "inline", method="gptq", calib_data=ids, progress=False, workers=1)
    monkeypatch.setattr(sessions, "_INLINE_LIMIT", 0)  # every part through a file
    through_files = quantize(
        src, tmp_path / "files", method="gptq", calib_data=ids, progress=False, workers=1
    )
    for name in ("model.onnx", "model.onnx_data"):
        assert (inline / name).read_bytes() == (through_files / name).read_bytes(), name


def test_a_session_maps_its_weights_instead_of_copying_them(tmp_path):
    """Calibration sessions leave weights in the data file onnxruntime maps (no packed copies): opening a
    part with a 128 MB weight adds far less than 128 MB of anonymous memory, and it computes the same."""
    import onnx_ir as ir

    from optimum.adaround.graph_passes.calibration.sessions import open_session
    from optimum.adaround.graph_passes.memory import tree_anon_bytes

    k, n = 4096, 8192
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, k])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, n])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
        [onnx.numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data")
    del model, graph
    part = ir.load(tmp_path / "m.onnx")
    before = tree_anon_bytes()
    sess = open_session(part, ["CPUExecutionProvider"])
    added = tree_anon_bytes() - before
    assert added < w.nbytes // 4, f"opening the session added {added / 2**20:.0f} MB"
    xs = np.random.default_rng(1).standard_normal((2, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(["y"], {"x": xs})[0], xs @ w, rtol=1e-4, atol=1e-3)
