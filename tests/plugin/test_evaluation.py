"""Perplexity through onnxruntime (exact on a constant-table model, = torch on SmolLM2), size, bits, SQNR."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimum.adaround import evaluation as E
from optimum.adaround.cli import main as cli_main
from optimum.adaround.graph_passes.scheme import QuantScheme

V = 8  # vocabulary of the word tokenizer fixture: <unk>, <s>, a..f


def _bigram_model(folder, table: np.ndarray, tokenizer_dir) -> None:
    """A causal LM whose logits at position t are ``table[input_ids[t]]`` (a bigram model), plus tokenizer."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)],
        "bigram",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])],
        [numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
        folder / "model.onnx",
    )
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())


def _expected_nll(table: np.ndarray, windows: list[list[int]], first: int) -> tuple[float, int]:
    """Straight from the definition, one token at a time (independent of window_nll)."""
    total, n = 0.0, 0
    for w in windows:
        for t in range(max(1, first), len(w)):
            row = table[w[t - 1]].astype(np.float64)
            total += math.log(sum(math.exp(x) for x in row)) - row[w[t]]
            n += 1
    return total, n


def test_make_windows_non_overlapping_with_prefix():
    stream = np.arange(10, dtype=np.int64) + 2
    ws = E.make_windows(stream, 4)
    assert [w.tolist() for w in ws] == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
    ws = E.make_windows(stream, 4, prefix=[1])
    assert [w.tolist() for w in ws] == [[1, 2, 3, 4], [1, 5, 6, 7], [1, 8, 9, 10], [1, 11]]
    assert [w.tolist() for w in E.make_windows(stream[:9], 4)] == [
        [2, 3, 4, 5],
        [6, 7, 8, 9],
    ]  # 1-token tail dropped
    with pytest.raises(E.EvaluationError, match="context_length=1"):
        E.make_windows(stream, 1, prefix=[1])


def test_window_nll_uniform_and_first_target():
    logits = np.zeros((5, V))
    s, n = E.window_nll(logits, np.array([1, 2, 3, 4, 5]))
    assert n == 4 and s == pytest.approx(4 * math.log(V))
    s, n = E.window_nll(logits, np.array([1, 2, 3, 4, 5]), first_target=3)
    assert n == 2 and s == pytest.approx(2 * math.log(V))


def test_uniform_model_has_perplexity_exactly_vocab(tmp_path, word_tokenizer_dir):
    _bigram_model(tmp_path / "m", np.zeros((V, V)), word_tokenizer_dir(bos=False))
    r = E.perplexity(tmp_path / "m", "a b c d e f " * 10, context_length=16, progress=False)
    assert r.perplexity == pytest.approx(V, rel=1e-12)
    # 60 tokens in windows of 16: 16+16+16+12, each scores all but its first token
    assert (r.tokens, r.windows) == (56, 4)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_bigram_model_perplexity_matches_definition(tmp_path, word_tokenizer_dir, bos, batch_size):
    rng = np.random.default_rng(0)
    table = rng.normal(0, 2, (V, V)).astype(np.float32)  # what the graph stores
    _bigram_model(tmp_path / "m", table, word_tokenizer_dir(bos=bos))
    words = rng.choice(list("abcdef"), 101)
    r = E.perplexity(
        tmp_path / "m", " ".join(words), context_length=10, batch_size=batch_size, progress=False
    )
    ids = [2 + "abcdef".index(w) for w in words]
    prefix = [1] if bos else []
    body = 10 - len(prefix)
    windows = [prefix + ids[i : i + body] for i in range(0, len(ids), body)]
    total, n = _expected_nll(table, windows, first=len(prefix))
    assert r.tokens == n == (101 if bos else 101 - len(windows))
    assert r.perplexity == pytest.approx(math.exp(total / n), rel=1e-9)


