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

import ctypes
import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from ..errors import CalibrationError, InternalError
from ..records import QuantizedWeight, WeightSite
from ..rounding.base import SiteStats
from .blocks import Part, extract_part, plan_parts
from .feeds import check_token_ids, feed_specs, make_feeds
from .stats import HessianAccumulator, Precision

__all__ = ["BlockCallback", "CalibrationReport", "PartReport", "resolve_providers", "run_calibration"]

logger = logging.getLogger(__name__)

BlockCallback = Callable[[list[WeightSite], dict[str, SiteStats]], dict[str, QuantizedWeight]]

# Above this, a part is handed to onnxruntime through a temporary file with external data (protobuf's
# 2 GiB message limit).
_INLINE_LIMIT = 1 << 30


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
    """CPU time of the process over the run (all threads); on a shared machine ``seconds`` can be far more."""

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


def _release_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps a dropped session's arena otherwise: +0.5 GB per
    block on SmolLM2 with 8x512-token batches, accumulating over the first blocks)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


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


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


class _PartSessions:
    """Opens onnxruntime sessions of one extracted part, first with its own weights, then with replacements.

    Replacements are written into the part (a clone sharing the caller's tensors, so the caller's model is
    untouched) and the part is serialized again. Not ``SessionOptions.add_initializer``: onnxruntime 1.31
    constant-folds from the model's initializer, so a weight reached through a Transpose (tied lm_head,
    Gemm exports) would silently keep its float values.
    """

    def __init__(self, model: ir.Model, providers: Sequence[str]) -> None:
        self.model = model
        self.providers = list(providers)

    def open(self, weights: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
        inits = self.model.graph.initializers
        for name, arr in (weights or {}).items():
            inits[name].const_value = ir.tensor(arr, name=name)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if _weight_bytes(self.model) < _INLINE_LIMIT:
            return ort.InferenceSession(
                ir.to_proto(self.model).SerializeToString(), opts, providers=self.providers
            )
        # protobuf's 2 GiB limit: go through a file with external data
        with tempfile.TemporaryDirectory(prefix="adaround-calib-") as tmp:
            path = Path(tmp) / "part.onnx"
            ir.save(self.model, path, external_data="part.onnx.data")
            return ort.InferenceSession(str(path), opts, providers=self.providers)


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


def _graph_weights(
    part_model: ir.Model, sites: dict[str, WeightSite], qws: dict[str, QuantizedWeight]
) -> dict[str, np.ndarray]:
    """The dequantized codes of the returned sites, in each initializer's layout and dtype, by name."""
    inits = part_model.graph.initializers
    out = {}
    for name, qw in qws.items():
        site = sites[name]
        value = inits.get(site.weight_name)
        if value is None or value.const_value is None:
            raise InternalError(
                f"weight {site.weight_name!r} of site {name!r} is not an initializer of its block"
            )
        old = value.const_value
        w = qw.dequantize()
        arr = np.ascontiguousarray(w if site.transposed else w.T, dtype=old.dtype.numpy())
        if tuple(old.shape) != arr.shape:
            raise InternalError(f"site {name!r}: graph weight has shape {tuple(old.shape)}, got {arr.shape}")
        out[site.weight_name] = arr
    return out


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def run_calibration(
    model: ir.Model,
    sites: Sequence[WeightSite],
    token_ids: np.ndarray,
    on_block: BlockCallback,
    *,
    sequential: bool = True,
    batch_size: int = 8,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: bool = True,
    hessian_precision: Precision = "float64",
    fp_target: bool = False,
) -> CalibrationReport:
    """Gather ``H = sum X^T X`` per activation of ``sites`` on ``token_ids`` and call ``on_block``.

    Sequential (default): ``on_block(block_sites, stats)`` once per part that holds sites, in execution
    order; the returned weights (dequantized) replace that block's weights before the next block's inputs
    are computed. One-pass (``sequential=False``): one run of the full fp model, then a single
    ``on_block(all_sites, stats)``. ``stats`` is keyed by site name; sites sharing an activation share one
    ``SiteStats``. ``model`` is not modified. ``hessian_precision="float32"`` halves the cost of the
    per-batch ``X^T X`` (the sum stays float64; see ``stats.py``).

    ``fp_target=True`` (sequential mode) also runs each block on the full-precision model's boundary
    tensors and hands every site ``extra[FP_CROSS] = sum X_q^T X_fp`` (``stats.py``), for methods that
    match the fp model's output rather than the layer's own (one more onnxruntime run per block and one
    more cached copy of the boundary tensors once a block has been quantized).
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    ids = check_token_ids(token_ids)
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
    if not sites:
        raise CalibrationError("no weight sites to calibrate")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise InternalError("weight sites have duplicate names")
    specs = feed_specs(model.graph.inputs)
    provs = resolve_providers(providers)
    batches = _batches(ids.shape[0], batch_size)
    n, t = ids.shape
    HessianAccumulator([], hessian_precision)  # validate the option before any work
    run = _Run(
        model, list(sites), ids, specs, batches, provs, on_block, progress, hessian_precision, fp_target
    )
    parts = run.sequential() if sequential else run.one_pass()
    report = CalibrationReport(
        sequential=sequential,
        n_sequences=n,
        seq_len=t,
        n_tokens=n * t,
        batch_size=batch_size,
        providers=provs,
        parts=parts,
        n_activations=len({s.activation for s in sites}),
        n_quantized=run.n_quantized,
        peak_cache_bytes=run.peak_cache_bytes,
        peak_part_weight_bytes=run.peak_part_weight_bytes,
        seconds=time.perf_counter() - t_start,
        cpu_seconds=time.process_time() - cpu_start,
    )
    logger.info("%s", report.summary())
    return report


class _Run:
    """State of one calibration run (kept out of the public signature)."""

    def __init__(
        self, model, sites, ids, specs, batches, providers, on_block, progress, precision, fp_target=False
    ) -> None:
        self.model: ir.Model = model
        self.sites: list[WeightSite] = sites
        self.ids: np.ndarray = ids
        self.specs = specs
        self.batches: list[slice] = batches
        self.providers: list[str] = providers
        self.on_block: BlockCallback = on_block
        self.progress: bool = progress
        self.precision: Precision = precision
        self.n_quantized = 0
        self.peak_cache_bytes = 0
        self.peak_part_weight_bytes = 0
        self.fp_target: bool = fp_target
        # The fp model's boundary tensors, once they differ from ``cache`` (after the first quantized block);
        # until then both paths are the same tensors and ``fp_cache`` is empty.
        self.fp_cache: dict[str, list[np.ndarray]] = {}
        self.diverged = False

    def _feeds(self, b: slice) -> dict[str, np.ndarray]:
        return make_feeds(self.specs, self.ids[b])

    def _bar(self, total: int, desc: str):
        return tqdm(
            total=total, desc=desc, unit="part", disable=not self.progress, file=sys.stderr, leave=False
        )

    # -- one pass over the full model ----------------------------------------------------------------
    def one_pass(self) -> list[PartReport]:
        acc = HessianAccumulator(self.sites, self.precision)
        graph_inputs = [v.name for v in self.model.graph.inputs if v.name]
        produced = [a for a in acc.activations if a not in graph_inputs]
        sub = extract_part(self.model, graph_inputs, produced, name="calibration")
        rep = PartReport("model", len(self.sites), len(acc.activations), _weight_bytes(sub))
        self.peak_part_weight_bytes = rep.weight_bytes
        t0 = time.perf_counter()
        sess = _PartSessions(sub, self.providers).open()
        wanted = {i.name for i in sess.get_inputs()}
        del sub
        for b in tqdm(
            self.batches, desc="calibration", unit="batch", disable=not self.progress, file=sys.stderr
        ):
            feeds = self._feeds(b)
            outs = dict(
                zip(
                    produced, sess.run(produced, {k: v for k, v in feeds.items() if k in wanted}), strict=True
                )
            )
            t1 = time.perf_counter()
            for a in acc.activations:
                acc.add(a, outs[a] if a in outs else feeds[a])
            rep.stats_s += time.perf_counter() - t1
        rep.forward_s = time.perf_counter() - t0 - rep.stats_s
        del sess
        _release_memory()
        t2 = time.perf_counter()
        qws = self._call(self.sites, acc)
        rep.callback_s = time.perf_counter() - t2
        _check_returned({s.name: s for s in self.sites}, qws)
        self.n_quantized = len(qws)
        return [rep]

    def _call(self, sites: list[WeightSite], acc: HessianAccumulator) -> dict[str, QuantizedWeight]:
        out = self.on_block(list(sites), acc.by_site(sites))
        return dict(out or {})

    # -- block by block ------------------------------------------------------------------------------
    def sequential(self) -> list[PartReport]:
        plan = plan_parts(self.model.graph)
        by_part: dict[int, list[WeightSite]] = {}
        for s in self.sites:
            part = plan.part_of_node(s.node_name)
            if part is None:
                raise CalibrationError(f"weight site {s.name!r}: node {s.node_name!r} is not in the model")
            by_part.setdefault(part.index, []).append(s)
        last = max(by_part)  # parts after the last one holding sites need not run
        cache: dict[str, list[np.ndarray]] = {}
        reports: list[PartReport] = []
        with self._bar(last + 1, "calibration") as bar:
            for part in plan.parts[: last + 1]:
                bar.set_postfix_str(part.label)
                reports.append(self._run_part(part, by_part.get(part.index, []), cache))
                size = sum(a.nbytes for c in (cache, self.fp_cache) for v in c.values() for a in v)
                self.peak_cache_bytes = max(self.peak_cache_bytes, size)
                for name in [k for k in cache if plan.last_reader.get(k, -1) <= part.index]:
                    del cache[name]
                    self.fp_cache.pop(name, None)
                bar.update(1)
        return reports

    def _run_part(
        self, part: Part, sites: list[WeightSite], cache: dict[str, list[np.ndarray]]
    ) -> PartReport:
        acc = HessianAccumulator(sites, self.precision, cross=self.fp_target)
        produced = [a for a in acc.activations if a not in part.inputs]
        outputs = list(part.outputs)
        rep = PartReport(part.label, len(sites), len(acc.activations), 0)
        if not outputs and not sites:
            return rep  # nothing downstream reads it
        t_build = time.perf_counter()
        sub = None
        if outputs or produced:  # else the part's activations are all cached inputs: no session needed
            examples = {k: v[0] for k, v in cache.items()}
            sub = extract_part(self.model, part.inputs, outputs + produced, examples, name=part.label)
            rep.weight_bytes = _weight_bytes(sub)
            self.peak_part_weight_bytes = max(self.peak_part_weight_bytes, rep.weight_bytes)

        builder = None if sub is None else _PartSessions(sub, self.providers)
        rep.forward_s = time.perf_counter() - t_build
        return self._passes(part, sites, cache, sub, builder, acc, outputs, produced, rep)

    def _passes(
        self,
        part: Part,
        sites: list[WeightSite],
        cache: dict[str, list[np.ndarray]],
        sub: ir.Model | None,
        builder: _PartSessions | None,
        acc: HessianAccumulator,
        outputs: list[str],
        produced: list[str],
        rep: PartReport,
    ) -> PartReport:
        # Pass 1: fp weights of this part; activations -> H, boundary outputs kept in case nothing changes.
        # With fp_target (after the first quantized block) the same session also runs on the fp model's
        # boundary tensors: its activations give sum X_q^T X_fp, its outputs the fp path's next inputs.
        t0 = time.perf_counter()
        sess = None if builder is None else builder.open()
        two_paths = self.fp_target and self.diverged
        fp_outputs, fp_path = self._forward(
            sess, part, cache, outputs, produced, acc, rep, self.fp_cache if two_paths else None
        )
        del sess  # its arena (attention scores of a whole batch) is the largest transient allocation
        _release_memory()
        rep.forward_s += time.perf_counter() - t0 - rep.stats_s
        if two_paths:
            assert fp_path is not None
            self._store(self.fp_cache, outputs, fp_path)
        if not sites:
            self._store(cache, outputs, fp_outputs)
            return rep

        t1 = time.perf_counter()
        qws = self._call(sites, acc)
        rep.callback_s = time.perf_counter() - t1
        self.n_quantized += len(qws)
        _check_returned({s.name: s for s in sites}, qws)
        if qws and outputs:
            # Pass 2: the next part must see what the quantized block computes.
            assert sub is not None
            t2 = time.perf_counter()
            if self.fp_target and not self.diverged:
                self._store(self.fp_cache, outputs, fp_outputs)  # from here on the two paths differ
                self.diverged = True
            del fp_outputs
            assert builder is not None
            sess = builder.open(_graph_weights(sub, {s.name: s for s in sites}, qws))
            self._store(cache, outputs, self._forward(sess, part, cache, outputs, [], None, rep)[0])
            del sess
            _release_memory()
            rep.requant_s = time.perf_counter() - t2
        else:
            self._store(cache, outputs, fp_outputs)
        return rep

    def _forward(
        self,
        sess: ort.InferenceSession | None,
        part: Part,
        cache: dict[str, list[np.ndarray]],
        outputs: list[str],
        produced: list[str],
        acc: HessianAccumulator | None,
        rep: PartReport,
        fp_cache: dict[str, list[np.ndarray]] | None = None,
    ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]] | None]:
        """Run the part over every batch, feeding ``acc`` (if given) with the activations of its sites.

        Returns the boundary ``outputs``, per output name, per batch. Activations that are inputs of the
        part (e.g. the hidden state an lm_head reads) come from the cache, not from the session. With
        ``fp_cache`` (the fp model's boundary tensors, where they differ from ``cache``), each batch runs
        a second time on those: the activations pair up in ``acc`` and the second run's outputs are
        returned too (else None).
        """
        wanted = [] if sess is None else [i.name for i in sess.get_inputs()]
        fetch = outputs + produced
        kept: list[list[np.ndarray]] = [[] for _ in outputs]
        kept_fp: list[list[np.ndarray]] | None = None if fp_cache is None else [[] for _ in outputs]
        for bi, b in enumerate(self.batches):
            graph_feeds = self._feeds(b)

            def feed(
                name: str,
                path: dict[str, list[np.ndarray]] = cache,
                bi: int = bi,
                graph_feeds: dict[str, np.ndarray] = graph_feeds,
            ) -> np.ndarray:
                for c in (path, cache):  # the fp path shares the tensors it has no copy of
                    if name in c:
                        return c[name][bi]
                if name in graph_feeds:
                    return graph_feeds[name]
                raise InternalError(f"{part.label}: no feed for input {name!r}")

            res = sess.run(fetch, {n: feed(n) for n in wanted}) if sess is not None else []
            res_fp: list[np.ndarray] | None = None
            if fp_cache is not None and kept_fp is not None:
                res_fp = sess.run(fetch, {n: feed(n, fp_cache) for n in wanted}) if sess is not None else []
                for j in range(len(outputs)):
                    kept_fp[j].append(np.array(res_fp[j], copy=True))
            for j in range(len(outputs)):
                # a copy: the array onnxruntime returns can pin its session's whole memory arena
                kept[j].append(np.array(res[j], copy=True))
            if acc is not None:
                t0 = time.perf_counter()
                for a in acc.activations:  # inputs of the part first: they come earlier in the graph
                    if a not in produced:
                        acc.add(a, feed(a), None if fp_cache is None else feed(a, fp_cache))
                for i, (a, x) in enumerate(zip(produced, res[len(outputs) :], strict=True)):
                    acc.add(a, x, None if res_fp is None else res_fp[len(outputs) + i])
                rep.stats_s += time.perf_counter() - t0
        return kept, kept_fp

    @staticmethod
    def _store(
        cache: dict[str, list[np.ndarray]], outputs: list[str], values: list[list[np.ndarray]]
    ) -> None:
        cache.update(zip(outputs, values, strict=True))
