"""The quantize pipeline: sites -> (calibration) -> rounding -> packing -> rewrite, one weight at a time.

Memory stays bounded by about one weight: each site's float weight is read through the mmap, quantized,
packed, and its packed arrays are spilled to memory-mapped ``.npy`` files in a scratch folder before the
next site is read. The rewrite pass then references those mmaps, and a streamed save writes them out.
The scratch folder must outlive the save: :class:`QuantizationResult` owns it (``close()`` removes it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass
from tqdm.auto import tqdm

from . import packing, rounding  # noqa: F401  (importing the packages registers packers and methods)
from .config import OutputConfig, QuantConfig
from .embeddings import quantize_embeddings
from .errors import (
    CalibrationError,
    NoQuantizableWeightsError,
    UnsupportedSchemeError,
    UserError,
)
from .fuse import FuseSiblingMatMulNBitsPass
from .memory import GB, RoundingPlan, default_budget, plan_rounding, tree_anon_bytes
from .model_io import read_weight
from .packing.base import PackedWeight, Packer, get_packer
from .parallel import in_order, mapped, mapped_stats, resolve_workers, result_of, round_site, rounding_pool
from .ray_pool import RayTaskLost, ray_pool
from .records import QuantizedWeight, SiteReport, SkippedSite, WeightSite
from .rewrite import ReplaceWeightSitesPass, SiteRewrite
from .rounding.base import SINK_SITES, MethodConfig, SiteStats, weight_first_position
from .scheme import QuantScheme, WeightFormat
from .shapes import ShareShapeComputationsPass
from .sites import ALREADY_QUANTIZED, find_weight_sites
from .tune.block import TuneSettings

__all__ = [
    "QuantizationResult",
    "SiteResult",
    "check_opset",
    "check_sites",
    "choose_format",
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
    scheme: str = ""
    """The label of the scheme the site was quantized with (the output projection may differ)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class QuantizationResult:
    """The rewritten model plus per-site metrics, skipped sites and timings.

    ``model`` references packed arrays memory-mapped from ``spill_dir``: save it before ``close()``.
    """

    model: ir.Model
    config: QuantConfig
    """The configuration as run: the format chosen, the method's device resolved."""
    sites: list[SiteResult]
    skipped: list[SkippedSite]
    timings: dict[str, float]
    spill_dir: Path | None = None
    calibration: dict[str, Any] | None = None
    """The calibration engine's report (``CalibrationReport`` as a dict) for methods that needed statistics."""
    embeddings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Embedding tables replaced by ``GatherBlockQuantized`` (shared with the output projection or not)."""
    shapes: dict[str, Any] | None = None
    """What ``ShareShapeComputationsPass`` did (None when it did not run)."""
    _tmp: tempfile.TemporaryDirectory[str] | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme.to_dict(),
            "method": {"name": self.config.method.name, "options": self.config.method.to_data()},
            "sites": [s.to_dict() for s in self.sites],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "timings": dict(self.timings),
            "calibration": self.calibration,
            "embeddings": list(self.embeddings),
            "shapes": self.shapes,
        }

    @property
    def scheme(self) -> QuantScheme:
        return self.config.scheme

    def close(self) -> None:
        """Remove the scratch folder of spilled arrays (the model must have been saved already)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> QuantizationResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    tensors = {
        role: spill_array(array, folder / f"{stem}.{role}.bin") for role, array in packed.tensors.items()
    }
    return dataclasses.replace(packed, tensors=tensors)


def spill_array(array: np.ndarray, file: Path) -> np.ndarray:
    """``array`` written to ``file`` and reopened read-only memory-mapped (empty arrays stay as they are)."""
    arr = np.ascontiguousarray(array)
    if arr.size == 0:
        return arr
    out = np.memmap(file, dtype=arr.dtype, mode="w+", shape=arr.shape)
    out[...] = arr
    out.flush()
    del out
    return np.memmap(file, dtype=arr.dtype, mode="r", shape=arr.shape)


