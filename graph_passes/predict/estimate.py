"""Per-site relative output errors of candidate schemes, estimated from the float model's statistics.

One block-by-block calibration pass of the float model (nothing substituted) hands each block's ``H`` over;
for every site and candidate scheme:

- round to nearest gives its relative error (``tr(dW H dW^T) / tr(W H W^T)``), on up to ``RTN_ROWS`` random
  rows of the weight (rows are independent given ``H``);
- a calibrated method (gptq, adaround...) runs on ``sample_rows`` rows of every site (rows are independent
  given ``H``), beside round to nearest on the same rows; the ratio of the two errors scales that site's
  round-to-nearest error. A ratio pooled per site kind (from 4 blocks, before) flattered the sites an
  allocation chose for few bits: their measured errors were 1.2-1.7x the pooled estimate, and five
  allocations were predicted 26-36% low (errors from the per-site output SQNR the runs record); the five
  chosen with ratios per site, 5-20% either way. The estimate takes longer: one scheme 50 -> 82 s, the 12
  candidates of an allocation 93 -> 297 s (SmolLM2-135M; benchmarks/results/predictor.md).

The Hessian of each block is dropped once its sites are done: memory stays that of one block's statistics.
It reads the run's calibration sequences: with fewer, a calibrated method fits ``H`` more closely than the
run will (its in-sample error on 16 sequences was a fifth lower than on 32 for the down projections).

For ``shaped_blocks`` blocks the method also rounds the whole weight under ``REFERENCE``: its error, normalised to
relative output error 1 (``shaped``), is the noise the probes use to measure how much more (or less) the
loss responds to the method's error than to round to nearest's at the same relative error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from ..calibration.engine import run_calibration
from ..model_io import read_weight
from ..packing.base import get_packer
from ..records import QuantizedWeight, WeightSite
from ..rounding.base import MethodConfig, SiteStats, build_method
from ..rounding.rtn import nearest_error
from ..scheme import QuantScheme, WeightFormat
from .units import LOOKUP, REFERENCE, SiteEnergy, lookup_error, lookup_site, output_energy

__all__ = ["FLOAT", "SiteErrors", "estimate_errors", "packed_bytes", "site_kind"]

FLOAT = "float"
"""The candidate that keeps a site in floating point (relative error 0, its stored bytes)."""


def site_kind(site: WeightSite) -> str:
    """``q_proj``, ``down_proj``, ``lm_head``...: what the method's error ratio is pooled over."""
    return "lm_head" if site.kind == "lm_head" else site.name.rsplit(".", 1)[-1]


@dataclasses.dataclass
class SiteErrors:
    """Float energies and, per candidate label, each site's estimated relative output error."""

    energy: dict[str, SiteEnergy]
    errors: dict[str, dict[str, float]]
    """``errors[label][site]``; the float candidate maps every site to 0."""
    ratios: dict[str, dict[str, float]]
    """``ratios[label][kind]``: the method's error over round to nearest's (geometric mean of the samples)."""
    seconds: float = 0.0
    shaped: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Site -> the method's weight error ``[N, K]`` under ``REFERENCE``, scaled to relative output error 1
    (sampled blocks of a calibrated method only)."""


def packed_bytes(scheme: QuantScheme, k: int, n: int, accuracy_level: int = 4) -> int:
    """Bytes the packer of ``scheme`` (format resolved) stores for an ``[n, k]`` weight."""
    return _packed_bytes(scheme, k, n, accuracy_level)


@functools.lru_cache(maxsize=4096)
def _packed_bytes(scheme: QuantScheme, k: int, n: int, accuracy_level: int) -> int:
    options = (
        {"accuracy_level": accuracy_level}
        if scheme.format in (WeightFormat.MATMULNBITS, WeightFormat.LOWBIT)
        else {}
    )
    packer = get_packer(scheme.format, **options)
    nb = scheme.n_blocks(k)
    qw = QuantizedWeight(
        codes=np.zeros((n, k), np.uint8),
        scales=np.ones((n, nb), np.float32),
        zero_points=None if scheme.symmetric else np.zeros((n, nb), np.uint8),
        scheme=scheme,
        codebook=None,
    )
    return int(packer.pack(qw).nbytes)


def _rows(n: int, count: int, seed: int) -> np.ndarray:
    if n <= count:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


RTN_ROWS = 1024
"""Rows round to nearest is scored on per site (all when fewer): the ratio estimate over 1024 random rows
is within a few percent of the whole weight's, at a fraction of the cost for wide output projections."""


