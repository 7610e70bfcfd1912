"""What the calibrated methods (``gptq``, ``adaround``, ``adaround_ls``) share around their rounding: the
checks of a site's weight and statistics, the torch thread setting, rounding in row chunks, and the
metrics every one reports.

Row chunks bound memory: given ``H``, every row of ``W`` is rounded independently (GPTQ's error feedback runs
along a row; AdaRound's variables, Adam and flips are per weight and per row), so a method may round
``rows`` rows at a time and stack the results. What depends on ``H`` alone (permutation, Cholesky factor,
mean Hessian, guard) is computed once per site and kept in ``Site.cache``. The chunk size is a multiple of
``ROW_ALIGN`` so that AdaRound's row tiles (64 rows by default) never straddle two chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..errors import InvalidOptionError, UnsupportedSchemeError
from ..records import QuantizedWeight
from ..scheme import DataType, QuantScheme
from . import hessian as hs
from .base import SiteStats
from .grid import check_finite
from .metrics import db, quadratic_form
from .rtn import round_to_nearest

__all__ = [
    "Site",
    "check_device",
    "merge_info",
    "open_site",
    "round_in_chunks",
    "row_slices",
    "site_report",
    "torch_threads",
]
RowsFn = Callable[["Site"], tuple[QuantizedWeight, dict[str, float], dict[str, QuantizedWeight]]]


@dataclasses.dataclass(frozen=True)
class Site:
    """One weight being rounded: ``w[N, K]``, its statistics (summed Hessian, checked), the Hessian
    prepared for inversion, and when the method started on it. ``w`` is any float array, possibly a
    strided view of a memory-mapped file: the methods read it a row chunk at a time (``rows``), where it
    becomes contiguous float32."""

    name: str
    w: np.ndarray
    scheme: QuantScheme
    stats: SiteStats
    prep: hs.PreparedHessian
    t0: float
    cache: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """What the method derived from ``H`` alone, shared by the site's row chunks."""
    row0: int = 0
    """The first row of ``w`` in the whole site's weight (a row chunk's offset)."""

    def rows(self, r0: int, r1: int) -> Site:
        """The site restricted to rows ``r0:r1`` of its weight, read as a contiguous float32 copy and checked
        (same statistics, same cache)."""
        w = np.ascontiguousarray(self.w[r0:r1], dtype=np.float32)
        check_finite(w, f"site {self.name}: weight")
        return dataclasses.replace(self, w=w, row0=self.row0 + r0)

    @property
    def n(self) -> int:
        return int(self.w.shape[0])

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per site (the row chunks share the result)."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def hessian_on(self, device: str | torch.device) -> torch.Tensor:
        """The summed Hessian as a float64 tensor on ``device`` (one copy per site and device)."""
        return self.cached(f"h:{device}", lambda: torch.from_numpy(np.asarray(self.h, np.float64)).to(device))

    @property
    def h(self) -> np.ndarray:
        """The summed (undampened) Hessian ``X^T X``."""
        return self.stats.hessian  # type: ignore[return-value]  # open_site checked it

    @property
    def n_tokens(self) -> int:
        return self.stats.n_tokens


def open_site(
    method: str, weight: np.ndarray, scheme: QuantScheme, stats: SiteStats | None, name: str
) -> Site:
    """Check the scheme, the weight and the Hessian (a one-line error naming the site) and prepare them."""
    if scheme.data_type is not DataType.INT:
        raise UnsupportedSchemeError(
            f"method {method} rounds onto a uniform integer grid; data_type={scheme.data_type.value} "
            "is not supported (use data_type=int)"
        )
    t0 = time.perf_counter()
    prep = hs.prepare(None if stats is None else stats.hessian, weight.shape[1], name)  # raises without stats
    return Site(name, weight, scheme, stats, prep, t0)  # type: ignore[arg-type]


def row_slices(n: int, rows: int | None) -> list[tuple[int, int]]:
    """``[r0, r1)`` chunks of at most ``rows`` rows covering ``n`` rows (one chunk for None)."""
    step = n if rows is None or rows >= n else max(int(rows), 1)
    return [(r0, min(r0 + step, n)) for r0 in range(0, max(n, 1), max(step, 1))]


_MEAN_KEYS = ("_frac", "_rows", "clip_mean", "kept_init")
_SUM_KEYS = ("proxy_loss_before_polish",)


