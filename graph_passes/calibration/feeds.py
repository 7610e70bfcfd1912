"""Feeds for calibration batches, built from the model's own graph inputs.

A causal-LM export (Optimum ``text-generation[-with-past]``) takes some of ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.{i}.{key,value}``. Calibration runs full
sequences without padding and without a past, so: the mask is all ones, positions are ``arange(T)``, and
each past tensor is empty along its sequence axis (``[batch, kv_heads, 0, head_dim]``; the fixed dims come
from the input's declared shape, so no config.json is needed). Anything else is refused.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from ..errors import CalibrationError

__all__ = ["FeedSpec", "InputKind", "check_token_ids", "feed_specs", "make_feeds"]

_PAST = re.compile(r"^past_key_values\.\d+\.(key|value)$|^past_key_values\.\d+$|^past_\d+_(key|value)$")


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
            0 if i == self.past_seq_axis else (b if d is None else d) for i, d in enumerate(self.past_shape)
        ]
        return np.zeros(dims, dtype=self.dtype)


def _np_dtype(value: ir.Value) -> np.dtype:
    if value.dtype is None:
        raise CalibrationError(f"graph input {value.name!r} has no element type")
    return value.dtype.numpy()


def _past_spec(value: ir.Value) -> FeedSpec:
    shape = value.shape
    if shape is None:
        raise CalibrationError(f"past input {value.name!r} has no declared shape; cannot build an empty past")
    dims: list[int | None] = [d if isinstance(d, int) else None for d in shape]
    symbolic = [i for i, d in enumerate(dims) if d is None]
    # Layout [batch, kv_heads, past_len, head_dim]: batch and past_len are the symbolic dims; the past
    # length is the last symbolic one (GPT-2-style fused [2, b, h, past, d] also fits this rule).
    if len(symbolic) < 2:
        raise CalibrationError(
            f"past input {value.name!r} has shape {shape}: expected symbolic batch and past-length dims"
        )
    extra = [i for i in symbolic[1:-1]]
    if extra:
        raise CalibrationError(
            f"past input {value.name!r} has shape {shape}: dims {extra} are symbolic besides batch and "
            "past length, so the empty past cannot be built without a config"
        )
    return FeedSpec(value.name or "", InputKind.PAST, _np_dtype(value), tuple(dims), symbolic[-1])


def feed_specs(inputs: Sequence[ir.Value]) -> list[FeedSpec]:
    """Classify every graph input; CalibrationError for inputs calibration cannot fill."""
    specs: list[FeedSpec] = []
    for v in inputs:
        name = v.name or ""
        if name in _NAMED:
            specs.append(FeedSpec(name, _NAMED[name], _np_dtype(v)))
        elif _PAST.match(name):
            specs.append(_past_spec(v))
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
