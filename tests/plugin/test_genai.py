"""Outputs run in onnxruntime-genai: the written ``genai_config.json`` opens them with no manual step, and
genai's greedy tokens and logits equal onnxruntime's on the same quantized graph."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from optimum.adaround import custom_ops, quantize
from optimum.adaround.cli import main as cli_main
from optimum.adaround.evaluation import perplexity
from optimum.adaround.genai import GENAI_CONFIG, write_genai_config
from optimum.adaround.graph_passes.errors import InvalidOptionError
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.loading import session_options

og = pytest.importorskip("onnxruntime_genai")
og.disable_telemetry_events()

PROMPT = [5, 6, 7, 8]
NEW_TOKENS = 8


def _has_op_library() -> bool:
    try:
        custom_ops.library_path()
    except FileNotFoundError:
        return False
    return True


def genai_greedy(folder: Path, n: int = NEW_TOKENS) -> tuple[list[int], np.ndarray]:
    """Greedy tokens after PROMPT from onnxruntime-genai, and the logits of the prompt's last position."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(PROMPT) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([PROMPT], dtype=np.int32))
    first_logits = np.asarray(gen.get_logits()).reshape(-1)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, first_logits


def ort_greedy(folder: Path, n: int = NEW_TOKENS) -> tuple[list[int], np.ndarray]:
    """The same greedy loop on a plain onnxruntime session of the folder's model.onnx (cache fed back)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(
        str(folder / "model.onnx"), session_options(), providers=["CPUExecutionProvider"]
    )
    cfg = json.loads((folder / GENAI_CONFIG).read_text())["model"]["decoder"]
    kv, hd = cfg["num_key_value_heads"], cfg["head_size"]
    past = {
        i.name: np.zeros((1, kv, 0, hd), np.float32) for i in sess.get_inputs() if i.name.startswith("past")
    }
    names = {i.name for i in sess.get_inputs()}
    ids, tokens, first = list(PROMPT), [], None
    step = np.array([PROMPT], np.int64)
    while len(tokens) < n:
        total = len(ids)
        feeds = {
            "input_ids": step,
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(total - step.shape[1], total, dtype=np.int64)[None],
            **past,
        }
        feeds = {k: v for k, v in feeds.items() if k in names}  # gemma3_text has no position_ids
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
        logits = outs["logits"][0, -1]
        first = logits if first is None else first
        nxt = int(np.argmax(logits))
        tokens.append(nxt)
        ids.append(nxt)
        step = np.array([[nxt]], np.int64)
        past = {k: outs[k.replace("past_key_values", "present")] for k in past}
    return tokens, first


FORMATS = [
    "auto",
    pytest.param("lowbit", marks=pytest.mark.skipif(not _has_op_library(), reason="op library not built")),
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimum_export_runs_in_genai(fmt, tiny_hf_onnx, tmp_path, monkeypatch):
    out = quantize(tiny_hf_onnx("llama"), tmp_path / "q", method="rtn", format=fmt, progress=False)
    record = json.loads((out / "quantization_config.json").read_text())
    assert GENAI_CONFIG in record["copied_files"]
    config = json.loads((out / GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert (config["model"]["type"], decoder["num_hidden_layers"], decoder["num_key_value_heads"]) == (
        "llama",
        2,
        2,
    )
    assert (decoder["head_size"], config["model"]["vocab_size"]) == (16, 320)
    library = decoder["session_options"].get("custom_ops_library")
    if fmt == "lowbit":  # copied beside the model: the folder opens from any working directory
        assert library == custom_ops.library_path().name and library in record["copied_files"]
        assert (out / library).read_bytes() == custom_ops.library_path().read_bytes()
    else:
        assert library is None
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # neither the output nor the installed library lies below
    tokens, logits = genai_greedy(out)
    ref_tokens, ref_logits = ort_greedy(out)
    assert len(tokens) == NEW_TOKENS
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3_text"])
def test_other_architectures_run_in_genai(arch, tiny_hf_onnx, tmp_path):
    out = quantize(tiny_hf_onnx(arch), tmp_path / "q", method="rtn", progress=False)
    tokens, logits = genai_greedy(out)
    ref_tokens, ref_logits = ort_greedy(out)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)


BUILDER_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "genai"


def builder_model(name: str) -> Path:
    """A tiny model written by onnxruntime-genai's builder (tests/fixtures/genai), or a skip."""
    folder = BUILDER_FIXTURES / name
    if not (folder / GENAI_CONFIG).is_file():
        pytest.skip(f"builder fixture {name} is not in this checkout")
    return folder


