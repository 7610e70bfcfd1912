"""What the calibrated methods (``gptq``, ``adaround``, ``adaround_ls``) share around their rounding: the
checks of a site's weight and statistics, the torch thread setting, and the metrics every one reports."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import UnsupportedSchemeError
from ..records import QuantizedWeight
from ..scheme import DataType, QuantScheme
from . import hessian as hs
from .base import SiteStats
from .grid import check_finite
from .metrics import proxy_loss, site_quality
from .rtn import round_to_nearest

__all__ = ["Site", "open_site", "site_report", "torch_threads"]


@dataclasses.dataclass(frozen=True)
class Site:
    """One weight being rounded: float32 ``w[N, K]``, its statistics (summed Hessian, checked), the
    Hessian prepared for inversion, and when the method started on it."""

    name: str
    w: np.ndarray
    scheme: QuantScheme
    stats: SiteStats
    prep: hs.PreparedHessian
    t0: float

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
    w = np.ascontiguousarray(weight, dtype=np.float32)
    check_finite(w, f"site {name}: weight")
    prep = hs.prepare(None if stats is None else stats.hessian, w.shape[1], name)  # raises without stats
    return Site(name, w, scheme, stats, prep, t0)  # type: ignore[arg-type]


def site_report(
    site: Site, qw: QuantizedWeight, info: dict[str, float], **refs: np.ndarray
) -> QuantizedWeight:
    """``qw`` with its metrics: proxy loss, weight and output SQNR, ``proxy_loss_<name>`` of each reference
    rounding in ``refs`` (dequantized) and of the ``rtn`` method's default, ``info``, and the time taken."""
    rtn_codes, rtn_scales, rtn_zps = round_to_nearest(site.w, site.scheme)
    refs["rtn"] = QuantizedWeight(rtn_codes, rtn_scales, rtn_zps, site.scheme).dequantize()
    qw.metrics.update(site_quality(site.w, qw.dequantize(), site.h, site.n_tokens))
    for ref_name, ref in refs.items():
        qw.metrics[f"proxy_loss_{ref_name}"] = proxy_loss(site.w, ref, site.h, site.n_tokens)
    qw.metrics.update(info)
    qw.metrics["time_s"] = time.perf_counter() - site.t0
    return qw


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
