"""Quality metrics of a quantized weight, shared by every rounding method (pure functions).

The *proxy loss* is what GPTQ and AdaRound minimise: the mean squared error the weight error ``dW = Wq - W``
causes on the layer output over the calibration tokens, ``||X dW^T||_F^2 / n = tr(dW H dW^T) / n`` with
``H = X^T X`` summed over ``n`` tokens. All sums are accumulated in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "db",
    "output_sqnr_db",
    "proxy_loss",
    "quadratic_form",
    "row_quadratic_forms",
    "site_quality",
    "sqnr_db",
]

ArrayLike = np.ndarray | torch.Tensor


def _t64(a: ArrayLike) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64)
    return torch.from_numpy(np.asarray(a)).to(torch.float64)


def quadratic_form(d: ArrayLike, h: ArrayLike) -> float:
    """``tr(d H d^T)`` in float64 (``d`` is ``[N, K]``, ``H`` is ``[K, K]``)."""
    d64 = _t64(d)
    return float(((d64 @ _t64(h)) * d64).sum())


def row_quadratic_forms(d: ArrayLike, h: ArrayLike) -> torch.Tensor:
    """Per-row ``d_r H d_r^T`` (``[N]``): the output error of each row of ``d``. In float64, or in float32
    with float64 sums when ``h`` is a float32 tensor (a wide layer's, not copied to float64)."""
    if isinstance(h, torch.Tensor) and h.dtype == torch.float32:
        d32 = torch.as_tensor(d).to(device=h.device, dtype=torch.float32)
        return ((d32 @ h) * d32).sum(dim=1, dtype=torch.float64)
    d64 = _t64(d)
    return ((d64 @ _t64(h)) * d64).sum(dim=1)


def proxy_loss(w: ArrayLike, wq: ArrayLike, h: ArrayLike, n_tokens: int) -> float:
    """``tr(dW H dW^T) / n_tokens``: the mean squared output error per token caused by quantization."""
    return quadratic_form(_t64(wq) - _t64(w), h) / max(int(n_tokens), 1)


def db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(w: ArrayLike, wq: ArrayLike) -> float:
    """Weight signal-to-quantization-noise ratio ``10 log10(||W||^2 / ||W - Wq||^2)`` (inf if exact)."""
    w64 = _t64(w)
    return db(float((w64 * w64).sum()), float(((_t64(wq) - w64) ** 2).sum()))


def output_sqnr_db(w: ArrayLike, wq: ArrayLike, h: ArrayLike) -> float:
    """Output SQNR over the calibration data: ``10 log10(tr(W H W^T) / tr(dW H dW^T))``."""
    return db(quadratic_form(w, h), quadratic_form(_t64(wq) - _t64(w), h))


def site_quality(w: ArrayLike, wq: ArrayLike, h: ArrayLike, n_tokens: int) -> dict[str, float]:
    """``proxy_loss``, ``sqnr_db`` and ``output_sqnr_db`` together (two quadratic forms instead of three)."""
    err = quadratic_form(_t64(wq) - _t64(w), h)
    return {
        "proxy_loss": err / max(int(n_tokens), 1),
        "sqnr_db": sqnr_db(w, wq),
        "output_sqnr_db": db(quadratic_form(w, h), err),
    }
