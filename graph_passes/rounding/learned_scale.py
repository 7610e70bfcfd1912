"""Learned scales with learned rounding (method ``adaround_ls``), under the same H-weighted output loss.

In the spirit of OmniQuant's learnable weight clipping and FlexRound, the per-block scales are free
parameters next to the rounding. We alternate two exact minimisations of ``tr(dW H dW^T)``:

1. *Scales for fixed codes.* With integer codes ``q`` and zero points ``z`` fixed, ``Wq = sum_b s_b (q - z)_b``
   is linear in each row's block scales, so the best scales are a small least-squares solve per row:
   ``(A H A^T) s = A H w`` with ``A[b, j] = (q_j - z_b)`` on block ``b``. This is the optimum a gradient
   method on log clip factors would only approach, at the cost of one ``[N, K] @ [K, K]`` product.
   Scales are rounded to the stored dtype and kept per row only where the row loss did not increase.
2. *Rounding for fixed scales.* AdaRound + exact flip descent (``adaround.py``) on the new grid.

Starting point: the ``adaround`` method's result (GPTQ init). The reported ``clip_mean`` is the mean ratio
new scale / initial scale (below 1: the grid was shrunk, i.e. clipped).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np
import torch

from ..records import QuantizedWeight
from .adaround import AdaRound, codes_of, keep_better, refine_on, state_from
from .base import register_method
from .hessian import mean_hessian
from .scales import refit_scales

__all__ = ["AdaRoundLS", "refit_scales"]


@register_method
@dataclasses.dataclass
class AdaRoundLS(AdaRound):
    """Method ``adaround_ls``: ``adaround`` plus learned per-block scales (``scale_steps`` alternations)."""

    name: ClassVar[str] = "adaround_ls"

    scale_steps: int = 2
    final_refit: Literal["guarded", "full", "none"] | bool = "none"
    """Off here: the scale steps above already alternate refits with rounding (and were measured so)."""

    def refine(
        self,
        w: np.ndarray,
        init_qw: QuantizedWeight,
        h: np.ndarray,
        n_tokens: int,
        site: str,
        guard: torch.Tensor | None = None,
    ) -> tuple[QuantizedWeight, dict[str, float]]:
        qw, info = super().refine(w, init_qw, h, n_tokens, site, guard)
        hm = mean_hessian(h, n_tokens)
        opts = self.options()
        for _ in range(self.scale_steps):
            scales = refit_scales(w, qw.codes, qw.scales, qw.zero_points, qw.scheme, h)
            moved = QuantizedWeight(qw.codes, scales, qw.zero_points, qw.scheme)
            st, _ = refine_on(state_from(w, moved), hm, opts, guard, self.device)
            qw = QuantizedWeight(codes_of(st, qw.scheme, site), scales, qw.zero_points, qw.scheme)
        nz = init_qw.scales != 0
        info["clip_mean"] = float((qw.scales[nz] / init_qw.scales[nz]).mean()) if nz.any() else 1.0
        return keep_better(w, init_qw, qw, h, site, info), info
