"""Streaming reduction of activations into ``SiteStats`` (``H = sum X^T X``, summed in float64).

Two precisions for the per-batch product (the running sum is float64 either way):

- ``"float64"`` (default): ``x`` is widened first; products of float32 values are exact in float64, so H
  matches a float64 reference to ~1e-15 relative.
- ``"float32"``: the batch's ``X^T X`` is one float32 GEMM (about 2x less CPU on AVX2, where X^T X is ~40% of
  a sequential calibration's time), then added into the float64 sum. Entries then carry relative errors of
  ~1e-6 of their row/column scale, far below GPTQ's 1% dampening; GPTQ implementations commonly accumulate
  in float32 throughout.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from ..errors import CalibrationError, InvalidOptionError
from ..records import WeightSite
from ..rounding.base import FIRST_POSITION, FIRST_POSITION_TOKENS, SiteStats

__all__ = ["MAPPED_BYTES", "PRECISIONS", "HessianAccumulator", "Precision", "check_precision"]


Precision = Literal["float64", "float32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str) -> Precision:
    """``precision`` if it is one of ``PRECISIONS``, else InvalidOptionError naming the accepted ones."""
    if precision not in PRECISIONS:
        raise InvalidOptionError(f"hessian precision {precision!r}: use 'float64' or 'float32'")
    return precision  # type: ignore[return-value]


MAPPED_BYTES = 64 << 20
"""Sums of this size and up (K >= 2897) live in memory-mapped ``.npy`` files when a folder is given: pages
the kernel may write out and drop, and that worker processes map instead of receiving a copy."""


PRODUCT_BYTES = 64 << 20
"""Largest temporary of a batch's ``X^T X``: it is added into the sum a block of rows at a time (a whole
K x K product for K = 14336 is 1.6 GB in float64)."""


def _zeros(k: int, folder: Path | None) -> np.ndarray:
    if folder is None or 8 * k * k < MAPPED_BYTES:
        return np.zeros((k, k), np.float64)
    fd, name = tempfile.mkstemp(suffix=".npy", prefix="hessian-", dir=folder)
    os.close(fd)
    return np.lib.format.open_memmap(name, mode="w+", dtype=np.float64, shape=(k, k))  # zero-filled


class HessianAccumulator:
    """One float64 ``[K, K]`` sum per activation; batches are added and dropped as they arrive. With
    ``folder``, wide sums are memory-mapped files there (deleted with the folder)."""

    def __init__(
        self, sites: Iterable[WeightSite], precision: Precision = "float64", folder: Path | None = None
    ) -> None:
        self.dtype = np.dtype(check_precision(precision))
        self.stats: dict[str, SiteStats] = {}
        # the same arrays as ``stats[a].hessian``, typed as present
        self.hessians: dict[str, np.ndarray] = {}
        for s in sites:
            if s.activation in self.hessians:
                k = self.hessians[s.activation].shape[0]
                if k != s.k:
                    raise CalibrationError(
                        f"sites reading activation {s.activation!r} disagree on its width ({k} "
                        f"vs {s.k} for {s.name!r})"
                    )
                continue
            self.hessians[s.activation] = _zeros(s.k, folder)
            self.stats[s.activation] = SiteStats(hessian=self.hessians[s.activation])

    @property
    def activations(self) -> list[str]:
        return list(self.stats)

    def _rows(self, activation: str, x: np.ndarray) -> np.ndarray:
        k = self.hessians[activation].shape[0]
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
        return x2

    def add(self, activation: str, x: np.ndarray) -> None:
        """Add ``x[..., K]`` (any leading dims = tokens) to the activation's running sum."""
        x2 = self._rows(activation, x)
        xw = x2.astype(self.dtype, copy=False)
        h = self.hessians[activation]
        step = max(1, PRODUCT_BYTES // (xw.itemsize * h.shape[0]))
        for i in range(0, h.shape[0], step):  # by row blocks: no K x K temporary beside the sum
            h[i : i + step] += xw[:, i : i + step].T @ xw
        st = self.stats[activation]
        st.n_tokens += x2.shape[0]
        if np.ndim(x) == 3:  # [batch, seq, K]: the first positions' rows, for methods that guard the rest
            first = x2.reshape(x.shape)[:, 0, :].astype(np.float64)
            if FIRST_POSITION not in st.extra:
                st.extra[FIRST_POSITION] = np.zeros((0, h.shape[0]), np.float64)
                st.extra[FIRST_POSITION_TOKENS] = np.zeros((), np.int64)
            st.extra[FIRST_POSITION] = np.concatenate([st.extra[FIRST_POSITION], first])
            st.extra[FIRST_POSITION_TOKENS] += first.shape[0]

    def by_site(self, sites: Iterable[WeightSite]) -> dict[str, SiteStats]:
        """Stats keyed by site name; sites sharing an activation share one object."""
        return {s.name: self.stats[s.activation] for s in sites}
