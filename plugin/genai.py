"""``genai_config.json`` in the output folder, so that ``onnxruntime_genai.Model(out)`` opens it as is.

onnxruntime-genai opens a folder only through its ``genai_config.json`` (model type, decoder file, input and
output names, head geometry, special tokens, search defaults). Two cases:

- the input was written by onnxruntime-genai's model builder and has one: it is copied, with the decoder's
  file name set to the output's;
- the input is an Optimum export (``config.json``, decoder with past): one is written from ``config.json``,
  ``generation_config.json`` and the graph's inputs and outputs. Optimum's names (``past_key_values.%d.key``,
  ``present.%d.key``) are the ones genai uses by default; the cache grows each step
  (``past_present_share_buffer`` false), as the export's attention expects.

When the output uses our ops (format lowbit), the op library is copied into the folder and named in
``decoder.session_options.custom_ops_library``: onnxruntime-genai 0.18 loads it only from inside the model
folder or the working directory (and refuses ``..``), so the folder stays self-contained.

Anything else (no ``config.json``, an encoder, a merged decoder with ``use_cache_branch``, a model type
genai does not run) gets no config and a logged note: the quantized model itself is unaffected.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from .custom_ops import uses_custom_domain
from .graph_passes.errors import InvalidModelError, UserError

__all__ = [
    "GENAI_CONFIG",
    "GENAI_MODEL_TYPES",
    "genai_config_from_export",
    "genai_logits",
    "write_genai_config",
]

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"

# Decoder-only model types onnxruntime-genai 0.18 runs whose Optimum exports use the plain decoder layout.
GENAI_MODEL_TYPES = frozenset(
    {"gemma", "gemma2", "gemma3_text", "gpt2", "granite", "llama", "mistral", "olmo", "phi", "phi3",
     "qwen2", "qwen3", "smollm3"}
)  # fmt: skip

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)")
_PLAIN_INPUTS = ("input_ids", "attention_mask", "position_ids")
_CACHE = "past_key_values.0.key"  # [batch, kv_heads, past_len, head_size]


def write_genai_config(src_folder: Path, dst_folder: Path, model: ir.Model, model_file: str) -> list[str]:
    """Write ``dst_folder/genai_config.json`` for the quantized ``model`` saved as ``model_file``: the
    input's own, updated, or one built for an Optimum export. Returns the names of the files written (the
    config, and our op library when the model uses our ops)."""
    src = Path(src_folder) / GENAI_CONFIG
    if src.is_file():
        config = json.loads(src.read_text(encoding="utf-8"))
        config["model"]["decoder"]["filename"] = model_file
    else:
        built = genai_config_from_export(Path(src_folder), model, model_file)
        if isinstance(built, str):
            logger.info("no %s written: %s", GENAI_CONFIG, built)
            return []
        config = built
    written = [GENAI_CONFIG]
    if uses_custom_domain(model):
        written += _add_op_library(config, Path(dst_folder))
    (Path(dst_folder) / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return written


def _add_op_library(config: dict[str, Any], folder: Path) -> list[str]:
    """Copy our op library beside the model and name it in the decoder's session options: genai 0.18 loads
    ``custom_ops_library`` only from inside the model folder or the working directory, relative names
    from the model folder."""
    from . import custom_ops

    try:
        library = custom_ops.library_path()
    except FileNotFoundError as e:
        logger.warning(
            "%s names no op library, onnxruntime-genai will not open the model: %s", GENAI_CONFIG, e
        )
        return []
    shutil.copy2(library, folder / library.name)
    config["model"]["decoder"].setdefault("session_options", {})["custom_ops_library"] = library.name
    return [library.name]


def genai_config_from_export(folder: Path, model: ir.Model, model_file: str) -> dict[str, Any] | str:
    """genai's config for an Optimum export in ``folder`` whose decoder graph is ``model``; a string says
    why there is none."""
    if not (folder / "config.json").is_file():
        return f"{folder} has no config.json"
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    hf = {**hf, **hf.get("text_config", {})}
    model_type = hf.get("model_type")
    if model_type not in GENAI_MODEL_TYPES:
        return f"model type {model_type!r} is not one onnxruntime-genai runs from an Optimum export"
    io = _decoder_io(model)
    if isinstance(io, str):
        return io
    inputs, outputs, n_layers = io
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": model_file,
        **_geometry(hf, model, n_layers),
        "inputs": inputs,
        "outputs": outputs,
    }
    context = int(_first(hf, "max_position_embeddings", "n_positions", "seq_length", default=2048))
    vocab, tokens = _vocab_size(hf, model), _special_tokens(folder, hf)
    ids = {i for v in tokens.values() for i in (v if isinstance(v, list) else [v])}
    outside = sorted(i for i in ids if not 0 <= i < vocab)
    if outside:  # genai refuses the folder ("eos_token_id ... must be in range")
        return f"special token ids {outside} lie outside the vocabulary of {vocab}"
    return {
        "model": {
            **tokens,
            "context_length": context,
            "decoder": decoder,
            "type": model_type,
            "vocab_size": vocab,
        },
        "search": {
            "do_sample": False,
            "max_length": context,
            "num_beams": 1,
            "past_present_share_buffer": False,
        },
    }


def _decoder_io(model: ir.Model) -> tuple[dict[str, str], dict[str, str], int] | str:
    """genai's input/output name maps and the layer count, or why the graph is not a decoder with past."""
    names_in = [v.name for v in model.graph.inputs]
    names_out = [v.name for v in model.graph.outputs]
    past = [m for m in map(_PAST.fullmatch, names_in) if m]
    present = [m for m in map(_PRESENT.fullmatch, names_out) if m]
    unknown = [n for n in names_in if n not in _PLAIN_INPUTS and not _PAST.fullmatch(n)]
    if "input_ids" not in names_in or "logits" not in names_out or not past:
        return "the graph is not a decoder with past (input_ids, past_key_values.N.key/value -> logits)"
    if unknown:
        return f"the graph has inputs onnxruntime-genai does not feed: {', '.join(unknown)}"
    n_layers = len(past) // 2
    layers = {(int(m[1]), m[2]) for m in past}
    expected = {(i, kind) for i in range(n_layers) for kind in ("key", "value")}
    if layers != expected or {(int(m[1]), m[2]) for m in present} != expected:
        return "the past_key_values inputs and present outputs do not pair up layer by layer"
    inputs = {n: n for n in _PLAIN_INPUTS if n in names_in}
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    return inputs, outputs, n_layers


