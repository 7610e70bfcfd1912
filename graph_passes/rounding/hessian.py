"""Pure functions for the layer Hessian ``H = X^T X`` that the calibrated rounding methods consume.

``H`` is kept as a float64 *sum* over calibration tokens (``SiteStats.hessian``); the mean is ``H / n``.

Robustness policy (documented here once, used by every method):

1. NaN/Inf anywhere in ``H`` (or a shape that does not match the weight) is bad calibration data:
   :class:`CalibrationError` naming the site, never a silent fallback.
2. Dead inputs (``H_ii == 0``: the feature was always zero) get ``H_ii = 1`` so the matrix stays invertible;
   the weight's column does not influence the output and the methods set it to zero.
3. A Hessian that is not positive definite after the usual dampening (``percdamp`` x mean diagonal) is
   retried with 10x more dampening, up to ``max_tries`` times in total.
4. If it still fails, :func:`inverse_cholesky` returns None; the caller falls back to round-to-nearest for that
   site, logs a warning, and records ``fallback = 1`` in the site's metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import torch

from ..errors import CalibrationError

__all__ = [
    "WIDE_K",
    "PreparedHessian",
    "accumulate",
    "check_hessian",
    "dampen",
    "empty_hessian",
    "inverse_cholesky",
    "mean_hessian",
    "prepare",
    "work_dtype",
]

logger = logging.getLogger(__name__)


def empty_hessian(k: int) -> np.ndarray:
    """A zero ``[k, k]`` float64 accumulator."""
    return np.zeros((k, k), dtype=np.float64)


def accumulate(h: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Add ``x^T x`` to ``h`` in place (float64 sum) and return ``h``.

    ``x`` is ``[..., K]`` activations (any float dtype); leading dimensions are flattened into tokens.
    The product is formed in float64 so long calibration runs do not lose the small eigen-directions.
    """
    k = h.shape[0]
    x2 = np.asarray(x).reshape(-1, k)
    if x2.shape[0]:
        x64 = torch.from_numpy(np.ascontiguousarray(x2, dtype=np.float64))
        torch.from_numpy(h).add_(x64.T @ x64)
    return h


WIDE_K = 8192
"""From this many inputs the methods factor and hold ``K x K`` arrays in float32, half the memory (a K = 14336
Hessian is 1.6 GB in float64); the sums stay float64. GPTQ's reference implementation works in float32
throughout; below this width nothing changes."""


def work_dtype(k: int) -> torch.dtype:
    """The dtype of the ``K x K`` arrays a method derives from a Hessian of width ``k``."""
    return torch.float32 if k >= WIDE_K else torch.float64


def mean_hessian(h: np.ndarray, n_tokens: int) -> torch.Tensor:
    """The mean ``H / n`` of a summed Hessian as a torch tensor of ``work_dtype`` (``n`` floored at 1)."""
    src = torch.from_numpy(np.asarray(h, dtype=np.float64))
    return src.to(work_dtype(src.shape[0]), copy=True).div_(max(int(n_tokens), 1))  # never the sum itself


def check_hessian(h: np.ndarray | None, k: int, site: str) -> np.ndarray:
    """``h``, after raising :class:`CalibrationError` naming ``site`` if it is missing, mis-shaped or
    non-finite."""
    if h is None:
        raise CalibrationError(
            f"site {site}: this method needs calibration statistics (a Hessian), none given"
        )
    if h.shape != (k, k):
        raise CalibrationError(f"site {site}: Hessian shape {tuple(h.shape)} does not match K={k}")
    if not np.isfinite(h).all():
        raise CalibrationError(
            f"site {site}: the calibration Hessian contains NaN/Inf (overflowing activations?); "
            "check the calibration data or run the model in float32"
        )
    return h