def prompt_logits(folder: Path, n: int = NEW_TOKENS) -> np.ndarray:
    """onnxruntime's logits at the prompt's last position, fed as genai feeds a builder graph: zero caches
    of the generation's full length (its shared past/present buffer), the mask over the prompt only."""
    import onnxruntime as ort

    sess = ort.InferenceSession(
        str(folder / "model.onnx"), session_options(), providers=["CPUExecutionProvider"]
    )
    cfg = json.loads((folder / GENAI_CONFIG).read_text())["model"]["decoder"]
    cache = (1, cfg["num_key_value_heads"], len(PROMPT) + n, cfg["head_size"])
    feeds = {"input_ids": np.array([PROMPT]), "attention_mask": np.ones((1, len(PROMPT)), np.int64)}
    feeds |= {i.name: np.zeros(cache, np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    return sess.run(["logits"], feeds)[0][0, -1]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["llama-fp32", "qwen2-fp32"])
def test_builder_model_runs_in_genai(name, fmt, tmp_path, monkeypatch):
    """A builder model quantized from another working directory opens in genai with its own config (kept,
    op library added for lowbit); genai's logits equal onnxruntime's on the quantized graph."""
    src = builder_model(name)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = quantize(src, tmp_path / "q", method="rtn", format=fmt, progress=False)
    written = json.loads((out / GENAI_CONFIG).read_text())
    given = json.loads((src / GENAI_CONFIG).read_text())
    assert written["search"] == given["search"] and written["model"]["type"] == given["model"]["type"]
    tokens, logits = genai_greedy(out)
    assert len(tokens) == NEW_TOKENS
    np.testing.assert_allclose(logits, prompt_logits(out), rtol=1e-5, atol=1e-5)


def test_windowed_builder_model_runs_in_genai(tmp_path):
    """Gemma-3 with a sliding-window layer (window 16): genai needs a cache of at least the window."""
    out = quantize(builder_model("gemma3-fp32"), tmp_path / "q", method="rtn", progress=False)
    tokens, logits = genai_greedy(out, n=16)
    assert len(tokens) == 16
    np.testing.assert_allclose(logits, prompt_logits(out, n=16), rtol=1e-5, atol=1e-5)


def test_input_genai_config_is_copied_and_updated(tiny_hf_onnx, tmp_path):
    """A folder that already has a genai_config.json (as the model builder writes) keeps it, with the
    decoder's file name set to the output's and its own settings left as they were."""
    src = tmp_path / "in"
    shutil.copytree(tiny_hf_onnx("llama"), src)
    shutil.move(src / "model.onnx", src / "decoder.onnx")
    write_genai_config(src, src, load_model(src).model, "decoder.onnx")
    given = json.loads((src / GENAI_CONFIG).read_text())
    given["search"]["top_k"] = 7
    (src / GENAI_CONFIG).write_text(json.dumps(given))
    out = quantize(src, tmp_path / "q", method="rtn", progress=False)
    written = json.loads((out / GENAI_CONFIG).read_text())
    assert written["search"]["top_k"] == 7
    assert written["model"]["decoder"]["filename"] == "decoder.onnx"
    assert len(genai_greedy(out)[0]) == NEW_TOKENS


def test_token_ids_outside_the_vocabulary_get_no_config(tiny_hf_onnx, tmp_path, caplog):
    """The tiny Phi-3 keeps Phi-3's eos id 32000 with a 320-entry vocabulary: genai would refuse the folder."""
    with caplog.at_level(logging.INFO, logger="optimum.adaround.genai"):
        out = quantize(tiny_hf_onnx("phi3"), tmp_path / "q", method="rtn", progress=False)
    assert not (out / GENAI_CONFIG).exists()
    assert "special token ids [32000] lie outside the vocabulary of 320" in caplog.text


def test_unsupported_graph_gets_no_config_and_a_note(tiny_hf_onnx, tmp_path, caplog):
    src = tmp_path / "in"
    shutil.copytree(tiny_hf_onnx("llama"), src)
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "model_type": "bert"}))
    with caplog.at_level(logging.INFO, logger="optimum.adaround.genai"):
        out = quantize(src, tmp_path / "q", method="rtn", progress=False)
    assert not (out / GENAI_CONFIG).exists()
    assert "'bert' is not one onnxruntime-genai runs" in caplog.text
    assert (out / "model.onnx").is_file()


TEXT = "The quick brown fox jumps over the lazy dog. Hello world, a tiny tokenizer. " * 8


def test_eval_runtime_genai_matches_onnxruntime(tiny_hf_onnx, tmp_path, capsys):
    """``eval --runtime genai`` scores the same windows with genai's logits: the same perplexity as
    onnxruntime's on the same quantized graph; lowbit outputs open through the config's op library."""
    fmt = "lowbit" if _has_op_library() else "auto"
    out = quantize(tiny_hf_onnx("llama"), tmp_path / "q", method="rtn", format=fmt, progress=False)
    (tmp_path / "t.txt").write_text(TEXT)
    reports = {}
    for runtime in ("onnxruntime", "genai"):
        args = [
            "eval",
            str(out),
            "--text",
            str(tmp_path / "t.txt"),
            "--context-length",
            "32",
            "--no-progress",
        ]
        assert cli_main([*args, "--runtime", runtime, "--json", str(tmp_path / f"{runtime}.json")]) == 0
        reports[runtime] = json.loads((tmp_path / f"{runtime}.json").read_text())["perplexity"]
    assert reports["genai"]["tokens"] == reports["onnxruntime"]["tokens"] > 100
    assert reports["genai"]["perplexity"] == pytest.approx(reports["onnxruntime"]["perplexity"], rel=1e-6)
    assert ", genai)" in capsys.readouterr().out


def test_eval_runtime_genai_needs_the_config(tiny_hf_onnx, tmp_path, capsys):
    out = quantize(tiny_hf_onnx("llama"), tmp_path / "q", method="rtn", progress=False)
    (out / GENAI_CONFIG).unlink()
    assert cli_main(["eval", str(out), "--runtime", "genai", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"has no {GENAI_CONFIG}: onnxruntime-genai cannot open it" in err and err.count("\n") == 1
    with pytest.raises(InvalidOptionError, match="runtime='tvm'"):
        perplexity(out, TEXT, runtime="tvm")