class _SiteQuantizer:
    """Quantize -> pack -> spill, site after site in order (rounding may run ahead in worker processes),
    collecting results."""

    def __init__(
        self,
        model: ir.Model,
        schemes: Mapping[str, QuantScheme],
        method: MethodConfig,
        packers: Mapping[WeightFormat, Packer],
        folder: Path,
    ):
        self.model, self.schemes, self.method, self.packers, self.folder = (
            model,
            schemes,
            method,
            packers,
            folder,
        )
        self.rewrites: list[SiteRewrite] = []
        self.results: list[SiteResult] = []
        self.seconds: dict[str, float] = {}
        """Rounding seconds of the sites rounded but not yet recorded (``record=False``)."""

    def quantize_all(
        self,
        items: Iterable[tuple[WeightSite, SiteStats | None]],
        pool: Executor | None,
        window: int = 1,
        memory: int | None = None,
        record: bool = True,
    ) -> Iterator[tuple[WeightSite, QuantizedWeight]]:
        """Round ``items`` (in ``pool``'s worker processes when given, at most ``window`` at once, each
        within ``memory`` bytes) and pack and record each result in the order of ``items``; with
        ``record=False`` the caller records the final weights itself (``record``)."""
        handed: dict[int, tuple[SiteStats, SiteStats]] = {}  # id -> (kept alive, its mapped copy)
        count = itertools.count()

        def submit(item: tuple[WeightSite, SiteStats | None]) -> Any:
            site, stats = item
            weight: Any = read_weight(self.model, site, copy=False)  # a view: each method reads row chunks
            if isinstance(pool, ProcessPoolExecutor):  # local workers read large arrays through mmap
                stem = self.folder / f"round-{next(count):05d}"
                weight = mapped(weight, stem.with_suffix(".w.npy"))
                if stats is not None:
                    stats = handed.setdefault(id(stats), (stats, mapped_stats(stats, stem)))[1]
            args = (self.method, weight, self.schemes[site.name], stats, site.name, memory)
            return (
                pool.submit(round_site, *args) if pool is not None else functools.partial(round_site, *args)
            )

        try:
            yield from self._collect(items, submit, window, record)
        finally:
            for path in self.folder.glob("round-*.npy"):
                path.unlink(missing_ok=True)

    def _collect(
        self,
        items: Iterable[tuple[WeightSite, SiteStats | None]],
        submit: Callable[..., Any],
        window: int,
        record: bool,
    ) -> Iterator[tuple[WeightSite, QuantizedWeight]]:
        """The results of ``submit`` on ``items``, in order, packed and recorded (if ``record``)."""
        for (site, _), job in in_order(items, submit, window):
            try:
                qw, seconds = result_of(job)  # type: ignore[misc]
            except BrokenProcessPool as e:
                raise UserError(
                    f"{site.name}: a rounding worker process ended abruptly (killed, e.g. for memory?): "
                    "rerun with fewer worker processes (workers=1 / --workers 1 rounds in this process)"
                ) from e
            except RayTaskLost as e:
                raise UserError(
                    f"{site.name}: Ray lost the task rounding it ({e}; killed, e.g. for memory?): rerun with "
                    "fewer workers (--workers) or round locally (--executor local)"
                ) from e
            except UserError as e:  # add the node and initializer to the method's "site <name>: ..." message
                msg = str(e).removeprefix(f"site {site.name}: ").removeprefix("site ?: ")
                e.args = (f"{site.name} (node {site.node_name!r}, initializer {site.weight_name!r}): {msg}",)
                raise
            if record:
                yield site, self._record(site, qw, seconds)
            else:
                self.seconds[site.name] = seconds
                yield site, qw

    def record(self, site: WeightSite, qw: QuantizedWeight) -> None:
        """Pack and record a site's final weights (rounded earlier with ``record=False``)."""
        self._record(site, qw, self.seconds.pop(site.name, 0.0))

    def _record(self, site: WeightSite, qw: QuantizedWeight, seconds: float) -> QuantizedWeight:
        t0 = time.perf_counter()
        scheme = self.schemes[site.name]
        packer = self.packers[scheme.format]
        try:
            packed = _spill(packer.pack(qw), self.folder, f"{len(self.rewrites):05d}")
        except OSError as e:  # the scratch folder is full or unwritable: the user's to fix
            raise UserError(
                f"{site.name}: writing its packed weight to the scratch folder {self.folder} failed "
                f"({e.strerror or e}): free space there or point TMPDIR at a larger folder"
            ) from e
        self.rewrites.append(SiteRewrite(site, packed, packer))
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
                scheme=scheme.label,
            )
        )
        return qw


_PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}


def choose_format(scheme: QuantScheme, shapes: Sequence[tuple[int, int]]) -> QuantScheme:
    """``scheme`` with ``format=auto`` resolved: MatMulNBits where it stores every site under the scheme
    (onnxruntime's own kernel), else our MatMulLowBit/MatMulCodebook op (3 bits, codebooks...). QDQ only
    when asked. ``shapes``: the sites' ``(k, n)``. A format given explicitly is kept (``check_sites`` says
    if it cannot store a site)."""
    if scheme.format is not WeightFormat.AUTO:
        return scheme
    for fmt in (WeightFormat.MATMULNBITS, WeightFormat.LOWBIT):
        try:
            candidate = dataclasses.replace(scheme, format=fmt)
        except UserError:  # e.g. a codebook data type only our op stores
            continue
        if _stores_all(candidate, shapes):
            return candidate
    return dataclasses.replace(scheme, format=WeightFormat.LOWBIT)  # check_sites names the site and why


