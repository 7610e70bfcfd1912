"""Embedded text: clean extraction, a deterministic non-overlapping split, user sources, calibration ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optimum.adaround.data import text as T
from optimum.adaround.graph_passes.errors import CalibrationError, UserError


def test_wikipedia_articles_are_clean_prose():
    arts = T.embedded_articles("wikipedia")
    assert 60 <= len(arts) <= 120  # ~100 full articles after dropping redirects, disambiguation and stubs
    assert len({a.title for a in arts}) == len(arts)
    for a in arts:
        assert len(a.text) >= 2000
        assert "#REDIRECT" not in a.text and "(disambiguation)" not in a.title
        # leftover markup that filter_wiki does not remove is cleaned
        assert "'''" not in a.text and "''" not in a.text and "[[" not in a.text and "{{" not in a.text
        assert not any(line.startswith(("=", "*", "|")) for line in a.text.splitlines())
    assert "Anarchism is a political philosophy" in next(a.text for a in arts if a.title == "Anarchism")


def test_split_is_disjoint_deterministic_and_covers_everything():
    for name in ("wikipedia", "news"):
        cal = T.embedded_articles(name, "calibration")
        ev = T.embedded_articles(name, "evaluation")
        assert cal and ev
        assert not {a.text for a in cal} & {a.text for a in ev}
        assert len(cal) + len(ev) == len(T.embedded_articles(name))
        assert 0.1 < len(ev) / (len(cal) + len(ev)) < 0.4  # ~25% goes to evaluation
    # the split depends on the title only (sha1), not on order or the Python hash seed
    assert T.split_of("Anarchism") == T.split_of("Anarchism")
    assert {T.split_of(str(i)) for i in range(50)} == {"calibration", "evaluation"}


def test_evaluation_and_calibration_text_never_share_a_paragraph():
    ev = set(T.evaluation_text().split("\n\n"))
    cal = set(T.calibration_text().split("\n\n"))
    assert len(ev) > 100 and len(cal) > 300
    assert not (ev & cal) - {""}
    both = T.evaluation_text("embedded")
    assert T.evaluation_text() in both and len(both) > len(T.evaluation_text())


def test_user_text_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("a b c")
    (tmp_path / "b.txt").write_text("d e f")
    assert T.evaluation_text(tmp_path / "a.txt") == "a b c"
    assert T.evaluation_text(tmp_path) == "a b c\n\nd e f"
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "a a"}) + "\n\n" + json.dumps({"text": "b b", "id": 3}) + "\n")
    assert T.evaluation_text(j) == "a a\n\nb b"


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json\n", r"d\.jsonl:1: not valid JSON"), ('{"txt": "a"}\n', r'd\.jsonl:1: .*"text" field')],
)
def test_bad_jsonl_names_the_line(tmp_path, content, match):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(T.TextSourceError, match=match):
        T.evaluation_text(tmp_path / "d.jsonl")


def test_bad_sources(tmp_path):
    with pytest.raises(T.TextSourceError, match="neither a file"):
        T.evaluation_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(T.TextSourceError, match="empty"):
        T.evaluation_text(tmp_path / "empty.txt")
    with pytest.raises(T.TextSourceError, match="unknown embedded text"):
        T.embedded_articles("klingon")
    assert issubclass(T.TextSourceError, UserError)


def test_hf_dataset_source_gives_one_clear_line():
    # `datasets` is not a dependency (and there is no hub here): either way the error is one clear line.
    with pytest.raises(T.TextSourceError, match=r"hf:wikitext|datasets") as e:
        T.evaluation_text("hf:wikitext:wikitext-2-raw-v1:test")
    assert "\n" not in str(e.value)


def test_calibration_token_ids_shape_seed_and_bos(tmp_path, word_tokenizer_dir):
    src = tmp_path / "c.txt"
    src.write_text(" ".join("abcdef"[i % 6] for i in range(500)))
    tok = word_tokenizer_dir(bos=True)
    ids = T.calibration_token_ids(tok, src, n_samples=7, seq_len=16, seed=3)
    assert ids.dtype == np.int64 and ids.shape == (7, 16)
    assert (ids[:, 0] == 1).all()  # the tokenizer's BOS leads every sequence
    assert ((ids[:, 1:] >= 2) & (ids[:, 1:] <= 7)).all()
    # each row is a contiguous window of the cyclic text a b c d e f ...
    assert ((np.diff(ids[:, 1:], axis=1) % 6) == 1).all()
    np.testing.assert_array_equal(ids, T.calibration_token_ids(tok, src, n_samples=7, seq_len=16, seed=3))
    assert not np.array_equal(ids, T.calibration_token_ids(tok, src, n_samples=7, seq_len=16, seed=4))
    no_bos = T.calibration_token_ids(word_tokenizer_dir(bos=False), src, n_samples=2, seq_len=16)
    assert (no_bos >= 2).all()


def test_calibration_token_ids_errors(tmp_path, word_tokenizer_dir):
    tok = word_tokenizer_dir(bos=False)
    short = tmp_path / "s.txt"
    short.write_text("a b c")
    with pytest.raises(CalibrationError, match="3 tokens, shorter than one sequence of 8"):
        T.calibration_token_ids(tok, short, n_samples=2, seq_len=8)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="empty"):
        T.calibration_token_ids(tok, empty, n_samples=2, seq_len=8)
    with pytest.raises(CalibrationError, match="n_samples=0"):
        T.calibration_token_ids(tok, short, n_samples=0, seq_len=8)


def test_default_calibration_split_tokenizes(word_tokenizer_dir):
    ids = T.calibration_token_ids(word_tokenizer_dir(bos=False), None, n_samples=4, seq_len=64)
    assert ids.shape == (4, 64)


def test_a_tokenizer_config_of_an_unknown_class_falls_back_to_tokenizer_json(tiny_hf_onnx, tmp_path):
    # tokenizer_config.json written by a newer transformers (or onnxruntime-genai's builder) may name a
    # class this transformers lacks: tokenizer.json alone still tokenizes the calibration text.
    import json
    import shutil

    from optimum.adaround.data.text import load_tokenizer

    src = tiny_hf_onnx("llama")
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="tokenizer.json alone"):
        tokenizer = load_tokenizer(folder)
    reference = load_tokenizer(src)
    text = "the quick brown fox"
    assert (
        tokenizer(text, add_special_tokens=False)["input_ids"]
        == reference(text, add_special_tokens=False)["input_ids"]
    )
