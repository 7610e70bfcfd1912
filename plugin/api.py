"""The Python API: ``quantize`` (an ONNX model in, a quantized ONNX model out).

Flow: config (``QuantConfig`` + keyword overrides, all validated before anything is loaded) -> load with
onnx-ir (weights memory-mapped) -> find weight sites -> calibration token ids (methods that need
statistics) -> one pipeline pass (every site with its scheme: scheme overrides, the output projection's) -> streamed save into the one
atomic output writer (``output.write_output``) with the exported folder's side files, the config and
``quantization_config.json``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .graph_passes.config import ModuleOverride, QuantConfig
from .graph_passes.errors import InternalError, InvalidOptionError
from .graph_passes.model_io import LoadedModel, initializer_bytes, load_model, save_model, to_source_kind
from .graph_passes.pipeline import QuantizationResult, prepare_sites, quantize_model
from .output import check_output_path, write_output
from .recipes import ConfigLike, resolve_config
from .run_inputs import (
    allocation_budget,
    calibration_ids,
    candidate_schemes,
    given_sensitivity,
    pop_token_ids,
)

__all__ = ["QuantizationRun", "quantize", "run_config"]


def run_config(config: ConfigLike = None, **overrides: Any) -> QuantConfig:
    """The config of a run: ``config`` (a QuantConfig, preset name, recipe file or mapping; None = the
    defaults) with the keyword ``overrides`` applied (flat option names; see ``QuantConfig.with_overrides``)."""
    return resolve_config(config).with_overrides(**overrides)


def quantize(
    model: Any,
    output: str | os.PathLike | None = None,
    config: ConfigLike = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> Any:
    """Quantize the weights of an ONNX model with calibrated (or round-to-nearest) rounding.

    ``model``: a ``.onnx`` path, an exported folder (config/tokenizer files are copied to the output), an
    ``onnx.ModelProto`` or an ``onnx_graphsurgeon.Graph``. ``output``: the folder to write; for path
    inputs it defaults to a sibling named after the scheme and method. It appears atomically and the input
    is never modified. ``config``: a ``QuantConfig``, a preset name, a recipe file or its mapping (None =
    the defaults); ``overrides``: any option by its flat name (``scheme="w4-g128"``, ``method="gptq"``,
    ``method_options={...}``, ``bits``, ``calib_samples``, ``lm_head``, ``workers``...; the names and
    defaults are those of ``optimum-adaround quantize --help``). ``calib_data`` may also be an int64
    token-id array ``[n, seq_len]``.

    Returns the output folder (``Path``) for path inputs, else the quantized model in the input's kind.
    """
    token_ids = pop_token_ids(overrides)
    cfg = run_config(config, **overrides)
    inputs = [model] if isinstance(model, (str, os.PathLike)) else []
    if output is not None:
        check_output_path(output, inputs, overwrite)  # before loading anything: nothing written on a bad path
    loaded = load_model(model)
    if output is None and loaded.kind == "path":
        output = _default_output(loaded, cfg)
        check_output_path(output, inputs, overwrite)
    with QuantizationRun(loaded, cfg, token_ids, progress) as run:
        if output is not None:
            write_output(output, inputs, overwrite, run.write)
        if loaded.kind == "path" and output is not None:
            return Path(output)
        return to_source_kind(run.model, loaded.kind)


def _default_output(loaded: LoadedModel, config: QuantConfig) -> Path:
    """A sibling of the input folder (or file) named after the scheme and method."""
    if loaded.folder is not None:
        base = loaded.folder
    elif loaded.path is not None:
        base = loaded.path.parent / loaded.path.stem
    else:
        raise InternalError("a model loaded from a path has no path")
    return base.parent / f"{base.name}-{config.scheme.label}-{config.method.name}"


class QuantizationRun:
    """One run: quantizes ``loaded`` under ``config`` on entry (one pipeline pass, each site with its own
    scheme) and keeps the result's scratch folder until exit.
    ``write(folder)`` saves the model, side files, config and record into ``folder``."""

    def __init__(
        self, loaded: LoadedModel, config: QuantConfig, token_ids: np.ndarray | None, progress: bool
    ) -> None:
        self.loaded, self.config, self.progress = loaded, config, progress
        self.t0 = time.perf_counter()
        self.float_bytes = initializer_bytes(loaded.model)
        self.given_ids = token_ids
        self.token_ids: np.ndarray | None = None
        self.calib_info: dict[str, Any] | None = None
        self.result: QuantizationResult | None = None
        self.transforms: list[dict[str, Any]] = []
        self.allocation: dict[str, Any] | None = None
        self._stack = contextlib.ExitStack()

    @property
    def model(self) -> Any:
        return self.loaded.model

    def __enter__(self) -> QuantizationRun:
        try:
            self.transforms = self._transform()
            self.result = self._stack.enter_context(self._pass(self._allocate(self.config)))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _transform(self) -> list[dict[str, Any]]:
        """The float graph's equivalent transforms, checked on the first calibration sequences (computed
        here, before the sites are found, since the transforms replace the weights)."""
        names = self.config.transform.transform
        if not names:
            return []
        from .graph_passes.transforms import DATA_AWARE, apply_transforms, check_ids

        if self.config.needs_calibration:
            self.token_ids, self.calib_info = calibration_ids(self.config, self.loaded, self.given_ids)
        folder = self.loaded.directory
        ids = check_ids(self.model, self.token_ids)
        calibration = self.token_ids
        if calibration is None and DATA_AWARE & set(names):  # rtn: the text only chooses the transform
            calibration, _ = calibration_ids(self.config, self.loaded, self.given_ids, force=True)
        return apply_transforms(
            self.model, names, ids, seed=self.config.transform.rotation_seed, folder=folder,
            calibration=calibration, scheme=self.config.scheme, method=self.config.method,
        )  # fmt: skip

    def _allocate(self, config: QuantConfig) -> QuantConfig:
        """Under ``target_bits`` or ``max_size``: the config with each layer group's chosen scheme as an
        override (float groups excluded), from the predictor's sensitivities and error estimates
        (``predict/``)."""
        if not config.allocation.allocates:
            return config
        if config.selection.overrides:
            raise InvalidOptionError(
                f"{config.allocation.asked_name} chooses every layer's scheme: drop the scheme overrides, or "
                f"drop {config.allocation.asked_name}"
            )
        from .graph_passes.predict.plan import as_selection, plan_allocation

        sel = config.selection
        report = prepare_sites(self.model, sel.include, sel.exclude, sel.quantize_lm_head)
        budget, asked = allocation_budget(config, self.model, self.loaded.path, report.sites)
        if self.token_ids is None:
            self.token_ids, self.calib_info = calibration_ids(config, self.loaded, self.given_ids, force=True)
        planned = plan_allocation(
            self.model, report.sites, candidate_schemes(config, report.sites), config.method, self.token_ids,
            budget=budget, asked=asked, probe_samples=config.allocation.probe_samples,
            accuracy_level=config.output.accuracy_level, progress=self.progress, model_dir=self.loaded.directory,
            sensitivity=given_sensitivity(config, self.model, report.sites),
        )  # fmt: skip
        self.allocation = planned.to_dict()
        overrides, exclude = as_selection(planned.allocation)
        return config.with_overrides(
            overrides=tuple(ModuleOverride(p, label) for p, label in overrides),
            exclude=(*sel.exclude, *exclude),
        )

    def _pass(self, config: QuantConfig) -> QuantizationResult:
        sel = config.selection
        report = prepare_sites(self.model, sel.include, sel.exclude, sel.quantize_lm_head)
        if self.token_ids is None and config.needs_calibration:  # after the model's own checks passed
            self.token_ids, self.calib_info = calibration_ids(config, self.loaded, self.given_ids)
        return quantize_model(
            self.model, config, sites=report, token_ids=self.token_ids, progress=self.progress,
            model_dir=self.loaded.directory,
        )  # fmt: skip

    def record(self) -> dict[str, Any]:
        """The body of ``quantization_config.json`` (versions and date are added when it is written)."""
        return build_record(self)

    def write(self, folder: Path) -> dict[str, Any]:
        """Save everything into ``folder``; returns the record written."""
        name = self.loaded.path.name if self.loaded.path is not None else "model.onnx"
        # A model that came with external data keeps it: streamed, bounded-memory save.
        files = save_model(self.model, folder / name, external_data=True if self.loaded.external else None)
        record = self.record()
        if self.config.output.ort_fusions:
            from .ort_fusions import apply_ort_fusions

            record["ort_fusions"], files = apply_ort_fusions(
                self.model, folder / name, files, self.loaded.folder,
                share_shapes=self.config.output.share_shapes,
            )  # fmt: skip
        record["files"] = {f.name: f.stat().st_size for f in files}
        record["quantized_bytes"] = sum(record["files"].values())
        _check_size(record["quantized_bytes"], self.config.allocation.max_size)
        record["timings"]["total_with_save"] = time.perf_counter() - self.t0
        if self.loaded.folder is not None:
            from .output import copy_side_files

            record["copied_files"] = copy_side_files(self.loaded.folder, folder, self.model, name)
        return record


def _check_size(written: int, max_size: float | None) -> None:
    """The model files must fit ``max_size`` MB; raising here leaves no output (the write is atomic)."""
    from .graph_passes.predict.allocate import AllocationError
    from .graph_passes.predict.size import MB

    if max_size is not None and written > max_size * MB:
        over = written - int(max_size * MB)
        raise AllocationError(
            f"max_size={max_size:g} MB: the written model takes {written} bytes, {over} over (its graph took "
            f"more than estimated); ask for {over} bytes less"
        )


def build_record(run: QuantizationRun) -> dict[str, Any]:
    """``quantization_config.json``'s body: the config as run, per-site results (each with its scheme),
    skipped sites, calibration report and timings."""
    result = run.result
    if result is None:
        raise InternalError("the record of a run that has not quantized yet")
    body = result.to_dict()
    return {
        "quant_method": "optimum-adaround",
        "config": run.config.to_dict(),  # as asked: format auto stays auto (the choice is "format")
        "scheme": result.scheme.to_dict(),
        "format": result.scheme.format.value,
        "method": body["method"],
        "calibration": run.calib_info,
        "calibration_report": result.calibration,
        "source": {"kind": run.loaded.kind, "path": str(run.loaded.path) if run.loaded.path else None},
        "float_bytes": run.float_bytes,
        "n_sites": len(body["sites"]),
        "sites": body["sites"],
        "embeddings": body["embeddings"],
        "shapes": result.shapes,
        "transforms": run.transforms,
        "allocation": run.allocation,
        "skipped": body["skipped"],
        "timings": body["timings"],
    }


def quantize_into(
    folder: Path, model: Any, config: QuantConfig, *, progress: bool = True,
    token_ids: np.ndarray | None = None, extend: Callable[[Path, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Quantize ``model`` under ``config`` into the (temporary, not yet committed) ``folder``; ``extend``
    may add files and record entries before the record is written. Returns the record. The export and the
    main job build on this inside ``write_output``."""
    loaded = load_model(model)
    with QuantizationRun(loaded, config, token_ids, progress) as run:
        record = run.write(folder)
    if extend is not None:
        extend(folder, record)
    return record
