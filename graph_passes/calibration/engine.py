"""The calibration engine: streams token batches through onnxruntime and hands per-site statistics to a
rounding callback, either in one pass over the whole model or decoder block by decoder block.

Sequential mode (what GPTQ / AdaRound want): the graph is cut into prologue, one part per decoder block and
epilogue (``blocks.py``). The prologue runs once per batch; the tensors that later parts read (hidden state,
mask, rotary tables) are cached for the whole calibration set. Each block then runs over all batches with
its sites' activations as extra outputs, ``H = sum X^T X`` is reduced per activation as batches arrive, the
callback returns quantized weights, those replace the block's weights, and the block runs again so the next
block sees the outputs of the *quantized* block. Peak memory: one block's weights plus the cached boundary
tensors of the calibration set (``CalibrationReport.peak_cache_bytes``).

The model passed in is never modified: each part is a clone sharing the weight tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from ..errors import CalibrationError, InternalError, InvalidOptionError
from ..memory import release_memory
from ..records import QuantizedWeight, WeightSite
from ..rounding.base import SiteStats
from ..rounding.calibrated import row_slices
from ..tune.block import NothingToTuneError, TuneSettings, tune_block
from ..tune.torch_graph import UnsupportedGraphError
from .blocks import Part, PartPlan, extract_part, plan_parts
from .feeds import FeedSpec, check_token_ids, feed_specs, make_feeds, window_capacities
from .sessions import open_session, resolve_providers, weight_bytes
from .stats import HessianAccumulator, Precision, check_precision

__all__ = [
    "BlockCallback",
    "CalibrationOptions",
    "CalibrationReport",
    "FinalCallback",
    "PartReport",
    "resolve_providers",
    "run_calibration",
]

logger = logging.getLogger(__name__)

BlockCallback = Callable[[list[WeightSite], dict[str, SiteStats]], dict[str, QuantizedWeight]]
FinalCallback = Callable[[dict[str, QuantizedWeight]], None]
"""Called with each part's final weights (the method's, or block tuning's where it kept its own)."""

Cache = dict[str, list[np.ndarray]]
"""Boundary tensors by value name, one array per batch."""


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """How one calibration run goes; each field is also a keyword of ``run_calibration``."""

    sequential: bool = True
    """Block by block, each block seeing the quantized blocks before it; else one pass of the fp model."""
    batch_size: int = 8
    """Calibration sequences per onnxruntime run."""
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    """onnxruntime execution providers, in order of preference (CPU is always added last)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    hessian_precision: Precision = "float64"
    """Precision of the per-batch ``X^T X`` (the sum is float64 either way; see ``stats.py``)."""
    model_dir: Path | None = None
    """The model's folder: its ``genai_config.json`` / ``config.json`` give cache dims the graph leaves
    symbolic (onnxruntime-genai builder models)."""
    stats_dir: Path | None = None
    """A folder for the sums of wide activations (``stats.MAPPED_BYTES`` and up), kept there as
    memory-mapped files instead of in this process's memory; None keeps every sum in memory."""
    tune: TuneSettings | None = None
    """Refine each decoder block's returned weights on the block's output (``tune.block``); None: off."""

    def __post_init__(self) -> None:
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise InvalidOptionError(f"calibration batch_size must be an integer >= 1, got {size!r}")
        if isinstance(self.providers, str):
            raise InvalidOptionError(
                f"calibration providers must be a list of execution provider names, got {self.providers!r}"
            )
        object.__setattr__(self, "providers", tuple(self.providers))
        check_precision(self.hessian_precision)

    @classmethod
    def build(cls, base: CalibrationOptions | None, overrides: dict[str, Any]) -> CalibrationOptions:
        """``base`` (default: the defaults) with ``overrides``; InvalidOptionError for an unknown key."""
        accepted = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(accepted))
        if unknown:
            raise InvalidOptionError(
                f"run_calibration has no option {unknown[0]!r}; accepted: {', '.join(accepted)}"
            )
        return dataclasses.replace(base or cls(), **overrides)


