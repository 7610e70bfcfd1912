"""Models built by onnxruntime-genai's model builder as input (fixtures in tests/fixtures/genai, see its
README): symbolic head size in the cache inputs, windowed caches of GroupQueryAttention, ops onnxruntime
registers in the ONNX domain, external data read from any working directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from optimum.adaround import quantize
from optimum.adaround.cli import main
from optimum.adaround.graph_passes.calibration.engine import run_calibration
from optimum.adaround.graph_passes.calibration.feeds import feed_specs, make_feeds, window_capacities
from optimum.adaround.graph_passes.calibration.sessions import open_session
from optimum.adaround.graph_passes.errors import CalibrationError
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.packing.base import read_stored_weight
from optimum.adaround.graph_passes.sites import find_weight_sites, module_path

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "genai"
MODELS = [f"{arch}-{precision}" for arch in ("llama", "qwen2", "gemma3") for precision in ("fp32", "fp16")]
IDS = np.random.default_rng(0).integers(0, 320, size=(2, 40))
"""40 tokens: more than the 16-token window of the Gemma-3 fixtures' sliding layer."""


def _session(model: ir.Model | Path) -> ort.InferenceSession:
    if isinstance(model, Path):
        return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return open_session(model, ["CPUExecutionProvider"])  # its weights partly still in the input's data file


def _logits(sess: ort.InferenceSession, model: ir.Model, folder: Path, past: float = 0.0) -> np.ndarray:
    """Logits of ``IDS`` with an empty past (windowed caches: a buffer of the window filled with ``past``)."""
    specs = feed_specs(model.graph.inputs, folder=folder, capacities=window_capacities(model.graph))
    feeds = {
        k: (v + past).astype(v.dtype) if k.startswith("past") else v
        for k, v in make_feeds(specs, IDS).items()
    }
    return sess.run(["logits"], feeds)[0].astype(np.float32)


def _dequantized_reference(src: Path, out: Path) -> ir.Model:
    """The float model of ``src`` with each weight quantized in ``out`` replaced by its dequantized codes."""
    ref = load_model(src).model
    sites = {s.name: s for s in find_weight_sites(ref, quantize_lm_head=True).sites}
    replaced = 0
    for node in load_model(out).model.graph:
        stored = read_stored_weight(node)
        if stored is None:
            continue
        site = sites[module_path(node.name or "")]
        init = ref.graph.initializers[site.weight_name]
        w = stored.unpack().dequantize()
        arr = w if site.transposed else w.T
        init.const_value = ir.tensor(np.ascontiguousarray(arr, dtype=init.const_value.dtype.numpy()))
        replaced += 1
    assert replaced >= 10  # every projection of both layers: qkv, o, gate, up, down
    return ref


def _check_against_dequantized_reference(src: Path, out: Path) -> None:
    """The output runs in plain onnxruntime, and its logits are those of the float graph with the
    dequantized weights in place of the float ones (and not those of the float graph itself)."""
    quantized = load_model(out).model
    assert "MatMulNBits" in {n.op_type for n in quantized.graph}
    got = _logits(_session(out / "model.onnx"), quantized, src)
    reference = _dequantized_reference(src, out)
    want = _logits(_session(reference), reference, src)
    tol = (2e-2 if "fp16" in src.name else 1e-4) * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    fp = load_model(src).model
    assert np.abs(_logits(_session(src / "model.onnx"), fp, src) - want).max() > tol


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("name", MODELS)
def test_builder_model_quantizes_from_outside_its_folder(name, method, tmp_path, monkeypatch):
    src = FIXTURES / name
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # external data of the calibration parts must not resolve against it
    out = quantize(src, tmp_path / "q", method=method, calib_data=IDS[:, :32], progress=False)
    _check_against_dequantized_reference(src, out)


def test_cli_gptq_on_a_windowed_builder_model_calibrates_on_text(tmp_path, monkeypatch):
    """The command as a user types it, from another folder, calibrating on text through the builder's
    tokenizer files (longer sequences than the 16-token window)."""
    src = FIXTURES / "gemma3-fp32"
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", str(src), "out", "--method", "gptq", "--calib-samples", "4", "--seq-len", "40"]
    with pytest.warns(UserWarning, match="tokenizer.json alone"):
        assert main([*argv, "--no-progress"]) == 0
    _check_against_dequantized_reference(src, tmp_path / "out")


def test_windowed_cache_buffer_is_never_read():
    """The window-capacity past that calibration feeds a sliding layer is masked out: its contents do not
    change the logits (so calibration statistics are those of a run without a past)."""
    src = FIXTURES / "gemma3-fp32"
    model = load_model(src).model
    assert window_capacities(model.graph) == {"past_key_values.0.key": 16, "past_key_values.0.value": 16}
    sess = _session(src / "model.onnx")
    np.testing.assert_array_equal(_logits(sess, model, src), _logits(sess, model, src, past=3.0))


def test_sequential_statistics_match_one_pass_on_a_windowed_model():
    """Block by block and in one run of the whole graph, the same activations reach every site (nothing is
    substituted): the prologue's mask and sequence lengths reach the sliding layer's block intact."""
    src = FIXTURES / "gemma3-fp32"
    model = load_model(src).model
    sites = find_weight_sites(model).sites
    seen: dict[bool, dict[str, np.ndarray]] = {}
    for sequential in (True, False):
        got = seen.setdefault(sequential, {})

        def on_block(block, stats, got=got):
            got.update({name: st.hessian.copy() for name, st in stats.items()})
            return {}

        run_calibration(model, sites, IDS, on_block, sequential=sequential, progress=False, model_dir=src)
    assert set(seen[True]) == set(seen[False]) == {s.name for s in sites}
    for name, h in seen[False].items():
        np.testing.assert_allclose(seen[True][name], h, rtol=1e-5, atol=1e-6 * np.abs(h).max())


def test_cache_dims_come_from_config_json_without_genai_config(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama-fp32", folder)
    (folder / "genai_config.json").unlink()
    model = load_model(folder).model
    specs = {s.name: s for s in feed_specs(model.graph.inputs, folder=folder)}
    assert specs["past_key_values.1.value"].past_shape == (None, 2, None, 16)
    assert make_feeds(specs.values(), IDS)["past_key_values.1.value"].shape == (2, 2, 0, 16)


def test_symbolic_head_size_without_config_files_is_one_line(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in ("model.onnx", "model.onnx.data"):
        shutil.copy(FIXTURES / "qwen2-fp32" / f, folder / f)
    model = load_model(folder).model
    with pytest.raises(
        CalibrationError, match=r"dim 3 \(kv_cache_dim, the head size\).*genai_config\.json"
    ) as e:
        feed_specs(model.graph.inputs, folder=folder)
    assert "\n" not in str(e.value)
