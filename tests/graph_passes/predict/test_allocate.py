"""Budgeted format allocation (multiple-choice knapsack): budget never exceeded, exact at full resolution."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum.adaround.graph_passes.errors import UserError
from optimum.adaround.graph_passes.predict.allocate import AllocationError, Choice, allocate


def _total_bytes(units, sel):
    return sum(units[i][k].nbytes for i, k in enumerate(sel))


def _total_cost(units, sel):
    return sum(units[i][k].cost for i, k in enumerate(sel))


def _min_total(units):
    return sum(min(c.nbytes for c in u) for u in units)


def _max_total(units):
    return sum(max(c.nbytes for c in u) for u in units)


def _brute_force(units, budget):
    costs = [
        _total_cost(units, sel)
        for sel in itertools.product(*(range(len(u)) for u in units))
        if _total_bytes(units, sel) <= budget
    ]
    return min(costs)


_choice = st.builds(
    Choice,
    label=st.just("opt"),
    nbytes=st.integers(0, 50),
    cost=st.floats(0, 10, allow_nan=False, allow_infinity=False),
)
_units = st.lists(st.lists(_choice, min_size=1, max_size=4), min_size=1, max_size=6)


@st.composite
def _instances(draw):
    units = draw(_units)
    budget = draw(st.integers(_min_total(units), _max_total(units)))
    return units, budget


def _check_shape(units, sel):
    assert len(sel) == len(units)
    assert all(isinstance(k, int) and 0 <= k < len(u) for k, u in zip(sel, units, strict=True))


@settings(max_examples=300, deadline=None)
@given(_instances(), st.integers(1, 400))
def test_total_never_exceeds_budget(instance, resolution):
    units, budget = instance
    sel = allocate(units, budget, resolution=resolution)
    _check_shape(units, sel)
    assert _total_bytes(units, sel) <= budget


@settings(max_examples=300, deadline=None)
@given(_instances())
def test_full_resolution_is_the_exact_optimum(instance):
    units, budget = instance
    sel = allocate(units, budget, resolution=max(budget, 1))
    _check_shape(units, sel)
    assert _total_bytes(units, sel) <= budget
    assert _total_cost(units, sel) == pytest.approx(_brute_force(units, budget), abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(_instances())
def test_coarse_resolution_holds_budget_and_beats_all_smallest(instance):
    units, budget = instance
    sel = allocate(units, budget, resolution=3)
    _check_shape(units, sel)
    assert _total_bytes(units, sel) <= budget
    smallest = [min(range(len(u)), key=lambda k, u=u: (u[k].nbytes, k)) for u in units]
    assert _total_cost(units, sel) <= _total_cost(units, smallest) + 1e-9


def test_rounding_up_cells_falls_back_to_smallest_and_spends_the_rest():
    # budget 10 in 3 cells of 4 bytes: three 3-byte options need 3 cells (> 2), yet 9 bytes fit.
    units = [[Choice("a", 3, 1.0), Choice("b", 4, 0.0)] for _ in range(3)]
    sel = allocate(units, 10, resolution=3)
    assert _total_bytes(units, sel) <= 10
    assert sorted(sel) == [0, 0, 1]  # greedy upgrades one unit with the spare byte


def test_budget_at_or_above_largest_total_takes_least_cost_everywhere():
    units = [
        [Choice("w4", 10, 3.0), Choice("w8", 20, 1.0), Choice("float", 40, 0.0)],
        [Choice("w4", 5, 0.5), Choice("w8", 9, 0.5), Choice("float", 30, 2.0)],
        [Choice("only", 7, 4.0)],
    ]
    for budget in (_max_total(units), _max_total(units) + 1000):
        assert allocate(units, budget) == [2, 0, 0]  # unit 1: equal cost, fewer bytes wins


def test_ties_prefer_fewer_bytes_then_lower_index():
    units = [[Choice("big", 8, 1.0), Choice("small", 4, 1.0), Choice("small2", 4, 1.0)]]
    assert allocate(units, 6) == [1]
    assert allocate(units, 6, resolution=1) == [1]


def test_large_instance_returns_valid_allocation_within_budget():
    rng = np.random.default_rng(0)
    units = []
    for _ in range(500):
        nbytes = np.sort(rng.integers(1_000, 1_000_000, size=12))
        costs = np.sort(rng.random(12))[::-1] * 10  # more bytes, less loss
        units.append(
            [Choice(f"f{k}", int(b), float(c)) for k, (b, c) in enumerate(zip(nbytes, costs, strict=True))]
        )
    budget = (_min_total(units) + _max_total(units)) // 2
    sel = allocate(units, budget)
    _check_shape(units, sel)
    assert _total_bytes(units, sel) <= budget
    smallest = [0] * len(units)
    assert _total_cost(units, sel) < _total_cost(units, smallest)


@pytest.mark.parametrize(
    ("units", "budget", "resolution", "match"),
    [
        ([], 10, 4096, "no units"),
        ([[Choice("a", 1, 0.0)], []], 10, 4096, "unit 1 has no options"),
        ([[Choice("a", -3, 0.0)]], 10, 4096, "nbytes -3"),
        ([[Choice("a", 1, float("nan"))]], 10, 4096, "non-finite cost nan"),
        ([[Choice("a", 1, float("inf"))]], 10, 4096, "non-finite cost inf"),
        (
            [[Choice("a", 6, 0.0)], [Choice("b", 5, 0.0)]],
            10,
            4096,
            "budget 10 bytes is below the smallest allocation 11 bytes",
        ),
        ([[Choice("a", 1, 0.0)]], 10, 0, "resolution must be an integer >= 1, got 0"),
    ],
)
def test_errors_are_one_line_user_errors(units, budget, resolution, match):
    with pytest.raises(AllocationError, match=match) as info:
        allocate(units, budget, resolution=resolution)
    assert isinstance(info.value, UserError)
    assert "\n" not in str(info.value)
