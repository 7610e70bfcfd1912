"""Embedded English text for calibration and evaluation, and user-supplied text sources.

Embedded text comes from gensim's test data (installed with ``pip install gensim``), so nothing is downloaded:

- ``wikipedia``: the shortened English Wikipedia dump gensim ships (CC BY-SA), extracted with gensim's own
  ``extract_pages``/``filter_wiki``; redirects, disambiguation pages and stubs are dropped and leftover markup
  (bold/italic quotes, headings, list bullets, table cells, reference sections) is cleaned, keeping prose
  paragraphs. About 100 articles, ~2.5 MB.
- ``news``: gensim's ``lee_background.cor`` (one news article per line), 360 kB.

Each article goes to the calibration or the evaluation split by a hash of its title (news: of its text), so
the splits never overlap and do not depend on ordering or on the Python hash seed (~25% goes to evaluation).

A ``source`` is one of: ``None`` (the embedded Wikipedia split), ``"wikipedia"``, ``"news"``, ``"embedded"``
(both), a path to a ``.txt`` file (or a folder of them), a ``.jsonl`` file with a ``"text"`` field per line,
or ``"hf:NAME[:CONFIG][:SPLIT]"`` for a Hugging Face ``datasets`` dataset (used only when the library is
installed and the dataset is reachable). User files are used as given: the same file for calibration and
evaluation is the user's choice.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import os
import re
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from ..graph_passes.errors import CalibrationError, UserError
from ..graph_passes.model_io import check_inside

__all__ = [
    "EMBEDDED_SOURCES",
    "Article",
    "TextSourceError",
    "calibration_text",
    "calibration_token_ids",
    "embedded_articles",
    "evaluation_text",
    "load_tokenizer",
    "split_of",
    "token_stream",
]

Split = Literal["calibration", "evaluation"]
EMBEDDED_SOURCES = ("wikipedia", "news", "embedded")
_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS = "lee_background.cor"
_EVAL_BUCKETS = 64  # of 256: the evaluation share of the hash space (25%)
_MIN_ARTICLE_CHARS = 2000  # shorter cleaned articles are stubs
_MIN_PARAGRAPH_WORDS = 8  # shorter lines are table cells, captions, list fragments
_TAIL_SECTIONS = re.compile(
    r"^=+\s*(See also|References|Notes|Further reading|External links|Bibliography|Sources|Footnotes)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE,
)


class TextSourceError(UserError):
    """A text source that cannot be read (missing file, bad JSONL, unreachable dataset)."""


class Article(NamedTuple):
    """One embedded article."""

    title: str
    text: str


def split_of(key: str) -> Split:
    """Deterministic split of an article: the first byte of SHA-1 of its key."""
    bucket = hashlib.sha1(key.encode("utf-8")).digest()[0]
    return "evaluation" if bucket < _EVAL_BUCKETS else "calibration"


def _gensim_test_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise TextSourceError("the embedded text needs gensim's test data: run `pip install gensim`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    if not (folder / _WIKI_DUMP).is_file():
        raise TextSourceError(f"{folder / _WIKI_DUMP} is missing: reinstall gensim (`pip install gensim`)")
    return folder


def clean_wiki(raw_markup: str) -> str:
    """Prose paragraphs of one article from its wiki markup (gensim's ``filter_wiki`` does the heavy part)."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw_markup)
    tail = _TAIL_SECTIONS.search(text)
    if tail:
        text = text[: tail.start()]
    paragraphs = []
    for line in text.splitlines():
        if line.strip().startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}")):
            continue  # headings, lists, indents, table syntax
        line = re.sub(r"'{2,}", "", line)  # bold / italic quotes
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses emptied by removed templates
        line = re.sub(r"<[^>]{0,200}>", "", line)  # stray html tags
        line = re.sub(r"[ \t]{2,}", " ", line).replace(" ,", ",").replace(" .", ".").strip()
        # Prose only: a list item or table cell whose bullet hid behind quotes is caught here.
        if len(line.split()) >= _MIN_PARAGRAPH_WORDS and not line.startswith(("=", "*", "#", "|", "!")):
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


