"""Round-to-nearest, with an optional per-block clip-ratio search (data-free baseline).

``search="mse"`` shrinks each block's range by each ratio of a grid (1.0 down to ``min_clip``) and keeps
the ratio whose rounding has the least squared error, so a few outliers no longer stretch the grid of the
whole block. Ratio 1.0 is tried first and only a strictly smaller error replaces it, so weights that
already lie on a min-max grid keep their exact codes. ``grid="ort"`` reproduces onnxruntime's own RTN
quantizer bit for bit (its ``roundf`` rounding of codes and zero points, see ``grid.py``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np
from tqdm.auto import tqdm

from ..errors import UnsupportedSchemeError
from ..options import option
from ..records import QuantizedWeight
from ..scheme import DataType, QuantScheme
from .base import MethodConfig, SiteStats, register_method
from .grid import (
    blockwise_minmax,
    check_finite,
    grid_params,
    ort_codes,
    ort_grid_params,
    pad_blocks,
    quantize_blocks,
)
from .metrics import db, proxy_loss, sqnr_db

__all__ = [
    "CLIP_GRID",
    "RTN",
    "RTNConfig",
    "clip_ratios",
    "mse_clip_search",
    "nearest_error",
    "round_to_nearest",
]

_TINY = np.float32(1e-12)  # scales at or below this are all-zero blocks (as in grid.py)


def clip_ratios(n_grid: int, min_clip: float) -> np.ndarray:
    """The ratios tried by the MSE search, 1.0 first, float32."""
    return np.linspace(1.0, min_clip, n_grid, dtype=np.float32)


def mse_clip_search(
    w: np.ndarray, scheme: QuantScheme, ratios: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, float]:
    """Per-block best clip ratio of ``w[N, K]``.

    Returns ``(scales, zero_points, codes[N, K], clip[N, nb], squared_error)``; a single ratio 1.0 is plain
    min-max RTN. The squared error of the result comes for free and spares a full dequantization.
    """
    n, k = w.shape
    block = scheme.block_size(k)
    blocks = pad_blocks(w, block)
    # Padding repeats the edge value: mask it out of the error so the last column is not over-weighted.
    mask = None
    if k % block:
        mask = np.ones(blocks.shape[1:], np.float32)
        mask[-1, k % block :] = 0
    bmin, bmax = blocks.min(axis=2), blocks.max(axis=2)
    best_err = np.full(bmin.shape, np.inf, np.float32)
    best_clip = np.ones(bmin.shape, np.float32)
    mid = np.float32(scheme.implied_zero_point)
    for c in ratios:
        s, z = grid_params(bmin, bmax, scheme, clip=c)
        # Error in code units, scaled back by s^2: ((q - z) s - w)^2 = s^2 (q - (w / s + z))^2. Same
        # rounding as quantize_blocks, two fewer passes over the block than dequantizing.
        live = np.abs(s) > _TINY
        t = blocks / np.where(live, s, np.float32(1))[..., None]
        t += mid if z is None else z[..., None].astype(np.float32)
        d = np.rint(t)
        np.clip(d, scheme.qmin, scheme.qmax, out=d)
        d -= t
        if mask is not None:
            d *= mask
        err = np.einsum("ijk,ijk->ij", d, d) * np.where(live, s * s, np.float32(0))
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_clip = np.where(better, c, best_clip)
    scales, zp = grid_params(bmin, bmax, scheme, clip=best_clip)
    q = quantize_blocks(blocks, scales, zp, scheme)
    codes = q.reshape(n, -1)[:, :k].astype(np.uint8)
    return scales, zp, codes, best_clip, float(best_err.sum(dtype=np.float64))


# Clip factors tried by the default MSE clip search (``rtn`` search="mse", ``gptq`` mse_clip): 1.0 first.
CLIP_GRID: np.ndarray = clip_ratios(16, 0.5)


def round_to_nearest(
    w: np.ndarray, scheme: QuantScheme, mse_clip: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest exactly as the ``rtn`` method does it (min-max by default, per-block MSE clip
    search with ``mse_clip=True``): the baseline in metrics and the fallback. Codes, scales, zps."""
    ratios = CLIP_GRID if mse_clip else np.ones(1, np.float32)
    scales, zps, codes, _, _ = mse_clip_search(np.ascontiguousarray(w, dtype=np.float32), scheme, ratios)
    return codes, scales, zps