@dataclasses.dataclass
class PartReport:
    """Timings of one part (prologue, block, epilogue, or the whole model in one-pass mode)."""

    label: str
    n_sites: int
    n_activations: int
    weight_bytes: int
    forward_s: float = 0.0
    """Time of the statistics pass without X^T X: extraction, serialization, session, onnxruntime runs."""
    stats_s: float = 0.0
    """Time spent reducing activations into H."""
    callback_s: float = 0.0
    """Time inside ``on_block`` (the rounding method)."""
    requant_s: float = 0.0
    """Time of the second pass with the quantized weights (0 when nothing was substituted)."""
    tune: dict[str, float] | None = None
    """The block tuning's output error before and after, and its seconds (None: not tuned)."""


@dataclasses.dataclass
class CalibrationReport:
    """What a calibration run did and what it cost."""

    sequential: bool
    n_sequences: int
    seq_len: int
    n_tokens: int
    batch_size: int
    providers: list[str]
    parts: list[PartReport]
    n_activations: int
    n_quantized: int
    """QuantizedWeights returned by ``on_block`` (in sequential mode also substituted downstream)."""
    peak_cache_bytes: int
    """Largest total size of cached boundary tensors (whole calibration set) at any point."""
    peak_part_weight_bytes: int
    """Largest weight footprint of one part handed to onnxruntime."""
    seconds: float
    cpu_seconds: float = 0.0
    """CPU time of the process over the run (all threads); with other processes on the cores ``seconds``
    can be far more."""

    def summary(self) -> str:
        fwd = sum(p.forward_s + p.requant_s for p in self.parts)
        st = sum(p.stats_s for p in self.parts)
        cb = sum(p.callback_s for p in self.parts)
        mode = "sequential" if self.sequential else "one-pass"
        return (
            f"calibration ({mode}, {self.n_sequences}x{self.seq_len} tokens, {len(self.parts)} parts, "
            f"{self.n_activations} activations): {self.seconds:.1f} s ({self.cpu_seconds:.0f} CPU-s) = onnxruntime {fwd:.1f} s + "
            f"X^T X {st:.1f} s + rounding {cb:.1f} s; cache peak {self.peak_cache_bytes / 2**20:.0f} MiB, "
            f"largest part {self.peak_part_weight_bytes / 2**20:.0f} MiB of weights"
        )


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every step of one calibration run reads: the model, its sites, the tokens and the options."""

    model: ir.Model
    sites: tuple[WeightSite, ...]
    ids: np.ndarray
    """Validated token ids, int64 ``[n, T]``."""
    on_block: BlockCallback
    options: CalibrationOptions
    specs: tuple[FeedSpec, ...]
    providers: tuple[str, ...]
    """The requested providers that onnxruntime has, CPU last."""
    on_final: FinalCallback | None = None

    def final(self, qws: dict[str, QuantizedWeight]) -> None:
        if qws and self.on_final is not None:
            self.on_final(qws)

    @property
    def batches(self) -> list[slice]:
        n, size = self.ids.shape[0], self.options.batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def feeds(self, batch: slice) -> dict[str, np.ndarray]:
        return make_feeds(self.specs, self.ids[batch])

    def accumulator(self, sites: Sequence[WeightSite]) -> HessianAccumulator:
        return HessianAccumulator(sites, self.options.hessian_precision, self.options.stats_dir)

    def quantize(
        self, sites: Sequence[WeightSite], acc: HessianAccumulator, rep: PartReport
    ) -> dict[str, QuantizedWeight]:
        """``on_block`` on these sites' statistics, timed into ``rep``, its answer checked."""
        t0 = time.perf_counter()
        qws = dict(self.on_block(list(sites), acc.by_site(sites)) or {})
        rep.callback_s = time.perf_counter() - t0
        _check_returned({s.name: s for s in sites}, qws)
        return qws


@dataclasses.dataclass
class _Totals:
    """What the report sums over parts besides their own timings."""

    n_quantized: int = 0
    peak_cache_bytes: int = 0


