"""Feeds for calibration batches, built from the model's own graph inputs.

A causal-LM export (Optimum ``text-generation[-with-past]``, onnxruntime-genai's model builder) takes some
of ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.{key,value}``. Calibration
runs full sequences without padding and without a past, so: the mask is all ones, positions are
``arange(T)``, and each past tensor is empty along its sequence axis (``[batch, kv_heads, 0, head_dim]``).
The fixed dims come from the input's declared shape; where the graph leaves the head size or KV-head count
symbolic (the builder's ``kv_cache_dim``), from ``genai_config.json`` or ``config.json`` in the model's
folder. A windowed cache (``GroupQueryAttention`` with ``sliding_window_cache``) must hold at least the
window, so its past has that capacity, all zeros: the attention mask says no position of it is filled
(the op reads the past length from the mask, not from the buffer). Anything else is refused.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import CalibrationError

__all__ = ["FeedSpec", "InputKind", "check_token_ids", "feed_specs", "make_feeds", "window_capacities"]

_PAST = re.compile(r"^past_key_values\.\d+\.(key|value)$|^past_key_values\.\d+$|^past_\d+_(key|value)$")
# A symbolic dim of a past input named like this is its sequence axis (the builder's past_sliding_length).
_PAST_LENGTH_NAME = re.compile(r"past|seq|length", re.IGNORECASE)


class InputKind(str, enum.Enum):
    """A graph input calibration fills, by its role."""

    IDS = "input_ids"
    MASK = "attention_mask"
    POSITIONS = "position_ids"
    PAST = "past"
    """``past_key_values.*``: empty along the past-length axis."""


_NAMED = {k.value: k for k in (InputKind.IDS, InputKind.MASK, InputKind.POSITIONS)}


@dataclasses.dataclass(frozen=True)
class FeedSpec:
    """How to fill one graph input for a batch of ``[b, T]`` token ids."""

    name: str
    kind: InputKind
    dtype: np.dtype
    past_shape: tuple[int | None, ...] = ()
    """For past inputs: the declared dims, None where symbolic (batch -> b, past length -> 0)."""
    past_seq_axis: int = -1
    past_capacity: int = 0
    """For past inputs: the buffer length along ``past_seq_axis`` (the attention window for windowed caches)."""

    def fill(self, ids: np.ndarray) -> np.ndarray:
        """This input for a ``[b, T]`` batch of token ids (no padding, zero-length past)."""
        b, t = ids.shape
        if self.kind is InputKind.IDS:
            return ids.astype(self.dtype, copy=False)
        if self.kind is InputKind.MASK:
            return np.ones((b, t), dtype=self.dtype)
        if self.kind is InputKind.POSITIONS:
            return np.broadcast_to(np.arange(t, dtype=self.dtype), (b, t)).copy()
        dims = [
            self.past_capacity if i == self.past_seq_axis else (b if d is None else d)
            for i, d in enumerate(self.past_shape)
        ]
        # the zeros of a windowed cache are never read: the all-ones mask of length T says the past is empty
        return np.zeros(dims, dtype=self.dtype)


def _np_dtype(value: ir.Value) -> np.dtype:
    if value.dtype is None:
        raise CalibrationError(f"graph input {value.name!r} has no element type")
    return value.dtype.numpy()


class _FolderDims:
    """Cache dims the graph leaves symbolic, read on first use from the model folder's config files."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._dims: dict[str, int] | None = None

    def get(self, key: str) -> int | None:
        if self._dims is None:
            self._dims = _config_dims(self.folder) if self.folder is not None else {}
        return self._dims.get(key)


