"""Activation-aware per-channel scaling (``--transform awq``): input channels that carry large activations
get larger weights, folded out of the RMSNorm that feeds them, so the float model is unchanged.

For an RMSNorm whose output only linear layers read (q/k/v after the input norm, gate/up after the
post-attention norm), ``y = norm(x) * g`` and ``out = y W``: with ``s > 0`` per channel, ``g <- g / s`` and
``W <- diag(s) W`` give the same ``out``, while rounding ``diag(s) W`` spends the grid's resolution on the
channels ``s`` enlarges. ``s = rms(y)^alpha`` (normalised to a geometric mean of 1 between its extremes),
``alpha`` from a grid, chosen per norm to minimise the readers' output error under the calibration
statistics, ``sum tr(dW H dW^T)`` with ``dW = Q(diag(s) W) / s - W`` and ``Q`` the run's rounding under its
scheme where it needs only ``H`` (gptq, on 64 rows of each weight), else round to nearest (AWQ's objective
under our ``H``; ``alpha = 0`` leaves the norm as it was). Rounding then runs
on the scaled graph with its own statistics. The output projection is not scaled: its table may also be the
token lookup's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..calibration.engine import run_calibration
from ..errors import InternalError
from ..model_io import read_weight
from ..predict.units import output_energy
from ..records import QuantizedWeight, WeightSite
from ..rounding.base import MethodConfig, RoundingMethod, SiteStats, build_method
from ..rounding.rtn import RTNConfig
from ..scheme import QuantScheme
from .residual import Norm, find_rms_norms, weight_of
from .rotate import replace_initializer, weight_kn

__all__ = ["ALPHAS", "ScaleInputsPass", "choose_scale", "scale_groups"]

ALPHAS = tuple(i / 10 for i in range(11))
"""The exponents tried (AWQ's grid of 0..1 in steps of 0.05 halved: each try rounds the group's weights)."""


def scale_groups(graph: ir.Graph, sites: Sequence[WeightSite]) -> list[tuple[Norm, list[WeightSite]]]:
    """Each RMSNorm whose output only the given linear layers read (none of them an output projection),
    with those layers."""
    by_activation: dict[str, list[WeightSite]] = {}
    for s in sites:
        by_activation.setdefault(s.activation, []).append(s)
    nodes = {n.name: n for n in graph}
    groups = []
    for norm in find_rms_norms(graph):
        readers = by_activation.get(norm.output.name or "", [])
        reading = {id(node) for node, _ in norm.output.uses() if node.op_type != "Shape"}  # shapes stay
        if not readers or any(s.kind == "lm_head" for s in readers):
            continue
        if reading != {id(nodes[s.node_name]) for s in readers if s.node_name in nodes}:
            continue  # something else reads the norm's values too
        if any(weight_of(nodes[s.node_name]) is None for s in readers):
            continue
        groups.append((norm, readers))
    return groups


def choose_scale(
    weights: Sequence[np.ndarray], h: np.ndarray, scheme: QuantScheme, alphas: Sequence[float] = ALPHAS,
    method: MethodConfig | None = None,
) -> tuple[float, np.ndarray, float]:  # fmt: skip
    """``(alpha, s, error ratio to alpha = 0)`` minimising ``sum tr(dW H dW^T)`` over ``weights``
    (``[N, K]`` each) for ``s = rms^alpha``, ``rms`` the input channels' from ``H`` (``[K, K]``). ``method``:
    the rounding that ``dW`` is measured for (one that needs only ``H``, on ``METHOD_ROWS`` rows of each
    weight; round to nearest when None or when it needs more)."""
    rms = np.sqrt(np.maximum(np.diag(h), 1e-12))
    rounder: RoundingMethod = build_method(method if calibrated(method) else RTNConfig())  # type: ignore[arg-type]
    if calibrated(method):
        weights = [np.ascontiguousarray(w[_rows(w.shape[0])]) for w in weights]
    best: tuple[float, np.ndarray, float] | None = None
    base = 0.0
    for alpha in alphas:
        s = rms**alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = sum(_output_error(rounder, w, s, h, scheme) for w in weights)
        if alpha == 0:
            base = err
        if best is None or err < best[2]:
            best = (alpha, s, err)
    assert best is not None  # noqa: S101 (alphas is never empty)
    return best[0], best[1], best[2] / base if base > 0 else 1.0


def calibrated(method: MethodConfig | None) -> bool:
    """A method whose rounding depends on ``H`` alone (gptq): the exponent is chosen for it."""
    return method is not None and bool(method.needs) and method.needs <= {"hessian"}


METHOD_ROWS = 64
"""Rows of each weight a calibrated method rounds per exponent tried (rows are independent given ``H``)."""


def _rows(n: int) -> np.ndarray:
    return np.arange(n) if n <= METHOD_ROWS else np.linspace(0, n - 1, METHOD_ROWS).round().astype(int)


def _output_error(
    rounder: RoundingMethod, w: np.ndarray, s: np.ndarray, h: np.ndarray, scheme: QuantScheme
) -> float:
    """The output error under ``H`` of rounding ``w diag(s)`` (whose input is ``x / s``: ``H`` scaled)."""
    stats = SiteStats(hessian=h / np.outer(s, s).astype(np.float64), n_tokens=1)
    d = rounder.quantize(np.ascontiguousarray(w * s), scheme, stats).dequantize() / s - w
    return output_energy(d, h)


class ScaleInputsPass(ir.passes.InPlacePass):
    """Scale each eligible RMSNorm's readers by ``choose_scale`` on ``token_ids`` and fold ``1 / s`` into
    the norm. ``record``: how many norms were scaled, their exponents and output error ratios, or why
    nothing was done (the graph is then left as it was)."""

    def __init__(self, seed: int = 0, *, token_ids: np.ndarray | None = None, scheme: QuantScheme | None = None,
                 folder: Path | None = None, method: MethodConfig | None = None) -> None:  # fmt: skip
        super().__init__()
        self.token_ids, self.folder = token_ids, folder
        self.method = method if calibrated(method) else None
        self.scheme = scheme or QuantScheme.parse("w4-g128")
        self.record: dict[str, object] = {"applied": False}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from ..pipeline import prepare_sites  # the pipeline imports the transforms

        if self.token_ids is None:
            self.record = {"applied": False, "reason": "no calibration text to measure activations on"}
            return ir.passes.PassResult(model, modified=False)
        groups = scale_groups(model.graph, prepare_sites(model, quantize_lm_head=False).sites)
        if not groups:
            self.record = {"applied": False, "reason": "no RMSNorm whose output only linear layers read"}
            return ir.passes.PassResult(model, modified=False)
        chosen = self._choose(model, groups)
        nodes = {n.name: n for n in model.graph}
        for norm, readers in groups:
            alpha, s, _ = chosen[norm.output.name or ""]
            if alpha > 0:
                _fold(model.graph, nodes, norm, readers, s.astype(np.float64))
        alphas = [c[0] for c in chosen.values()]
        self.record = {"applied": True, "scheme": self.scheme.label, "norms": len(groups),
                       "chosen_for": self.method.name if self.method is not None else "rtn",
                       "scaled": sum(a > 0 for a in alphas), "alphas": alphas,
                       "error_ratios": [round(c[2], 4) for c in chosen.values()]}  # fmt: skip
        return ir.passes.PassResult(model, modified=True)

    def _choose(self, model: ir.Model, groups: list[tuple[Norm, list[WeightSite]]]) -> dict[str, tuple]:
        chosen: dict[str, tuple] = {}

        def on_block(block: list[WeightSite], stats: dict[str, SiteStats]) -> dict[str, QuantizedWeight]:
            for norm, readers in groups:
                key = norm.output.name or ""
                if key not in chosen and readers[0].name in stats:
                    h = np.asarray(stats[readers[0].name].hessian, dtype=np.float64)
                    weights = [read_weight(model, s) for s in readers]
                    chosen[key] = choose_scale(weights, h, self.scheme, method=self.method)
            return {}

        sites = [s for _, readers in groups for s in readers]
        run_calibration(model, sites, np.asarray(self.token_ids, dtype=np.int64), on_block, sequential=False,
                        progress=False, model_dir=self.folder)  # fmt: skip
        missing = sorted({norm.output.name or "" for norm, _ in groups} - set(chosen))
        if missing:
            raise InternalError(f"awq: no statistics for {missing[0]}")
        return chosen


def _fold(graph: ir.Graph, nodes: Mapping[str | None, ir.Node], norm: Norm, readers: Sequence[WeightSite],
          s: np.ndarray) -> None:  # fmt: skip
    """``W <- diag(s) W`` for each reader (``nodes``: the graph's by name) and the norm's multiplier
    ``(offset + g) <- (offset + g) / s``."""
    for site in readers:
        node = nodes[site.node_name]
        replace_initializer(graph, node, 1, s[:, None] * weight_kn(node), weight_of(node)[0])  # type: ignore[index]
    node, index = norm.scale_user
    multiplier = norm.offset + norm.scale.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
    replace_initializer(graph, node, index, multiplier / s, norm.scale)