def test_eval_cli_json_for_fp32_model(tmp_path, word_tokenizer_dir, capsys):
    _bigram_model(tmp_path / "m", np.zeros((V, V)), word_tokenizer_dir(bos=False))
    (tmp_path / "t.txt").write_text("a b c d e f " * 5)
    out = tmp_path / "r.json"
    rc = cli_main(
        [
            "eval",
            str(tmp_path / "m"),
            "--text",
            str(tmp_path / "t.txt"),
            "--context-length",
            "8",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["perplexity"]["perplexity"] == pytest.approx(V)
    assert d["bits_per_weight"] is None and d["sites"] == 0
    assert d["model_bytes"] == (tmp_path / "m" / "model.onnx").stat().st_size
    assert "perplexity      8.0000" in capsys.readouterr().out


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("optimum-adaround: error:") and err.count("\n") == 1
    assert cli_main(["eval", str(tmp_path), "--sqnr-plot", str(tmp_path / "x.png")]) == 2
    assert "--reference" in capsys.readouterr().err


def test_sqnr_db():
    w = np.ones((4, 4))
    assert E.sqnr_db(w, w) == math.inf
    assert E.sqnr_db(w, w * 1.1) == pytest.approx(20.0)  # noise is 1/10 of the signal amplitude


@pytest.fixture(scope="module")
def ort_quantized(tiny_hf_onnx, tmp_path_factory):
    """The tiny tied Llama (lm_head reads Transpose(embed_tokens), which onnxruntime skips) quantized by onnxruntime's own quantizer: MatMulNBits and QDQ, W4 symmetric block 32."""
    import shutil

    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    src = tiny_hf_onnx("llama_tied")
    out = {}
    for name, fmt in (("nbits", mq.QuantFormat.QOperator), ("qdq", mq.QuantFormat.QDQ)):
        cfg = mq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=4, quant_format=fmt)
        q = mq.MatMulNBitsQuantizer(onnx.load(str(src / "model.onnx")), algo_config=cfg)
        q.process()
        d = tmp_path_factory.mktemp(name)
        q.model.save_model_to_file(str(d / "model.onnx"), use_external_data_format=False)
        for f in src.iterdir():
            if f.suffix != ".onnx":
                shutil.copy2(f, d / f.name)
        out[name] = d
    return src, out


def test_quantized_sites_dequantize_like_onnxruntime(ort_quantized):
    from optimum.adaround.graph_passes.model_io import load_model, read_weight
    from optimum.adaround.graph_passes.sites import find_weight_sites

    src, out = ort_quantized
    ref = load_model(src).model
    ref_sites = {s.name: s for s in find_weight_sites(ref).sites}
    nbits, _ = E.quantized_sites(load_model(out["nbits"]).model)
    qdq, _ = E.quantized_sites(load_model(out["qdq"]).model)
    assert {s.name for s in nbits} == {s.name for s in qdq} == set(ref_sites)  # the tied lm_head stays fp32
    qdq_by_name = {s.name: s for s in qdq}
    for s in nbits:
        w = read_weight(ref, ref_sites[s.name])
        wq = s.dequantize()
        assert wq.shape == w.shape == (s.n, s.k)
        # the same RTN grid, whichever container holds it
        np.testing.assert_array_equal(wq, qdq_by_name[s.name].dequantize())
        # symmetric RTN with block 32, step absmax/8 and codes [-8, 7]: every weight within one step (values
        # beyond 7 steps on the short side of the grid are clipped), most within half a step
        step = np.abs(w).reshape(s.n, -1, 32).max(axis=2, keepdims=True) / 8
        err = np.abs(w - wq).reshape(s.n, -1, 32)
        assert (err <= step + 1e-6).all()
        assert (err <= step / 2 + 1e-6).mean() > 0.95
    # bits per weight from stored bytes: QDQ int4 codes + one fp32 scale per 32 weights = 5 bits exactly
    assert sum(s.stored_bytes for s in qdq) * 8 / sum(s.weights for s in qdq) == pytest.approx(5.0)


def test_evaluate_reports_sqnr_and_matches_fp32_closely(ort_quantized):
    src, out = ort_quantized
    text = "The quick brown fox jumps over the lazy dog. " * 30
    fp32 = E.evaluate(src, text=text, context_length=64, progress=False)
    rep = E.evaluate(out["nbits"], text=text, reference=src, context_length=64, progress=False)
    assert rep.sites == len(rep.weight_sqnr_db) > 0
    assert all(10 < v < 30 for v in rep.weight_sqnr_db.values())  # 4-bit RTN: ~20 dB
    assert rep.bits_per_weight is not None and 4 < rep.bits_per_weight < 6
    assert rep.perplexity.tokens == fp32.perplexity.tokens
    assert rep.model_bytes < fp32.model_bytes
    # random tiny weights: 4-bit noise moves perplexity, but not wildly
    assert rep.perplexity.perplexity == pytest.approx(fp32.perplexity.perplexity, rel=0.2)


def test_reference_of_another_model_is_refused(ort_quantized, tiny_hf_onnx):
    _, out = ort_quantized
    with pytest.raises(E.EvaluationError, match="reference"):
        E.evaluate(out["nbits"], reference=tiny_hf_onnx("gpt2"), skip_perplexity=True, progress=False)


@pytest.mark.slow
def test_smollm2_onnx_perplexity_matches_torch():
    """The fp32 export through onnxruntime vs the HF checkpoint in torch: same text, same windows, within 1%."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum.adaround.data.default_model import default_model_dir, default_onnx_dir
    from optimum.adaround.data.text import evaluation_text, load_tokenizer, special_prefix, token_stream

    onnx_dir, hf_dir = default_onnx_dir(), default_model_dir()
    text = evaluation_text()
    ours = E.perplexity(onnx_dir, text, context_length=128, max_tokens=512, progress=False)

    tok = load_tokenizer(str(hf_dir))
    prefix = special_prefix(tok)
    windows = E.make_windows(token_stream(tok, [text])[:512], 128, prefix)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(torch.from_numpy(w)[None]).logits[0].numpy()
            s, c = E.window_nll(logits, w, first_target=max(1, len(prefix)))
            total, n = total + s, n + c
    assert n == ours.tokens == 512
    assert ours.perplexity == pytest.approx(math.exp(total / n), rel=0.01)
    assert 10 < ours.perplexity < 60  # a trained model on Wikipedia text (random weights: ~50,000)


def test_lowbit_custom_op_model_is_read_and_run(tiny_hf_onnx, tmp_path):
    """Our 3-bit ``MatMulLowBit`` export: sites read through the lowbit packer, perplexity via the custom op."""
    from optimum.adaround import custom_ops
    from optimum.adaround.api import quantize

    try:
        custom_ops.library_path()
    except Exception as e:  # the op library is built by `pip install -e .` / CMake; not every checkout has it
        pytest.skip(f"custom-op library not built: {e}")
    src = tiny_hf_onnx("llama_tied")
    out = quantize(src, tmp_path / "w3", scheme="w3-g32", method="rtn", format="lowbit", progress=False)
    rep = E.evaluate(
        out,
        text="The quick brown fox jumps over the lazy dog. " * 20,
        reference=src,
        context_length=64,
        progress=False,
    )
    assert rep.sites == len(rep.weight_sqnr_db) > 0 and not rep.unreadable_sites
    # codes + one fp32 scale per 32 weights (K = 64, 128: whole chunks, no padding): 3 + 1 = 4 bits for the
    # linear layers, 8 + 1 = 9 for the output projection (its own 8-bit default, in the same op)
    sites = json.loads((out / "quantization_config.json").read_text())["sites"]
    bits = {s["name"]: QuantScheme.parse(s["scheme"]).bits + 1 for s in sites}
    assert set(bits.values()) == {4, 9} and bits["lm_head"] == 9 and set(bits) == set(rep.weight_sqnr_db)
    weights = {s["name"]: s["k"] * s["n"] for s in sites}
    assert rep.bits_per_weight == pytest.approx(
        sum(bits[n] * w for n, w in weights.items()) / sum(weights.values())
    )
    # 3-bit RTN: ~14 dB; 8-bit: ~40 dB
    assert all(5 < v < 20 for n, v in rep.weight_sqnr_db.items() if n != "lm_head")
    assert rep.weight_sqnr_db["lm_head"] > 30
    assert rep.perplexity is not None and math.isfinite(rep.perplexity.perplexity)


@pytest.mark.parametrize("name", ["llama-fp32", "gemma3-fp32"])
def test_perplexity_of_an_onnxruntime_genai_builder_model(name, tmp_path, monkeypatch):
    # The builder leaves the cache's head size symbolic (the folder's genai_config.json has it) and Gemma-3's
    # windowed layer needs a cache buffer of window capacity: evaluation feeds both, as calibration does.
    from optimum.adaround.evaluation import perplexity

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "genai" / name
    if not folder.is_dir():
        pytest.skip("onnxruntime-genai builder fixtures not in this checkout")
    monkeypatch.chdir(tmp_path)  # the external data is found from any working directory
    text = "the quick brown fox jumps over the lazy dog and runs far away " * 8
    result = perplexity(folder, text, context_length=40, progress=False)
    assert result.tokens > 0 and np.isfinite(result.perplexity) and result.perplexity > 1
