"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

Figures have a fixed pixel size (``size_px``), so a reader of the files (and the tests) knows what to expect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .graph_passes.errors import UserError

__all__ = ["PlotError", "plot_perplexity_vs_bits", "plot_sqnr_bars"]

_DPI = 100


class PlotError(UserError):
    """Nothing to plot, or the values cannot be drawn."""


def _figure(size_px: tuple[int, int]) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(size_px[0] / _DPI, size_px[1] / _DPI), dpi=_DPI)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")  # no bbox_inches="tight": it would change the pixel size
    plt.close(fig)
    return path


def plot_sqnr_bars(
    sqnr_db: Mapping[str, float],
    path: str | Path,
    *,
    title: str = "Per-layer weight SQNR",
    size_px: tuple[int, int] = (1400, 500),
) -> Path:
    """One bar per quantized site (in the given order), SQNR in dB; infinite values are drawn at the top."""
    if not sqnr_db:
        raise PlotError("no per-site SQNR values to plot (evaluate with a reference model)")
    names = list(sqnr_db)
    finite = [v for v in sqnr_db.values() if math.isfinite(v)]
    cap = (max(finite) if finite else 0.0) + 5.0
    values = [v if math.isfinite(v) else cap for v in sqnr_db.values()]
    fig = _figure(size_px)
    ax = fig.add_subplot(1, 1, 1)
    # Colour by projection type (the last part of the module path) so patterns across layers stand out.
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    palette = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    ax.bar(range(len(names)), values, color=[palette[n.rsplit(".", 1)[-1]] for n in names], width=0.85)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=palette[k], label=k) for k in kinds],
        fontsize=7,
        ncol=min(len(kinds), 7),
        loc="lower right",
    )
    ax.set_xlim(-1, len(names))
    # Start below the worst site, not at 0: the differences between sites are a few dB.
    ax.set_ylim(max(0.0, min(values) - 3.0) if min(values) > 0 else min(values) - 1.0, cap + 1.0)
    ax.set_ylabel("SQNR (dB)")
    ax.set_xlabel(f"quantized weight ({len(names)} sites, graph order)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    fig.subplots_adjust(bottom=0.3 if len(names) <= 40 else 0.12)
    return _save(fig, path)


def plot_perplexity_vs_bits(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    fp32_perplexity: float | None = None,
    title: str = "Perplexity vs bits per weight",
    log_y: bool = True,
    size_px: tuple[int, int] = (900, 600),
) -> Path:
    """Scatter of perplexity against bits per weight, one series per ``method``.

    Each point is a mapping with ``method``, ``bits_per_weight``, ``perplexity`` and optionally ``label``
    (written next to the point, e.g. the scheme). Points without a finite value are left out.
    """
    usable = [
        p
        for p in points
        if p.get("bits_per_weight") is not None
        and p.get("perplexity") is not None
        and math.isfinite(float(p["perplexity"]))
    ]
    if not usable:
        raise PlotError("no (bits per weight, perplexity) points to plot")
    fig = _figure(size_px)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(str(p["method"]) for p in usable))
    markers = "osD^v<>pP*Xh"
    for i, method in enumerate(methods):
        series = sorted((p for p in usable if str(p["method"]) == method), key=lambda p: p["bits_per_weight"])
        xs = [float(p["bits_per_weight"]) for p in series]
        ys = [float(p["perplexity"]) for p in series]
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-", label=method, alpha=0.85)
        for p, x, y in zip(series, xs, ys, strict=True):
            if p.get("label"):
                ax.annotate(str(p["label"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fp32_perplexity is not None:
        ax.axhline(
            fp32_perplexity, color="k", linestyle="--", linewidth=1, label=f"fp32 ({fp32_perplexity:.2f})"
        )
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("bits per quantized weight (codes + scales + zero points)")
    ax.set_ylabel("perplexity" + (" (log scale)" if log_y else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