def run_calibration(
    model: ir.Model,
    sites: Sequence[WeightSite],
    token_ids: np.ndarray,
    on_block: BlockCallback,
    options: CalibrationOptions | None = None,
    on_final: FinalCallback | None = None,
    **overrides: Any,
) -> CalibrationReport:
    """Gather ``H = sum X^T X`` per activation of ``sites`` on ``token_ids`` and call ``on_block``.

    Sequential (default): ``on_block(block_sites, stats)`` once per part that holds sites, in execution
    order; the returned weights (dequantized; block-tuned first with ``tune``) replace that block's weights
    before the next block's inputs are computed. One-pass (``sequential=False``): one run of the full fp
    model, then a single ``on_block(all_sites, stats)``. Either way ``on_final`` gets each part's final
    weights: what a caller writes must come from it, not from what ``on_block`` returned. ``stats`` is
    keyed by site name; sites sharing an activation share one ``SiteStats``. ``model`` is not modified.
    ``overrides`` are ``CalibrationOptions`` fields (``sequential``, ``batch_size``, ``providers``,
    ``progress``, ``hessian_precision``, ``model_dir``) replacing those of ``options``.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    run = _prepare(model, sites, token_ids, on_block, CalibrationOptions.build(options, overrides), on_final)
    totals = _Totals()
    parts = _sequential(run, totals) if run.options.sequential else _one_pass(run, totals)
    report = _report(run, parts, totals, time.perf_counter() - t_start, time.process_time() - cpu_start)
    logger.info("%s", report.summary())
    return report


def _report(
    run: _Run, parts: list[PartReport], totals: _Totals, seconds: float, cpu_seconds: float
) -> CalibrationReport:
    n, t = run.ids.shape
    return CalibrationReport(
        sequential=run.options.sequential,
        n_sequences=n,
        seq_len=t,
        n_tokens=n * t,
        batch_size=run.options.batch_size,
        providers=list(run.providers),
        parts=parts,
        n_activations=len({s.activation for s in run.sites}),
        n_quantized=totals.n_quantized,
        peak_cache_bytes=totals.peak_cache_bytes,
        peak_part_weight_bytes=max((p.weight_bytes for p in parts), default=0),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    )


def _prepare(
    model: ir.Model,
    sites: Sequence[WeightSite],
    token_ids: np.ndarray,
    on_block: BlockCallback,
    options: CalibrationOptions,
    on_final: FinalCallback | None = None,
) -> _Run:
    """The run record, after checking everything a caller can get wrong."""
    ids = check_token_ids(token_ids)
    if not sites:
        raise CalibrationError("no weight sites to calibrate")
    names = [s.name for s in sites]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CalibrationError(
            f"weight sites have duplicate names, e.g. {repeated[0]!r}: give each site once"
        )
    specs = tuple(
        feed_specs(model.graph.inputs, folder=options.model_dir, capacities=window_capacities(model.graph))
    )
    providers = tuple(resolve_providers(options.providers))
    return _Run(model, tuple(sites), ids, on_block, options, specs, providers, on_final)


def _check_returned(sites: dict[str, WeightSite], qws: dict[str, QuantizedWeight]) -> None:
    unknown = sorted(set(qws) - set(sites))
    if unknown:
        raise InternalError(f"on_block returned weights for sites not in this block: {unknown}")
    for name, qw in qws.items():
        site = sites[name]
        if (qw.n, qw.k) != (site.n, site.k):
            raise InternalError(
                f"site {name!r}: quantized weight is [N, K] = {[qw.n, qw.k]}, expected {[site.n, site.k]}"
            )


DEQUANT_CHUNK_BYTES = 64 << 20
"""Float32 bytes of the rows dequantized at a time when the quantized weights are written for pass 2."""


def _graph_weights(
    part_model: ir.Model, sites: dict[str, WeightSite], qws: dict[str, QuantizedWeight], folder: Path
) -> dict[str, np.ndarray]:
    """The dequantized codes of the returned sites, in each initializer's layout and dtype, by name: arrays
    mapped from files in ``folder``, written a row chunk at a time (file-backed, not held in memory)."""
    inits = part_model.graph.initializers
    out = {}
    for i, (name, qw) in enumerate(qws.items()):
        site = sites[name]
        value = inits.get(site.weight_name)
        if value is None or value.const_value is None:
            raise InternalError(
                f"weight {site.weight_name!r} of site {name!r} is not an initializer of its block"
            )
        old = value.const_value
        shape = (site.n, site.k) if site.transposed else (site.k, site.n)
        if tuple(old.shape) != shape:
            raise InternalError(f"site {name!r}: graph weight has shape {tuple(old.shape)}, got {shape}")
        arr = np.lib.format.open_memmap(folder / f"{i:05d}.npy", "w+", old.dtype.numpy(), shape)
        for r0, r1 in row_slices(site.n, DEQUANT_CHUNK_BYTES // (4 * site.k)):
            w = qw.rows(r0, r1).dequantize()
            if site.transposed:
                arr[r0:r1] = w
            else:
                arr[:, r0:r1] = w.T
        arr.flush()
        out[site.weight_name] = arr
    return out


# -- one pass over the full model ----------------------------------------------------------------------


def _one_pass(run: _Run, totals: _Totals) -> list[PartReport]:
    """Statistics of every site from the fp model in one session, then one ``on_block`` call."""
    acc = run.accumulator(run.sites)
    graph_inputs = [v.name for v in run.model.graph.inputs if v.name]
    produced = [a for a in acc.activations if a not in graph_inputs]
    sub = extract_part(run.model, graph_inputs, produced, name="calibration")
    rep = PartReport("model", len(run.sites), len(acc.activations), weight_bytes(sub))
    t0 = time.perf_counter()
    sess = open_session(sub, run.providers)
    wanted = {i.name for i in sess.get_inputs()}
    del sub
    hide = not run.options.progress
    for b in tqdm(run.batches, desc="calibration", unit="batch", disable=hide, file=sys.stderr):
        feeds = run.feeds(b)
        values = sess.run(produced, {k: v for k, v in feeds.items() if k in wanted})
        outs = dict(zip(produced, values, strict=True))
        t1 = time.perf_counter()
        for a in acc.activations:
            acc.add(a, outs[a] if a in outs else feeds[a])
        rep.stats_s += time.perf_counter() - t1
    rep.forward_s = time.perf_counter() - t0 - rep.stats_s
    del sess
    release_memory()
    qws = run.quantize(run.sites, acc, rep)
    totals.n_quantized = len(qws)
    run.final(qws)
    return [rep]


# -- block by block ------------------------------------------------------------------------------------


def _sequential(run: _Run, totals: _Totals) -> list[PartReport]:
    """Each part in execution order up to the last one holding sites, caching what later parts read."""
    plan = plan_parts(run.model.graph)
    by_part = _sites_by_part(plan, run.sites)
    last = max(by_part)  # parts after the last one holding sites need not run
    tune = run.options.tune
    caches = _Boundaries({}, {} if tune is not None and tune.float_targets else None)
    reports: list[PartReport] = []
    bar = tqdm(
        total=last + 1,
        desc="calibration",
        unit="part",
        disable=not run.options.progress,
        file=sys.stderr,
        leave=False,
    )
    with bar:
        for part in plan.parts[: last + 1]:
            bar.set_postfix_str(part.label)
            reports.append(_run_part(run, part, by_part.get(part.index, []), caches, totals))
            totals.peak_cache_bytes = max(totals.peak_cache_bytes, caches.nbytes())
            caches.drop_read(plan, part.index)
            bar.update(1)
    return reports


@dataclasses.dataclass
class _Boundaries:
    """What later parts read: the quantized model's boundary values and, when block tuning fits the
    float model, the float model's own (``None`` otherwise)."""

    quantized: Cache
    floats: Cache | None = None

    def _all(self) -> list[Cache]:
        return [self.quantized] if self.floats is None else [self.quantized, self.floats]

    def nbytes(self) -> int:
        return sum(a.nbytes for c in self._all() for v in c.values() for a in v)

    def drop_read(self, plan: PartPlan, index: int) -> None:
        """Forget the values no part after ``index`` reads."""
        for c in self._all():
            for name in [k for k in c if plan.last_reader.get(k, -1) <= index]:
                del c[name]


