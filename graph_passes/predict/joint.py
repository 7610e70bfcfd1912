"""Predict one configuration with a joint probe: every site's weight moved at once by the error the run's
rounding leaves, and the loss increase measured through onnxruntime on a few calibration sequences.

The per-unit probes (``probe.py``) are what an allocation needs: a cost for each unit and option. One
configuration needs only its own sum, which one probe measures directly, interactions and int8 inputs
included (the session rounds each site's input per its scheme's block at ``accuracy_level`` 4):

- round to nearest needs no statistics: its error is computed exactly from the weights, and the probe is
  the quantized model on ``JOINT_SEQUENCES`` sequences (one-sided: its first-order term is part of what
  the run will show; SmolLM2-135M rtn W2-W4 within 7% of the measured increase);
- a calibrated method (gptq...) needs statistics: one float pass (``run_calibration``, one session) gives
  ``H`` of the sites of ``SAMPLED_BLOCKS`` evenly spaced blocks and of the sites outside the stack, where the
  method rounds the whole weights. Every other site gets round to nearest's error scaled to the method's
  relative output error (its kind's mean ratio on the sampled sites) times ``factor``, how much more the
  loss responds to the method's error than to the scaled one at the same relative error, measured on the
  sampled sites under ``REFERENCE`` (the same whatever the configuration's schemes). A scaled error's first-order term is not the method's, so the probes
  are two-sided (mean of ``W + dW`` and ``W - dW``), as the per-unit probes are.

Cost on SmolLM2-135M: benchmarks/results/predictor.md (``--cost``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ..calibration.engine import run_calibration
from ..model_io import read_weight
from ..records import QuantizedWeight, WeightSite
from ..rounding.base import MethodConfig, RoundingMethod, SiteStats, build_method
from ..rounding.rtn import nearest_error
from ..scheme import QuantScheme
from .estimate import _rows, _sampled_layers, site_kind
from .probe import SAMPLES_PER_SEQUENCE, _Lookup, _mean_se, _Prober
from .units import LOOKUP, REFERENCE, lookup_site, output_energy

__all__ = ["JOINT_SEQUENCES", "SAMPLED_BLOCKS", "JointPrediction", "MethodSample", "predict_joint"]

JOINT_SEQUENCES = 8
"""Calibration sequences the joint probe reads (standard error about 5-8% of the increase on SmolLM2)."""
FACTOR_SEQUENCES = 4
"""Of those, the ones the ``factor`` probes read (four passes: the method's error and the scaled one, each
two-sided)."""
SAMPLED_BLOCKS = 4
"""Blocks whose sites a calibrated method rounds whole for its error ratios and ``factor``."""
WIDE_ROWS = 1024
"""Rows a calibrated method rounds of a site outside the stack (the output projection: 49152 rows on
SmolLM2, where rounding them all took 14.5 s of a 105 s gptq run), for that site's ratio alone."""


@dataclasses.dataclass(frozen=True)
class JointPrediction:
    delta: float
    """Predicted increase of the mean NLL (= of ln perplexity)."""
    delta_se: float
    """Its standard error over the probe sequences (not the error of the approximations)."""
    base_nll: float
    n_tokens: int
    factor: float = 1.0
    ratios: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """``label/kind`` -> the method's relative output error over round to nearest's (sampled sites)."""
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MethodSample:
    """A calibrated method's errors on the sampled sites and its error ratios."""

    errors: dict[str, np.ndarray]
    """Site -> the method's weight error ``[N, K]`` (whole weight)."""
    site_ratios: dict[str, float]
    ratios: dict[tuple[str, str], float]
    """``(label, kind)`` -> mean of the sampled sites' ratios."""
    lookup_ratio: float = 1.0
    """For a table tied to a token lookup: the method's error of the table's rows over round to nearest's
    (plain squared error: the lookup reads rows, not outputs; gptq's is above 1 at 2 bits on SmolLM2)."""
    reference: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Site -> the method's error under ``REFERENCE`` (the sites rounded whole): what ``factor`` is
    measured on, the same whatever the configuration's schemes."""
    reference_ratios: dict[str, float] = dataclasses.field(default_factory=dict)

    def ratio(self, label: str, kind: str) -> float:
        if (label, kind) in self.ratios:
            return self.ratios[(label, kind)]
        same = [r for (lab, _), r in self.ratios.items() if lab == label]
        return float(np.mean(same)) if same else 1.0


