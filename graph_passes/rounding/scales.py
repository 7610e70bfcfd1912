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


def _block_onehot(k: int, g: int) -> torch.Tensor:
    nb = -(-k // g)
    return torch.nn.functional.one_hot(torch.arange(k) // g, nb).to(torch.float64)


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
    onehot = _block_onehot(k, g).to(dev)  # [K, nb]
    z = (
        torch.full((n, k), float(scheme.implied_zero_point), dtype=torch.float64, device=dev)
        if zero_points is None
        else torch.from_numpy(np.repeat(zero_points.astype(np.float64), g, axis=1)[:, :k]).to(dev)
    )
    a = torch.from_numpy(codes.astype(np.float64)).to(dev) - z  # codes relative to the zero point
    w64 = torch.from_numpy(np.asarray(w, dtype=np.float64)).to(dev)
    rhs = (a * (w64 @ h64)) @ onehot  # [N, nb]
    gram = torch.empty(n, nb, nb, dtype=torch.float64, device=dev)
    for b in range(nb):
        cols = slice(b * g, min((b + 1) * g, k))
        gram[:, :, b] = (a * (a[:, cols] @ h64[cols, :])) @ onehot
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
