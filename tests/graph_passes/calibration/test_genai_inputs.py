"""Models built by onnxruntime-genai's model builder as input (fixtures in tests/fixtures/genai, see its
README): symbolic head size in the cache inputs, windowed caches of GroupQueryAttention, ops onnxruntime
registers in the ONNX domain, external data read from any working directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from optimum.adaround import quantize
from optimum.adaround.cli import main
from optimum.adaround.evaluation import quantized_sites
from optimum.adaround.graph_passes.calibration.engine import run_calibration
from optimum.adaround.graph_passes.calibration.feeds import feed_specs, make_feeds, window_capacities
from optimum.adaround.graph_passes.calibration.sessions import open_session
from optimum.adaround.graph_passes.errors import CalibrationError
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.packing.base import PackedWeight
from optimum.adaround.graph_passes.packing.gather_block import GatherBlockQuantizedPacker
from optimum.adaround.graph_passes.scheme import QuantScheme
from optimum.adaround.graph_passes.sites import find_weight_sites

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
    """The float model of ``src`` with each weight quantized in ``out`` replaced by its dequantized codes:
    every linear layer and the output projection (read as evaluation reads them, a fused q/k/v or gate/up
    node as its modules), and each token embedding table stored as its own ``GatherBlockQuantized``. A
    table tied to the output projection is the projection's weight (Gemma-3: the Gather reads its
    transpose), so replacing that weight replaces the table too, as the quantized lookup reads the same
    codes."""
    ref = load_model(src).model
    sites = {s.name: s for s in find_weight_sites(ref, quantize_lm_head=True).sites}
    quantized = load_model(out).model
    found, unreadable = quantized_sites(quantized)
    assert not unreadable
    for q in found:
        site = sites[q.name]
        w = q.dequantize()
        _replace(ref, site.weight_name, w if site.transposed else w.T)
    assert {q.name for q in found} == set(sites)  # every projection of both layers and lm_head
    record = json.loads((out / "quantization_config.json").read_text())
    for table in record["embeddings"]:
        if table["shared_with"] is None:
            node = next(n for n in quantized.graph if n.name == f"{table['node']}/GatherBlockQuantized")
            _replace(ref, table["table"], _gather_table(node))
    return ref


def _replace(model: ir.Model, name: str, array: np.ndarray) -> None:
    init = model.graph.initializers[name]
    init.const_value = ir.tensor(np.ascontiguousarray(array, dtype=init.const_value.dtype.numpy()))


def _gather_table(node: ir.Node) -> np.ndarray:
    """The float table ``[vocab, hidden]`` a ``GatherBlockQuantized`` node looks rows up in."""
    data, scales = (node.inputs[i].const_value.numpy() for i in (0, 2))
    zp = node.inputs[3].const_value.numpy() if len(node.inputs) > 3 and node.inputs[3] is not None else None
    bits, block = (node.attributes[a].as_int() for a in ("bits", "block_size"))
    scheme = QuantScheme(bits=bits, group_size=block, symmetric=zp is None)
    tensors = {"data": data, "scales": scales, **({} if zp is None else {"zero_points": zp})}
    n, k = data.shape[0], data.shape[1] * 8 // bits
    return GatherBlockQuantizedPacker().unpack(PackedWeight(tensors, {}), scheme, k, n).dequantize()


def _check_against_dequantized_reference(src: Path, out: Path) -> None:
    """The output runs in plain onnxruntime, and its logits are those of the float graph with the
    dequantized weights in place of the float ones (and not those of the float graph itself)."""
    quantized = load_model(out).model
    assert {"MatMulNBits", "GatherBlockQuantized"} <= {n.op_type for n in quantized.graph}
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
    # accuracy_level 0: the kernels compute in float, so the logits are the dequantized reference's up to
    # float rounding (the default, 4, quantizes activations to int8 and differs by ~1e-2)
    out = quantize(
        src, tmp_path / "q", method=method, calib_data=IDS[:, :32], accuracy_level=0, progress=False
    )
    _check_against_dequantized_reference(src, out)


def test_defaults_share_the_tied_table_and_run_in_onnxruntime_genai(tmp_path):
    """With the defaults (8-bit output projection, embeddings on, accuracy_level 4, fusion) the Gemma-3
    builder model's tied embedding becomes a lookup into the head's own packed arrays: no float copy of
    the table is left, and onnxruntime-genai loads the folder and generates."""
    og = pytest.importorskip("onnxruntime_genai")
    src = FIXTURES / "gemma3-fp32"
    out = quantize(src, tmp_path / "q", calib_data=IDS[:, :32], progress=False)
    record = json.loads((out / "quantization_config.json").read_text())
    head = next(s for s in record["sites"] if s["kind"] == "lm_head")
    assert head["scheme"] == "w8-g64-sym"  # the run's block 128 halved to divide K = 64: no padded block
    [table] = record["embeddings"]
    assert table["shared_with"] == head["name"] and table["bits"] == 8
    model = load_model(out).model
    vocab, hidden = 320, 64
    floats = [
        name
        for name, v in model.graph.initializers.items()
        if v.const_value is not None
        and v.const_value.dtype == ir.DataType.FLOAT
        and sorted(v.const_value.shape.dims) == [hidden, vocab]
    ]
    assert floats == []  # neither the table nor its transpose
    [lookup] = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    [matmul] = [n for n in model.graph if n.op_type == "MatMulNBits" and n.outputs[0].name == "logits"]
    reshape = lookup.inputs[0].producer()
    assert reshape.op_type == "Reshape" and reshape.inputs[0] is matmul.inputs[1]  # the head's own codes
    levels = {n.attributes["accuracy_level"].as_int() for n in model.graph if n.op_type == "MatMulNBits"}
    assert levels == {4}
    og.disable_telemetry_events()
    genai_model = og.Model(str(out))
    params = og.GeneratorParams(genai_model)
    # the cache must hold the sliding layer's window (16)
    params.set_search_options(do_sample=False, max_length=24)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(np.array([[5, 6, 7, 8]], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert len(tokens) == 20 and all(0 <= t < vocab for t in tokens)


def test_cli_gptq_on_a_windowed_builder_model_calibrates_on_text(tmp_path, monkeypatch):
    """The command as a user types it, from another folder, calibrating on text through the builder's
    tokenizer files (longer sequences than the 16-token window)."""
    src = FIXTURES / "gemma3-fp32"
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", str(src), "out", "--method", "gptq", "--calib-samples", "4", "--seq-len", "40",
            "--accuracy-level", "0"]  # fmt: skip
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