def _site_errors(
    w: np.ndarray, stats: SiteStats, candidates: Mapping[str, QuantScheme], method: MethodConfig | None,
    rows: np.ndarray | None, seed: int,
) -> tuple[SiteEnergy, dict[str, float], dict[str, float]]:  # fmt: skip
    """Energy, round-to-nearest relative error per candidate, and (on ``rows``) the method's error ratio."""
    h = np.asarray(stats.hessian, dtype=np.float64)
    n_tok = max(int(stats.n_tokens), 1)
    h32 = torch.from_numpy(h.astype(np.float32))
    scored = np.ascontiguousarray(w[_rows(w.shape[0], RTN_ROWS, seed)])
    sig_scored = output_energy(scored, h32)
    errs, ratios = {}, {}
    sampled = method is not None and rows is not None
    sub = np.ascontiguousarray(w[rows]) if sampled else None
    rounder = build_method(method) if sampled else None
    for label, scheme in candidates.items():
        err = output_energy(nearest_error(scored, scheme), h32)
        errs[label] = err / sig_scored if sig_scored > 0 else 0.0
        if sub is not None and rounder is not None:
            mine = output_energy(rounder.quantize(sub, scheme, stats).dequantize() - sub, h32)
            near = output_energy(nearest_error(sub, scheme), h32)
            if near > 0 and mine > 0:
                ratios[label] = mine / near
    signal = output_energy(w, h32) / n_tok
    ref = output_energy(nearest_error(scored, QuantScheme.parse(REFERENCE)), h32)
    energy = SiteEnergy(signal=signal, trace_h=float(np.trace(h)) / n_tok, n=int(w.shape[0]),
                        ref_error=ref / sig_scored if sig_scored > 0 else 0.0)  # fmt: skip
    return energy, errs, ratios


def _shaped_error(w: np.ndarray, stats: SiteStats, method: MethodConfig) -> np.ndarray:
    """The method's error on the whole weight under ``REFERENCE``, scaled to relative output error 1."""
    h32 = torch.from_numpy(np.asarray(stats.hessian, dtype=np.float32))
    d = build_method(method).quantize(w, QuantScheme.parse(REFERENCE), stats).dequantize() - w
    err, sig = output_energy(d, h32), output_energy(w, h32)
    return (d * np.float32(math.sqrt(sig / err))).astype(np.float32) if err > 0 else np.zeros_like(d)


def _lookup_errors(
    w: np.ndarray, stats: SiteStats, schemes: Mapping[str, QuantScheme], method: MethodConfig | None,
    rows: np.ndarray | None, token_ids: np.ndarray,
) -> dict[str, float]:  # fmt: skip
    """Per candidate, the relative error of a tied table's codes over the rows ``token_ids`` look up
    (``lookup_error``): round to nearest's on those rows, times the method's over round to nearest's error
    of the rows themselves on the sampled ``rows``."""
    unique, counts = np.unique(np.asarray(token_ids), return_counts=True)
    looked = np.ascontiguousarray(w[unique], dtype=np.float32)
    rounder = build_method(method) if method is not None and rows is not None else None
    sub = np.ascontiguousarray(w[rows], dtype=np.float32) if rounder is not None else None
    out = {}
    for label, scheme in schemes.items():
        out[label] = lookup_error(looked, looked + nearest_error(looked, scheme), counts)
        if rounder is not None and sub is not None:
            ones = np.ones(len(sub))
            mine = lookup_error(sub, rounder.quantize(sub, scheme, stats).dequantize(), ones)
            near = lookup_error(sub, sub + nearest_error(sub, scheme), ones)
            out[label] *= mine / near if near > 0 else 1.0
    return out


def _sampled_layers(sites: Sequence[WeightSite], count: int) -> set[int | None]:
    layers = sorted({s.layer for s in sites if s.layer is not None})
    if count <= 0 or not layers:
        return {None}
    picks = np.unique(np.linspace(0, len(layers) - 1, num=min(count, len(layers))).round().astype(int))
    return {layers[i] for i in picks} | {None}  # sites outside the stack (the output projection) always


