"""Sensitivity of the model's loss to each unit's output error, measured through onnxruntime.

One session of the float model runs with the site weights as *overridable* initializers (also listed as
graph inputs), so a probe feeds one unit's weights with Gaussian noise of known energy and everything else
keeps its stored values; no session is rebuilt. For each unit the noise has relative output error ``t``
(``E tr(dW H dW^T) = t tr(W H W^T)``, from the unit's float statistics) and is fed as ``W + dW`` and
``W - dW``: the mean of the two losses cancels the first-order (gradient) term, which at small ``t`` would
otherwise swamp the second-order response we want. The sensitivity is ``alpha = dNLL / t`` in nats per
token per unit of relative error (HIGGS' linear law: the loss increase is close to ``sum alpha_u t_u``).

*Link* probes put every unit at the same ``t`` at once, for a few ``t``: how far the joint loss increase
departs from the sum of the units' (interactions, curvature at large errors). The predictor interpolates
through them (``law.py``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import torch
from tqdm.auto import tqdm

from ..calibration.blocks import extract_part
from ..calibration.feeds import feed_specs, make_feeds, window_capacities
from ..calibration.sessions import open_session, resolve_providers
from ..embeddings import id_lookups
from ..errors import CalibrationError, InvalidOptionError
from ..records import WeightSite
from ..rounding.rtn import nearest_error
from ..scheme import QuantScheme
from .int8_inputs import round_site_inputs
from .units import LOOKUP, REFERENCE, SiteEnergy, Unit, lookup_error, lookup_site

_GATE = "optimum_adaround.int8_gate"
SAMPLES_PER_SEQUENCE = 4
"""``_Prober.nll``'s values per probe sequence (its quarters): enough samples for a standard error from two
sequences."""

__all__ = [
    "LINK_LEVELS",
    "PROBE_T",
    "LinkPoint",
    "Sensitivity",
    "UnitSensitivity",
    "load_sensitivity",
    "probe_int8_inputs",
    "probe_sensitivity",
]

PROBE_T = 0.02
"""Relative output error of a unit's probe: about that of 4-bit round-to-nearest, where the response is
still close to linear (benchmarks/results/predictor.md)."""
LINK_LEVELS = (0.005, 0.02, 0.06, 0.15, 0.35)
"""Relative errors of the joint probes: from 8-bit-like to past 2-bit-like errors."""


@dataclasses.dataclass(frozen=True)
class UnitSensitivity:
    name: str
    sites: tuple[str, ...]
    alpha: float
    """Loss increase (nats per token) per unit of relative output error."""
    alpha_se: float
    """Standard error of ``alpha`` over the probe sequences."""

    @property
    def is_lookup(self) -> bool:
        """The tied token lookup (``LOOKUP``), not a group of weight sites."""
        return self.sites == (LOOKUP,)


@dataclasses.dataclass(frozen=True)
class LinkPoint:
    level: float
    """Every unit's relative output error in this probe."""
    linear: float
    """``sum alpha_u * level``: the linear law's prediction."""
    delta: float
    """The measured loss increase (nats per token)."""
    delta_se: float


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """Everything the predictor needs besides the per-site errors of a scheme."""

    probe_t: float
    units: tuple[UnitSensitivity, ...]
    link: tuple[LinkPoint, ...]
    energy: Mapping[str, SiteEnergy]
    base_nll: float
    n_tokens: int
    seconds: float
    fingerprint: str = ""
    """``weights_fingerprint`` of the model probed: reuse is refused on another model."""
    method_factors: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Site kind (``q_proj``, ``down_proj``...; ``*`` pooled) -> how much more the loss responds to the
    rounding method's error than to the probes' at the same relative error (1 when not measured)."""

    method: str = ""
    """The rounding method ``method_factors`` and ``errors`` are of ("" when neither was measured)."""
    errors: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    """Scheme label -> site -> relative output error of ``method`` (``estimate.py``), kept with the probes so
    a later prediction or allocation over the same schemes needs no calibration pass."""
    int8_inputs: Mapping[int, tuple[float, float]] = dataclasses.field(default_factory=dict)
    """Block size -> loss increase (and its standard error) of the float model with every site's input
    rounded to int8 per block of that size, as ``accuracy_level`` 4 computes (``int8_inputs.py``)."""

    def factor(self, unit: UnitSensitivity) -> float:
        if unit.is_lookup:  # its error is computed for the method's own codes
            return 1.0
        kind = unit.sites[0].rsplit(".", 1)[-1]
        return float(self.method_factors.get(kind, self.method_factors.get("*", 1.0)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe_t": self.probe_t,
            "units": [dataclasses.asdict(u) for u in self.units],
            "link": [dataclasses.asdict(p) for p in self.link],
            "energy": {k: dataclasses.asdict(v) for k, v in self.energy.items()},
            "base_nll": self.base_nll,
            "n_tokens": self.n_tokens,
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
            "method_factors": dict(self.method_factors),
            "method": self.method,
            "errors": {k: dict(v) for k, v in self.errors.items()},
            "int8_inputs": {str(b): list(v) for b, v in self.int8_inputs.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sensitivity:
        units = tuple(
            UnitSensitivity(u["name"], tuple(u["sites"]), u["alpha"], u["alpha_se"]) for u in d["units"]
        )
        return cls(
            probe_t=float(d["probe_t"]),
            units=units,
            link=tuple(LinkPoint(**p) for p in d["link"]),
            energy={k: SiteEnergy(**v) for k, v in d["energy"].items()},
            base_nll=float(d["base_nll"]),
            n_tokens=int(d["n_tokens"]),
            seconds=float(d["seconds"]),
            fingerprint=str(d.get("fingerprint", "")),
            method_factors={k: float(v) for k, v in d.get("method_factors", {}).items()},
            method=str(d.get("method", "")),
            errors={k: {s: float(t) for s, t in v.items()} for k, v in d.get("errors", {}).items()},
            int8_inputs={int(b): (float(v[0]), float(v[1])) for b, v in d.get("int8_inputs", {}).items()},
        )


def weights_fingerprint(model: ir.Model, sites: Sequence[WeightSite]) -> str:
    """sha256 over each site's name, shape and first 256 stored values: tells models apart cheaply."""
    import hashlib

    h = hashlib.sha256()
    for s in sites:
        value = model.graph.initializers[s.weight_name].const_value
        h.update(f"{s.name}:{s.n}x{s.k}".encode())
        if value is not None:
            h.update(np.ascontiguousarray(np.asarray(value.numpy()).reshape(-1)[:256]).tobytes())
    return h.hexdigest()


