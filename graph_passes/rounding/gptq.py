"""GPTQ (Frantar et al., 2022): round one input column at a time, feeding each column's rounding error back
into the columns not yet rounded through the inverse Hessian, so the layer *output* error
``tr(dW H dW^T)`` stays small rather than the weight error.

Implementation notes (why, not what):

- Dampening ``percdamp * mean(diag H)`` and the retry/fallback policy live in ``hessian.py``.
- The upper Cholesky factor ``U`` of ``H^-1`` gives the error-feedback rows directly (``err / U_jj`` times
  ``U_j,j:``) and is numerically much better behaved than updating ``H^-1`` column by column.
- Lazy batches of ``block_size`` columns: in-block updates are rank-1 on a small ``[N, B]`` slab, the rest of
  the matrix gets one ``[N, B] @ [B, K-i2]`` matmul per block (the work is matmul-bound, not loop-bound).
- Group scales in natural order are computed when the error feedback reaches a new group, from the
  *updated* weights of that group (all of them are already updated: the lazy block is a multiple of the
  group). With ``act_order`` the groups are STATIC: all scales come up front from the original weight in
  natural order, and only the order in which columns are rounded changes (descending ``diag H``). The
  result is a plain blockwise weight, so no packed format needs a ``g_idx``.
- Round-to-nearest here uses the same grid convention as ``grid.py`` (ties to even, clamped), and the
  returned codes dequantize (``QuantizedWeight.dequantize``) to exactly the weights GPTQ fed back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch

from ..records import QuantizedWeight
from ..scheme import DataType, QuantScheme
from . import hessian as hs
from .base import SiteStats, register_method
from .grid import check_finite, grid_params
from .metrics import proxy_loss, row_quadratic_forms, site_quality
from .rtn import clip_ratios, mse_clip_search
from .scales import refit_scales

__all__ = ["GPTQ", "block_grid", "gptq_round", "quantize_columns", "round_to_nearest"]

logger = logging.getLogger(__name__)

_TINY = 1e-12
# Clip factors tried by the MSE clip search: the same grid as the ``rtn`` method's default (1.0 first).
CLIP_GRID: np.ndarray = clip_ratios(16, 0.5)


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


def _check_scheme(scheme: QuantScheme, method: str) -> None:
    if scheme.data_type is not DataType.INT:
        from ..errors import UnsupportedSchemeError

        raise UnsupportedSchemeError(
            f"method {method} rounds onto a uniform integer grid; data_type={scheme.data_type.value} "
            "is not supported (use data_type=int)"
        )


def quantize_columns(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | float, qmax: int, all_live: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes (float) and their dequantized values for ``w`` on grid ``(s, z)``.

    Same arithmetic as ``grid.codes_from_weight`` and ``QuantizedWeight.dequantize`` (float32, ties to
    even, zero scale -> the zero point), so the values returned here are bit-identical to the reference.
    ``all_live``: the caller knows no scale is zero, so the masking ops are skipped (same results; GPTQ's
    column loop calls this K times per site).
    """
    if all_live:
        q = torch.round(w / s).add_(z).clamp_(0, qmax)
        return q, (q - z) * s
    nonzero = s.abs() > _TINY
    safe = torch.where(nonzero, s, torch.ones_like(s))
    q = torch.round(w / safe) + z
    q = torch.where(nonzero, q, torch.as_tensor(z, dtype=w.dtype).expand_as(q)).clamp_(0, qmax)
    return q, (q - z) * s


