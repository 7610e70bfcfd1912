"""From sensitivities and error estimates to a per-unit choice of scheme under a byte budget.

Each unit's options are the candidate schemes (and float): bytes as the packer would store them, predicted
cost ``alpha_u * t_u`` (plus, for an output projection a token lookup shares, the lookup's ``alpha * t``,
and for a quantized option the unit's share of the int8 inputs' loss, ``law.int8_floor``). Minimising the linear law's sum minimises the prediction (the link is monotone), so
``allocate`` runs on the linear costs. The choice becomes scheme overrides (exact site names) and excludes
(units kept in float): the ordinary per-site schemes of one pipeline pass.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..records import WeightSite
from ..scheme import QuantScheme, WeightFormat
from .allocate import AllocationError, Choice, allocate
from .estimate import FLOAT, SiteErrors, packed_bytes
from .int8_inputs import INT8_SEQUENCES, input_blocks
from .law import Prediction, int8_floor, predict
from .probe import Sensitivity
from .units import LOOKUP, Unit, lookup_site, site_errors, unit_error

__all__ = ["Allocation", "budget_for_bits", "choose", "unit_choices", "unit_pattern"]


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The chosen label per unit, what it stores and what it is predicted to cost."""

    labels: dict[str, str]
    """Unit name -> candidate label (``float`` = kept in floating point)."""
    units: tuple[Unit, ...]
    nbytes: int
    budget: int
    weights: int
    prediction: Prediction
    float_bytes: int = 0
    """Of ``nbytes``, what the units kept in floating point store."""

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.weights, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "bytes": self.nbytes,
            "bits_per_weight": self.bits_per_weight,
            "weights": self.weights,
            "float_bytes": self.float_bytes,
            "units": {u.label: self.labels[u.name] for u in self.units},
            "predicted_delta_nll": self.prediction.delta,
            "predicted_delta_nll_se": self.prediction.delta_se,
        }


def float_bytes(site: WeightSite, itemsize: int) -> int:
    return site.k * site.n * itemsize


def unit_choices(
    units: Sequence[Unit],
    sites: Mapping[str, WeightSite],
    schemes: Mapping[str, QuantScheme | None],
    errors: SiteErrors,
    sens: Sensitivity,
    itemsize: Mapping[str, int],
    accuracy_level: int = 4,
) -> list[list[Choice]]:
    """Every unit's options: per candidate label its packed bytes (float: the stored bytes, ``itemsize``
    per site) and its linear-law cost. An output projection tied to the token embedding takes only
    MatMulNBits schemes (or float): the lookup shares those codes, while another format would leave the
    table to be stored a second time, bytes the budget would not see."""
    alpha = {u.name: sens.factor(u) * u.alpha for u in sens.units}
    shared = lookup_site(list(sites.values()))
    out = []
    for u in units:
        options = []
        members = [sites[s] for s in u.sites]
        tied = any(s.tied for s in members)
        for label, scheme in schemes.items():
            if tied and scheme is not None and scheme.format is not WeightFormat.MATMULNBITS:
                continue
            if scheme is None:
                nbytes = sum(float_bytes(s, itemsize[s.name]) for s in members)
            else:
                nbytes = sum(packed_bytes(scheme, s.k, s.n, accuracy_level) for s in members)
            t = unit_error(errors.errors[label], errors.energy, u)
            cost = max(alpha[u.name], 0.0) * t
            if shared in u.sites:  # the tied table's lookup shares these codes
                cost += max(alpha.get(LOOKUP, 0.0), 0.0) * errors.errors[label].get(LOOKUP, 0.0)
            # its share of the loss of int8 inputs (none in float)
            cost += int8_floor(sens, input_blocks(dict.fromkeys(u.sites, label), members, accuracy_level))[0]
            options.append(Choice(label, nbytes, cost))
        out.append(options)
    return out