def _config_dims(folder: Path) -> dict[str, int]:
    """``head_size`` and ``kv_heads`` from ``genai_config.json`` (model.decoder) or ``config.json``."""
    dims: dict[str, int] = {}
    genai = _read_json(folder / "genai_config.json").get("model", {})
    decoder = genai.get("decoder", {}) if isinstance(genai, dict) else {}
    hf = _read_json(folder / "config.json")
    hf = {**hf, **hf.get("text_config", {})} if isinstance(hf.get("text_config"), dict) else hf
    heads, hidden = hf.get("num_attention_heads"), hf.get("hidden_size")
    derived = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
    candidates = {
        "head_size": (decoder.get("head_size"), hf.get("head_dim"), derived),
        "kv_heads": (decoder.get("num_key_value_heads"), hf.get("num_key_value_heads"), heads),
    }
    for key, values in candidates.items():
        found = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
        if found:
            dims[key] = found[0]
    return dims


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CalibrationError(f"{path}: cannot be read as JSON ({e}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _past_axes(value: ir.Value, dims: list[int | None]) -> tuple[int, int]:
    """(batch axis, past-length axis) of a past input: the first symbolic dim, and the symbolic dim named
    like a length (else the last symbolic one: ``[b, h, past, d]`` and GPT-2's fused ``[2, b, h, past, d]``)."""
    symbolic = [i for i, d in enumerate(dims) if d is None]
    if len(symbolic) < 2:
        raise CalibrationError(
            f"past input {value.name!r} has shape {value.shape}: expected symbolic batch and past-length dims"
        )
    named = [i for i in symbolic[1:] if _PAST_LENGTH_NAME.search(str(value.shape[i]))]  # type: ignore[index]
    return symbolic[0], (named[0] if len(named) == 1 else symbolic[-1])


def _past_spec(value: ir.Value, folder: _FolderDims, capacity: int) -> FeedSpec:
    shape = value.shape
    if shape is None:
        raise CalibrationError(f"past input {value.name!r} has no declared shape; cannot build an empty past")
    dims: list[int | None] = [d if isinstance(d, int) else None for d in shape]
    batch, seq = _past_axes(value, dims)
    for i in [i for i, d in enumerate(dims) if d is None and i not in (batch, seq)]:
        # [batch, kv_heads, past, head_size]: the builder leaves head_size symbolic (kv_cache_dim)
        key = "head_size" if i == len(dims) - 1 else "kv_heads" if i == seq - 1 else None
        dims[i] = folder.get(key) if key is not None else None
        if dims[i] is None:
            what = {"head_size": "the head size", "kv_heads": "the number of KV heads"}.get(key or "", "")
            raise CalibrationError(
                f"past input {value.name!r} has shape {shape}: dim {i} ({shape[i]}{', ' + what if what else ''}) "
                "is symbolic; put the model's genai_config.json (model.decoder.head_size, num_key_value_heads) "
                "or config.json (head_dim, num_key_value_heads) in its folder"
            )
    return FeedSpec(value.name or "", InputKind.PAST, _np_dtype(value), tuple(dims), seq, capacity)


def window_capacities(graph: ir.Graph) -> dict[str, int]:
    """Past inputs read by a ``GroupQueryAttention`` with a windowed cache, and the window: onnxruntime
    refuses a cache buffer shorter than it."""
    out: dict[str, int] = {}
    for node in graph.all_nodes():
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        window = node.attributes.get_int("local_window_size", -1)
        if window <= 0 or not node.attributes.get_int("sliding_window_cache", 0):
            continue
        for past in node.inputs[3:5]:  # past_key, past_value
            if past is not None and past.is_graph_input() and past.name:
                out[past.name] = max(out.get(past.name, 0), window)
    return out


def feed_specs(
    inputs: Sequence[ir.Value],
    *,
    folder: Path | None = None,
    capacities: Mapping[str, int] | None = None,
) -> list[FeedSpec]:
    """Classify every graph input; CalibrationError for inputs calibration cannot fill.

    ``folder``: the model's folder, whose config files give cache dims the graph leaves symbolic.
    ``capacities``: past-buffer lengths by input name (:func:`window_capacities`); others are empty.
    """
    dims, capacities = _FolderDims(folder), capacities or {}
    specs: list[FeedSpec] = []
    for v in inputs:
        name = v.name or ""
        if name in _NAMED:
            specs.append(FeedSpec(name, _NAMED[name], _np_dtype(v)))
        elif _PAST.match(name):
            specs.append(_past_spec(v, dims, capacities.get(name, 0)))
        else:
            raise CalibrationError(
                f"model input {name!r} is not one calibration can fill (supported: input_ids, attention_mask, "
                "position_ids, past_key_values.*)"
            )
    if not any(s.kind == InputKind.IDS for s in specs):
        raise CalibrationError("the model has no 'input_ids' input: calibration feeds token ids")
    return specs


def make_feeds(specs: Sequence[FeedSpec], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a ``[b, T]`` batch of token ids (no padding, zero-length past)."""
    return {s.name: s.fill(ids) for s in specs}


def check_token_ids(token_ids: np.ndarray) -> np.ndarray:
    """Validate calibration tokens: a non-empty int ``[n, T]`` array with ``T >= 2``."""
    arr = np.asarray(token_ids)
    if arr.ndim != 2:
        raise CalibrationError(f"token_ids must be a 2-D [n_sequences, seq_len] array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.size == 0:
        raise CalibrationError("token_ids is empty: give at least one calibration sequence")
    if arr.shape[1] < 2:
        raise CalibrationError(
            f"calibration sequences are too short (seq_len={arr.shape[1]}); need >= 2 tokens"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise CalibrationError(f"token_ids must be integers, got dtype {arr.dtype}")
    if int(arr.min()) < 0:
        raise CalibrationError("token_ids has negative ids")
    return arr.astype(np.int64, copy=False)