def block_grid(
    wblk: torch.Tensor, scheme: QuantScheme, mse_clip: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) of one block per row from ``wblk[N, width]``: min-max, or the clip factor of
    ``CLIP_GRID`` with the smallest squared rounding error per row when ``mse_clip``. Returns ``[N]`` arrays.
    """
    wmin = wblk.min(dim=1).values.numpy()[:, None]
    wmax = wblk.max(dim=1).values.numpy()[:, None]
    best_s, best_z = grid_params(wmin, wmax, scheme)  # float16-rounded already for scale_dtype=float16
    if mse_clip:
        best_err = None
        for clip in CLIP_GRID:
            s, zp = grid_params(wmin, wmax, scheme, clip)
            z = (
                torch.from_numpy(zp.astype(np.float32))
                if zp is not None
                else float(scheme.implied_zero_point)
            )
            _, deq = quantize_columns(wblk, torch.from_numpy(s), z, scheme.qmax)
            err = ((deq - wblk) ** 2).sum(dim=1).numpy()
            if best_err is None:
                best_err, best_s, best_z = err, s, zp
                continue
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better[:, None], s, best_s)
            if zp is not None and best_z is not None:
                best_z = np.where(better[:, None], zp, best_z)
    return best_s[:, 0], (best_z[:, 0] if best_z is not None else None)


def _static_grid(
    w: torch.Tensor, scheme: QuantScheme, mse_clip: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block grid of every block of ``w[N, K]`` in natural order: ``([N, nb], [N, nb] | None)``."""
    k = w.shape[1]
    g = scheme.block_size(k)
    parts = [block_grid(w[:, b0 : b0 + g], scheme, mse_clip) for b0 in range(0, k, g)]
    scales = np.stack([p[0] for p in parts], axis=1)
    zps = None if scheme.symmetric else np.stack([p[1] for p in parts], axis=1).astype(np.uint8)
    return scales, zps


def _expand(per_block: np.ndarray, g: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.repeat(per_block.astype(np.float32), g, axis=1)[:, :k].copy())


