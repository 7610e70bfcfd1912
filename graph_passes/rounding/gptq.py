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

import dataclasses
import functools
import re
from typing import Any, ClassVar

import numpy as np
import torch

from ..options import option
from ..records import QuantizedWeight
from ..scheme import QuantScheme
from . import hessian as hs
from .base import MethodConfig, SiteStats, register_method
from .calibrated import Site, check_device, open_site, round_in_chunks, site_report, torch_threads
from .grid import grid_params
from .metrics import row_quadratic_forms
from .rtn import CLIP_GRID, round_to_nearest
from .scales import refit_scales

__all__ = [
    "GPTQ",
    "GPTQConfig",
    "block_grid",
    "gptq_factor",
    "gptq_quantize",
    "gptq_round",
    "gptq_rows",
    "quantize_columns",
]

_TINY = 1e-12


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
    w = w.cpu()  # the grid math is numpy's
    parts = [block_grid(w[:, b0 : b0 + g], scheme, mse_clip) for b0 in range(0, k, g)]
    scales = np.stack([p[0] for p in parts], axis=1)
    zps = None if scheme.symmetric else np.stack([p[1] for p in parts], axis=1).astype(np.uint8)
    return scales, zps


def _expand(per_block: np.ndarray, g: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.repeat(per_block.astype(np.float32), g, axis=1)[:, :k].copy())


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
    dev = w.device
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
    s_cols = _expand(scales, g, k).to(dev) if static else torch.zeros(n, k, device=dev)
    z_cols: torch.Tensor | float = float(scheme.implied_zero_point)
    if not scheme.symmetric:
        z_cols = _expand(zps, g, k).to(dev) if static and zps is not None else torch.zeros(n, k, device=dev)
    if perm is not None:
        w = w[:, perm]
        s_cols = s_cols[:, perm].contiguous()
        if isinstance(z_cols, torch.Tensor):
            z_cols = z_cols[:, perm].contiguous()
    u32 = upper.to(torch.float32)
    # A static grid without zero scales needs no per-column masking (see ``quantize_columns``).
    fast = static and bool((s_cols.abs() > _TINY).all())
    codes = torch.zeros(n, k, device=dev)
    wq = torch.zeros(n, k, device=dev)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u32[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if not static and col % g == 0:
                s_b, z_b = block_grid(w1[:, j : j + g].cpu(), scheme, mse_clip)  # numpy grid math
                scales[:, col // g] = s_b
                width = min(g, k - col)
                s_cols[:, col : col + width] = torch.from_numpy(s_b).to(dev)[:, None]
                if zps is not None and z_b is not None and isinstance(z_cols, torch.Tensor):
                    zps[:, col // g] = z_b
                    z_cols[:, col : col + width] = torch.from_numpy(z_b.astype(np.float32)).to(dev)[:, None]
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
    return codes.to(torch.uint8).cpu(), scales, zps, wq.cpu()


PERCDAMP_HELP = (
    "dampening added to diag H, relative to its mean (retried x10 while H is not positive definite)"
)
ACT_ORDER_HELP = (
    "round columns in descending diag H order, with static groups (no g_idx); lowers the layer loss "
    "(benchmarks/results/option_defaults.md)"
)
MSE_CLIP_HELP = "search each group's clip factor for the least squared rounding error"
REFIT_ROUNDS_HELP = (
    "closed-form refits of the block scales to the codes under H, each after one more GPTQ pass on the refit "
    "grid (benchmarks/results/option_defaults.md)"
)
THREADS_HELP = (
    "torch intra-op threads while rounding (one: on busy cores each small op waits for its peers); "
    "null keeps torch's setting"
)


DEVICE_HELP = (
    "torch device of the rounding: cpu, cuda or cuda:N; null = the run's device (cuda where the run asks for "
    "it and torch sees a GPU)"
)


def check_gptq_options(config: Any) -> None:
    """Range checks of the options that ``gptq`` and AdaRound's GPTQ init share (``config`` has them)."""
    for name, ok, what in (
        (
            "device",
            config.device in (None, "cpu") or re.fullmatch(r"cuda(:\d+)?", config.device),
            "use 'cpu', 'cuda' or 'cuda:N'",
        ),
        ("percdamp", 0 <= config.percdamp < 10, "use a value in [0, 10)"),
        ("refit_rounds", config.refit_rounds >= 0, "use an integer >= 0"),
        ("threads", config.threads is None or config.threads >= 1, "use a positive integer, or null"),
    ):
        if not ok:
            config.reject(name, what)


@dataclasses.dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """Options of ``gptq``: Hessian-aware error-feedback rounding."""

    name: ClassVar[str] = "gptq"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})
    row_bytes: ClassVar[float] = 80.0
    hessian_copies: ClassVar[float] = 3.0

    percdamp: float = option(0.01, PERCDAMP_HELP)
    block_size: int = option(
        128, "lazy-batch width in columns (rounded up to a multiple of the group size); changes speed only"
    )
    act_order: bool = option(True, ACT_ORDER_HELP)
    mse_clip: bool = option(False, MSE_CLIP_HELP)
    refit_rounds: int = option(2, REFIT_ROUNDS_HELP)
    threads: int | None = option(1, THREADS_HELP)
    device: str | None = option(None, DEVICE_HELP)

    def validate(self) -> None:
        check_gptq_options(self)
        if self.block_size < 1:
            self.reject("block_size", "use a positive integer")


@register_method(GPTQConfig)
class GPTQ:
    """Method ``gptq``: round column by column, feeding each column's error back through ``H^-1``."""

    def __init__(self, config: GPTQConfig) -> None:
        check_device(config)
        self.config = config

    def quantize(
        self,
        weight: np.ndarray,
        scheme: QuantScheme,
        stats: SiteStats | None = None,
        *,
        site: str = "?",
        memory: int | None = None,
    ) -> QuantizedWeight:
        with torch_threads(self.config.threads):
            opened = open_site(self.config.name, weight, scheme, stats, site)
            rows = self.config.rows_within(memory, *weight.shape)
            qw, info = gptq_quantize(opened, self.config, rows)
            return site_report(opened, qw, info, rows)


def gptq_factor(
    site: Site, config: GPTQConfig
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, float] | None]:
    """The activation-order permutation (None without ``act_order``) and the inverse Cholesky factor of the
    (permuted) Hessian with the dampening used, or None when it cannot be made positive definite. Computed
    once per site: every row chunk uses them."""

    device = config.device or "cpu"

    def make() -> tuple[torch.Tensor | None, tuple[torch.Tensor, float] | None]:
        prep = site.prep
        perm = torch.argsort(prep.diagonal(), descending=True, stable=True) if config.act_order else None
        if device != "cpu":
            h = prep.h if perm is None else prep.permuted(perm)
            factor = hs.inverse_cholesky(h.to(device), config.percdamp, site=site.name)
            return None if perm is None else perm.to(device), factor
        # on the CPU each try builds the (permuted) Hessian afresh and factors it in place
        build = (lambda: prep.h) if perm is None else (lambda: prep.permuted(perm))
        return perm, hs.inverse_cholesky(build, config.percdamp, site=site.name)

    return site.cached(f"gptq:{config.act_order}:{config.percdamp}:{device}", make)