def load_sensitivity(path: str | Path, model: ir.Model, sites: Sequence[WeightSite]) -> Sensitivity:
    """Sensitivities saved by an earlier run (``quantization_config.json``: ``allocation.sensitivity``), a
    prediction (``predict --json``: ``sensitivity``) or on their own; they must cover exactly ``sites``."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidOptionError(f"sensitivity={str(path)!r}: cannot read it as JSON ({e})") from None
    if isinstance(data, dict) and "sensitivity" not in data and isinstance(data.get("allocation"), dict):
        data = data["allocation"]  # a run's record nests them under allocation; a prediction does not
    if isinstance(data, dict) and isinstance(data.get("sensitivity"), dict):
        data = data["sensitivity"]
    try:
        sens = Sensitivity.from_dict(data)
    except (KeyError, TypeError, ValueError):
        raise InvalidOptionError(
            f"sensitivity={str(path)!r}: holds no sensitivities (write them with a --target-bits run or "
            "predict --json)"
        ) from None
    probed = {s for u in sens.units for s in u.sites} - {LOOKUP}
    wanted = {s.name for s in sites}
    if probed != wanted:
        diff = sorted(probed ^ wanted)
        raise InvalidOptionError(
            f"sensitivity={str(path)!r}: probed other layers than this run quantizes (e.g. {diff[0]}): "
            "probe this model, or select the same layers"
        )
    if sens.fingerprint != weights_fingerprint(model, sites):
        raise InvalidOptionError(
            f"sensitivity={str(path)!r}: probed another model (its weights differ from this one's): probe "
            "this model"
        )
    return sens


class _Prober:
    """The float model's session with overridable site weights, and per-sequence NLL of a feed.

    When an output projection's table is also the token lookup's (tied), the part starts after the lookup
    and the looked-up rows are fed: the lookup and the projection are then probed apart, though they
    share one tensor in the model.
    """

    def __init__(self, model: ir.Model, sites: Sequence[WeightSite], ids: np.ndarray, providers: Sequence[str],
                 model_dir: Path | None, int8_block: int | Mapping[str, int] | None = None,
                 switchable: bool = False) -> None:  # fmt: skip
        """``int8_block``: round the sites' inputs to int8 (``round_site_inputs``); ``switchable``: behind a
        gate that ``nll(int8=...)`` sets per run, so one session serves the float and the int8 probes."""
        graph = model.graph
        self.specs = feed_specs(graph.inputs, folder=model_dir, capacities=window_capacities(graph))
        logits = next((v for v in graph.outputs if v.name == "logits"), graph.outputs[0])
        self.lookup = _Lookup.of(model, sites, ids)
        starts = [v.name for v in graph.inputs if v.name]
        examples = {}
        if self.lookup is not None:
            starts.append(self.lookup.value)
            examples[self.lookup.value] = self.lookup.looked_up
        part = extract_part(model, starts, [logits.name], examples, name="probe")
        self.gate: tuple[str, np.dtype] | None = None
        if int8_block is not None:
            gate = None
            if switchable:
                dtype = logits.dtype.numpy() if logits.dtype is not None else np.float32
                gate = ir.Value(
                    name=_GATE, type=ir.TensorType(ir.DataType.from_numpy(dtype)), shape=ir.Shape([])
                )
                part.graph.inputs.append(gate)
                self.gate = (_GATE, np.dtype(dtype))
            round_site_inputs(part.graph, sites, int8_block, gate)
        self.weights: dict[str, np.ndarray] = {}
        for s in dict.fromkeys(s.weight_name for s in sites):
            value = part.graph.initializers[s]
            part.graph.inputs.append(value)  # overridable: fed by a probe, else its stored value
            self.weights[s] = np.asarray(value.const_value.numpy())
        self.session = open_session(part, resolve_providers(providers))
        self.logits = logits.name
        self.wanted = {i.name for i in self.session.get_inputs()}
        self.ids = ids
        self.feeds = self._feeds(len(ids))
        self.targets = torch.from_numpy(np.ascontiguousarray(ids[:, 1:], dtype=np.int64))

    def _feeds(self, n: int) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in make_feeds(self.specs, self.ids[:n]).items() if k in self.wanted}
        if self.lookup is not None:
            feeds[self.lookup.value] = self.lookup.looked_up[:n]
        return feeds

    def nll(self, weights: Mapping[str, np.ndarray] | None = None, *, int8: bool = True,
            sequences: int | None = None) -> np.ndarray:  # fmt: skip
        """Mean next-token NLL of each quarter of each probe sequence (float64, sequence-major) with
        ``weights`` fed over the stored ones (``LOOKUP``: a change of the looked-up rows, ``[n, T,
        hidden]``); ``int8``: with the inputs' rounding of a switchable prober; ``sequences``: the first so
        many probe sequences only (their values are the first ``SAMPLES_PER_SEQUENCE * sequences`` of the
        full run's)."""
        n = len(self.ids) if sequences is None else min(sequences, len(self.ids))
        feeds = self.feeds if n == len(self.ids) else self._feeds(n)
        feeds = {**feeds, **{k: v for k, v in (weights or {}).items() if k != LOOKUP}}
        if weights is not None and LOOKUP in weights and self.lookup is not None:
            feeds[self.lookup.value] = self.lookup.looked_up[:n] + weights[LOOKUP][:n]
        if self.gate is not None:
            feeds[self.gate[0]] = np.array(1 if int8 else 0, dtype=self.gate[1])
        out = self.session.run([self.logits], feeds)[0]
        logits = torch.from_numpy(np.asarray(out, dtype=np.float32))[:, :-1]  # a view: no copy of the logits
        # float32 log-sum-exp: ~1e-6 nats per token, far below the responses measured (1e-4 and up)
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, self.targets[:n, :, None])[..., 0]
        parts = torch.tensor_split(nll.to(torch.float64), SAMPLES_PER_SEQUENCE, dim=1)
        return torch.stack([c.mean(dim=1) for c in parts], dim=1).reshape(-1).numpy()