@dataclasses.dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Options of ``rtn``: round-to-nearest on a uniform grid, no calibration data."""

    name: ClassVar[str] = "rtn"

    search: Literal["minmax", "mse"] = option(
        "minmax",
        "per-block range: the full one, or the clip ratio with the least squared error (mse hurt "
        "perplexity: benchmarks/results/option_defaults.md)",
    )
    grid: Literal["default", "ort"] = option(
        "default", "ort: onnxruntime's own RTN grid and rounding, bit for bit (needs search=minmax)"
    )
    n_grid: int = option(16, "clip ratios tried by search=mse, from 1.0 down to min_clip")
    min_clip: float = option(0.5, "the smallest clip ratio tried by search=mse")
    chunk_rows: int = option(4096, "rows searched at once: bounds the search's scratch memory")
    progress: bool = option(False, "a progress bar over the row chunks of each weight")

    def validate(self) -> None:
        if self.grid == "ort" and self.search != "minmax":
            self.reject("grid", "reproduces onnxruntime's min-max RTN; use search='minmax'")
        if self.n_grid < 1:
            self.reject("n_grid", "use an integer >= 1")
        if not 0.0 < self.min_clip <= 1.0:
            self.reject("min_clip", "use a ratio in (0, 1]")
        if self.chunk_rows < 1:
            self.reject("chunk_rows", "use a positive integer")


@register_method(RTNConfig)
class RTN:
    """Round-to-nearest on a uniform grid; min-max by default, per-block MSE clip search on request."""

    def __init__(self, config: RTNConfig) -> None:
        self.config = config
        self.ratios = clip_ratios(config.n_grid, config.min_clip)

    def quantize(
        self,
        weight: np.ndarray,
        scheme: QuantScheme,
        stats: SiteStats | None = None,
        *,
        site: str = "?",
        memory: int | None = None,
    ) -> QuantizedWeight:
        """``memory`` is not needed: the search holds ``chunk_rows`` rows at a time."""
        if scheme.data_type is not DataType.INT:
            raise UnsupportedSchemeError(
                f"rtn quantizes to uniform integer grids; data_type={scheme.data_type.value} is not one"
            )
        w = np.asarray(weight)  # may be a view of the stored tensor (fp16, transposed): read by chunks
        if w.ndim != 2:
            raise UnsupportedSchemeError(f"rtn expects a 2-D weight [N, K], got shape {list(w.shape)}")
        if self.config.grid == "ort":
            w = np.asarray(w, dtype=np.float32)
            check_finite(w)
            qw = self._ort(w, scheme)
        else:
            qw = self._searched(w, scheme)
        if stats is not None and stats.hessian is not None:
            w = np.asarray(w, dtype=np.float32)
            qw.metrics["proxy_loss"] = proxy_loss(w, qw.dequantize(), stats.hessian, stats.n_tokens)
        return qw

    @staticmethod
    def _ort(w: np.ndarray, scheme: QuantScheme) -> QuantizedWeight:
        wmin, wmax = blockwise_minmax(w, scheme)
        scales, zp = ort_grid_params(wmin, wmax, scheme)
        qw = QuantizedWeight(ort_codes(w, scales, zp, scheme), scales, zp, scheme)
        qw.metrics["sqnr_db"] = sqnr_db(w, qw.dequantize())
        qw.metrics["clip_mean"] = 1.0
        return qw

    def _searched(self, w: np.ndarray, scheme: QuantScheme) -> QuantizedWeight:
        """Min-max or MSE-searched rounding, ``chunk_rows`` rows at a time, each read into float32 from
        ``w`` in whatever dtype and layout it has (no whole-weight float32 copy)."""
        config = self.config
        n, k = w.shape
        ratios = self.ratios if config.search == "mse" else np.ones(1, np.float32)
        nb = scheme.n_blocks(k)
        scales = np.empty((n, nb), np.float32)
        zp = None if scheme.symmetric else np.empty((n, nb), np.uint8)
        codes = np.empty((n, k), np.uint8)
        clip_sum = err_sum = 0.0
        starts = range(0, n, config.chunk_rows)
        signal = 0.0
        for r0 in tqdm(starts, desc="rtn", disable=not config.progress, leave=False):
            r1 = min(r0 + config.chunk_rows, n)
            part = np.ascontiguousarray(w[r0:r1], dtype=np.float32)
            if not np.isfinite(part).all():
                check_finite(np.asarray(w, dtype=np.float32))  # the error, naming the first bad entry
            signal += float(np.einsum("ij,ij->", part, part, dtype=np.float64))
            s, z, q, c, e = mse_clip_search(part, scheme, ratios)
            scales[r0:r1], codes[r0:r1] = s, q
            if zp is not None and z is not None:
                zp[r0:r1] = z
            clip_sum += float(c.sum(dtype=np.float64))
            err_sum += e
        qw = QuantizedWeight(codes, scales, zp, scheme)
        # sqnr from the search's own error sums (float32 per block, float64 total): no dequantization
        qw.metrics["sqnr_db"] = db(signal, err_sum)
        qw.metrics["clip_mean"] = clip_sum / max(n * nb, 1)
        return qw


def nearest_error(w: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """``Q(w) - w`` of the default ``rtn`` (min-max), ``[N, K]`` float32: the error the predictor scales and
    the transforms score against."""
    return (RTN(RTNConfig()).quantize(w, scheme).dequantize() - w).astype(np.float32)
