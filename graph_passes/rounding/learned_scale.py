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

import torch

from ..options import option
from ..records import QuantizedWeight
from .adaround import AdaRound, AdaRoundConfig, codes_of, keep_better, refine_on, state_from
from .base import register_method
from .calibrated import Site
from .scales import refit_scales

__all__ = ["AdaRoundLS", "AdaRoundLSConfig", "refit_scales"]


@dataclasses.dataclass(frozen=True)
class AdaRoundLSConfig(AdaRoundConfig):
    """Options of ``adaround_ls``: ``adaround``'s, plus alternating refits of the block scales."""

    name: ClassVar[str] = "adaround_ls"

    final_refit: Literal["guarded", "full", "none"] | bool = option(
        "none", "off here: the scale steps already end with a refit followed by rounding on that grid"
    )
    scale_steps: int = option(
        2, "alternations of (refit the block scales to the codes, AdaRound on that grid)"
    )

    def validate(self) -> None:
        super().validate()
        if self.scale_steps < 0:
            self.reject("scale_steps", "use an integer >= 0")


@register_method(AdaRoundLSConfig)
class AdaRoundLS(AdaRound):
    """Method ``adaround_ls``: ``adaround`` plus learned per-block scales (``scale_steps`` alternations)."""

    config: AdaRoundLSConfig

    def refine(
        self, site: Site, init_qw: QuantizedWeight, guard: torch.Tensor | None
    ) -> tuple[QuantizedWeight, dict[str, float]]:
        qw, info = super().refine(site, init_qw, guard)
        for _ in range(self.config.scale_steps):
            h = site.hessian_on(self.config.device or "cpu")
            scales = refit_scales(site.w, qw.codes, qw.scales, qw.zero_points, qw.scheme, h)
            moved = QuantizedWeight(qw.codes, scales, qw.zero_points, qw.scheme)
            st, _ = refine_on(state_from(site.w, moved), site, self.config, guard)
            qw = QuantizedWeight(codes_of(st, qw.scheme, site.name), scales, qw.zero_points, qw.scheme)
        nz = init_qw.scales != 0
        info["clip_mean"] = float((qw.scales[nz] / init_qw.scales[nz]).mean()) if nz.any() else 1.0
        return keep_better(site, init_qw, qw, info), info
