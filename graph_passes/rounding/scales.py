"""Closed-form block scales for fixed integer codes under the layer's output loss (pure math).

With codes ``q`` and zero points ``z`` fixed, ``Wq = sum_b s_b (q - z)_b`` is linear in each row's block
scales, so the scales minimising ``(Wq - w) H (Wq - w)^T`` are a small least-squares solve per row:
``(A H A^T) s = A H w`` with ``A[b, j] = (q_j - z_b)`` on block ``b``. Used after GPTQ (``gptq``'s
``refit_scales``) and alternated with AdaRound (``adaround_ls``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..scheme import QuantScheme
from .grid import round_scales

__all__ = ["refit_scales"]


REFIT_CHUNK_BYTES = 1 << 23
"""Float64 bytes of one ``[rows, K]`` temporary of the Gram computation: rows are taken this many bytes at a
time so the temporaries stay in cache (8 MB: 256 rows at K = 4096)."""


def _block_sums(x: torch.Tensor, g: int, nb: int) -> torch.Tensor:
    """``[R, K] -> [R, nb]``: the sums of ``x`` over each block of ``g`` columns (the last may be short)."""
    r, k = x.shape
    if nb * g != k:
        x = torch.nn.functional.pad(x, (0, nb * g - k))
    return x.view(r, nb, g).sum(dim=2)


def block_gram(
    a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``r``, the normal equations of its block scales: ``G_r = A_r H A_r^T`` ``[N, nb, nb]`` and
    ``b_r = A_r H w_r`` ``[N, nb]``, where ``A_r`` holds ``a[r]`` on each block's columns (float64).

    Computed block row by block row on and right of the diagonal (``a[:, cols] @ H[cols, j0:]``: about
    ``N K^2 / 2`` multiply-adds in all; ``G_r`` is symmetric) over row chunks of ``REFIT_CHUNK_BYTES``."""
    n, k = a.shape
    nb = -(-k // g)
    gram = torch.empty(n, nb, nb, dtype=torch.float64, device=h.device)
    rhs = torch.empty(n, nb, dtype=torch.float64, device=h.device)
    step = max(1, REFIT_CHUNK_BYTES // (8 * k))
    for r0 in range(0, n, step):
        ar, r1 = a[r0 : r0 + step], min(r0 + step, n)
        rhs[r0:r1] = _block_sums(ar * (w[r0:r1] @ h), g, nb)
        for b in range(nb):
            j0 = b * g
            cols = slice(j0, min(j0 + g, k))
            upper = _block_sums(ar[:, j0:] * (ar[:, cols] @ h[cols, j0:]), g, nb - b)
            gram[r0:r1, b, b:] = upper
            gram[r0:r1, b + 1 :, b] = upper[:, 1:]
    return gram, rhs


def refit_scales(
    w: np.ndarray,
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    scheme: QuantScheme,
    h: np.ndarray | torch.Tensor,
) -> np.ndarray:
    """Per-row least-squares block scales for fixed codes under ``H`` (float64, on ``h``'s device); returns
    ``[N, nb]``.

    Rows whose solution is not finite or flips a scale's sign, or whose loss would increase, keep ``scales``.
    """
    n, k = w.shape
    g = scheme.block_size(k)
    nb = scheme.n_blocks(k)
    h64 = torch.as_tensor(h, dtype=torch.float64)
    dev = h64.device
    z = (
        torch.full((n, k), float(scheme.implied_zero_point), dtype=torch.float64, device=dev)
        if zero_points is None
        else torch.from_numpy(np.repeat(zero_points.astype(np.float64), g, axis=1)[:, :k]).to(dev)
    )
    a = torch.from_numpy(codes.astype(np.float64)).to(dev) - z  # codes relative to the zero point
    del z
    w64 = torch.from_numpy(np.asarray(w, dtype=np.float64)).to(dev)
    gram, rhs = block_gram(a, w64, h64, g)
    del a, w64
    gram0, rhs0 = gram, rhs
    old = torch.from_numpy(scales.astype(np.float64)).to(dev)
    # A block whose codes all sit on the zero point has no say in the output: pin its scale.
    empty = torch.diagonal(gram, dim1=1, dim2=2) <= 0
    eye = torch.eye(nb, dtype=torch.float64, device=dev)
    gram = torch.where(empty[:, :, None] | empty[:, None, :], eye.expand(n, nb, nb) * empty[:, :, None], gram)
    rhs = torch.where(empty, old, rhs)
    ridge = 1e-12 * torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
    sol, info = torch.linalg.solve_ex(gram + ridge[:, None, None] * eye, rhs[..., None])
    new = sol[..., 0]
    ok = (info == 0) & torch.isfinite(new).all(dim=1) & ((new * old > 0) | empty).all(dim=1)
    new = torch.where(ok[:, None], new, old)
    new_np = round_scales(new.cpu().numpy().astype(np.float32), scheme)

    def row_loss(s: np.ndarray) -> torch.Tensor:
        # (a s - w) H (a s - w)^T = s G s - 2 s b + w H w^T; the last term is the same for both sides.
        st = torch.from_numpy(s.astype(np.float64)).to(dev)
        return torch.einsum("ni,nij,nj->n", st, gram0, st) - 2 * (st * rhs0).sum(dim=1)

    better = (row_loss(new_np) <= row_loss(scales)).cpu().numpy()
    return np.where(better[:, None], new_np, scales).astype(np.float32)