def gptq_quantize(
    site: Site, config: GPTQConfig, rows: int | None = None
) -> tuple[QuantizedWeight, dict[str, float]]:
    """GPTQ of ``site`` in chunks of ``rows`` rows; falls back to round-to-nearest (``fallback = 1``) when
    the Hessian cannot be made positive definite. ``refit_rounds`` > 0 alternates closed-form scale refits
    (under the undampened Hessian) with GPTQ on the refit grid, ending with a refit. Returns the weight and
    bookkeeping metrics."""
    perm, chol = gptq_factor(site, config)
    info: dict[str, float] = {"dead_columns": float(int(site.prep.dead.sum())), "fallback": 0.0}
    if chol is None:
        codes, scales, zps = round_to_nearest(site.w, site.scheme)
        info["fallback"] = 1.0
        return QuantizedWeight(codes, scales, zps, site.scheme), info
    upper, info["percdamp"] = chol
    qw, more, _ = round_in_chunks(site, rows, lambda part: (*gptq_rows(part, config, perm, upper), {}))
    info.update(more)
    return qw, info


def gptq_rows(
    site: Site, config: GPTQConfig, perm: torch.Tensor | None, upper: torch.Tensor
) -> tuple[QuantizedWeight, dict[str, float]]:
    """GPTQ (and the scale refits) of the rows of ``site`` given the site's factor ``upper``."""
    w, scheme = site.w, site.scheme
    device = upper.device
    wt = torch.from_numpy(w.copy()).to(device)
    wt[:, site.prep.dead.to(device)] = (
        0  # dead inputs never reach the output: zero them so they do not widen the grid
    )
    h = site.hessian_on(device)
    rounding = functools.partial(gptq_round, wt, upper, scheme, perm=perm, block_size=config.block_size)
    codes_t, scales, zps, _ = rounding(mse_clip=config.mse_clip)
    qw = QuantizedWeight(codes_t.numpy(), scales, zps, scheme)
    info: dict[str, float] = {}
    for r in range(config.refit_rounds):
        if r:
            codes_t, scales, zps, _ = rounding(grid=(qw.scales, qw.zero_points))
            qw = keep_lower(w, qw, QuantizedWeight(codes_t.numpy(), scales, zps, scheme), h)
        refit = refit_scales(w, qw.codes, qw.scales, qw.zero_points, scheme, h)
        info["scales_refit_frac"] = float(np.mean(refit != qw.scales))
        qw = QuantizedWeight(qw.codes, refit, qw.zero_points, scheme)
    return qw, info


def keep_lower(
    w: np.ndarray, a: QuantizedWeight, b: QuantizedWeight, h: np.ndarray | torch.Tensor
) -> QuantizedWeight:
    """Row by row, the one of two roundings of ``w`` with the lower output loss under ``h`` (ties: ``a``;
    computed on ``h``'s device)."""
    h64 = torch.as_tensor(h, dtype=torch.float64)
    take_b = (
        (
            row_quadratic_forms(torch.from_numpy(b.dequantize() - w).to(h64.device), h64)
            < row_quadratic_forms(torch.from_numpy(a.dequantize() - w).to(h64.device), h64)
        )
        .cpu()
        .numpy()
    )
    if not take_b.any():
        return a
    pick = take_b[:, None]
    zps = None if a.zero_points is None else np.where(pick, b.zero_points, a.zero_points)
    return QuantizedWeight(
        np.where(pick, b.codes, a.codes), np.where(pick, b.scales, a.scales), zps, a.scheme
    )