def merge_info(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """One info record from ``(rows, info)`` of each chunk: fractions and means weighted by rows, sums
    summed, the rest (per-site values such as ``percdamp`` or ``fallback``) the largest."""
    if len(parts) == 1:
        return dict(parts[0][1])
    total = max(sum(r for r, _ in parts), 1)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for _, info in parts for k in info):
        values = [(r, info[key]) for r, info in parts if key in info]
        if key.endswith(_MEAN_KEYS):
            out[key] = sum(r * v for r, v in values) / total
        elif key in _SUM_KEYS:
            out[key] = sum(v for _, v in values)
        else:
            out[key] = max(v for _, v in values)
    return out


def round_in_chunks(
    site: Site, rows: int | None, fn: RowsFn
) -> tuple[QuantizedWeight, dict[str, float], dict[str, QuantizedWeight]]:
    """``fn`` on each row chunk of ``site``; the chunks' weights (and references) written in row order into
    whole-site arrays as they come."""
    slices = row_slices(site.n, rows)
    if len(slices) == 1:
        return fn(site.rows(*slices[0]))
    out: dict[str, QuantizedWeight] = {}  # "" = the rounding, else the references; shaped by the first chunk
    infos = []
    for r0, r1 in slices:
        part, info, refs = fn(site.rows(r0, r1))
        for name, chunk in (("", part), *refs.items()):
            if name not in out:
                out[name] = QuantizedWeight.empty_like(chunk, site.n)
            out[name].put(r0, chunk)
        infos.append((part.n, info))
    whole = out.pop("")
    return whole, merge_info(infos), out


def site_report(
    site: Site,
    qw: QuantizedWeight,
    info: dict[str, float],
    rows: int | None = None,
    **refs: QuantizedWeight,
) -> QuantizedWeight:
    """``qw`` with its metrics: proxy loss, weight and output SQNR, ``proxy_loss_<name>`` of each reference
    rounding in ``refs`` and of the ``rtn`` method's default, ``info``, and the time taken. The sums run
    over row chunks of ``rows`` rows (float64), so the report holds no full-size float copy."""
    h = torch.from_numpy(np.asarray(site.h, dtype=np.float64))
    sums = dict.fromkeys(("err", "signal", "w2", "d2", *refs, "rtn"), 0.0)
    for r0, r1 in row_slices(site.n, rows):
        part = site.rows(r0, r1).w
        w = torch.from_numpy(part).to(torch.float64)
        d = torch.from_numpy(qw.rows(r0, r1).dequantize()).to(torch.float64) - w
        sums["err"] += quadratic_form(d, h)
        sums["signal"] += quadratic_form(w, h)
        sums["w2"] += float((w * w).sum())
        sums["d2"] += float((d * d).sum())
        rtn = QuantizedWeight(*round_to_nearest(part, site.scheme), site.scheme)
        for name, ref in (*refs.items(), ("rtn", rtn)):
            ref_rows = ref if name == "rtn" else ref.rows(r0, r1)
            sums[name] += quadratic_form(torch.from_numpy(ref_rows.dequantize()).to(torch.float64) - w, h)
    n = max(int(site.n_tokens), 1)
    qw.metrics.update(
        proxy_loss=sums["err"] / n,
        sqnr_db=db(sums["w2"], sums["d2"]),
        output_sqnr_db=db(sums["signal"], sums["err"]),
    )
    for name in (*refs, "rtn"):
        qw.metrics[f"proxy_loss_{name}"] = sums[name] / n
    qw.metrics.update(info)
    qw.metrics["time_s"] = time.perf_counter() - site.t0
    return qw


def check_device(config: Any) -> None:
    """A one-line error when ``config.device`` names a GPU that torch does not see here."""
    if config.device not in (None, "cpu") and not torch.cuda.is_available():
        raise InvalidOptionError(
            f"{config.name} option device={config.device!r}: torch {torch.__version__} sees no CUDA "
            "device here; use 'cpu'"
        )


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads inside the block (None: leave as is).

    The rounding loops issue thousands of small ops; with OpenMP threads on a busy 2-core machine each op
    waits at a barrier for a descheduled peer (measured in the pipeline: GPTQ 6 s instead of 0.3 s per site,
    ``cholesky_inverse`` 1.9 s instead of 0.01 s), so the methods default to one thread.
    """
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
