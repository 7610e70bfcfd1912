"""Budgeted choice of one option per unit (a multiple-choice knapsack).

Used to pick a quantization format per group of weight sites: the total stored bytes must stay within a
budget while the summed predicted loss increase is minimal.

Method: dynamic programming over the units, with bytes discretised into at most ``resolution`` cells of
``u = ceil(budget / resolution)`` bytes (``u = 1`` when ``budget <= resolution``, which makes the result
exact). Each option's bytes are rounded *up* to whole cells and the capacity *down*, so anything the DP
finds fits the real budget. Rounding up can make tight allocations look infeasible, so a greedy pass then
spends the real bytes left: it repeatedly applies the single-unit change with the best cost decrease per
extra byte that still fits, until none helps. If the DP finds nothing but every unit's smallest option
fits, the greedy pass starts from that allocation.

Ties prefer fewer bytes, then the lower index, so the result is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

from ..errors import InternalError, UserError

__all__ = ["AllocationError", "Choice", "allocate"]


class AllocationError(UserError):
    """The allocation problem is malformed or infeasible (no options, bad sizes or costs, budget too small)."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """One option for a unit: what it is called, the bytes it stores and its predicted loss increase."""

    label: str
    nbytes: int
    cost: float


@dataclasses.dataclass(frozen=True)
class _Tables:
    """Units padded to a rectangle: ``nbytes``/``cost`` are ``[units, options]``; ``valid`` marks real options."""

    nbytes: np.ndarray
    cost: np.ndarray
    valid: np.ndarray


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _validate(units: Sequence[Sequence[Choice]], budget: int, resolution: int) -> None:
    """Raise AllocationError on anything the DP cannot take; the budget check comes last (needs sizes)."""
    if not _is_int(resolution) or resolution < 1:
        raise AllocationError(f"resolution must be an integer >= 1, got {resolution!r}")
    if not _is_int(budget):
        raise AllocationError(f"budget must be an integer number of bytes, got {budget!r}")
    if len(units) == 0:
        raise AllocationError("no units to allocate: give at least one unit with at least one option")
    for i, unit in enumerate(units):
        if len(unit) == 0:
            raise AllocationError(f"unit {i} has no options: give it at least one Choice")
        for j, c in enumerate(unit):
            if not _is_int(c.nbytes) or c.nbytes < 0:
                raise AllocationError(
                    f"unit {i} option {j} ({c.label!r}) has nbytes {c.nbytes!r}: must be an integer >= 0"
                )
            if not math.isfinite(float(c.cost)):
                raise AllocationError(f"unit {i} option {j} ({c.label!r}) has non-finite cost {c.cost!r}")
    smallest = sum(min(int(c.nbytes) for c in unit) for unit in units)
    if budget < smallest:
        raise AllocationError(f"budget {budget} bytes is below the smallest allocation {smallest} bytes")


def _tables(units: Sequence[Sequence[Choice]]) -> _Tables:
    width = max(len(unit) for unit in units)
    nbytes = np.zeros((len(units), width), dtype=np.int64)
    cost = np.full((len(units), width), np.inf)
    valid = np.zeros((len(units), width), dtype=bool)
    for i, unit in enumerate(units):
        nbytes[i, : len(unit)] = [int(c.nbytes) for c in unit]
        cost[i, : len(unit)] = [float(c.cost) for c in unit]
        valid[i, : len(unit)] = True
    return _Tables(nbytes, cost, valid)


def _least_cost(t: _Tables) -> np.ndarray:
    """Per unit, the least-cost option (ties: fewer bytes, then lower index): the unconstrained optimum."""
    idx = np.arange(t.cost.shape[1])
    return np.array([np.lexsort((idx, t.nbytes[i], t.cost[i]))[0] for i in range(t.cost.shape[0])])


def _smallest(t: _Tables) -> np.ndarray:
    """Per unit, the option with the fewest bytes (ties: lower index)."""
    padded = np.where(t.valid, t.nbytes, np.iinfo(np.int64).max)
    return np.argmin(padded, axis=1)


def _total_bytes(t: _Tables, sel: np.ndarray) -> int:
    return int(t.nbytes[np.arange(len(sel)), sel].sum())


def _dp_step(
    prev: np.ndarray, cells: np.ndarray, cost: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One unit: best cost per exact cell count, and which option got there.

    Options are stacked in ``order`` (fewest bytes first, then lower index) so that ``argmin``, which
    keeps the first of equal values, breaks cost ties the documented way.
    """
    cap = prev.shape[0] - 1
    cand = np.full((len(order), cap + 1), np.inf)
    for row, k in enumerate(order):
        w = int(cells[k])
        if w <= cap:
            cand[row, w:] = prev[: cap + 1 - w] + cost[k]
    pick = np.argmin(cand, axis=0)
    return cand[pick, np.arange(cap + 1)], order[pick].astype(np.int32)