def round_to_nearest(
    w: np.ndarray, scheme: QuantScheme, mse_clip: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest exactly as the ``rtn`` method does it (min-max by default, per-block MSE clip
    search with ``mse_clip=True``): the baseline in metrics and the fallback. Codes, scales, zps."""
    ratios = CLIP_GRID if mse_clip else np.ones(1, np.float32)
    scales, zps, codes, _, _ = mse_clip_search(np.ascontiguousarray(w, dtype=np.float32), scheme, ratios)
    return codes, scales, zps


def gptq_round(
    w: torch.Tensor,
    upper: torch.Tensor,
    scheme: QuantScheme,
    *,
    perm: torch.Tensor | None = None,
    block_size: int = 128,
    mse_clip: bool = False,
    grid: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None, torch.Tensor]:
    """The GPTQ loop on ``w[N, K]`` float32 given ``upper`` = upper Cholesky of ``H^-1`` (float64).

    ``perm`` (activation order) means: ``w``'s columns are processed in the order ``perm`` and ``upper``
    belongs to ``H[perm][:, perm]``; the grid is then static (natural-order groups from the input ``w``).
    ``grid`` = ``(scales, zero_points)`` fixes the per-block grid instead (static, e.g. refit scales).
    Returns codes ``uint8 [N, K]`` in natural order, scales ``[N, nb]``, zero points (None if symmetric)
    and the dequantized weight the error feedback used (natural order; equals the codes' dequantization).
    """
    n, k = w.shape
    g = scheme.block_size(k)
    nb = scheme.n_blocks(k)
    static = perm is not None or scheme.per_channel or grid is not None
    w = w.clone()
    if grid is not None:
        scales, zps = grid[0].astype(np.float32), grid[1]
    elif static:
        scales, zps = _static_grid(w, scheme, mse_clip)
    else:
        scales = np.zeros((n, nb), np.float32)
        zps = None if scheme.symmetric else np.zeros((n, nb), np.uint8)
        # Groups must never straddle a lazy block: the group's columns must all be updated when it starts.
        block_size = max(block_size, g)
        block_size = -(-block_size // g) * g
    s_cols = _expand(scales, g, k) if static else torch.zeros(n, k)
    z_cols: torch.Tensor | float = float(scheme.implied_zero_point)
    if not scheme.symmetric:
        z_cols = _expand(zps, g, k) if static and zps is not None else torch.zeros(n, k)
    if perm is not None:
        w = w[:, perm]
        s_cols = s_cols[:, perm].contiguous()
        if isinstance(z_cols, torch.Tensor):
            z_cols = z_cols[:, perm].contiguous()
    u32 = upper.to(torch.float32)
    # A static grid without zero scales needs no per-column masking (see ``quantize_columns``).
    fast = static and bool((s_cols.abs() > _TINY).all())
    codes = torch.zeros(n, k)
    wq = torch.zeros(n, k)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u32[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if not static and col % g == 0:
                s_b, z_b = block_grid(w1[:, j : j + g], scheme, mse_clip)
                scales[:, col // g] = s_b
                width = min(g, k - col)
                s_cols[:, col : col + width] = torch.from_numpy(s_b)[:, None]
                if zps is not None and z_b is not None:
                    zps[:, col // g] = z_b
                    assert isinstance(z_cols, torch.Tensor)
                    z_cols[:, col : col + width] = torch.from_numpy(z_b.astype(np.float32))[:, None]
            z = z_cols[:, col] if isinstance(z_cols, torch.Tensor) else z_cols
            wc = w1[:, j]
            q, deq = quantize_columns(wc, s_cols[:, col], z, scheme.qmax, all_live=fast)
            codes[:, col] = q
            wq[:, col] = deq
            e = (wc - deq) / u1[j, j]
            w1[:, j:].sub_(e[:, None] * u1[j, j:][None, :])
            err1[:, j] = e
        if i2 < k:
            w[:, i2:].sub_(err1 @ u32[i1:i2, i2:])
    if perm is not None:
        inv = torch.argsort(perm)
        codes, wq = codes[:, inv], wq[:, inv]
    return codes.to(torch.uint8), scales, zps, wq


def _metrics(
    w: np.ndarray, qw: QuantizedWeight, h: np.ndarray, n_tokens: int, rtn: QuantizedWeight | None
) -> dict[str, float]:
    m = site_quality(w, qw.dequantize(), h, n_tokens)
    if rtn is not None:
        m["proxy_loss_rtn"] = proxy_loss(w, rtn.dequantize(), h, n_tokens)
    return m


@register_method
@dataclasses.dataclass
class GPTQ:
    """Method ``gptq``: Hessian-aware error-feedback rounding (options: see the fields)."""

    name: ClassVar[str] = "gptq"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})

    percdamp: float = 0.01
    """Dampening added to the diagonal, relative to its mean (retried x10 if not positive definite)."""
    block_size: int = 128
    """Lazy-batch width (columns updated together); rounded up to a multiple of the group size."""
    act_order: bool = True
    """Round columns in descending ``diag H`` order (static natural-order groups: no g_idx needed).
    On by default: better proxy loss than natural order on 20 of 20 SmolLM2 sites measured (W4 g128)."""
    mse_clip: bool = False
    """Search a clip factor per group (``CLIP_GRID``) minimising the group's squared rounding error."""
    refit_rounds: int = 2
    """Rounds of scale refitting: after rounding, re-solve each row's block scales for the chosen codes in
    closed form under H (``scales.py``; a row keeps its scales where that would not lower its loss); each
    further round first re-runs GPTQ on the refit grid (a row keeps the better of the two roundings).
    Measured on SmolLM2 W4 g128 (2048 eval tokens): perplexity 31.44 with 0 rounds, 31.20 with 1, 30.66
    with 2; each round beyond the first costs one more GPTQ pass."""
    threads: int | None = 1
    """torch intra-op threads while rounding (see ``torch_threads``); None keeps torch's setting."""

    def __post_init__(self) -> None:
        from ..errors import UnsupportedSchemeError

        if not 0 <= self.percdamp < 10:
            raise UnsupportedSchemeError(f"gptq option percdamp={self.percdamp!r}: use a value in [0, 10)")
        if self.block_size < 1:
            raise UnsupportedSchemeError(
                f"gptq option block_size={self.block_size!r}: use a positive integer"
            )
        if not (isinstance(self.refit_rounds, int) and self.refit_rounds >= 0):
            raise UnsupportedSchemeError(
                f"gptq option refit_rounds={self.refit_rounds!r}: use an integer >= 0"
            )

    def quantize(
        self, weight: np.ndarray, scheme: QuantScheme, stats: SiteStats | None = None, *, site: str = "?"
    ) -> QuantizedWeight:
        with torch_threads(self.threads):
            return self._quantize(weight, scheme, stats, site)

    def _quantize(
        self, weight: np.ndarray, scheme: QuantScheme, stats: SiteStats | None, site: str
    ) -> QuantizedWeight:
        _check_scheme(scheme, self.name)
        t0 = time.perf_counter()
        w = np.ascontiguousarray(weight, dtype=np.float32)
        check_finite(w, f"site {site}: weight")
        k = w.shape[1]
        h_raw = stats.hessian if stats is not None else None
        prep = hs.prepare(h_raw, k, site)
        assert stats is not None and h_raw is not None
        qw, info = gptq_quantize(
            w,
            prep,
            scheme,
            site=site,
            percdamp=self.percdamp,
            block_size=self.block_size,
            act_order=self.act_order,
            mse_clip=self.mse_clip,
            refit_rounds=self.refit_rounds,
            h_raw=h_raw,
        )
        codes, scales, zps = round_to_nearest(w, scheme)  # the rtn method's default, as the baseline
        rtn = QuantizedWeight(codes, scales, zps, scheme)
        qw.metrics.update(_metrics(w, qw, h_raw, stats.n_tokens, rtn))
        qw.metrics.update(info)
        qw.metrics["time_s"] = time.perf_counter() - t0
        return qw


def gptq_quantize(
    w: np.ndarray,
    prep: hs.PreparedHessian,
    scheme: QuantScheme,
    *,
    site: str = "?",
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mse_clip: bool = False,
    refit_rounds: int = 0,
    h_raw: np.ndarray | None = None,
) -> tuple[QuantizedWeight, dict[str, float]]:
    """GPTQ of ``w[N, K]`` with a prepared Hessian; falls back to round-to-nearest (``fallback = 1``) when
    the Hessian cannot be made positive definite. ``refit_rounds`` > 0 alternates closed-form scale refits
    (under ``h_raw``, the undampened sum) with GPTQ on the refit grid, ending with a refit. Returns the
    weight and bookkeeping metrics."""
    wt = torch.from_numpy(w.copy())
    dead = prep.dead
    wt[:, dead] = 0  # dead inputs never reach the output: zero them so they do not widen the grid
    h = prep.h
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        h = h[perm][:, perm]
    chol = hs.inverse_cholesky(h, percdamp, site=site)
    info: dict[str, float] = {"dead_columns": float(int(dead.sum())), "fallback": 0.0}
    if chol is None:
        codes, scales, zps = round_to_nearest(w, scheme)
        info["fallback"] = 1.0
        return QuantizedWeight(codes, scales, zps, scheme), info
    upper, used = chol
    info["percdamp"] = used
    codes_t, scales, zps, _ = gptq_round(
        wt, upper, scheme, perm=perm, block_size=block_size, mse_clip=mse_clip
    )
    qw = QuantizedWeight(codes_t.numpy(), scales, zps, scheme)
    for r in range(refit_rounds):
        assert h_raw is not None, "refit_rounds needs the Hessian"
        if r:
            grid = (qw.scales, qw.zero_points)
            codes_t, scales, zps, _ = gptq_round(
                wt, upper, scheme, perm=perm, block_size=block_size, grid=grid
            )
            again = QuantizedWeight(codes_t.numpy(), scales, zps, scheme)
            qw = keep_lower(w, qw, again, h_raw)
        refit = refit_scales(w, qw.codes, qw.scales, qw.zero_points, scheme, h_raw)
        info["scales_refit_frac"] = float(np.mean(refit != qw.scales))
        qw = QuantizedWeight(qw.codes, refit, qw.zero_points, scheme)
    return qw, info


def keep_lower(w: np.ndarray, a: QuantizedWeight, b: QuantizedWeight, h: np.ndarray) -> QuantizedWeight:
    """Row by row, the one of two roundings of ``w`` with the lower output loss under ``h`` (ties: ``a``)."""
    h64 = torch.from_numpy(np.asarray(h, np.float64))
    take_b = (
        row_quadratic_forms(b.dequantize() - w, h64) < row_quadratic_forms(a.dequantize() - w, h64)
    ).numpy()
    if not take_b.any():
        return a
    pick = take_b[:, None]
    zps = None if a.zero_points is None else np.where(pick, b.zero_points, a.zero_points)
    return QuantizedWeight(
        np.where(pick, b.codes, a.codes), np.where(pick, b.scales, a.scales), zps, a.scheme
    )