def _first(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    return next((hf[k] for k in keys if hf.get(k) is not None), default)


def _static_dim(model: ir.Model, name: str, axis: int) -> int | None:
    value = next(v for v in model.graph.inputs if v.name == name)
    dim = value.shape[axis] if value.shape is not None and len(value.shape) > axis else None
    return dim if isinstance(dim, int) else None


def _geometry(hf: dict[str, Any], model: ir.Model, n_layers: int) -> dict[str, int]:
    """Head geometry: the cache input's static dims where the graph has them, else config.json's."""
    hidden = int(_first(hf, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(hf, "num_attention_heads", "n_head"))
    kv_heads = _static_dim(model, _CACHE, 1) or int(_first(hf, "num_key_value_heads", default=heads))
    head_size = _static_dim(model, _CACHE, 3) or int(_first(hf, "head_dim", default=hidden // heads))
    return {
        "head_size": head_size,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": kv_heads,
    }


def _vocab_size(hf: dict[str, Any], model: ir.Model) -> int:
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    last = logits.shape[-1] if logits.shape is not None and len(logits.shape) else None
    return last if isinstance(last, int) else int(hf["vocab_size"])


def _special_tokens(folder: Path, hf: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids: generation_config.json over config.json (as the builder does); pad falls back to eos."""
    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else {}
    ids = {k: _first(gen, k, default=hf.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    eos = ids["eos_token_id"]
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return {k: v for k, v in ids.items() if v is not None}


def genai_logits(folder: Path) -> Callable[[np.ndarray], np.ndarray]:
    """``logits_of(ids[B, T]) -> logits[B, T, vocab]`` computed by onnxruntime-genai on the folder's
    ``genai_config.json`` (its providers and session options): one generator per window, the prompt's full
    logits read from the decoder's output."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UserError(
            "onnxruntime-genai is not installed: pip install 'optimum-adaround[genai]' (or use the onnxruntime "
            "runtime)"
        ) from None
    if not (Path(folder) / GENAI_CONFIG).is_file():
        raise InvalidModelError(
            f"{folder} has no {GENAI_CONFIG}: onnxruntime-genai cannot open it (quantize the exported folder, "
            "not the .onnx file, to get one)"
        )
    model = og.Model(str(folder))

    def logits_of(ids: np.ndarray) -> np.ndarray:
        rows = []
        for row in np.asarray(ids, dtype=np.int32):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=int(row.size), do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(row[None])
            rows.append(np.asarray(gen.get_output("logits"))[0])
        return np.stack(rows)

    return logits_of