@functools.cache
def _wikipedia() -> tuple[Article, ...]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(_gensim_test_data() / _WIKI_DUMP, "rb") as fh:
        for title, markup, _ in extract_pages(fh, filter_namespaces=("0",)):
            if not markup or markup.lstrip()[:9].lower() == "#redirect" or "(disambiguation)" in title:
                continue
            text = clean_wiki(markup)
            if len(text) >= _MIN_ARTICLE_CHARS:
                articles.append(Article(title, text))
    return tuple(articles)


@functools.cache
def _news() -> tuple[Article, ...]:
    lines = (_gensim_test_data() / _NEWS).read_text(encoding="utf-8").splitlines()
    return tuple(Article(f"lee-{i}", line.strip()) for i, line in enumerate(lines) if line.strip())


def embedded_articles(name: str = "wikipedia", split: Split | None = None) -> list[Article]:
    """Articles of an embedded corpus (``wikipedia``, ``news`` or ``embedded`` = both), optionally one split."""
    if name not in EMBEDDED_SOURCES:
        raise TextSourceError(f"unknown embedded text {name!r}; choose one of {EMBEDDED_SOURCES}")
    corpora = {"wikipedia": (_wikipedia,), "news": (_news,), "embedded": (_wikipedia, _news)}[name]
    out: list[Article] = []
    for corpus in corpora:
        for art in corpus():
            # News articles have no title worth hashing: hash their text instead.
            key = art.text if art.title.startswith("lee-") else art.title
            if split is None or split_of(key) == split:
                out.append(art)
    return out


def _read_text(path: Path) -> str:
    """A user's text file as UTF-8: regular files only (a pipe or device would block or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO waits for a writer
    except OSError as e:
        raise TextSourceError(f"{path}: cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise TextSourceError(f"{path}: not a regular file (a pipe, device or socket): give a text file")
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextSourceError(f"{path}: not UTF-8 text (byte {e.start}): convert it to UTF-8") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TextSourceError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TextSourceError(f'{path}:{i}: each line needs a string "text" field')
        docs.append(record["text"])
    return docs


def _read_user_source(source: str | Path) -> list[str]:
    text = str(source)
    if text.startswith("hf:"):
        return _read_hf_dataset(text[3:])
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise TextSourceError(f"{path}: folder holds no .txt files")
        return [_read_text(f) for f in files]
    if not path.exists():
        raise TextSourceError(
            f"text source {text!r} is neither a file, a folder, one of {EMBEDDED_SOURCES} nor 'hf:NAME'"
        )
    return _read_jsonl(path) if path.suffix == ".jsonl" else [_read_text(path)]


def _read_hf_dataset(spec: str) -> list[str]:
    name, config, split = ([*spec.split(":"), None, None])[:3]
    try:
        import datasets
    except ImportError as e:
        raise TextSourceError(f"hf:{spec} needs the `datasets` library: run `pip install datasets`") from e
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # offline, unknown name, ...: one line for the user
        raise TextSourceError(
            f"cannot load dataset hf:{spec}: {type(e).__name__}: {e}".splitlines()[0]
        ) from e
    if "text" not in ds.column_names:
        raise TextSourceError(f"dataset hf:{spec} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t]


def _documents(source: str | Path | None, split: Split) -> list[str]:
    if source is None:
        source = "wikipedia"
    if str(source) in EMBEDDED_SOURCES:
        return [a.text for a in embedded_articles(str(source), split)]
    return _read_user_source(source)


def calibration_text(source: str | Path | None = None) -> str:
    """The calibration text: the embedded calibration split by default, else the user's source."""
    return "\n\n".join(_documents(source, "calibration"))


def evaluation_text(source: str | Path | None = None) -> str:
    """The evaluation text: the embedded evaluation split by default (never overlaps calibration)."""
    text = "\n\n".join(_documents(source, "evaluation"))
    if not text.strip():
        raise TextSourceError(f"text source {source!r} is empty")
    return text


# Files a transformers tokenizer is read from; one of the first six must be there.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "config.json",
)


