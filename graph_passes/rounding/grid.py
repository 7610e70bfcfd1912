"""Pure functions for the uniform quantization grid, shared by every rounding method.

All arrays use the package's ``[N, K]`` orientation (see ``records.py``); blocks run along K and the last
block may be short (K need not be a multiple of the block size).

Symmetric grid: unsigned codes ``q in [0, 2**b - 1]`` with implied zero point ``z = 2**(b-1)``, value
``(q - z) * s``. The scale is ``s = absmax / 2**(b-1)`` by default (``-absmax`` lands exactly on code 0).
Asymmetric grid: ``s = (max - min) / (2**b - 1)``, ``z = round(-min / s)`` clamped to the code range.
"""

from __future__ import annotations

import numpy as np

from ..scheme import QuantScheme

__all__ = [
    "blockwise_minmax",
    "codes_from_weight",
    "grid_params",
    "pad_blocks",
]

_TINY = np.float32(1e-12)


def pad_blocks(w: np.ndarray, block: int) -> np.ndarray:
    """View ``w[N, K]`` as ``[N, n_blocks, block]``, padding the last block by repeating its edge value.

    Edge padding (rather than zeros) keeps min/max of a short last block equal to those of its real values.
    """
    n, k = w.shape
    nb = (k + block - 1) // block
    pad = nb * block - k
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)), mode="edge")
    return w.reshape(n, nb, block)


def blockwise_minmax(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """Per-block (min, max) of ``w[N, K]``, each ``[N, n_blocks]`` float32."""
    blocks = pad_blocks(np.asarray(w, dtype=np.float32), scheme.block_size(w.shape[1]))
    return blocks.min(axis=2), blocks.max(axis=2)


def grid_params(
    wmin: np.ndarray, wmax: np.ndarray, scheme: QuantScheme, clip: float | np.ndarray = 1.0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zero points) for per-block ranges, optionally shrunk by ``clip`` in (0, 1].

    Returns ``(scales[N, nb] float32, zero_points[N, nb] uint8 | None)``. All-zero blocks get scale 0
    (exactly representable: every code is the zero point) so they dequantize to exact zeros.
    """
    wmin = np.minimum(np.asarray(wmin, np.float32), 0) * clip
    wmax = np.maximum(np.asarray(wmax, np.float32), 0) * clip
    if scheme.symmetric:
        absmax = np.maximum(-wmin, wmax)
        scales = (absmax / np.float32(scheme.implied_zero_point)).astype(np.float32)
        return scales, None
    scales = ((wmax - wmin) / np.float32(scheme.qmax)).astype(np.float32)
    safe = np.where(scales > _TINY, scales, np.float32(1))
    zp = np.clip(np.rint(-wmin / safe), 0, scheme.qmax)
    zp = np.where(scales > _TINY, zp, 0)
    return scales, zp.astype(np.uint8)


def codes_from_weight(
    w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, scheme: QuantScheme
) -> np.ndarray:
    """Round-to-nearest codes ``uint8[N, K]`` of ``w`` on a given grid (ties to even, clamped)."""
    n, k = w.shape
    block = scheme.block_size(k)
    s = np.repeat(np.asarray(scales, np.float32), block, axis=1)[:, :k]
    if zero_points is None:
        z = np.float32(scheme.implied_zero_point)
    else:
        z = np.repeat(zero_points.astype(np.float32), block, axis=1)[:, :k]
    safe = np.where(np.abs(s) > _TINY, s, np.float32(1))
    q = np.rint(np.asarray(w, np.float32) / safe) + z
    q = np.where(np.abs(s) > _TINY, q, z)
    return np.clip(q, scheme.qmin, scheme.qmax).astype(np.uint8)