def _mean_by(keys: Sequence[tuple[str, str]], values: Sequence[float]) -> dict[tuple[str, str], float]:
    """Mean per key: the arithmetic mean, since the sites of high ratio weigh most in the loss (a geometric
    mean put SmolLM2's gptq W3 g128 16% lower than per-site ratios did)."""
    by: dict[tuple[str, str], list[float]] = {}
    for k, v in zip(keys, values, strict=True):
        if v > 0 and math.isfinite(v):
            by.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in by.items()}


def _rounded(
    rounder: RoundingMethod, w: np.ndarray, scheme: QuantScheme, st: SiteStats
) -> tuple[np.ndarray, np.ndarray, float]:
    """The method's error, round to nearest's, and the ratio of their output errors under ``H``."""
    mine = (rounder.quantize(w, scheme, st).dequantize() - w).astype(np.float32)
    near = nearest_error(w, scheme)
    h = np.asarray(st.hessian, dtype=np.float32)
    e = output_energy(near, h)
    return mine, near, output_energy(mine, h) / e if e > 0 else 1.0


def sample_method(
    model: ir.Model, sites: Sequence[WeightSite], schemes: Mapping[str, QuantScheme], method: MethodConfig,
    token_ids: np.ndarray, *, blocks: int = SAMPLED_BLOCKS, progress: bool = False,
    providers: Sequence[str] = ("CPUExecutionProvider",), model_dir: Path | None = None,
) -> MethodSample:  # fmt: skip
    """The method's whole-weight errors on the sites of ``blocks`` evenly spaced blocks (under their
    schemes and under ``REFERENCE``), and its error ratio there and on ``WIDE_ROWS`` rows of the sites
    outside the stack, from one float pass over ``token_ids``."""
    layers = _sampled_layers(sites, blocks)
    chosen = [s for s in sites if s.layer in layers]
    rounder, ref = build_method(method), QuantScheme.parse(REFERENCE)
    sample = MethodSample({}, {}, {})
    tied = lookup_site(sites)

    def on_block(block: list[WeightSite], stats: dict[str, SiteStats]) -> dict[str, QuantizedWeight]:
        for site in block:
            w, scheme, st = read_weight(model, site), schemes[site.name], stats[site.name]
            whole = site.layer is not None or site.n <= WIDE_ROWS
            if not whole:
                w = np.ascontiguousarray(w[_rows(site.n, WIDE_ROWS, seed=0)])
            mine, near, sample.site_ratios[site.name] = _rounded(rounder, w, scheme, st)
            if whole:
                sample.errors[site.name] = mine
                same = scheme.label == ref.label
                at_ref = (
                    (mine, near, sample.site_ratios[site.name]) if same else _rounded(rounder, w, ref, st)
                )
                sample.reference[site.name], sample.reference_ratios[site.name] = at_ref[0], at_ref[2]
            if site.name == tied:
                plain = float(np.square(near, dtype=np.float64).sum())
                sample.lookup_ratio = (
                    float(np.square(mine, dtype=np.float64).sum()) / plain if plain > 0 else 1.0
                )
        return {}

    run_calibration(model, chosen, np.asarray(token_ids, dtype=np.int64), on_block, sequential=False,
                    progress=progress, providers=tuple(providers), model_dir=model_dir)  # fmt: skip
    by = {s.name: s for s in chosen}
    keys = [(schemes[n].label, site_kind(by[n])) for n in sample.site_ratios]
    sample.ratios = _mean_by(keys, list(sample.site_ratios.values()))
    return sample


def _stored(prober: _Prober, site: WeightSite, d: np.ndarray) -> np.ndarray:
    """An ``[N, K]`` change in the site weight's stored layout and dtype."""
    like = prober.weights[site.weight_name]
    return np.ascontiguousarray(d if site.transposed else d.T).astype(like.dtype)


def _lookup_change(lookup: _Lookup, table_error: np.ndarray) -> np.ndarray:
    """The looked-up rows' change for an error of the whole table ``[vocab, hidden]``."""
    return table_error[lookup.index][lookup.inverse].astype(lookup.looked_up.dtype)


