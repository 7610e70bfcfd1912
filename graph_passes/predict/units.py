"""Allocation units and the per-site quantities the predictor reads (pure functions, no onnxruntime).

A *unit* is the group of sites fed by one activation (q/k/v, gate/up; o, down and the output projection
alone). A unit gets one format: its sites share the Hessian and are fused into one kernel when their formats
match, and its sensitivity is probed as one. Its relative output error under a scheme is the members' output
error energy over their output energy, ``t = sum tr(dW H dW^T) / sum tr(W H W^T)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..records import WeightSite

__all__ = [
    "LOOKUP",
    "REFERENCE",
    "SiteEnergy",
    "Unit",
    "lookup_error",
    "lookup_site",
    "output_energy",
    "site_errors",
    "unit_error",
    "units_of",
]

REFERENCE = "w4-g128"
"""The scheme whose round-to-nearest error, rescaled, is the probes' noise under ``noise="rounding"``:
quantization-shaped (larger where a block's range is larger)."""

LOOKUP = "token_embedding"
"""The predictor's key for a token embedding table that shares its codes with a tied output projection.
Its own unit: the same codes cost the lookup a relative error of their own (the rows' error over the rows,
weighted by how often the text looks each up), which a calibrated method does not lower with the output
projection's error (gptq W2 g64 on SmolLM2-135M: the projection's output error is 1/6 of round to
nearest's, the lookup's 1.6 times)."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """Sites that read one activation, in graph order; ``name`` is the first site's module path."""

    name: str
    sites: tuple[str, ...]
    layer: int | None
    kinds: tuple[str, ...]
    """The last path component of each site (``q_proj``, ``down_proj``, ``lm_head``...)."""

    @property
    def label(self) -> str:
        """``model.layers.3.self_attn.{q,k,v}_proj``-style short label."""
        if len(self.sites) == 1:
            return self.name
        head = self.name.rsplit(".", 1)[0]
        return f"{head}.{{{','.join(self.kinds)}}}"


def units_of(sites: Sequence[WeightSite]) -> list[Unit]:
    """One unit per activation, in the order of the sites' first appearance."""
    groups: dict[str, list[WeightSite]] = {}
    for s in sites:
        groups.setdefault(s.activation, []).append(s)
    return [
        Unit(g[0].name, tuple(s.name for s in g), g[0].layer, tuple(s.name.rsplit(".", 1)[-1] for s in g))
        for g in groups.values()
    ]


@dataclasses.dataclass(frozen=True)
class SiteEnergy:
    """What the probes and the predictor need of one site: ``signal = tr(W H W^T) / n`` (mean output energy
    per token) and ``trace_h = tr(H) / n``, both under the float model's statistics."""

    signal: float
    trace_h: float
    n: int
    """Output channels (rows of W)."""
    ref_error: float = 0.0
    """Relative output error of round to nearest under ``REFERENCE`` (the shape of the probes' noise)."""


def output_energy(d: np.ndarray, h: np.ndarray | torch.Tensor) -> float:
    """``tr(d H d^T)``: float32 product, float64 sum."""
    d32 = torch.from_numpy(np.array(d, dtype=np.float32))  # a copy: weights may be read-only mmaps
    h32 = h if isinstance(h, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32))
    return float(((d32 @ h32) * d32).sum(dtype=torch.float64))


def unit_error(t_by_site: Mapping[str, float], energy: Mapping[str, SiteEnergy], unit: Unit) -> float:
    """A unit's relative output error from its sites' relative errors, weighted by their output energy."""
    sig = sum(energy[s].signal for s in unit.sites)
    if sig <= 0:
        return 0.0
    return sum(t_by_site[s] * energy[s].signal for s in unit.sites) / sig


def lookup_site(sites: Sequence[WeightSite]) -> str | None:
    """The output projection whose weight is also a token lookup's table (its codes are shared), if any."""
    return next((s.name for s in sites if s.kind == "lm_head" and s.tied), None)


def lookup_error(rows: np.ndarray, approx: np.ndarray, counts: np.ndarray) -> float:
    """Relative error of a table's ``rows`` stored as ``approx``, each row weighted by ``counts``."""
    r = np.asarray(rows, dtype=np.float64)
    d = np.asarray(approx, dtype=np.float64) - r
    c = np.asarray(counts, dtype=np.float64)
    sig = float(c @ (r * r).sum(axis=1))
    return float(c @ (d * d).sum(axis=1)) / sig if sig > 0 else 0.0


def site_errors(
    labels: Mapping[str, str], errors: Mapping[str, Mapping[str, float]], tied: str | None
) -> dict[str, float]:
    """Relative error per site (and ``LOOKUP``) of a choice of candidate label per site: ``errors[label]
    [site]``; the lookup's follows the label of the output projection ``tied`` to it (0 when float)."""
    t = {s: errors[lab][s] for s, lab in labels.items()}
    if tied is not None and tied in labels:
        t[LOOKUP] = errors[labels[tied]].get(LOOKUP, 0.0)
    return t