def resolve_config(config: QuantConfig, sites: Sequence[WeightSite]) -> QuantConfig:
    """The config as it will run: the format chosen, and the device of a method that rounds on a torch
    device and was given none: the GPU when the run asks for ``device=cuda`` and torch sees one, else the
    CPU (a device the user gave is kept)."""
    return plan_schemes(config, sites)[0]


def plan_schemes(
    config: QuantConfig, sites: Sequence[WeightSite]
) -> tuple[QuantConfig, dict[str, QuantScheme]]:
    """The resolved config (see :func:`resolve_config`) and each site's scheme, formats chosen: the first
    scheme override whose pattern matches the site, else the run's scheme, except the output projection at
    ``lm_head`` bits (its own format choice, so a 3-bit run in our op still gets an 8-bit MatMulNBits head).
    One pass rounds every site, whatever its scheme."""
    taken = override_schemes(config, sites)
    heads = {
        s.name: _head_for(s, h)
        for s in sites
        if s.kind == "lm_head" and s.name not in taken and (h := head_scheme(config, s.k))
    }
    own = [s for s in sites if s.name not in heads and s.name not in taken]
    scheme = choose_format(config.scheme, [(s.k, s.n) for s in own or sites])
    schemes = {**{s.name: scheme for s in own}, **heads}
    for wanted in dict.fromkeys(taken.values()):  # each override scheme's format chosen over its sites
        mine = [s for s in sites if taken.get(s.name) == wanted]
        chosen = choose_format(wanted, [(s.k, s.n) for s in mine])
        schemes.update((s.name, chosen) for s in mine)
    method = config.method
    if "device" in method.names() and method.device is None:
        method = method.replace(device=_torch_device(config.calibration.device))
    return dataclasses.replace(config, scheme=scheme, method=method), schemes


def override_schemes(config: QuantConfig, sites: Sequence[WeightSite]) -> dict[str, QuantScheme]:
    """The scheme of each site a scheme override takes (first matching pattern wins), format unresolved;
    an override that takes no site is a NoQuantizableWeightsError naming its pattern."""
    overrides = config.selection.overrides
    if not overrides:
        return {}
    patterns = [(o, re.compile(o.pattern)) for o in overrides]
    out: dict[str, QuantScheme] = {}
    used: set[str] = set()
    for site in sites:
        o = next((o for o, rx in patterns if rx.search(site.name)), None)
        if o is not None:
            out[site.name] = config.with_overrides(scheme=o.scheme).scheme  # the run's format
            used.add(o.pattern)
    for o in overrides:
        if o.pattern not in used:
            raise NoQuantizableWeightsError(
                f"scheme override {o.pattern!r} matches no quantizable layer (or only layers an earlier "
                "override takes)"
            )
    return out


def head_scheme(config: QuantConfig, k: int) -> QuantScheme | None:
    """The output projection's own scheme when ``lm_head`` gives it bits (None: it takes the run's).

    A uniform integer grid with the run's symmetry, scale type and format, and the run's block (128 for a
    per-channel run: MatMulNBits needs a block) halved while it does not divide ``k``, down to 16: a padded
    block stores codes for nothing (K = 576 at block 128 is 5 blocks for 4.5), and a smaller block is no less
    accurate (benchmarks/results/small_fast_defaults.md)."""
    bits = config.selection.lm_head
    if not bits.isdigit():
        return None
    run = config.scheme
    block = 128 if run.per_channel else run.group_size
    fit = block
    while fit > 16 and k % fit:
        fit //= 2
    block = fit if k % fit == 0 else block
    return QuantScheme(
        bits=int(bits),
        group_size=block,
        symmetric=run.symmetric,
        scale_dtype=run.scale_dtype,
        format=run.format,
    )


def _head_for(site: WeightSite, head: QuantScheme) -> QuantScheme:
    """``head`` (the output projection's scheme) with its format chosen for ``site`` (auto when the run's
    format cannot store it)."""
    shapes = [(site.k, site.n)]
    if head.format is not WeightFormat.AUTO and not _stores_all(head, shapes):
        head = dataclasses.replace(head, format=WeightFormat.AUTO)  # the run's format cannot: let auto choose
    return choose_format(head, shapes)


