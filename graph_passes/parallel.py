"""Rounding a block's sites in worker processes.

The calibrated methods spend most of their time in thousands of small torch ops per site (GPTQ's column
loop, AdaRound's steps): they hold the GIL, so threads gain little (measured on SmolLM2-shaped sites with 2
cores: 1.14x for GPTQ, 1.35x for AdaRound), while the sites of one decoder block are independent given
their statistics. Worker processes (spawned, one torch thread each) round them side by side; the main
process reads weights, packs and records in site order, so the output is the same bytes as a serial run.
A worker gets the method's config (a small frozen record) with each site and builds the method from it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import InvalidOptionError
from .memory import release_memory
from .records import QuantizedWeight, WeightSite
from .rounding.base import MethodConfig, SiteStats, build_method
from .scheme import QuantScheme

__all__ = [
    "AUTO_MIN_WEIGHTS",
    "MAX_AUTO_WORKERS",
    "Mapped",
    "in_order",
    "mapped",
    "mapped_stats",
    "resolve_workers",
    "result_of",
    "round_site",
    "rounding_pool",
]

AUTO_MIN_WEIGHTS = 16_000_000
"""``workers=None`` starts worker processes only for models with at least this many weights to round:
starting them costs a few seconds (interpreter + torch import), which small models do not win back."""
MAX_AUTO_WORKERS = 4
"""``workers=None`` uses at most this many (each holds its own torch and a copy of one site's inputs)."""

_SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

_log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Future | Callable[[], object]


def resolve_workers(workers: int | None, sites: Sequence[WeightSite], cpu_count: int | None = None) -> int:
    """The number of rounding processes: ``workers`` as given (1 = round in this process), or for None
    one per CPU (at most ``MAX_AUTO_WORKERS``) when the sites hold ``AUTO_MIN_WEIGHTS`` weights or more."""
    if workers is not None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise InvalidOptionError(f"workers={workers!r}: use a positive integer (1 = no worker processes)")
        return workers
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if sum(s.n * s.k for s in sites) < AUTO_MIN_WEIGHTS:
        return 1
    return max(1, min(cpus, MAX_AUTO_WORKERS))


def round_site(
    config: MethodConfig,
    weight: np.ndarray | Mapped,
    scheme: QuantScheme,
    stats: SiteStats | None,
    name: str,
    memory: int | None = None,
) -> tuple[QuantizedWeight, float]:
    """The method of ``config`` applied to one site within ``memory`` bytes, and its wall time (module
    level, so a worker process can run it). ``weight`` and the statistics' arrays may be ``Mapped``."""
    t0 = time.perf_counter()
    bound = {} if memory is None else {"memory": memory}  # methods without a footprint take no budget
    qw = build_method(config).quantize(_opened(weight), scheme, _opened_stats(stats), site=name, **bound)
    release_memory()  # a worker idles while the next block calibrates: not on the site's freed arrays
    return qw, time.perf_counter() - t0


SPILL_BYTES = 8 << 20
"""Arrays from this size go to a worker as a memory-mapped file rather than a pickled copy."""


@dataclasses.dataclass(frozen=True)
class Mapped:
    """An array in a ``.npy`` file that a worker process reads through a read-only memory map: one copy
    in the page cache, shared by every worker, instead of a private copy per worker."""

    path: str

    def open(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="c")  # copy-on-write: writable views, no copy until written


def _opened(a: np.ndarray | Mapped) -> np.ndarray:
    return a.open() if isinstance(a, Mapped) else a


def _opened_stats(stats: SiteStats | None) -> SiteStats | None:
    if stats is None or not (
        isinstance(stats.hessian, Mapped) or any(isinstance(v, Mapped) for v in stats.extra.values())
    ):
        return stats
    return SiteStats(_opened(stats.hessian), stats.n_tokens, {k: _opened(v) for k, v in stats.extra.items()})  # type: ignore[arg-type]


def _whole_npy(a: np.ndarray) -> bool:
    """Whether ``a`` is a memory map of a whole ``.npy`` file (header, then exactly these C-order data)."""
    name = getattr(a, "filename", None)
    if not isinstance(a, np.memmap) or name is None or not str(name).endswith(".npy"):
        return False
    return a.flags.c_contiguous and a.offset > 0 and a.offset + a.nbytes == os.path.getsize(name)


def mapped(a: np.ndarray, path: Path) -> np.ndarray | Mapped:
    """``a`` written to ``path`` as a ``Mapped`` array when it is ``SPILL_BYTES`` or larger, else ``a``
    (an array that is a whole ``.npy`` file already, such as a wide Hessian sum, is referred to as is)."""
    if _whole_npy(a):
        a.flush()  # type: ignore[union-attr]
        return Mapped(str(a.filename))  # type: ignore[union-attr]
    if a.nbytes < SPILL_BYTES:
        return a
    np.save(path, a, allow_pickle=False)
    return Mapped(str(path))


def mapped_stats(stats: SiteStats, stem: Path) -> SiteStats:
    """``stats`` with its large arrays written next to ``stem`` as ``Mapped`` arrays."""
    hessian = None if stats.hessian is None else mapped(stats.hessian, stem.with_suffix(".h.npy"))
    extra = {k: mapped(v, stem.with_suffix(f".{i}.npy")) for i, (k, v) in enumerate(stats.extra.items())}
    return SiteStats(hessian, stats.n_tokens, extra)  # type: ignore[arg-type]


def _ready() -> int:
    return os.getpid()


@contextlib.contextmanager
def rounding_pool(workers: int) -> Iterator[Executor | None]:
    """A pool of ``workers`` spawned processes with one BLAS/OpenMP thread each, or None for 1.

    Spawned, not forked: the parent already runs onnxruntime and torch thread pools, which a fork would
    copy in an unusable state. The workers start in the background while the caller goes on. A daemonic
    process (a ``multiprocessing.Pool`` worker, say) may not start children, so there the sites are rounded
    in-process, with a warning: the output bytes do not depend on it.
    """
    if workers > 1 and multiprocessing.current_process().daemon:
        _log.warning(
            "workers=%d ignored: this is a daemonic process, which cannot start workers; rounding in-process",
            workers,
        )
        workers = 1
    if workers <= 1:
        yield None
        return
    saved = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
    os.environ.update({k: "1" for k in _SINGLE_THREAD_ENV})  # read by the children as they start
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(_ready)  # starts every worker now (Python starts all of a spawn pool on first submit)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def in_order(items: Iterable[T], submit: Callable[[T], Job], window: int) -> Iterator[tuple[T, Job]]:
    """Yield ``(item, job)`` in the order of ``items``, with at most ``window`` jobs submitted and not yet
    handed out. ``submit(item)`` returns a Future or a zero-argument callable; get the result with
    :func:`result_of` (a callable then runs, in order)."""
    pending: collections.deque[tuple[T, Job]] = collections.deque()
    for item in items:
        pending.append((item, submit(item)))
        if len(pending) >= max(window, 1):
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def result_of(job: Job) -> object:
    """The result of a job from :func:`in_order` (raises what the job raised)."""
    return job.result() if isinstance(job, Future) else job()