@dataclasses.dataclass(frozen=True)
class _Lookup:
    """The token lookup of a table tied to an output projection, as the probes see it."""

    value: str
    """The lookup's output: where the probe part starts."""
    looked_up: np.ndarray
    """``table[ids]``, ``[n, T, hidden]``."""
    rows: np.ndarray
    """The distinct table rows the probe text reads, ``[r, hidden]`` float32 (``index``: which), and how
    often (``counts``)."""
    counts: np.ndarray
    index: np.ndarray
    inverse: np.ndarray
    """``ids`` as indices into ``rows``."""

    @classmethod
    def of(cls, model: ir.Model, sites: Sequence[WeightSite], ids: np.ndarray) -> _Lookup | None:
        tied = next((s for s in sites if s.name == lookup_site(sites)), None)
        if tied is None:
            return None
        gather = next((n for n in id_lookups(model.graph) if n.inputs[0].name == tied.weight_name), None)
        if gather is None:
            return None
        table = np.asarray(gather.inputs[0].const_value.numpy())
        unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        return cls(gather.outputs[0].name, np.ascontiguousarray(table[ids]),
                   np.asarray(table[unique], np.float32), counts, unique, inverse.reshape(ids.shape))  # fmt: skip

    def noise(self, t: float, kind: Noise, rng: np.random.Generator) -> np.ndarray:
        """A change of the looked-up rows with relative error ``t`` over the probe text (``lookup_error``):
        round to nearest's error under ``REFERENCE`` rescaled, or Gaussian white noise."""
        if kind == "rounding":
            d = nearest_error(self.rows, QuantScheme.parse(REFERENCE))
        else:
            d = rng.standard_normal(self.rows.shape, dtype=np.float32)
        e = lookup_error(self.rows, self.rows + d, self.counts)
        d *= np.float32(math.sqrt(t / e)) if e > 0 else np.float32(0)
        return d[self.inverse].astype(self.looked_up.dtype)