def _stores_all(scheme: QuantScheme, shapes: Sequence[tuple[int, int]]) -> bool:
    packer = get_packer(scheme.format)
    return all(packer.supports(scheme, k, n) is None for k, n in shapes)


def _torch_device(run_device: str) -> str:
    if run_device != "cuda":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _scratch(spill_dir: str | Path | None) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    if spill_dir is not None:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
        return Path(spill_dir), None
    tmp = tempfile.TemporaryDirectory(prefix="adaround-spill-")
    return Path(tmp.name), tmp


def _share_shapes(model: ir.Model, output: OutputConfig) -> dict[str, Any] | None:
    """Shape sharing on the rewritten graph; with ``ort_fusions`` it runs after those instead (the rotary
    fusion matches the export's own shape reads), on the written model."""
    if not output.share_shapes or output.ort_fusions:
        return None
    shapes = ShareShapeComputationsPass()
    shapes(model)
    return shapes.record


def quantize_model(
    model: ir.Model,
    config: QuantConfig,
    *,
    sites: SiteReport | None = None,
    token_ids: np.ndarray | None = None,
    progress: bool = True,
    spill_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
) -> QuantizationResult:
    """Quantize every site of ``model`` in place under ``config`` and return the rewritten model with
    its report.

    ``sites``: a :func:`prepare_sites` report (default: all sites, lm_head excluded). Data-free methods
    loop over sites; methods that need statistics run the calibration engine on ``token_ids`` (int64
    ``[n, T]``), which calls back once per decoder block. The packed arrays live in ``spill_dir``
    (default: a fresh temporary folder owned by the result) until the model is saved. ``model_dir``: the
    model's folder, whose ``genai_config.json`` / ``config.json`` calibration reads for cache dims the graph
    leaves symbolic.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report = sites if sites is not None else prepare_sites(model)
    timings["find_sites"] = time.perf_counter() - t0
    config, schemes = plan_schemes(config, report.sites)
    needs = config.method.needs
    packers = {s.format: get_packer(s.format, **_packer_options(s.format, config)) for s in schemes.values()}
    for scheme in dict.fromkeys(schemes.values()):  # each distinct scheme once, in site order
        check_opset(model, scheme)
        check_sites(packers[scheme.format], scheme, [s for s in report.sites if schemes[s.name] == scheme])
    n_workers = resolve_workers(config.output.workers, report.sites)  # checks ``workers`` for every method
    if needs and token_ids is None:
        raise CalibrationError(
            f"method {config.method.name!r} needs calibration data ({', '.join(sorted(needs))}); "
            "pass token ids / --calib-data, or use method='rtn'"
        )
    folder, tmp = _scratch(spill_dir)
    try:
        quantizer = _SiteQuantizer(model, schemes, config.method, packers, folder)
        t1 = time.perf_counter()
        where = None if model_dir is None else Path(model_dir)
        calibration = _round_all(model, report, config, quantizer, token_ids, n_workers, progress, where)
        timings["quantize"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        share = config.selection.embeddings != "none"
        rewrite = ReplaceWeightSitesPass(quantizer.rewrites, share_embeddings=share)
        rewrite(model)
        embeddings = rewrite.shared + _quantize_embeddings(model, config)
        if config.output.fuse:
            FuseSiblingMatMulNBitsPass(lambda name, a: spill_array(a, folder / f"{_file_stem(name)}.bin"))(
                model
            )
        shapes = _share_shapes(model, config.output)
        timings["rewrite"] = time.perf_counter() - t2
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    timings["total"] = time.perf_counter() - t0
    return QuantizationResult(
        model=model,
        config=config,
        sites=quantizer.results,
        skipped=list(report.skipped),
        timings=timings,
        spill_dir=folder,
        calibration=calibration,
        embeddings=embeddings,
        shapes=shapes,
        _tmp=tmp,
    )


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _quantize_embeddings(model: ir.Model, config: QuantConfig) -> list[dict[str, Any]]:
    bits = config.selection.embeddings
    return [] if bits == "none" else quantize_embeddings(model, int(bits), config.scheme)


def _packer_options(fmt: WeightFormat, config: QuantConfig) -> dict[str, Any]:
    """The output options a format's packer takes (only the op formats carry ``accuracy_level``)."""
    if fmt in (WeightFormat.MATMULNBITS, WeightFormat.LOWBIT):
        return {"accuracy_level": config.output.accuracy_level}
    return {}


