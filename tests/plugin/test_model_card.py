"""Model card: front matter parses, every number in it is the evaluation module's measured number."""

from __future__ import annotations

import json
import math
import re

import pytest

from optimum.adaround import export
from optimum.adaround.graph_passes.scheme import QuantScheme
from optimum.adaround.model_card import (
    build_model_card,
    fmt_mb,
    fmt_num,
    infer_base_model,
    perplexity_of,
    read_front_matter,
    source_license,
)


@pytest.fixture(scope="module")
def evaluated(tiny_hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    text = root / "eval.txt"  # a short user text keeps tokenization cheap; same text for both models
    text.write_text(
        " ".join(f"Sentence {i} tells the quick brown fox to jump over {i % 7} lazy dogs." for i in range(80))
    )
    return export(
        tiny_hf_model("llama"), root / "llama-w4", scheme="w4-g32", method="rtn", eval=True,
        eval_options={"dataset": str(text), "context_length": 64, "progress": False}, progress=False,
    )  # fmt: skip


def table_row(text: str, label: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith(f"| {label}"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} in the card")


def test_front_matter(evaluated, tiny_hf_model):
    text = (evaluated / "README.md").read_text()
    front = read_front_matter(text)
    assert front["library_name"] == "onnx"
    assert "base_model" not in front  # a local folder has no Hub id; the Hub rejects a made-up one
    assert f"# {tiny_hf_model('llama').name} (w4-g32-rtn, ONNX)" in text
    assert front["license"] == "apache-2.0"
    assert {"onnx", "quantized", "int4", "rtn", "matmulnbits", "optimum"} <= set(front["tags"])


def test_card_numbers_match_eval_json(evaluated):
    text = (evaluated / "README.md").read_text()
    ev = json.loads((evaluated / "eval_results.json").read_text())
    before, after = ev["original"], ev["quantized"]
    ppl_row = table_row(text, "perplexity")
    assert ppl_row[1:] == [fmt_num(perplexity_of(before)), fmt_num(perplexity_of(after))]
    assert f"{after['perplexity']['tokens']} tokens" in ppl_row[0]
    assert after["perplexity"]["tokens"] == before["perplexity"]["tokens"] > 500  # same text for both
    assert table_row(text, "ONNX model size")[1:] == [
        fmt_mb(before["model_bytes"]),
        fmt_mb(after["model_bytes"]),
    ]
    bpw = table_row(text, "bits per weight")
    assert bpw[2] == fmt_num(after["bits_per_weight"])
    assert after["bits_per_weight"] == pytest.approx(expected_bits_per_weight(evaluated))
    assert after["sites"] == 15 and f"({after['sites']} layers" in bpw[0]


def expected_bits_per_weight(folder) -> float:
    """Blocks of 32, symmetric, float32 scales: ``bits + 32/32`` per weight of each layer, exactly; the 14
    linear layers at 4 bits and the output projection at its own 8 bits, weighted by their sizes."""
    sites = json.loads((folder / "quantization_config.json").read_text())["sites"]
    assert {s["scheme"] for s in sites} == {"w4-g32-sym", "w8-g32-sym"}
    bits = sum((QuantScheme.parse(s["scheme"]).bits + 1) * s["k"] * s["n"] for s in sites)
    return bits / sum(s["k"] * s["n"] for s in sites)


def test_card_lists_the_head_scheme_and_the_quantized_embedding(evaluated):
    """The card says which layers are not at the run's scheme and which embedding tables are quantized
    (bits per weight above counts the linear layers only)."""
    text = (evaluated / "README.md").read_text()
    assert table_row(text, "layers at `w8-g32-sym`")[1] == "`lm_head`"
    assert table_row(text, "layers at `w4-g32-sym`")[1] == "14 layers"
    table = table_row(text, "embedding `model.embed_tokens.weight`")
    assert table[1] == "GatherBlockQuantized, 8 bits, block 32, its own codes"


def test_eval_perplexities_are_plausible(evaluated):
    ev = json.loads((evaluated / "eval_results.json").read_text())
    p0, p1 = perplexity_of(ev["original"]), perplexity_of(ev["quantized"])
    # random-init weights over a 320-token vocabulary: near-uniform predictions, and 4-bit g32 RTN barely moves them
    assert 100 < p0 < 1000 and abs(p1 - p0) / p0 < 0.1


def test_card_without_eval_says_so(evaluated, tmp_path):
    for name in ("model.onnx", "quantization_config.json", "config.json"):
        (tmp_path / name).write_bytes((evaluated / name).read_bytes())
    text = build_model_card(tmp_path, base_model="org/model", license="mit")
    assert "Perplexity was not measured" in text
    front = read_front_matter(text)
    assert front["base_model"] == "org/model" and front["license"] == "mit"
    assert re.search(rf"\| bits per weight.*\| 32 \| {fmt_num(expected_bits_per_weight(tmp_path))} \|", text)


def test_read_front_matter_edge_cases():
    assert read_front_matter("---\nlicense: mit\ntags: [a]\n---\n# x") == {"license": "mit", "tags": ["a"]}
    assert read_front_matter("# no front matter") == {}
    assert read_front_matter("---\n: [unclosed\n---\n") == {}


def test_source_license(tmp_path):
    assert source_license(None) is None and source_license(tmp_path / "missing") is None
    assert source_license(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"license": "llama2"}))
    assert source_license(tmp_path) == "llama2"
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert source_license(tmp_path) == "apache-2.0"  # the README wins


def test_infer_base_model(tmp_path):
    assert infer_base_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert infer_base_model("not a/valid id!") is None and infer_base_model(None) is None
    snapshot = tmp_path / "hub" / "models--org--my-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert infer_base_model(snapshot) == "org/my-model"
    local = tmp_path / "local"
    local.mkdir()
    assert infer_base_model(local) is None
    (local / "config.json").write_text(json.dumps({"_name_or_path": "org/other"}))
    assert infer_base_model(local) == "org/other"
    (local / "config.json").write_text(json.dumps({"_name_or_path": "/some/path"}))
    assert infer_base_model(local) is None


def test_card_shows_the_predicted_perplexity_beside_the_measured_one(tiny_hf_model, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(
        " ".join(f"Sentence {i} tells the quick brown fox to jump over {i % 7} dogs." for i in range(80))
    )
    out = export(
        tiny_hf_model("llama"), tmp_path / "mixed", method="rtn", target_bits=5.0, calib_samples=4, seq_len=32,
        candidates=("w2-g16-asym", "w4-g32", "w8-g32"), eval=True,
        eval_options={"dataset": str(text), "context_length": 64, "progress": False}, progress=False,
    )  # fmt: skip
    card = (out / "README.md").read_text()
    ev = json.loads((out / "eval_results.json").read_text())
    alloc = json.loads((out / "quantization_config.json").read_text())["allocation"]
    row = table_row(card, "perplexity predicted before the run")
    predicted = perplexity_of(ev["original"]) * math.exp(alloc["predicted_delta_nll"])
    assert row[2].startswith(fmt_num(predicted) + " +/- ")
    assert table_row(card, "perplexity (")[2] == fmt_num(perplexity_of(ev["quantized"]))
