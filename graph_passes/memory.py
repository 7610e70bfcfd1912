"""The memory budget of the rounding: how many sites round at once, and how much each may hold.

A run's budget (``max_memory``, default: what the process tree holds when the run starts plus 90% of the
machine's available memory) covers the whole process tree: this process (model, calibration statistics)
and the rounding workers. Before each decoder block is rounded, the tree's anonymous memory is measured;
what is left is shared among the sites rounded at once, and each method sizes its row chunks to its share
(``MethodConfig.rows_within``). Anonymous memory (``RssAnon``) is what the processes allocate; the weights
and statistics the workers read through memory-mapped files are file-backed pages the kernel may drop.
Calibration, which runs between the blocks' rounding, is kept small rather than planned: its onnxruntime
sessions map the part's weights, and it holds one batch's activations and a bounded ``X^T X`` block
(``calibration/``); idle workers give their freed heap back (``release_memory``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from collections.abc import Sequence

from .errors import UserError
from .records import WeightSite
from .rounding.base import MethodConfig

__all__ = ["GB", "RoundingPlan", "default_budget", "plan_rounding", "release_memory", "tree_anon_bytes"]

GB = 1_000_000_000
DEFAULT_SHARE = 0.9
"""Of the machine's available memory, the share a run takes by default (the rest is left to others)."""


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith(key)), 0)
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def tree_anon_bytes(pid: int | None = None) -> int:
    """Anonymous memory (``RssAnon``) of ``pid`` (default: this process) and its descendants, in bytes;
    the resident set size where ``/proc`` does not say (not Linux)."""
    root = os.getpid() if pid is None else pid
    if _status_kb(root, "RssAnon:") is None:
        import psutil

        proc = psutil.Process(root)
        return int(proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True)))
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += 1024 * (_status_kb(p, "RssAnon:") or 0)
        todo += _children(p)
    return total


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
    """Give freed heap pages back to the OS. glibc keeps them otherwise: a dropped onnxruntime session's
    arena (+0.5 GB per block on SmolLM2 with 8x512-token batches, accumulating over the first blocks), a
    rounded site's work arrays in a worker that then idles while the next block calibrates."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def default_budget() -> int:
    """What the tree holds now plus ``DEFAULT_SHARE`` of the memory the machine has available."""
    import psutil

    return tree_anon_bytes() + int(DEFAULT_SHARE * psutil.virtual_memory().available)


@dataclasses.dataclass(frozen=True)
class RoundingPlan:
    """Sites rounded at once, and the bytes each may hold (None: no bound)."""

    concurrent: int
    memory: int | None


def site_need(method: MethodConfig, site: WeightSite) -> int:
    """The least a site needs to round: its fixed bytes and one smallest row chunk."""
    return method.fixed_bytes(site.n, site.k) + int(method.row_bytes * site.k * method.row_align)


def plan_rounding(
    budget: int | None, held: int, sites: Sequence[WeightSite], method: MethodConfig, workers: int
) -> RoundingPlan:
    """How many of ``sites`` round at once (at most ``workers``) and the bytes each may hold, so that
    ``held`` plus their needs stay within ``budget`` bytes. A budget too small for the largest site alone
    is a one-line error naming it."""
    if budget is None or not sites or method.row_bytes <= 0:
        return RoundingPlan(max(min(workers, len(sites)), 1), None)
    largest = max(sites, key=lambda s: site_need(method, s))
    need = site_need(method, largest)
    free = budget - held
    if free < need:
        raise UserError(
            f"max_memory={budget / GB:.2f} GB is too small: the run holds {held / GB:.2f} GB and "
            f"{largest.name} ([{largest.n}, {largest.k}], {method.name}) needs at least {need / GB:.2f} GB "
            "more to round; raise --max-memory"
        )
    concurrent = int(max(1, min(workers, len(sites), free // need)))
    return RoundingPlan(concurrent, free // concurrent)