def _sites_by_part(plan: PartPlan, sites: Sequence[WeightSite]) -> dict[int, list[WeightSite]]:
    by_part: dict[int, list[WeightSite]] = {}
    for s in sites:
        part = plan.part_of_node(s.node_name)
        if part is None:
            raise CalibrationError(f"weight site {s.name!r}: node {s.node_name!r} is not in the model")
        by_part.setdefault(part.index, []).append(s)
    return by_part


def _run_part(
    run: _Run, part: Part, sites: list[WeightSite], caches: _Boundaries, totals: _Totals
) -> PartReport:
    """Statistics of ``part``'s sites, ``on_block``, and the part's outputs (with the quantized weights
    when some came back) stored in ``caches.quantized`` for the parts after it; with ``caches.floats``,
    what the float model computes there too (from the float values), stored there."""
    cache, floats = caches.quantized, caches.floats
    acc = run.accumulator(sites)
    produced = [a for a in acc.activations if a not in part.inputs]
    outputs = list(part.outputs)
    rep = PartReport(part.label, len(sites), len(acc.activations), 0)
    if not outputs and not sites:
        return rep  # nothing downstream reads it
    t_build = time.perf_counter()
    # without outputs or produced activations, the part's activations are all cached inputs: no session
    sub = _extract(run, part, cache, outputs + produced, rep) if outputs or produced else None
    rep.forward_s = time.perf_counter() - t_build

    # Pass 1: fp weights of this part; activations -> H, boundary outputs kept in case nothing changes.
    t0 = time.perf_counter()
    sess = None if sub is None else open_session(sub, run.providers)
    boundary = _forward(run, sess, part, cache, outputs, produced, acc, rep)
    targets = boundary if floats is None else _float_outputs(run, sess, part, cache, floats, boundary, rep)
    del sess  # its arena (attention scores of a whole batch) is the largest transient allocation
    release_memory()
    rep.forward_s += time.perf_counter() - t0 - rep.stats_s
    qws = run.quantize(sites, acc, rep) if sites else {}
    totals.n_quantized += len(qws)
    if qws and boundary and part.layer is not None and run.options.tune is not None:
        qws = _tuned(run, sub, part, sites, qws, cache, targets, rep)
    run.final(qws)
    if floats is not None:
        floats.update(zip(outputs, targets, strict=True))
    del targets
    if qws and outputs and sub is not None:  # ``outputs`` implies ``sub``
        del boundary  # replaced by what the quantized block computes
        boundary = _requantized(run, sub, part, sites, qws, cache, outputs, rep)
    cache.update(zip(outputs, boundary, strict=True))
    return rep


