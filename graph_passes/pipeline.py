"""The quantize pipeline: sites -> (calibration) -> rounding -> packing -> rewrite, one weight at a time.

Memory stays bounded by about one weight: each site's float weight is read through the mmap, quantized,
packed, and its packed arrays are spilled to memory-mapped ``.npy`` files in a scratch folder before the
next site is read. The rewrite pass then references those mmaps, and a streamed save writes them out.
The scratch folder must outlive the save: :class:`QuantizationResult` owns it (``close()`` removes it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass
from tqdm.auto import tqdm

from . import packing, rounding  # noqa: F401  (importing the packages registers packers and methods)
from .errors import CalibrationError, NoQuantizableWeightsError, UnsupportedSchemeError, UserError
from .model_io import read_weight
from .packing.base import PackedWeight, Packer, get_packer
from .parallel import in_order, resolve_workers, result_of, round_site, rounding_pool
from .records import QuantizedWeight, SiteReport, SkippedSite, WeightSite
from .rewrite import ReplaceWeightSitesPass, SiteRewrite
from .rounding.base import FP_CROSS, SINK_SITES, RoundingMethod, SiteStats, get_method, weight_first_position
from .scheme import QuantScheme, WeightFormat
from .sites import ALREADY_QUANTIZED, find_weight_sites

__all__ = [
    "QuantizationResult",
    "SiteResult",
    "check_opset",
    "check_sites",
    "prepare_sites",
    "quantize_model",
]


@dataclasses.dataclass
class SiteResult:
    """What happened to one site: its shape, the rounding metrics, bytes before/after and time taken."""

    name: str
    node_name: str
    kind: str
    k: int
    n: int
    float_bytes: int
    packed_bytes: int
    seconds: float
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class QuantizationResult:
    """The rewritten model plus per-site metrics, skipped sites and timings.

    ``model`` references packed arrays memory-mapped from ``spill_dir``: save it before ``close()``.
    """

    model: ir.Model
    scheme: QuantScheme
    method: str
    method_options: dict[str, Any]
    sites: list[SiteResult]
    skipped: list[SkippedSite]
    timings: dict[str, float]
    spill_dir: Path | None = None
    calibration: dict[str, Any] | None = None
    """The calibration engine's report (``CalibrationReport`` as a dict) for methods that needed statistics."""
    _tmp: tempfile.TemporaryDirectory[str] | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme.to_dict(),
            "method": {"name": self.method, "options": _jsonable(self.method_options)},
            "sites": [s.to_dict() for s in self.sites],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "timings": dict(self.timings),
            "calibration": self.calibration,
        }

    def close(self) -> None:
        """Remove the scratch folder of spilled arrays (the model must have been saved already)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> QuantizationResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (int, float, str, bool, type(None), list)) else repr(v)
        for k, v in options.items()
    }


def prepare_sites(
    model: ir.Model,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    quantize_lm_head: bool = False,
) -> SiteReport:
    """Lift Constant-node weights to initializers and find the sites; refuse a model with none selected.

    Weights that are already quantized (MatMulNBits, DequantizeLinear) are never touched again: they are
    listed in ``skipped``, and a model with no float weight left is refused with a message saying so.
    """
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024)(model)
    report = find_weight_sites(model, include, exclude, quantize_lm_head)
    if report.sites:
        return report
    done = [s for s in report.skipped if s.reason.startswith(ALREADY_QUANTIZED)]
    if done:
        raise NoQuantizableWeightsError(
            f"the model is already quantized ({len(done)} weights, e.g. {done[0].node_name}: {done[0].reason}) "
            "and no selected float weight is left; quantize the float model instead"
        )
    why = "; ".join(sorted({s.reason for s in report.skipped})[:3]) or "no MatMul/Gemm with a constant weight"
    raise NoQuantizableWeightsError(f"no quantizable weight selected ({len(report.skipped)} skipped: {why})")


# QDQ needs default-domain opset 21; the rewrite bumps the model's opset to it. From 18 on that only adds
# types; below 18 ops such as ReduceMean/Split/Unsqueeze take attributes that opset 21 reads as inputs,
# so a bumped graph would no longer load.
_MIN_BUMPABLE_OPSET = 18


def check_opset(model: ir.Model, scheme: QuantScheme) -> None:
    """Refuse a format that would need an opset bump the model's ops cannot survive."""
    default = model.opset_imports.get("", 0)
    if scheme.format is WeightFormat.QDQ and default < _MIN_BUMPABLE_OPSET:
        raise UnsupportedSchemeError(
            f"format qdq needs opset 21 and the model imports opset {default}; raising an opset below "
            f"{_MIN_BUMPABLE_OPSET} would break its other ops: re-export with --opset 18 or newer, or use "
            "format matmulnbits"
        )


