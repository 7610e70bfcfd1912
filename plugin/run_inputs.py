"""What a run reads besides its config: the calibration token ids (given or sampled from text, with their
hash), and the inputs of a budgeted allocation (candidate schemes, a kept sensitivity profile). Shared by
``api`` (quantize) and ``prediction`` (predict)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from .graph_passes.config import QuantConfig
from .graph_passes.errors import CalibrationError, InternalError
from .graph_passes.model_io import LoadedModel

__all__ = ["calibration_ids", "candidate_schemes", "given_sensitivity", "hashed_ids", "pop_token_ids"]


def pop_token_ids(overrides: dict[str, Any]) -> np.ndarray | None:
    """``calib_data`` given as a token-id array: taken out of ``overrides`` (it is data, not an option)."""
    return overrides.pop("calib_data") if isinstance(overrides.get("calib_data"), np.ndarray) else None


def given_sensitivity(config: QuantConfig, model: Any, sites: list[Any]) -> Any:
    """The sensitivities of ``config.allocation.sensitivity`` (None: probe)."""
    path = config.allocation.sensitivity
    if path is None:
        return None
    from .graph_passes.predict.probe import load_sensitivity

    return load_sensitivity(path, model, sites)


def allocation_budget(
    config: QuantConfig, model: Any, source: Path | None, sites: list[Any]
) -> tuple[int, str]:
    """The bytes an allocation may give ``sites`` of ``model`` (read from the ``.onnx`` file ``source``) and
    how the user asked for them: ``target_bits``, else ``max_size`` (``config.allocation.allocates``)."""
    from .graph_passes.predict.plan import AllocationError, budget_for_bits
    from .graph_passes.predict.size import MB, rest_bytes

    alloc = config.allocation
    if alloc.target_bits is not None:
        return budget_for_bits(alloc.target_bits, sites), f"target_bits={alloc.target_bits:g}"
    if alloc.max_size is None:
        raise InternalError("allocation_budget called for a run with one scheme")
    bits = config.selection.embeddings
    rest = rest_bytes(model, sites, source, None if bits == "none" else int(bits), config.scheme)
    asked = f"max_size={alloc.max_size:g} MB ({rest / MB:.2f} MB of it outside the layers quantized)"
    budget = int(alloc.max_size * MB) - rest
    if budget <= 0:
        raise AllocationError(f"{asked}: nothing is left for the quantized layers; raise max_size")
    return budget, asked


def candidate_schemes(config: QuantConfig, sites: list[Any]) -> dict[str, Any]:
    """The allocation's candidate labels -> schemes (the run's format choice per scheme; None = float)."""
    from .graph_passes.pipeline import choose_format

    shapes = [(s.k, s.n) for s in sites]
    out: dict[str, Any] = {}
    for label in config.allocation.candidates:  # keyed by the full label (w4-g128-sym), as sites record it
        if label == "float":
            out[label] = None
        else:
            scheme = choose_format(config.with_overrides(scheme=label).scheme, shapes)
            out[scheme.label] = scheme
    return out


def calibration_ids(
    config: QuantConfig, loaded: LoadedModel, given: np.ndarray | None, force: bool = False
) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """Calibration token ids for methods that need statistics (or when ``force``d: the allocation's probes):
    the caller's array, or sampled from text."""
    if not (config.needs_calibration or force):
        return None, None
    cal = config.calibration
    info: dict[str, Any] = {"sink_weight": cal.sink_weight}
    if given is not None:
        ids = np.asarray(given)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
            raise CalibrationError(
                f"calib_data array must be integer token ids [n, seq_len], got {ids.dtype}{list(ids.shape)}"
            )
        info.update(source="token ids given by the caller", n_samples=ids.shape[0], seq_len=ids.shape[1])
        return hashed_ids(ids, info)
    tokenizer_dir = loaded.directory
    if tokenizer_dir is None:
        raise CalibrationError(
            "an in-memory model has no tokenizer folder: pass calib_data as an int64 token-id array [n, seq_len]"
        )
    from .data.text import calibration_token_ids  # lazy: pulls in transformers' tokenizers

    n = config.calib_samples
    ids = calibration_token_ids(tokenizer_dir, cal.calib_data, n, cal.seq_len, seed=cal.seed)
    info.update(source=cal.calib_data or "default", n_samples=n, seq_len=cal.seq_len, seed=cal.seed)
    return hashed_ids(ids, info)


def hashed_ids(ids: np.ndarray, info: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """int64 token ids, with their sha256 recorded (the same calibration tokens can be checked later)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    info["tokens_sha256"] = hashlib.sha256(ids.tobytes()).hexdigest()
    return ids, info