def estimate_errors(
    model: ir.Model,
    sites: Sequence[WeightSite],
    candidates: Mapping[str, QuantScheme],
    method: MethodConfig,
    token_ids: np.ndarray,
    *,
    sample_rows: int = 32,
    sample_blocks: int | None = None,
    shaped_blocks: int = 4,
    seed: int = 0,
    progress: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    model_dir: Path | None = None,
) -> SiteErrors:
    """Energies and relative errors of every site under every candidate (labels -> schemes, formats
    resolved; ``FLOAT`` needs no scheme) for ``method``, from one float calibration pass. A calibrated
    method runs on ``sample_rows`` rows of each site of ``sample_blocks`` evenly spaced blocks (None: every
    block) and on the whole weights of ``shaped_blocks`` of them (``SiteErrors.shaped``)."""
    calibrated = method if method.needs else None
    every = {s.layer for s in sites}
    sampled = every if sample_blocks is None else _sampled_layers(sites, sample_blocks)
    whole = _sampled_layers(sites, shaped_blocks)
    energy: dict[str, SiteEnergy] = {}
    rtn_errs: dict[str, dict[str, float]] = {label: {} for label in candidates}
    samples: dict[tuple[str, str], list[float]] = {}
    own: dict[tuple[str, str], float] = {}
    shaped: dict[str, np.ndarray] = {}
    schemes = {k: v for k, v in candidates.items() if k != FLOAT}
    tied, lookup = lookup_site(sites), {}

    def on_block(block: list[WeightSite], stats: dict[str, SiteStats]) -> dict[str, QuantizedWeight]:
        for i, site in enumerate(block):
            if site.name not in stats:
                continue
            rows = _rows(site.n, sample_rows, seed + i) if site.layer in sampled else None
            w = read_weight(model, site)
            energy[site.name], errs, ratios = _site_errors(
                w, stats[site.name], schemes, calibrated, rows, seed
            )
            for label, t in errs.items():
                rtn_errs[label][site.name] = t
            for label, r in ratios.items():
                samples.setdefault((label, site_kind(site)), []).append(math.log(r))
                own[(label, site.name)] = r
            if calibrated is not None and site.layer in whole and site.layer is not None:
                shaped[site.name] = _shaped_error(w, stats[site.name], calibrated)
            if site.name == tied:
                lookup.update(_lookup_errors(w, stats[site.name], schemes, calibrated, rows, token_ids))
        return {}

    report = run_calibration(
        model, sites, np.asarray(token_ids, dtype=np.int64), on_block, sequential=True,
        progress=progress, providers=tuple(providers), model_dir=model_dir,
    )  # fmt: skip
    ratios = _ratios(samples, schemes, sites) if calibrated is not None else {}
    errors = {label: _scaled(rtn_errs[label], label, ratios.get(label, {}), own, sites) for label in schemes}
    for label, t in lookup.items():
        errors[label][LOOKUP] = t
    if FLOAT in candidates:
        errors[FLOAT] = {s.name: 0.0 for s in sites} | ({LOOKUP: 0.0} if lookup else {})
    return SiteErrors(energy, errors, ratios, report.seconds, shaped)


def _ratios(
    samples: Mapping[tuple[str, str], list[float]],
    schemes: Mapping[str, QuantScheme],
    sites: Sequence[WeightSite],
) -> dict[str, dict[str, float]]:
    """Geometric-mean ratio per (label, kind); a kind without samples takes the label's overall mean."""
    out: dict[str, dict[str, float]] = {}
    kinds = {site_kind(s) for s in sites}
    for label in schemes:
        pooled = [x for (lab, _), xs in samples.items() if lab == label for x in xs]
        overall = math.exp(float(np.mean(pooled))) if pooled else 1.0
        out[label] = {
            k: math.exp(float(np.mean(samples[(label, k)]))) if (label, k) in samples else overall
            for k in kinds
        }
    return out


def _scaled(
    rtn: Mapping[str, float],
    label: str,
    by_kind: Mapping[str, float],
    own: Mapping[tuple[str, str], float],
    sites: Sequence[WeightSite],
) -> dict[str, float]:
    """Round to nearest's error times the method's ratio: the site's own where its rows were sampled (an
    allocation leans on any site a pooled ratio flatters), else its kind's."""
    return {
        s.name: rtn[s.name] * own.get((label, s.name), by_kind.get(site_kind(s), 1.0))
        for s in sites
        if s.name in rtn
    }