def joint_change(
    prober: _Prober, model: ir.Model, sites: Sequence[WeightSite], schemes: Mapping[str, QuantScheme],
    sample: MethodSample | None = None, factor: float = 1.0, only: set[str] | None = None,
    scaled: bool = False,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Each site's weight change (and the tied lookup's rows' change): the method's own error where
    ``sample`` holds it (unless ``scaled``: round to nearest's scaled by the site's own ratio), else round
    to nearest's scaled by ``factor`` times its kind's ratio. ``only``: these sites alone."""
    out: dict[str, np.ndarray] = {}
    tied = lookup_site(sites)
    for site in sites:
        if only is not None and site.name not in only:
            continue
        scheme = schemes[site.name]
        if sample is not None and site.name in sample.errors and not scaled:
            d = sample.errors[site.name]
            table = d
        else:
            near = nearest_error(read_weight(model, site), scheme)
            d, table = near, near
            if sample is not None:
                own = sample.site_ratios.get(site.name)
                ratio = own if own is not None else sample.ratio(scheme.label, site_kind(site))
                d = near * np.float32(math.sqrt(factor * ratio))
                table = near * np.float32(math.sqrt(sample.lookup_ratio))
        out[site.weight_name] = _stored(prober, site, d)
        if site.name == tied and prober.lookup is not None:
            out[LOOKUP] = _lookup_change(prober.lookup, table)
    return out


def _fed(prober: _Prober, change: Mapping[str, np.ndarray], sign: int) -> dict[str, np.ndarray]:
    return {k: sign * d if k == LOOKUP else prober.weights[k] + sign * d for k, d in change.items()}


def _measure(
    prober: _Prober, base: np.ndarray, change: Mapping[str, np.ndarray], two_sided: bool, **run: Any
) -> np.ndarray:
    """The loss increase per probe sample (``run``: ``_Prober.nll``'s options; ``base`` of the same run)."""
    plus = prober.nll(_fed(prober, change, 1), **run)
    if not two_sided:
        return plus - base
    return (plus + prober.nll(_fed(prober, change, -1), **run)) / 2 - base


def _factor(prober: _Prober, base: np.ndarray, model: ir.Model, sites: Sequence[WeightSite],
            sample: MethodSample) -> float:  # fmt: skip
    """The loss response to the method's own error over that to round to nearest's scaled to the same
    relative error, both under ``REFERENCE`` on the sites rounded whole; 1 when the scaled error's response
    is within two standard errors of nothing. At the configuration's own schemes it was not transferable:
    in a SmolLM2 mix whose sampled sites were W2/W3/W8 it read 0.59, and predicted the mix 48% low.
    On the first ``FACTOR_SEQUENCES`` probe sequences, without int8 inputs (``base``: the float model's)."""
    at_ref = MethodSample(sample.reference, sample.reference_ratios, {})
    schemes = dict.fromkeys(sample.reference, QuantScheme.parse(REFERENCE))
    only = set(sample.reference)
    run = {"int8": False, "sequences": FACTOR_SEQUENCES}
    base = base[: SAMPLES_PER_SEQUENCE * FACTOR_SEQUENCES]
    own = _measure(prober, base, joint_change(prober, model, sites, schemes, at_ref, only=only), True, **run)
    scaled = _measure(
        prober, base, joint_change(prober, model, sites, schemes, at_ref, only=only, scaled=True), True, **run
    )
    s_mean, s_se = _mean_se(scaled)
    if s_mean <= 2 * s_se:
        return 1.0
    return max(float(own.mean()), 0.0) / s_mean


def predict_joint(
    model: ir.Model, sites: Sequence[WeightSite], schemes: Mapping[str, QuantScheme],
    method: MethodConfig, token_ids: np.ndarray, *, int8_blocks: Mapping[str, int] | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",), model_dir: Path | None = None,
    progress: bool = False,
) -> JointPrediction:  # fmt: skip
    """The predicted loss increase of rounding each site under ``schemes`` (site name -> scheme) with
    ``method``; ``token_ids``: the run's calibration sequences (the method's statistics), of which the first
    ``JOINT_SEQUENCES`` are probed; ``int8_blocks``: site -> the block its input is rounded at (level 4)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    t0 = time.perf_counter()
    sample = None
    if method.needs:
        sample = sample_method(model, sites, schemes, method, ids, progress=progress, providers=providers,
                               model_dir=model_dir)  # fmt: skip
    t1 = time.perf_counter()
    probed = ids[:JOINT_SEQUENCES]
    # one session: the float base and the factor without the int8 inputs, the prediction with them
    prober = _Prober(model, sites, probed, providers, model_dir, int8_blocks or None, switchable=True)
    base = prober.nll(int8=False)
    # the factor compares weight errors alone: measured without the int8 inputs' loss, which both share
    factor = 1.0 if sample is None else _factor(prober, base, model, sites, sample)
    change = joint_change(prober, model, sites, schemes, sample, factor)
    delta, se = _mean_se(_measure(prober, base, change, two_sided=sample is not None))
    ratios = {f"{lab}/{kind}": r for (lab, kind), r in (sample.ratios if sample else {}).items()}
    return JointPrediction(delta, se, float(base.mean()), int(probed[:, 1:].size), factor, ratios,
                           {"estimate": t1 - t0, "probe": time.perf_counter() - t1})  # fmt: skip