def check_sites(packer: Packer, scheme: QuantScheme, sites: Sequence[WeightSite]) -> None:
    """Fail before any work if the packer cannot store one of the sites under ``scheme``."""
    for site in sites:
        reason = packer.supports(scheme, site.k, site.n)
        if reason is not None:
            raise UnsupportedSchemeError(
                f"{site.name} ({site.n}x{site.k}) cannot use {scheme.label} in format {scheme.format.value}: {reason}"
            )


def _spill(packed: PackedWeight, folder: Path, stem: str) -> PackedWeight:
    """Write the packed arrays to files and reopen them read-only memory-mapped (no copy stays in RAM)."""
    tensors: dict[str, np.ndarray] = {}
    for role, array in packed.tensors.items():
        arr = np.ascontiguousarray(array)
        if arr.size == 0:
            tensors[role] = arr
            continue
        file = folder / f"{stem}.{role}.bin"
        out = np.memmap(file, dtype=arr.dtype, mode="w+", shape=arr.shape)
        out[...] = arr
        out.flush()
        del out
        tensors[role] = np.memmap(file, dtype=arr.dtype, mode="r", shape=arr.shape)
    return dataclasses.replace(packed, tensors=tensors)


class _SiteQuantizer:
    """Quantize -> pack -> spill, site after site in order (rounding may run ahead in worker processes),
    collecting results."""

    def __init__(
        self, model: ir.Model, scheme: QuantScheme, method: RoundingMethod, packer: Packer, folder: Path
    ):
        self.model, self.scheme, self.method, self.packer, self.folder = model, scheme, method, packer, folder
        self.rewrites: list[SiteRewrite] = []
        self.results: list[SiteResult] = []

    def quantize_all(
        self, items: Iterable[tuple[WeightSite, SiteStats | None]], pool: Executor | None, window: int = 1
    ) -> Iterator[tuple[WeightSite, QuantizedWeight]]:
        """Round ``items`` (in ``pool``'s worker processes when given, at most ``window`` at once) and pack
        and record each result in the order of ``items``."""

        def submit(item: tuple[WeightSite, SiteStats | None]) -> Any:
            site, stats = item
            args = (self.method, read_weight(self.model, site), self.scheme, stats, site.name)
            return (
                pool.submit(round_site, *args) if pool is not None else functools.partial(round_site, *args)
            )

        for (site, _), job in in_order(items, submit, window):
            try:
                qw, seconds = result_of(job)  # type: ignore[misc]
            except BrokenProcessPool as e:
                raise UserError(
                    f"{site.name}: a rounding worker process ended abruptly (killed, e.g. for memory?): "
                    "rerun with fewer worker processes (workers=1 / --workers 1 rounds in this process)"
                ) from e
            except UserError as e:  # add the node and initializer to the method's "site <name>: ..." message
                msg = str(e).removeprefix(f"site {site.name}: ").removeprefix("site ?: ")
                e.args = (f"{site.name} (node {site.node_name!r}, initializer {site.weight_name!r}): {msg}",)
                raise
            yield site, self._record(site, qw, seconds)

    def _record(self, site: WeightSite, qw: QuantizedWeight, seconds: float) -> QuantizedWeight:
        t0 = time.perf_counter()
        try:
            packed = _spill(self.packer.pack(qw), self.folder, f"{len(self.rewrites):05d}")
        except OSError as e:  # the scratch folder is full or unwritable: the user's to fix
            raise UserError(
                f"{site.name}: writing its packed weight to the scratch folder {self.folder} failed "
                f"({e.strerror or e}): free space there or point TMPDIR at a larger folder"
            ) from e
        self.rewrites.append(SiteRewrite(site, packed))
        stored = self.model.graph.initializers[site.weight_name].const_value
        float_bytes = int(stored.nbytes) if stored is not None else 4 * site.n * site.k
        self.results.append(
            SiteResult(
                name=site.name,
                node_name=site.node_name,
                kind=site.kind,
                k=site.k,
                n=site.n,
                float_bytes=float_bytes,
                packed_bytes=packed.nbytes,
                seconds=seconds + time.perf_counter() - t0,
                metrics={k: float(v) for k, v in qw.metrics.items()},
            )
        )
        return qw


