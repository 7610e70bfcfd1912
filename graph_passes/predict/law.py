"""The predictor: loss increase of a quantized model from its units' relative errors (pure functions).

Linear law (HIGGS): ``S = sum_u f_u alpha_u t_u``, the units' sensitivities times their relative output
errors (``f_u``: the rounding method's factor for the unit's kind, ``Sensitivity.method_factors``).
The link probes measured the loss increase ``D`` when every unit had the same error at once, beside the
linear law's ``S`` for it; the prediction interpolates ``D`` as a function of ``S`` through those points in
log-log space (linear below the first point, the last segment's slope beyond the last), so interactions
between units and the curvature at large errors come from measurements, not from a fitted constant.

The uncertainty is the probes' sampling error over their token sequences (the units' and the link's),
propagated to first order; it does not cover the difference between the probe text and another text.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence

from .probe import LinkPoint, Sensitivity
from .units import LOOKUP, Unit, unit_error

__all__ = ["Prediction", "int8_floor", "link", "predict"]


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Predicted increase of the mean NLL (= of ln perplexity) and its standard error."""

    delta: float
    delta_se: float
    linear: float
    """``S``, the linear law's sum before the link."""

    def perplexity(self, base: float) -> tuple[float, float]:
        """Predicted perplexity and its standard error from the float model's ``base`` perplexity."""
        value = base * math.exp(self.delta)
        return value, value * self.delta_se


def link(s: float, points: Sequence[LinkPoint]) -> float:
    """The measured loss increase for linear-law sum ``s``: log-log interpolation through ``points``."""
    pts = sorted((p.linear, p.delta) for p in points if p.linear > 0 and p.delta > 0)
    if s <= 0:
        return 0.0
    if not pts:
        return s
    if s <= pts[0][0]:
        return s * pts[0][1] / pts[0][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if s <= x1:
            return _loglog(s, x0, y0, x1, y1)
    if len(pts) == 1:
        return s * pts[0][1] / pts[0][0]
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return _loglog(s, x0, y0, x1, y1)


def _loglog(s: float, x0: float, y0: float, x1: float, y1: float) -> float:
    slope = math.log(y1 / y0) / math.log(x1 / x0)
    return y0 * math.exp(slope * math.log(s / x0))


def predict(
    sens: Sensitivity, t_by_site: Mapping[str, float], blocks: Mapping[str, int] | None = None
) -> Prediction:
    """The prediction for relative errors ``t_by_site`` (every probed site, and ``LOOKUP`` when the probes
    measured a tied table; 0 = kept in float): ``units.site_errors`` builds it from labels. ``blocks``: the
    block size at which each site's input is rounded to int8 (``int8_inputs.input_blocks``)."""
    s, var = 0.0, 0.0
    for u in sens.units:
        if u.is_lookup:  # absent when its output projection stays in float
            t = t_by_site.get(LOOKUP, 0.0)
        else:
            t = unit_error(t_by_site, sens.energy, Unit(u.name, u.sites, None, ()))
        f = sens.factor(u)
        s += f * u.alpha * t
        var += (f * u.alpha_se * t) ** 2
    delta = link(s, sens.link)
    step = max(s * 1e-3, 1e-12)
    slope = (link(s + step, sens.link) - link(max(s - step, 0.0), sens.link)) / (2 * step)
    link_se = _link_se(s, sens.link, delta)
    floor, floor_se = int8_floor(sens, blocks or {})
    return Prediction(delta + floor, math.sqrt((slope**2) * var + link_se**2 + floor_se**2), s)


def int8_floor(sens: Sensitivity, blocks: Mapping[str, int]) -> tuple[float, float]:
    """The loss of rounding inputs to int8 (and its standard error): per block size, the measured increase
    with every input rounded, times the share of the units' sensitivity whose input is rounded at it."""
    shares: dict[int, float] = {}
    total = sum(max(u.alpha, 0.0) for u in sens.units if not u.is_lookup)
    for u in sens.units:
        b = blocks.get(u.sites[0])
        if b is not None and total > 0:
            shares[b] = shares.get(b, 0.0) + max(u.alpha, 0.0) / total
    missing = sorted(b for b in shares if b not in sens.int8_inputs)
    if missing:
        raise ValueError(
            f"no int8 input probe at block {missing[0]}: measure it with probe.probe_int8_inputs"
        )
    value = sum(w * sens.int8_inputs[b][0] for b, w in shares.items())
    se = math.sqrt(sum((w * sens.int8_inputs[b][1]) ** 2 for b, w in shares.items()))
    return value, se


def _link_se(s: float, points: Sequence[LinkPoint], delta: float) -> float:
    """The link's relative standard error at the nearest measured point, applied to ``delta``."""
    usable = [p for p in points if p.linear > 0 and p.delta > 0]
    if not usable:
        return 0.0
    near = min(usable, key=lambda p: abs(math.log(p.linear / s)) if s > 0 else p.linear)
    return delta * near.delta_se / near.delta
