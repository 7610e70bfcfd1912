"""onnxruntime sessions of extracted parts: provider choice, serialization, and giving memory back."""

from __future__ import annotations

import ctypes
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

__all__ = ["open_session", "release_memory", "resolve_providers", "weight_bytes"]

logger = logging.getLogger(__name__)

# Above this, a part is handed to onnxruntime through a temporary file with external data (protobuf's
# 2 GiB message limit).
_INLINE_LIMIT = 1 << 30


def resolve_providers(providers: Sequence[str]) -> list[str]:
    """Keep the requested execution providers onnxruntime has; fall back to CPU with a warning."""
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available]
    missing = [p for p in providers if p not in available]
    if missing:
        logger.warning(
            "onnxruntime lacks %s (available: %s); calibrating with %s",
            ", ".join(missing),
            ", ".join(sorted(available)),
            ", ".join(chosen or ["CPUExecutionProvider"]),
        )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (musl and others lack it)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def release_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps a dropped session's arena otherwise: +0.5 GB per
    block on SmolLM2 with 8x512-token batches, accumulating over the first blocks)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _external_data_folder(model: ir.Model) -> Path | None:
    """The folder of the data file the part's external initializers point into (a model loaded from bytes
    would otherwise have them resolved against the working directory, and refused outside it)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            return Path(tensor.base_dir).resolve()
    return None


def open_session(
    model: ir.Model, providers: Sequence[str], weights: dict[str, np.ndarray] | None = None
) -> ort.InferenceSession:
    """A session of ``model`` (an extracted part), after writing ``weights`` into its initializers by name.

    The part is a clone sharing the caller's tensors, so replacing a value's tensor leaves the caller's
    model untouched. Not ``SessionOptions.add_initializer``: onnxruntime 1.31 constant-folds from the
    model's initializer, so a weight reached through a Transpose (tied lm_head, Gemm exports) would
    silently keep its float values.
    """
    inits = model.graph.initializers
    for name, arr in (weights or {}).items():
        inits[name].const_value = ir.tensor(arr, name=name)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if weight_bytes(model) < _INLINE_LIMIT:
        folder = _external_data_folder(model)
        if folder is not None:  # weights left in the input's data file: onnxruntime reads them from there
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=list(providers))
    # protobuf's 2 GiB limit: through a file whose own data file holds every weight (so no folder is set)
    with tempfile.TemporaryDirectory(prefix="adaround-calib-") as tmp:
        path = Path(tmp) / "part.onnx"
        ir.save(model, path, external_data="part.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=list(providers))