def _float_outputs(
    run: _Run,
    sess: ort.InferenceSession | None,
    part: Part,
    cache: Cache,
    floats: Cache,
    boundary: list[list[np.ndarray]],
    rep: PartReport,
) -> list[list[np.ndarray]]:
    """The part's boundary outputs on the float model's values: ``boundary`` itself while no earlier part
    was quantized (the same arrays in both caches), else one more run of the float-weight session."""
    if sess is None or all(floats.get(n) is cache.get(n) for n in part.inputs):
        return boundary
    return _forward(run, sess, part, floats, list(part.outputs), [], None, rep)


def _tuned(
    run: _Run,
    sub: ir.Model,
    part: Part,
    sites: list[WeightSite],
    qws: dict[str, QuantizedWeight],
    cache: Cache,
    targets: list[list[np.ndarray]],
    rep: PartReport,
) -> dict[str, QuantizedWeight]:
    """``qws`` refined so that the part's boundary outputs (the block's hidden state), computed from the
    cached inputs, match ``targets`` (per output, per batch); a part the tuner cannot run keeps ``qws``
    (the reason is logged)."""
    wanted = [v.name for v in sub.graph.inputs]
    feeds = [{n: _feed(part, cache, bi, run.feeds(b), n) for n in wanted} for bi, b in enumerate(run.batches)]
    try:
        tuned, rep.tune = tune_block(
            sub.graph, sites, qws, feeds, list(zip(*targets, strict=True)), run.options.tune
        )
    except (UnsupportedGraphError, NothingToTuneError) as e:
        logger.warning("%s: not tuned (%s)", part.label, e)
        return qws
    logger.info("%s: tuned, held-out output error %.4g -> %.4g (%s)", part.label, rep.tune["error_before"],
                rep.tune["error_after"], "kept" if tuned is not qws else "not kept")  # fmt: skip
    return tuned