def _dp(t: _Tables, budget: int, resolution: int) -> np.ndarray | None:
    """Optimal allocation on the cell grid, or None when no allocation fits it after rounding up."""
    unit = 1 if budget <= resolution else -(-budget // resolution)
    cap = budget // unit  # rounded down: cap * unit <= budget
    cells = -(-t.nbytes // unit)  # rounded up: the real bytes never exceed cells * unit
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    backs = []
    for i in range(t.nbytes.shape[0]):
        k = np.flatnonzero(t.valid[i])
        order = k[np.lexsort((k, t.nbytes[i, k]))]
        best, back = _dp_step(best, cells[i], t.cost[i], order)
        backs.append(back)
    if not np.isfinite(best).any():
        return None
    c = int(np.argmin(best))  # first minimum: the fewest cells among equal costs
    sel = np.zeros(len(backs), dtype=np.int64)
    for i in range(len(backs) - 1, -1, -1):
        sel[i] = backs[i][c]
        c -= int(cells[i, sel[i]])
    return sel


def _best_move(t: _Tables, sel: np.ndarray, budget: int) -> tuple[int, int] | None:
    """The single-unit change with the best cost decrease per extra byte that fits, or None.

    Changes that add no bytes rank first (larger decrease first); ties: fewer extra bytes, lower unit,
    lower option index.
    """
    rows = np.arange(len(sel))
    cur_bytes = t.nbytes[rows, sel]
    slack = budget - int(cur_bytes.sum())
    extra = t.nbytes - cur_bytes[:, None]
    gain = t.cost[rows, sel][:, None] - t.cost
    ok = t.valid & (extra <= slack) & (gain > 0)
    if not ok.any():
        return None
    unit, opt = np.nonzero(ok)
    e, g = extra[unit, opt], gain[unit, opt]
    ratio = np.where(e > 0, g / np.maximum(e, 1), np.inf)
    first = np.lexsort((opt, unit, e, -g, -ratio))[0]
    return int(unit[first]), int(opt[first])


def _improve(t: _Tables, sel: np.ndarray, budget: int) -> np.ndarray:
    """Greedy single-unit changes until none helps.

    Each change strictly lowers its unit's cost, so a unit changes fewer times than it has options and
    the loop ends.
    """
    sel = sel.copy()
    while (move := _best_move(t, sel, budget)) is not None:
        sel[move[0]] = move[1]
    return sel


def allocate(units: Sequence[Sequence[Choice]], budget: int, *, resolution: int = 4096) -> list[int]:
    """Index of the chosen Choice per unit: minimal total cost with sum of nbytes <= budget (never more).

    Exact when ``resolution >= budget``; otherwise optimal on a grid of ``ceil(budget / resolution)``-byte
    cells, then improved greedily with the real bytes left.
    """
    _validate(units, budget, resolution)
    t = _tables(units)
    if budget >= int(np.where(t.valid, t.nbytes, 0).max(axis=1).sum()):
        return [int(k) for k in _least_cost(t)]  # everything fits: no trade-off to make
    sel = _dp(t, budget, resolution)
    if sel is None:
        sel = _smallest(t)  # fits: _validate checked the budget against it
    sel = _improve(t, sel, budget)
    if _total_bytes(t, sel) > budget:  # cannot happen: cells round up, moves check the real slack
        raise InternalError(f"allocation of {_total_bytes(t, sel)} bytes exceeds the budget {budget} bytes")
    return [int(k) for k in sel]