def _check_tokenizer_files(folder: Path) -> None:
    """The tokenizer files must be regular files inside the folder, and there must be some."""
    present = [n for n in _TOKENIZER_FILES if os.path.lexists(folder / n)]
    for name in present:
        check_inside(folder, name, "tokenizer file")
    if not set(present) & set(_TOKENIZER_FILES[:6]):
        raise TextSourceError(
            f"{folder}: no loadable tokenizer (none of {', '.join(_TOKENIZER_FILES[:3])}, ...); calibration text needs "
            "the exported folder's tokenizer files, or pass token ids"
        )


@functools.lru_cache(maxsize=8)
def load_tokenizer(tokenizer_dir: str | Path):  # -> transformers.PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    folder = Path(tokenizer_dir)
    if folder.is_dir():
        _check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # OSError, ValueError, and AttributeError/KeyError/... from half-present files
        fallback = _from_tokenizer_json(folder)
        if fallback is not None:
            return fallback
        # transformers' messages can run to pages (every known model type): keep the first 160 characters.
        why = " ".join(str(e).split()) or type(e).__name__
        why = why if len(why) <= 160 else why[:160] + "..."
        raise TextSourceError(
            f"{tokenizer_dir}: no loadable tokenizer ({why}); calibration text needs the exported folder's "
            "tokenizer files, or pass token ids, or use a data-free method (--method rtn)"
        ) from e


def _from_tokenizer_json(folder: Path):  # -> transformers.PreTrainedTokenizerFast | None
    """The fast tokenizer of ``folder/tokenizer.json`` alone, for folders whose ``tokenizer_config.json``
    names a class this transformers does not know (written by a newer one, or by onnxruntime-genai's
    builder). Special tokens the config would add are not: a warning says so."""
    path = folder / "tokenizer.json"
    if not (folder.is_dir() and path.is_file() and not path.is_symlink()):
        return None
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception:  # a broken tokenizer.json: the caller reports the first error
        return None
    warnings.warn(
        f"{folder}: tokenizer_config.json could not be loaded; calibrating with tokenizer.json alone "
        "(special tokens the config adds, such as BOS, are not added)",
        stacklevel=3,
    )
    return tokenizer


def token_stream(tokenizer, documents: Sequence[str]) -> np.ndarray:
    """All documents tokenized (no special tokens) and joined by the tokens of a blank line, int64."""
    if not documents:
        return np.zeros(0, np.int64)
    # Per document, so no single call sees a text longer than the tokenizer's nominal max length.
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i, doc in enumerate(encoded):
        if i:
            ids.extend(sep)
        ids.extend(doc)
    return np.asarray(ids, dtype=np.int64)


def special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer itself puts before any text (e.g. Llama-2's BOS; none for SmolLM2)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [int(i) for i in ids]


def calibration_token_ids(
    tokenizer_dir: str | Path,
    source: str | Path | None = None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> np.ndarray:
    """``n_samples`` calibration sequences ``int64[n_samples, seq_len]``: random windows of the token stream.

    Windows start at uniformly drawn offsets (``np.random.default_rng(seed)``), as in GPTQ's calibration;
    each begins with the tokenizer's own prefix tokens (BOS) when it adds any.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"n_samples={n_samples}, seq_len={seq_len}: need n_samples >= 1, seq_len >= 2")
    tokenizer = load_tokenizer(tokenizer_dir)
    docs = _documents(source, "calibration")
    stream = token_stream(tokenizer, docs)
    prefix = special_prefix(tokenizer)
    body = seq_len - len(prefix)
    if stream.size == 0:
        raise CalibrationError(f"calibration text {source or 'wikipedia'!r} is empty")
    if stream.size < body:
        raise CalibrationError(
            f"calibration text {source or 'wikipedia'!r} has {stream.size} tokens, shorter than one "
            f"sequence of {seq_len}: give more text or a smaller seq_len"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, stream.size - body + 1, size=n_samples)
    out = np.empty((n_samples, seq_len), np.int64)
    out[:, : len(prefix)] = prefix
    for row, start in enumerate(starts):
        out[row, len(prefix) :] = stream[start : start + body]
    return out
