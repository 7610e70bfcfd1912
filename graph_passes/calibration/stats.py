"""Streaming reduction of activations into ``SiteStats`` (``H = sum X^T X`` in float64)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import CalibrationError
from ..records import WeightSite
from ..rounding.base import SiteStats

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    """One float64 ``[K, K]`` sum per activation; batches are added and dropped as they arrive."""

    def __init__(self, sites: Iterable[WeightSite]) -> None:
        self.stats: dict[str, SiteStats] = {}
        self.k: dict[str, int] = {}
        for s in sites:
            if s.activation in self.k and self.k[s.activation] != s.k:
                raise CalibrationError(
                    f"sites reading activation {s.activation!r} disagree on its width ({self.k[s.activation]} "
                    f"vs {s.k} for {s.name!r})"
                )
            self.k[s.activation] = s.k
            self.stats.setdefault(s.activation, SiteStats(hessian=np.zeros((s.k, s.k), np.float64)))

    @property
    def activations(self) -> list[str]:
        return list(self.stats)

    def add(self, activation: str, x: np.ndarray) -> None:
        """Add ``x[..., K]`` (any leading dims = tokens) to the activation's running sum."""
        k = self.k[activation]
        if x.shape[-1] != k:
            raise CalibrationError(
                f"activation {activation!r} has last dim {x.shape[-1]}, but its weight sites expect K={k}"
            )
        x2 = np.asarray(x).reshape(-1, k)
        if not np.isfinite(x2).all():
            raise CalibrationError(
                f"activation {activation!r} contains NaN or Inf on the calibration data "
                "(overflow in the model or bad inputs); cannot compute its statistics"
            )
        # float32 products are exact in float64; summing there keeps H accurate over many tokens.
        x64 = x2.astype(np.float64)
        st = self.stats[activation]
        assert st.hessian is not None
        st.hessian += x64.T @ x64
        st.n_tokens += x2.shape[0]

    def by_site(self, sites: Iterable[WeightSite]) -> dict[str, SiteStats]:
        """Stats keyed by site name; sites sharing an activation share one object."""
        return {s.name: self.stats[s.activation] for s in sites}
