"""The Python API: ``quantize`` (an ONNX model in, a quantized ONNX model out).

Flow: parse options -> load with onnx-ir (weights memory-mapped) -> find weight sites -> (calibration
tokens for methods that need statistics) -> quantize site by site -> rewrite -> streamed save into an
atomic output folder with the exported folder's config/tokenizer files and ``quantization_config.json``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .defaults import DEFAULT_SEQ_LEN, DEFAULT_SINK_WEIGHT, default_calib_samples
from .graph_passes.errors import CalibrationError, UnsupportedSchemeError
from .graph_passes.model_io import LoadedModel, initializer_bytes, load_model, save_model, to_source_kind
from .graph_passes.pipeline import QuantizationResult, prepare_sites, quantize_model
from .graph_passes.rounding.base import METHODS, get_method
from .graph_passes.scheme import QuantScheme, WeightFormat
from .output import atomic_output, check_output_path, copy_side_files, write_quantization_config

__all__ = ["quantize", "resolve_scheme"]

_PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}


def resolve_scheme(
    scheme: str | QuantScheme | Mapping[str, Any], format: str | WeightFormat | None = None
) -> QuantScheme:
    """A QuantScheme from a label (``w4-g128``), a record, or its dict form; ``format`` overrides."""
    if isinstance(scheme, QuantScheme):
        resolved = scheme
    elif isinstance(scheme, str):
        resolved = QuantScheme.parse(scheme)
    elif isinstance(scheme, Mapping):
        resolved = QuantScheme.from_dict(dict(scheme)) if "type" in scheme else QuantScheme(**dict(scheme))
    else:
        raise UnsupportedSchemeError(
            f"scheme={scheme!r}: give a label like 'w4-g128', a QuantScheme or a dict"
        )
    if format is not None:
        try:
            fmt = WeightFormat(format)
        except ValueError:
            raise UnsupportedSchemeError(
                f"format={format!r}: choose one of {[f.value for f in WeightFormat]}"
            ) from None
        resolved = dataclasses.replace(resolved, format=fmt)
    return resolved


def _default_output(loaded: LoadedModel, scheme: QuantScheme, method: str) -> Path:
    src = loaded.folder if loaded.folder is not None else loaded.path
    assert src is not None
    base = src if loaded.folder is not None else src.parent / src.stem
    return base.parent / f"{base.name}-{scheme.label}-{method}"


def _method_options(
    method: str, options: Mapping[str, Any] | None, seed: int, device: str = "cpu"
) -> dict[str, Any]:
    """The user's options, plus ``seed`` when the method takes one and it was not given, and ``device``
    (``cuda`` when the run asks for it and torch sees a GPU) for methods that round on a torch device."""
    out = dict(options or {})
    cls = METHODS.get(method)
    try:
        params = inspect.signature(cls).parameters if cls is not None else {}
    except (TypeError, ValueError):  # builtins / odd callables: no signature to read
        params = {}
    if "seed" in params and "seed" not in out:
        out["seed"] = seed
    if "device" in params and "device" not in out and device == "cuda" and torch.cuda.is_available():
        out["device"] = "cuda"
    return out


def _token_ids(
    calib_data: Any, loaded: LoadedModel, n_samples: int, seq_len: int, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration token ids from an array, or from text (a source name/path, None = embedded default)."""
    if isinstance(calib_data, np.ndarray):
        ids = np.asarray(calib_data)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
            raise CalibrationError(
                f"calib_data array must be integer token ids [n, seq_len], got {ids.dtype}{list(ids.shape)}"
            )
        return ids.astype(np.int64), {
            "source": "token ids given by the caller",
            "n_samples": ids.shape[0],
            "seq_len": ids.shape[1],
        }
    tokenizer_dir = loaded.folder or (loaded.path.parent if loaded.path is not None else None)
    if tokenizer_dir is None:
        raise CalibrationError(
            "an in-memory model has no tokenizer folder: pass calib_data as an int64 token-id array [n, seq_len]"
        )
    from .data.text import calibration_token_ids  # lazy: pulls in transformers' tokenizers

    ids = calibration_token_ids(tokenizer_dir, calib_data, n_samples, seq_len, seed=seed)
    info = {
        "source": str(calib_data) if calib_data is not None else "default",
        "n_samples": n_samples,
        "seq_len": seq_len,
        "seed": seed,
    }
    return ids, info