def dampen(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``H + percdamp * mean(diag H) * I`` (a new tensor); an all-zero diagonal gets ``percdamp * I``."""
    return h + _damping(h, percdamp) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def _damping(h: torch.Tensor, percdamp: float) -> float:
    """``percdamp`` x the mean of ``h``'s diagonal (x 1 when that mean is not positive)."""
    diag = torch.diagonal(h)
    mean = float(diag.mean()) if diag.numel() else 0.0
    return percdamp * (mean if mean > 0 else 1.0)


@dataclasses.dataclass(frozen=True)
class PreparedHessian:
    """A checked Hessian (not copied) and its dead-input mask; ``h`` is a fresh float64 copy with dead
    inputs patched (``H_ii = 1``), made only by the methods that factor it."""

    source: np.ndarray
    dead: torch.Tensor

    @property
    def h(self) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(self.source, dtype=np.float64)).to(
            work_dtype(len(self.source)), copy=True
        )
        return _patch_dead(t, self.dead)

    def diagonal(self) -> torch.Tensor:
        """The diagonal of ``h`` (``work_dtype``), without forming ``h``."""
        d = torch.from_numpy(np.diagonal(self.source).astype(np.float64))
        return d.masked_fill_(self.dead, 1.0).to(work_dtype(len(self.source)))

    def permuted(self, perm: torch.Tensor, columns: int = 1024) -> torch.Tensor:
        """``h[perm][:, perm]`` as one new ``work_dtype`` array, gathered ``columns`` columns at a time
        from the float64 source (no second ``K x K`` array)."""
        k = len(self.source)
        src = np.asarray(self.source)
        p = perm.numpy()
        out = torch.empty(k, k, dtype=work_dtype(k))
        for j0 in range(0, k, columns):
            block = src[np.ix_(p, p[j0 : j0 + columns])].astype(np.float64, copy=False)
            out[:, j0 : j0 + columns] = torch.from_numpy(block)
        return _patch_dead(out, self.dead[perm])


def _patch_dead(t: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``t`` with the dead inputs' rows and columns zeroed and their diagonal set to 1 (policy 2), in place."""
    if bool(dead.any()):
        t[dead, :] = 0
        t[:, dead] = 0
        t[dead, dead] = 1
    return t


def prepare(h: np.ndarray | None, k: int, site: str) -> PreparedHessian:
    """Validate (see module policy 1) and find the dead inputs (policy 2) without copying ``h``."""
    checked = check_hessian(h, k, site)
    return PreparedHessian(checked, torch.from_numpy(np.diagonal(checked) == 0))


def inverse_cholesky(
    h: torch.Tensor | Callable[[], torch.Tensor], percdamp: float = 0.01, max_tries: int = 3, site: str = "?"
) -> tuple[torch.Tensor, float] | None:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``U^T U = H^-1``), in ``h``'s dtype.

    Tries ``percdamp, 10 percdamp, ...`` (``max_tries`` values); returns ``(U, percdamp_used)``, or None
    when every try fails (the caller then falls back to round-to-nearest, policy 4). ``h`` is left as it
    is; given as a function that makes a fresh ``H`` (on the CPU), each try factors that array in place,
    so a wide layer's factorisation holds one ``K x K`` array besides a transient one.
    """
    damp = percdamp
    for attempt in range(max_tries):
        upper = _factor(h() if callable(h) else h.clone(), damp)
        if upper is not None:
            if attempt:
                logger.info("site %s: Hessian needed percdamp=%g to be positive definite", site, damp)
            return upper, damp
        damp *= 10.0
    logger.warning(
        "site %s: Hessian is not positive definite even with percdamp=%g; falling back to round-to-nearest",
        site,
        damp / 10.0,
    )
    return None


def _factor(h: torch.Tensor, percdamp: float) -> torch.Tensor | None:
    """``U`` with ``U^T U = (h + damp I)^-1``, computed in ``h``'s memory (overwritten); None when not
    positive definite. The same operations as ``dampen`` and a Cholesky out of place, bit for bit."""
    torch.diagonal(h).add_(_damping(h, percdamp))
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info) != 0:
        return None
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
    if int(info) != 0 or not bool(torch.isfinite(h).all()):
        return None
    return h