def _extract(run: _Run, part: Part, cache: Cache, fetch: list[str], rep: PartReport) -> ir.Model:
    """The part as a model computing ``fetch``, its boundary inputs typed like the cached tensors."""
    examples = {k: v[0] for k, v in cache.items()}
    sub = extract_part(run.model, part.inputs, fetch, examples, name=part.label)
    rep.weight_bytes = weight_bytes(sub)
    return sub


def _requantized(
    run: _Run,
    sub: ir.Model,
    part: Part,
    sites: list[WeightSite],
    qws: dict[str, QuantizedWeight],
    cache: Cache,
    outputs: list[str],
    rep: PartReport,
) -> list[list[np.ndarray]]:
    """Pass 2: the part's boundary outputs with its sites' weights replaced by the dequantized codes, so
    the next part sees what the quantized block computes."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(
        prefix="adaround-requant-", dir=run.options.stats_dir, ignore_cleanup_errors=True
    ) as tmp:
        weights = _graph_weights(sub, {s.name: s for s in sites}, qws, Path(tmp))
        sess = open_session(sub, run.providers, weights)
        del weights  # the session maps its own file; the part keeps the arrays (file-backed) until it goes
    boundary = _forward(run, sess, part, cache, outputs, [], None, rep)
    del sess
    release_memory()
    rep.requant_s = time.perf_counter() - t0
    return boundary


def _forward(
    run: _Run,
    sess: ort.InferenceSession | None,
    part: Part,
    cache: Cache,
    outputs: list[str],
    produced: list[str],
    acc: HessianAccumulator | None,
    rep: PartReport,
) -> list[list[np.ndarray]]:
    """Run the part over every batch, feeding ``acc`` (if given) with the activations of its sites.

    Returns the boundary ``outputs``, per output name, per batch. Activations that are inputs of the
    part (e.g. the hidden state an lm_head reads) come from the cache, not from the session.
    """
    wanted = [] if sess is None else [i.name for i in sess.get_inputs()]
    fetch = outputs + produced
    kept: list[list[np.ndarray]] = [[] for _ in outputs]
    for bi, b in enumerate(run.batches):
        feed = functools.partial(_feed, part, cache, bi, run.feeds(b))
        res = sess.run(fetch, {n: feed(n) for n in wanted}) if sess is not None else []
        for j in range(len(outputs)):
            # a copy: the array onnxruntime returns can pin its session's whole memory arena
            kept[j].append(np.array(res[j], copy=True))
        if acc is not None:
            t0 = time.perf_counter()
            _add_activations(acc, produced, res[len(outputs) :], feed)
            rep.stats_s += time.perf_counter() - t0
    return kept


def _feed(part: Part, cache: Cache, bi: int, graph_feeds: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Input ``name`` of ``part`` for batch ``bi``: the cached boundary value, else the graph's own feed."""
    if name in cache:
        return cache[name][bi]
    if name in graph_feeds:
        return graph_feeds[name]
    raise InternalError(f"{part.label}: no feed for input {name!r}")


def _add_activations(
    acc: HessianAccumulator,
    produced: list[str],
    values: Sequence[np.ndarray],
    feed: Callable[[str], np.ndarray],
) -> None:
    """One batch into ``acc``: ``values`` of the ``produced`` activations, the others through ``feed``."""
    for a in acc.activations:  # inputs of the part first: they come earlier in the graph
        if a not in produced:
            acc.add(a, feed(a))
    for a, x in zip(produced, values, strict=True):
        acc.add(a, x)