def budget_for_bits(bits: float, sites: Sequence[WeightSite]) -> int:
    """Bytes that ``bits`` per weight allow over ``sites`` (codes, scales and zero points counted)."""
    return int(bits * sum(s.k * s.n for s in sites) // 8)


def choose(
    units: Sequence[Unit],
    choices: Sequence[Sequence[Choice]],
    budget: int,
    errors: SiteErrors,
    sens: Sensitivity,
    weights: int,
    sites: Sequence[WeightSite] = (),
    accuracy_level: int = 4,
) -> Allocation:
    """The allocation of least predicted loss within ``budget`` bytes, with its prediction (``sites``: for
    the tied lookup's and the int8 inputs' terms)."""
    try:
        picks = allocate(choices, budget)
    except AllocationError as e:
        smallest = sum(min(c.nbytes for c in opts) for opts in choices)
        largest = sum(max(c.nbytes for c in opts) for opts in choices)
        raise AllocationError(
            f"{e}; the candidates store between {8 * smallest / weights:.3f} and {8 * largest / weights:.3f} "
            "bits per weight"
        ) from None
    labels = {u.name: choices[i][k].label for i, (u, k) in enumerate(zip(units, picks, strict=True))}
    nbytes = sum(choices[i][k].nbytes for i, k in enumerate(picks))
    kept = sum(choices[i][k].nbytes for i, k in enumerate(picks) if choices[i][k].label == FLOAT)
    by_site = {s: labels[u.name] for u in units for s in u.sites}
    t = site_errors(by_site, errors.errors, lookup_site(sites))
    prediction = predict(sens, t, input_blocks(by_site, sites, accuracy_level))
    return Allocation(labels, tuple(units), nbytes, budget, weights, prediction, kept)


def unit_pattern(unit: Unit) -> str:
    """A regex matching exactly the unit's site names."""
    return "^(?:" + "|".join(re.escape(s) for s in unit.sites) + ")$"


def as_selection(allocation: Allocation) -> tuple[list[tuple[str, str]], list[str]]:
    """``(overrides as (pattern, label), exclude patterns)`` realising the allocation in one pass."""
    overrides, exclude = [], []
    for u in allocation.units:
        label = allocation.labels[u.name]
        if label == FLOAT:
            exclude.append(unit_pattern(u))
        else:
            overrides.append((unit_pattern(u), label))
    return overrides, exclude


@dataclasses.dataclass
class Planned:
    """An allocation with what it was computed from, and the time each step took."""

    allocation: Allocation
    sensitivity: Sensitivity
    errors: SiteErrors
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        sens = self.sensitivity
        return {
            **self.allocation.to_dict(),
            "probe": {
                "tokens": sens.n_tokens,
                "base_nll": sens.base_nll,
                "probe_t": sens.probe_t,
                "link": [dataclasses.asdict(p) for p in sens.link],
            },
            "method_error_ratios": self.errors.ratios,
            "seconds": self.seconds,
            "sensitivity": sens.to_dict(),
        }


def measure_profile(
    model: Any,
    sites: Sequence[WeightSite],
    schemes: Mapping[str, QuantScheme | None],
    method: Any,
    token_ids: Any,
    *,
    probe_samples: int,
    given: Sensitivity | None = None,
    progress: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    model_dir: Any = None,
    accuracy_level: int = 4,
) -> tuple[Sensitivity, SiteErrors, dict[str, float]]:
    """The sensitivities (probed, unless ``given``) and every scheme's errors for ``method`` (estimated,
    unless ``given`` holds them for the same method), and the seconds each step took. At ``accuracy_level``
    4 the int8 inputs are probed at every candidate's block size the sensitivities lack."""
    import time

    from .estimate import estimate_errors
    from .probe import probe_int8_inputs, probe_sensitivity
    from .units import units_of

    if given is not None and given.method and given.method != method.name:
        raise AllocationError(
            f"the sensitivities given were measured for method {given.method!r}, this run uses "
            f"{method.name!r}: probe again (drop sensitivity)"
        )
    t0 = time.perf_counter()
    wanted = {k: v for k, v in schemes.items() if v is not None}
    if given is not None and set(wanted) <= set(given.errors):
        errors = SiteErrors(dict(given.energy), {k: dict(given.errors[k]) for k in wanted}, {}, 0.0)
        errors.errors[FLOAT] = {s.name: 0.0 for s in sites}
    else:
        errors = estimate_errors(
            model, sites, {**wanted, FLOAT: None}, method, token_ids, progress=progress, providers=providers,
            model_dir=model_dir,
        )  # fmt: skip
    t1 = time.perf_counter()
    names = [s.name for s in sites]
    blocks = sorted(
        {b for lab in wanted for b in input_blocks(dict.fromkeys(names, lab), sites, accuracy_level).values()}
    )
    sens = given or probe_sensitivity(
        model, sites, units_of(sites), errors.energy, token_ids[:probe_samples], providers=providers,
        progress=progress, model_dir=model_dir, shaped=errors.shaped,
    )  # fmt: skip
    if missing := [b for b in blocks if b not in sens.int8_inputs]:  # not probed yet (or an older record)
        found = probe_int8_inputs(model, sites, token_ids[:INT8_SEQUENCES], missing, providers=providers,
                                  model_dir=model_dir)  # fmt: skip
        sens = dataclasses.replace(sens, int8_inputs={**sens.int8_inputs, **found})
    known = {**sens.errors, **{k: v for k, v in errors.errors.items() if k != FLOAT}}
    sens = dataclasses.replace(sens, method=method.name, errors=known)
    return sens, errors, {"estimate": t1 - t0, "probe": time.perf_counter() - t1}


def plan_allocation(
    model: Any,
    sites: Sequence[WeightSite],
    schemes: Mapping[str, QuantScheme | None],
    method: Any,
    token_ids: Any,
    *,
    budget: int,
    asked: str,
    probe_samples: int,
    accuracy_level: int = 4,
    progress: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    model_dir: Any = None,
    sensitivity: Sensitivity | None = None,
) -> Planned:
    """Estimate every candidate's errors (one float calibration pass), probe the sensitivities (both
    unless ``sensitivity`` holds them), allocate ``budget`` bytes (``asked``: how the user asked for them,
    for messages: ``target_bits=3``...)."""
    import time

    from .units import units_of

    sens, errors, seconds = measure_profile(
        model, sites, schemes, method, token_ids, probe_samples=probe_samples, given=sensitivity,
        progress=progress, providers=providers, model_dir=model_dir, accuracy_level=accuracy_level,
    )  # fmt: skip
    t2 = time.perf_counter()
    units = units_of(sites)
    itemsize = {s.name: _itemsize(model, s) for s in sites}
    by_name = {s.name: s for s in sites}
    choices = unit_choices(units, by_name, schemes, errors, sens, itemsize, accuracy_level)
    weights = sum(s.k * s.n for s in sites)
    stored = sum(float_bytes(s, itemsize[s.name]) for s in sites)
    if budget >= stored:
        raise AllocationError(
            f"{asked} allows {budget} bytes, at or above the {stored} bytes these layers take in floating "
            f"point ({8 * stored / weights:g} bits per weight): nothing to quantize"
        )
    try:
        allocation = choose(units, choices, budget, errors, sens, weights, sites, accuracy_level)
    except AllocationError as e:
        raise AllocationError(f"{asked}: {e}") from None
    return Planned(allocation, sens, errors, {**seconds, "allocate": time.perf_counter() - t2})


def _itemsize(model: Any, site: WeightSite) -> int:
    tensor = model.graph.initializers[site.weight_name].const_value
    return int(tensor.dtype.itemsize) if tensor is not None else 4
