"""onnxruntime sessions of extracted parts: provider choice, serialization, and giving memory back."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

__all__ = ["open_session", "resolve_providers", "weight_bytes"]

logger = logging.getLogger(__name__)

# Above this many bytes of in-memory weights, a part is handed to onnxruntime through a temporary file
# with external data, which onnxruntime maps instead of copying: an in-memory model is serialized (a
# copy), then parsed (another), then copied into the session (protobuf's 2 GiB limit aside).
_INLINE_LIMIT = 64 << 20


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


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _in_memory_bytes(model: ir.Model) -> int:
    """Bytes of the initializers held in memory (not read from a data file)."""
    return sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )


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
    # Weights stay in the mapped data file rather than being copied into packed buffers: a part's weights
    # (0.87 GB per Llama-3-8B block, 2.1 GB for its output projection) then add no anonymous memory, for
    # about 5% more time per run (Llama-3-8B shapes, one block and the output projection, 2 x 512 tokens:
    # 4.07 -> 4.27 s on a 2-core AMD EPYC).
    opts.add_session_config_entry("session.disable_prepacking", "1")
    if _in_memory_bytes(model) < _INLINE_LIMIT:
        folder = _external_data_folder(model)
        if folder is not None:  # weights left in the input's data file: onnxruntime reads them from there
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=list(providers))
    # through a file whose own data file holds every weight (so no folder is set), mapped by onnxruntime
    with tempfile.TemporaryDirectory(prefix="adaround-calib-") as tmp:
        path = Path(tmp) / "part.onnx"
        ir.save(model, path, external_data="part.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=list(providers))