Noise = Literal["gaussian", "rounding"]


def _noise(
    prober: _Prober, sites: Sequence[WeightSite], energy: Mapping[str, SiteEnergy], t: float,
    rng: np.random.Generator, kind: Noise = "gaussian",
) -> dict[str, np.ndarray]:  # fmt: skip
    """Weight noise per site with (expected) relative output error ``t``, in the stored layout: Gaussian
    white noise, or round-to-nearest's error under ``REFERENCE`` rescaled."""
    out = {}
    for s in sites:
        e = energy[s.name]
        w = prober.weights[s.weight_name]
        if kind == "rounding" and e.ref_error > 0:
            wt = np.asarray(w, np.float32) if s.transposed else np.asarray(w, np.float32).T
            d = nearest_error(np.ascontiguousarray(wt), QuantScheme.parse(REFERENCE))
            d *= np.float32(math.sqrt(t / e.ref_error))
            out[s.weight_name] = np.ascontiguousarray(d if s.transposed else d.T).astype(w.dtype)
            continue
        sigma = math.sqrt(t * e.signal / max(e.n * e.trace_h, 1e-30))
        out[s.weight_name] = (rng.standard_normal(w.shape, dtype=np.float32) * np.float32(sigma)).astype(
            w.dtype
        )
    return out