def quantize_model(
    model: ir.Model,
    scheme: QuantScheme,
    method: str = "rtn",
    method_options: Mapping[str, Any] | None = None,
    sites: SiteReport | None = None,
    token_ids: np.ndarray | None = None,
    sequential: bool = True,
    progress: bool = True,
    packer_options: Mapping[str, Any] | None = None,
    calibration_options: Mapping[str, Any] | None = None,
    spill_dir: str | Path | None = None,
    on_site: Callable[[SiteResult], None] | None = None,
    sink_weight: float = 1.0,
    sink_sites: str = SINK_SITES,
    workers: int | None = None,
) -> QuantizationResult:
    """Quantize every site of ``model`` in place and return the rewritten model with its report.

    ``sites``: a :func:`find_weight_sites` report (default: all sites, lm_head excluded). Data-free
    methods loop over sites; methods that need statistics run the calibration engine on ``token_ids``
    (int64 ``[n, T]``), which calls back once per decoder block. The packed arrays live in ``spill_dir``
    (default: a fresh temporary folder owned by the result) until the model is saved.

    ``sink_weight``: how many times each calibration sequence's first position counts in the statistics
    of the sites whose name matches ``sink_sites`` (the attention q/k/v projections; see
    :func:`weight_first_position`). 1 = plain ``X^T X``.

    ``workers``: processes that round the sites of a decoder block side by side (calibrated methods
    only; same bytes as 1). None: one per CPU up to 4 for models of 16M+ weights, else 1 (see
    :func:`~optimum.adaround.graph_passes.parallel.resolve_workers`).
    """
    if not (isinstance(sink_weight, (int, float)) and 1.0 <= sink_weight <= 1e6):
        raise UnsupportedSchemeError(f"sink_weight={sink_weight!r}: use a number in [1, 1e6] (1 = off)")
    try:
        sink_pattern = re.compile(sink_sites)
    except re.error as e:
        raise UnsupportedSchemeError(f"sink_sites={sink_sites!r} is not a regular expression: {e}") from None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report = sites if sites is not None else prepare_sites(model)
    timings["find_sites"] = time.perf_counter() - t0
    packer = get_packer(scheme.format, **dict(packer_options or {}))
    check_opset(model, scheme)
    check_sites(packer, scheme, report.sites)
    options = dict(method_options or {})
    rounding_method = get_method(method, **options)
    n_workers = resolve_workers(workers, report.sites)  # checks ``workers`` for every method
    if not rounding_method.needs:  # data-free rounding is quick: not worth starting processes
        n_workers = 1
    if rounding_method.needs and token_ids is None:
        raise CalibrationError(
            f"method {method!r} needs calibration data ({', '.join(sorted(rounding_method.needs))}); "
            "pass token ids / --calib-data, or use method='rtn'"
        )

    tmp = None
    if spill_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="adaround-spill-")
        folder = Path(tmp.name)
    else:
        folder = Path(spill_dir)
        folder.mkdir(parents=True, exist_ok=True)
    try:
        quantizer = _SiteQuantizer(model, scheme, rounding_method, packer, folder)
        bar = tqdm(
            total=len(report.sites), desc=f"{method} {scheme.label}", unit="site", disable=not progress
        )

        def quantize_all(
            items: Sequence[tuple[WeightSite, SiteStats | None]], pool: Any = None
        ) -> dict[str, QuantizedWeight]:
            out = {}
            for site, qw in quantizer.quantize_all(items, pool, n_workers + 1):
                out[site.name] = qw
                bar.set_postfix_str(site.name, refresh=False)
                bar.update()
                if on_site is not None:
                    on_site(quantizer.results[-1])
            return out

        t1 = time.perf_counter()
        calibration = None
        with bar, rounding_pool(n_workers) as pool:
            if rounding_method.needs:
                calibration = _calibrated(
                    model,
                    report,
                    token_ids,
                    functools.partial(quantize_all, pool=pool),
                    sequential,
                    progress,
                    calibration_options,
                    rounding_method.needs,
                    lambda site: float(sink_weight) if sink_pattern.search(site.name) else 1.0,
                )
            else:
                quantize_all([(site, None) for site in report.sites])
        timings["quantize"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        ReplaceWeightSitesPass(packer, quantizer.rewrites)(model)
        timings["rewrite"] = time.perf_counter() - t2
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    timings["total"] = time.perf_counter() - t0
    return QuantizationResult(
        model=model,
        scheme=scheme,
        method=method,
        method_options=options,
        sites=quantizer.results,
        skipped=list(report.skipped),
        timings=timings,
        spill_dir=folder,
        calibration=calibration,
        _tmp=tmp,
    )


def _calibrated(
    model: ir.Model,
    report: SiteReport,
    token_ids: np.ndarray | None,
    quantize_all: Callable[[Sequence[tuple[WeightSite, SiteStats | None]]], dict[str, QuantizedWeight]],
    sequential: bool,
    progress: bool,
    calibration_options: Mapping[str, Any] | None,
    needs: frozenset[str] = frozenset(),
    first_weight: Callable[[WeightSite], float] = lambda site: 1.0,
) -> dict[str, Any] | None:
    """Run the calibration engine, quantizing each block's sites with the statistics it hands over
    (first positions weighted by ``first_weight(site)``, once per shared statistics record)."""
    from .calibration.engine import run_calibration

    ids = np.asarray(token_ids)
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise CalibrationError(
            f"token ids must be a non-empty integer array [n, seq_len], got {ids.dtype}{list(ids.shape)}"
        )
    done: set[str] = set()

    def on_block(block: list[WeightSite], stats: dict[str, SiteStats]) -> dict[str, QuantizedWeight]:
        items = []
        weighted: dict[tuple[int, float], SiteStats] = {}  # q/k/v share one record: weight it once
        for site in block:
            if site.name in stats:
                st, w = stats[site.name], first_weight(site)
                if w != 1.0:
                    st = weighted.setdefault((id(st), w), weight_first_position(st, w))
                items.append((site, st))
        out = quantize_all(items)
        done.update(out)
        return out

    options = dict(calibration_options or {})
    options.setdefault("fp_target", sequential and FP_CROSS in needs)
    calib_report = run_calibration(
        model,
        report.sites,
        ids.astype(np.int64),
        on_block,
        sequential=sequential,
        progress=progress,
        **options,
    )
    missing = [s.name for s in report.sites if s.name not in done]
    if missing:
        raise CalibrationError(
            f"calibration produced no statistics for {len(missing)} sites, e.g. {missing[0]}"
        )
    return dataclasses.asdict(calib_report) if dataclasses.is_dataclass(calib_report) else None