def quantize(
    model: Any,
    output: str | os.PathLike | None = None,
    *,
    scheme: str | QuantScheme | Mapping[str, Any] = "w4-g128",
    method: str = "rtn",
    method_options: Mapping[str, Any] | None = None,
    format: str | WeightFormat | None = None,
    calib_data: Any = None,
    calib_samples: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    sequential: bool = True,
    sink_weight: float = DEFAULT_SINK_WEIGHT,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    quantize_lm_head: bool = False,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> Any:
    """Quantize the weights of an ONNX model with calibrated (or round-to-nearest) rounding.

    ``model``: a ``.onnx`` path, an exported folder (config/tokenizer files are copied to the output), an
    ``onnx.ModelProto`` or an ``onnx_graphsurgeon.Graph``. ``output``: the folder to write
    (``model.onnx`` [+ ``model.onnx_data``], ``quantization_config.json``); for path inputs it defaults to
    a sibling named after the scheme and method. The folder appears atomically and the input is never
    modified. ``calib_data``: text source for methods that need statistics (None = the embedded default
    text; a path; or an int64 token-id array ``[n, seq_len]``). ``calib_samples``: calibration sequences
    (None = the method's default: 32, or 128 for ``adaround`` and ``adaround_ls``). ``sink_weight``: how many times each
    calibration sequence's first position counts in the statistics of the attention q/k/v projections
    (1 = plain ``X^T X``; no effect on data-free methods). ``workers``: processes that round a decoder
    block's sites side by side (same output bytes; None = one per CPU, at most 4, for models of 16M+
    weights; 1 = none). ``device``: ``cuda`` calibrates through onnxruntime's CUDA provider and, where
    torch sees a GPU, runs AdaRound's refinement (``adaround``, ``adaround_ls``) there too.

    Returns the output folder (``Path``) for path inputs, else the quantized model in the input's kind
    (ModelProto or gs.Graph).
    """
    t0 = time.perf_counter()
    qscheme = resolve_scheme(scheme, format)
    if device not in _PROVIDERS:
        raise UnsupportedSchemeError(f"device={device!r}: choose one of {sorted(_PROVIDERS)}")
    options = _method_options(method, method_options, seed, device)
    rounding = get_method(method, **options)  # unknown method / bad options fail before any loading
    random.seed(seed)
    np.random.seed(seed)

    inputs = [model] if isinstance(model, (str, os.PathLike)) else []
    if output is not None:
        # Check the output before loading anything (cheap, and nothing is written on a bad path).
        check_output_path(output, inputs, overwrite)
    loaded = load_model(model)
    if output is None and loaded.kind == "path":
        output = _default_output(loaded, qscheme, method)
        check_output_path(output, inputs, overwrite)
    float_bytes = initializer_bytes(loaded.model)
    report = prepare_sites(loaded.model, include, exclude, quantize_lm_head)

    token_ids, calib_info = None, None
    if rounding.needs:
        if calib_samples is None:
            calib_samples = default_calib_samples(method)
        token_ids, calib_info = _token_ids(calib_data, loaded, calib_samples, seq_len, seed)
        calib_info["sink_weight"] = float(sink_weight)
    result = quantize_model(
        loaded.model,
        qscheme,
        method,
        options,
        sites=report,
        token_ids=token_ids,
        sequential=sequential,
        progress=progress,
        calibration_options={"providers": _PROVIDERS[device]},
        sink_weight=sink_weight if rounding.needs else 1.0,
        workers=workers,
    )
    with result:
        record = _config_record(
            result, loaded, calib_info, float_bytes, include, exclude, quantize_lm_head, seed
        )
        if output is not None:
            with atomic_output(output, inputs, overwrite) as tmp:
                name = loaded.path.name if loaded.path is not None else "model.onnx"
                # A model that came with external data keeps it: streamed, bounded-memory save.
                files = save_model(result.model, tmp / name, external_data=True if loaded.external else None)
                record["files"] = {f.name: f.stat().st_size for f in files}
                record["quantized_bytes"] = sum(record["files"].values())
                record["timings"]["total_with_save"] = time.perf_counter() - t0
                if loaded.folder is not None:
                    record["copied_files"] = copy_side_files(loaded.folder, tmp)
                write_quantization_config(tmp, record)
        if loaded.kind == "path":
            assert output is not None
            return Path(output)
        return to_source_kind(result.model, loaded.kind)


def _config_record(
    result: QuantizationResult,
    loaded: LoadedModel,
    calib_info: dict[str, Any] | None,
    float_bytes: int,
    include: Sequence[str],
    exclude: Sequence[str],
    quantize_lm_head: bool,
    seed: int,
) -> dict[str, Any]:
    """The body of ``quantization_config.json`` (versions and date are added when it is written)."""
    body = result.to_dict()
    return {
        "quant_method": "optimum-adaround",
        "scheme": body["scheme"],
        "format": result.scheme.format.value,
        "method": body["method"],
        "selection": {
            "include": list(include),
            "exclude": list(exclude),
            "quantize_lm_head": quantize_lm_head,
        },
        "calibration": calib_info,
        "calibration_report": body["calibration"],
        "seed": seed,
        "source": {"kind": loaded.kind, "path": str(loaded.path) if loaded.path else None},
        "float_bytes": float_bytes,
        "n_sites": len(result.sites),
        "sites": body["sites"],
        "skipped": body["skipped"],
        "timings": body["timings"],
    }