def _response(prober: _Prober, base: np.ndarray, noise: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-sequence loss increase, first-order term cancelled: mean of the ``W + dW`` and ``W - dW`` runs
    (``LOOKUP``: a change of the looked-up rows, fed as such)."""

    def fed(sign: int) -> dict[str, np.ndarray]:
        return {k: sign * d if k == LOOKUP else prober.weights[k] + sign * d for k, d in noise.items()}

    return (prober.nll(fed(1)) + prober.nll(fed(-1))) / 2 - base


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def _method_factors(
    prober: _Prober, base: np.ndarray, by_name: Mapping[str, WeightSite], units: Sequence[UnitSensitivity],
    shaped: Mapping[str, np.ndarray], t: float,
) -> dict[str, float]:  # fmt: skip
    """Per site kind: the loss response to the method's own error (``shaped``, sampled units) over the
    response to the probes' noise, as a ratio of sums over the kind's sampled units (and ``*`` over all)."""
    sums: dict[str, list[float]] = {}
    scale = np.float32(math.sqrt(t))
    for u in units:
        if not u.sites or not all(s in shaped for s in u.sites):
            continue
        noise = {}
        for name in u.sites:
            site, d = by_name[name], shaped[name] * scale
            stored = prober.weights[site.weight_name]
            noise[site.weight_name] = np.ascontiguousarray(d if site.transposed else d.T).astype(stored.dtype)
        own = float(_response(prober, base, noise).mean()) / t
        for key in (u.sites[0].rsplit(".", 1)[-1], "*"):
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + own, acc[1] + u.alpha
    return {k: own / probed for k, (own, probed) in sums.items() if probed > 0 and own > 0}


def probe_int8_inputs(
    model: ir.Model, sites: Sequence[WeightSite], token_ids: np.ndarray, blocks: Sequence[int], *,
    providers: Sequence[str] = ("CPUExecutionProvider",), model_dir: Path | None = None,
) -> dict[int, tuple[float, float]]:  # fmt: skip
    """Per block size, the loss increase (and its standard error) when every site's input is rounded to
    int8 per block of that size (``Sensitivity.int8_inputs``), on ``token_ids`` (``INT8_SEQUENCES`` of
    them: rounding has a first-order term that no two-sided probe cancels, so it needs more text)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if not blocks:
        return {}
    base = _Prober(model, sites, ids, providers, model_dir).nll()
    return {
        int(b): _mean_se(_Prober(model, sites, ids, providers, model_dir, b).nll() - base) for b in blocks
    }


def probe_sensitivity(
    model: ir.Model,
    sites: Sequence[WeightSite],
    units: Sequence[Unit],
    energy: Mapping[str, SiteEnergy],
    token_ids: np.ndarray,
    *,
    probe_t: float = PROBE_T,
    levels: Sequence[float] = LINK_LEVELS,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    seed: int = 0,
    progress: bool = True,
    model_dir: Path | None = None,
    noise: Noise = "rounding",
    shaped: Mapping[str, np.ndarray] | None = None,
) -> Sensitivity:
    """Each unit's sensitivity and the link probes, on ``token_ids`` ``[n, T]``; ``energy`` from the float
    statistics (``estimate.py``); ``shaped``: a rounding method's normalised errors on sampled sites, whose
    units are probed again with them (``Sensitivity.method_factors``). ``model`` is not modified; the int8
    inputs are probed apart (``probe_int8_inputs``)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise CalibrationError(f"probe token ids must be [n, T] with T >= 2, got {list(ids.shape)}")
    t0 = time.perf_counter()
    prober = _Prober(model, sites, ids, providers, model_dir)
    base = prober.nll()
    by_name = {s.name: s for s in sites}
    rng = np.random.default_rng(seed)
    out = []
    for u in tqdm(units, desc="sensitivity", unit="unit", disable=not progress, file=sys.stderr):
        members = [by_name[n] for n in u.sites]
        alpha, se = _mean_se(
            _response(prober, base, _noise(prober, members, energy, probe_t, rng, noise)) / probe_t
        )
        out.append(UnitSensitivity(u.name, u.sites, alpha, se))
    if prober.lookup is not None:
        alpha, se = _mean_se(
            _response(prober, base, {LOOKUP: prober.lookup.noise(probe_t, noise, rng)}) / probe_t
        )
        out.append(UnitSensitivity(LOOKUP, (LOOKUP,), alpha, se))
        energy = {**energy, LOOKUP: SiteEnergy(1.0, 1.0, len(prober.lookup.rows))}
    total = sum(u.alpha for u in out)
    link = []
    for level in levels:
        change = _noise(prober, list(sites), energy, level, rng, noise)
        if prober.lookup is not None:
            change[LOOKUP] = prober.lookup.noise(level, noise, rng)
        delta, se = _mean_se(_response(prober, base, change))
        link.append(LinkPoint(float(level), total * level, delta, se))
    factors = _method_factors(prober, base, by_name, out, shaped or {}, probe_t)
    seconds = time.perf_counter() - t0
    return Sensitivity(
        probe_t, tuple(out), tuple(link), dict(energy), float(base.mean()), int(ids[:, 1:].size), seconds,
        weights_fingerprint(model, sites), factors,
    )  # fmt: skip
