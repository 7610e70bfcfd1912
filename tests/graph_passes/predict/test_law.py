"""The predictor's law: the link through the measured joint probes, and the sum over units."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from optimum.adaround.graph_passes.predict.law import link, predict
from optimum.adaround.graph_passes.predict.probe import LinkPoint, Sensitivity, UnitSensitivity
from optimum.adaround.graph_passes.predict.units import LOOKUP, SiteEnergy

POINTS = (
    LinkPoint(0.01, 0.02, 0.018, 0.001),
    LinkPoint(0.1, 0.2, 0.25, 0.01),
    LinkPoint(0.3, 0.6, 1.2, 0.05),
)


def test_link_passes_through_the_measured_points_and_is_linear_below_the_first():
    for p in POINTS:
        assert link(p.linear, POINTS) == pytest.approx(p.delta)
    assert link(0.01, POINTS) == pytest.approx(0.009)  # half the first point's S: half its D
    assert link(0.0, POINTS) == 0.0


def test_link_extends_the_last_segments_log_log_slope():
    slope = math.log(1.2 / 0.25) / math.log(0.6 / 0.2)
    assert link(1.2, POINTS) == pytest.approx(1.2 * 2**slope)


def test_link_without_usable_points_is_the_linear_law():
    assert link(0.3, ()) == 0.3
    assert link(0.3, (LinkPoint(0.1, 0.1, -0.01, 0.01),)) == 0.3  # a negative measurement is not usable


@given(st.lists(st.floats(1e-4, 10.0), min_size=2, max_size=40))
def test_link_is_monotone_through_monotone_points(xs):
    xs = sorted(xs)
    values = [link(x, POINTS) for x in xs]
    assert all(a <= b * (1 + 1e-12) for a, b in itertools.pairwise(values))


def _sens(alphas):
    units = tuple(UnitSensitivity(f"u{i}", (f"s{i}a", f"s{i}b"), a, 0.1 * a) for i, a in enumerate(alphas))
    energy = {s: SiteEnergy(signal=1.0 + j, trace_h=1.0, n=4) for u in units for j, s in enumerate(u.sites)}
    return Sensitivity(0.02, units, (), energy, 3.0, 100, 1.0)


def test_prediction_is_the_energy_weighted_sum_without_link_points():
    sens = _sens([2.0, 5.0])
    t = {"s0a": 0.1, "s0b": 0.4, "s1a": 0.0, "s1b": 0.0}
    p = predict(sens, t)
    assert p.linear == pytest.approx(2.0 * (0.1 * 1 + 0.4 * 2) / 3)
    assert p.delta == pytest.approx(p.linear)
    assert p.delta_se == pytest.approx(0.2 * (0.1 * 1 + 0.4 * 2) / 3)
    zero = predict(sens, dict.fromkeys(t, 0.0))
    assert zero.delta == 0.0 and zero.delta_se == 0.0
    value, se = p.perplexity(20.0)
    assert value == pytest.approx(20.0 * math.exp(p.delta)) and se == pytest.approx(value * p.delta_se)


def test_sensitivity_round_trips_through_its_record():
    sens = _sens([1.0, 3.0])
    sens = Sensitivity(sens.probe_t, sens.units, POINTS, sens.energy, 3.1, 512, 2.5,
                       int8_inputs={64: (0.01, 0.002), 128: (0.02, 0.003)})  # fmt: skip
    assert Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict()))) == sens


def test_a_tied_lookup_is_its_own_term_at_its_own_error():
    """The lookup's term is ``alpha * t[LOOKUP]`` whatever the method's factor (its error is the method's
    own codes'), and nothing when the key is absent (its output projection kept in float)."""
    base = _sens([2.0])
    units = (*base.units, UnitSensitivity(LOOKUP, (LOOKUP,), 3.0, 0.3))
    energy = {**base.energy, LOOKUP: SiteEnergy(1.0, 1.0, 8)}
    sens = Sensitivity(0.02, units, (), energy, 3.0, 100, 1.0, method_factors={"*": 2.0})
    t = {"s0a": 0.1, "s0b": 0.1}
    without = predict(sens, t).delta
    assert without == pytest.approx(2.0 * 2.0 * 0.1)
    assert predict(sens, {**t, LOOKUP: 0.05}).delta == pytest.approx(without + 3.0 * 0.05)