def _round_all(
    model: ir.Model,
    report: SiteReport,
    config: QuantConfig,
    quantizer: _SiteQuantizer,
    token_ids: np.ndarray | None,
    n_workers: int,
    progress: bool,
    model_dir: Path | None,
) -> dict[str, Any] | None:
    """Round every site (through the calibration engine when the method needs statistics); returns the
    engine's report."""
    needs = config.method.needs
    n_workers = n_workers if needs else 1  # data-free rounding is quick: not worth starting processes
    ray = config.output.executor == "ray" and bool(needs)
    bar = tqdm(
        total=len(report.sites),
        desc=f"{config.method.name} {config.scheme.label}",
        unit="site",
        disable=not progress,
    )

    given = config.output.max_memory
    budget = None if not needs or ray else default_budget() if given is None else int(given * GB)

    def quantize_all(
        items: Sequence[tuple[WeightSite, SiteStats | None]], pool: Any = None, record: bool = True
    ) -> dict[str, QuantizedWeight]:
        out = {}
        sites = [site for site, _ in items]
        plan = plan_rounding(budget, tree_anon_bytes(), sites, config.method, n_workers)
        if ray and given is not None:  # Ray workers live outside this process tree: the budget is per task
            plan = RoundingPlan(n_workers, int(given * GB))
        window = n_workers + 1 if plan.concurrent >= n_workers else plan.concurrent
        for site, qw in quantizer.quantize_all(items, pool, window, plan.memory, record):
            out[site.name] = qw
            bar.set_postfix_str(site.name, refresh=False)
            bar.update()
        return out

    with bar, _pool(config, n_workers) as pool:
        n_workers = getattr(pool, "workers", n_workers)  # a Ray pool sizes itself to its cluster
        if not needs:
            quantize_all([(site, None) for site in report.sites])
            return None
        sink = re.compile(SINK_SITES)
        weight = config.calibration.sink_weight
        return _calibrated(
            model,
            report,
            token_ids,
            functools.partial(quantize_all, pool=pool, record=False),
            quantizer.record,
            config,
            progress,
            lambda site: float(weight) if sink.search(site.name) else 1.0,
            model_dir,
            quantizer.folder,
        )


def _pool(config: QuantConfig, n_workers: int) -> contextlib.AbstractContextManager[Any]:
    """Ray tasks for ``executor="ray"`` (calibrated methods: data-free rounding stays here), else
    ``n_workers`` local processes."""
    if config.output.executor == "ray" and config.method.needs:
        return ray_pool(config.output.workers, config.output.ray_address)
    return rounding_pool(n_workers)


def _tune_settings(config: QuantConfig) -> TuneSettings | None:
    steps = config.tune.tune_steps
    if not steps:
        return None
    return TuneSettings(
        steps=steps, lr=config.tune.tune_lr, float_targets=config.tune.tune_targets == "float"
    )


def _calibrated(
    model: ir.Model,
    report: SiteReport,
    token_ids: np.ndarray | None,
    quantize_all: Callable[[Sequence[tuple[WeightSite, SiteStats | None]]], dict[str, QuantizedWeight]],
    record: Callable[[WeightSite, QuantizedWeight], None],
    config: QuantConfig,
    progress: bool,
    first_weight: Callable[[WeightSite], float],
    model_dir: Path | None,
    stats_dir: Path | None = None,
) -> dict[str, Any] | None:
    """Run the calibration engine, quantizing each block's sites with the statistics it hands over
    (first positions weighted by ``first_weight(site)``, once per shared statistics record) and recording
    the weights the engine settles on (block tuning may replace the method's); the sums of wide
    activations live in memory-mapped files in ``stats_dir``."""
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
        if stats_dir is not None:  # the block's wide sums are spent (unlinking keeps open maps valid)
            for path in stats_dir.glob("hessian-*.npy"):
                path.unlink(missing_ok=True)
        return out

    by_name = {s.name: s for s in report.sites}

    def on_final(qws: dict[str, QuantizedWeight]) -> None:
        for name, qw in qws.items():
            record(by_name[name], qw)
        done.update(qws)

    calib_report = run_calibration(
        model,
        report.sites,
        ids.astype(np.int64),
        on_block,
        on_final=on_final,
        sequential=config.calibration.sequential,
        progress=progress,
        providers=_PROVIDERS[config.calibration.device],
        model_dir=model_dir,
        stats_dir=stats_dir,
        tune=_tune_settings(config),
    )
    missing = [s.name for s in report.sites if s.name not in done]
    if missing:
        raise CalibrationError(
            f"calibration produced no statistics for {len(missing)} sites, e.g. {missing[0]}"
        )
    return dataclasses.asdict(calib_report) if dataclasses.is_dataclass(calib_report) else None
