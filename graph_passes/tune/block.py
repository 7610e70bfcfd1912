"""Block-wise tuning of a rounded decoder block: the integer codes and scales of the block's weights are
refined together so that the block's output (not each layer's) matches the float block on calibration
inputs.

After a per-layer method (gptq, rtn, ...) has rounded every weight of a block, each weight is written as
``w_q = s * clamp(round(w / s + v), lo, hi)`` with ``s = s0 * a``: ``v`` (one offset per weight, in units of
the grid step) starts where the method's codes are, ``a`` (one factor per block of the scale) starts at 1.
Both are learned by Adam through the rounding (straight-through gradient) on the block output's error
relative to each position's norm (``relative_error``), the block run by ``TorchGraph``. Every fourth
micro batch of calibration sequences is held out: the tuned codes are kept only if they lower the error
there. Codebook weights (nf4, fp4) stay as the method rounded them.

Layer-wise methods minimise each layer's output error alone; at 2-3 bits the errors of the layers in a
block compound (the MLP sees the attention's error), and tuning on the block's output lets the rounding
of one layer make up for another's (the block reconstruction of BRECQ, AutoRound and OmniQuant)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import torch

from ..records import QuantizedWeight
from ..rounding.grid import round_scales
from ..sites import WeightSite
from .torch_graph import TorchGraph

__all__ = ["NothingToTuneError", "TuneSettings", "tune_block"]


class NothingToTuneError(ValueError):
    """The block holds no weight the tuner can move."""


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    steps: int = 200
    """Optimizer steps per block, each on ``micro_batch`` calibration sequences."""
    lr: float = 5e-3
    """Adam's step for the offsets (grid steps) and the scale factors."""
    micro_batch: int = 2
    """Calibration sequences per step."""
    float_targets: bool = True
    """Fit each block to what the float model computes there (from the float model's own inputs), so that it
    also makes up for the error of the blocks before it; else to the float block on the quantized inputs."""
    offsets: bool = True
    """Learn the per-weight offsets ``v`` as well as the scale factors (else the codes move only with the
    scales)."""
    first_weight: float = 64.0
    """Times the first position counts in the per-token error (the attention sink's hidden state)."""
    per_token: bool = True
    """The error relative to each position's norm, averaged (``relative_error``); else to the whole output's."""


@dataclasses.dataclass
class _Fake:
    """One site's fake-quantized weight: float ``w`` [N, K] and the learned ``v``, ``a``."""

    site: WeightSite
    qw: QuantizedWeight
    w: torch.Tensor
    s0: torch.Tensor
    zp: torch.Tensor
    v: torch.Tensor
    a: torch.Tensor

    def scale(self) -> torch.Tensor:
        block = self.qw.block_size
        return (self.s0 * self.a).repeat_interleave(block, dim=1)[:, : self.w.shape[1]]

    def values(self) -> torch.Tensor:
        """Signed grid values (codes - zero point), with a straight-through gradient through round."""
        x = self.w / self.scale() + self.v
        r = x + (torch.round(x) - x).detach()
        lo, hi = -self.zp, self.qw.scheme.qmax - self.zp
        return torch.maximum(torch.minimum(r, hi), lo)

    def weight(self) -> torch.Tensor:
        """The weight in the graph's layout."""
        wq = self.values() * self.scale()
        return wq if self.site.transposed else wq.T

    def result(self) -> QuantizedWeight:
        with torch.no_grad():
            codes = (self.values() + self.zp).round().to(torch.uint8).numpy()
            scales = round_scales((self.s0 * self.a).numpy(), self.qw.scheme)
        return dataclasses.replace(self.qw, codes=codes, scales=scales, metrics=dict(self.qw.metrics))


def _fake(site: WeightSite, qw: QuantizedWeight, graph: ir.Graph) -> _Fake:
    arr = graph.initializers[site.weight_name].const_value.numpy()
    w = torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: the initializer may be read-only
    w = w if site.transposed else w.T.contiguous()
    block = qw.block_size
    s0 = torch.from_numpy(qw.scales.astype(np.float32))
    if qw.zero_points is None:
        zp = torch.full((qw.n, 1), float(2 ** (qw.scheme.bits - 1)))
    else:
        zp = torch.from_numpy(qw.zero_points.astype(np.float32)).repeat_interleave(block, dim=1)[:, : qw.k]
    s = s0.repeat_interleave(block, dim=1)[:, : qw.k]
    codes = torch.from_numpy(qw.codes.astype(np.float32))
    v = (codes - zp - w / torch.where(s == 0, 1.0, s)).clone()
    v = torch.where(s == 0, 0.0, v)
    return _Fake(site, qw, w, s0, zp, v.requires_grad_(), torch.ones_like(s0).requires_grad_())


Batch = tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]
"""One step's feeds and the float outputs to match."""


def relative_error(
    out: torch.Tensor, target: torch.Tensor, per_token: bool, first_weight: float = 1.0
) -> torch.Tensor:
    """``|out - target|^2 / |target|^2``: over the whole tensor, or per token (last axis; positions on the
    axis before it) and averaged, the first position counted ``first_weight`` times.

    Per token, every position counts alike: the next block normalises each position (RMSNorm) before it
    reads it, so what it sees is the error relative to that position's norm. Over the whole tensor, the
    first position's hidden state (the attention sink, 25,000 against a median of 170 in SmolLM2's middle
    blocks) would hold 98% of the target's energy and decide the fit alone."""
    if not per_token:
        return ((out - target) ** 2).sum() / (target**2).sum().clamp_min(1e-30)
    err = ((out - target) ** 2).sum(-1) / (target**2).sum(-1).clamp_min(1e-30)
    if first_weight == 1.0 or err.dim() < 1 or err.shape[-1] < 2:
        return err.mean()
    w = torch.ones(err.shape[-1], dtype=err.dtype)
    w[0] = first_weight
    return (err * w).sum(-1).mean() / w.sum()


def _loss(
    graph: TorchGraph, fakes: list[_Fake], feeds: dict[str, torch.Tensor], targets: list[torch.Tensor | None],
    how: tuple[bool, float],
) -> torch.Tensor:  # fmt: skip
    """The mean relative error of the graph's first outputs against ``targets`` (None: not fitted)."""
    outs = graph.run(feeds, {f.site.weight_name: f.weight() for f in fakes})
    errs = [relative_error(o, t, *how) for o, t in zip(outs, targets, strict=False) if t is not None]
    return sum(errs) / len(errs)


def _total(graph: TorchGraph, fakes: list[_Fake], batches: Sequence[Batch], how: tuple[bool, float]) -> float:
    with torch.no_grad():
        return float(sum(_loss(graph, fakes, f, t, how) for f, t in batches)) / len(batches)


def tune_block(
    graph: ir.Graph,
    sites: Sequence[WeightSite],
    qws: dict[str, QuantizedWeight],
    feeds: Sequence[dict[str, np.ndarray]],
    targets: Sequence[Sequence[np.ndarray]],
    settings: TuneSettings,
) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """``qws`` tuned so that ``graph``'s first outputs match ``targets`` (per calibration batch, one array
    per output; float outputs only) for the inputs ``feeds``; the report holds the relative output error
    before and after on the held-out micro batches (``error_*``) and on the others (``train_error_*``),
    and the seconds."""
    t0 = time.perf_counter()
    tg = TorchGraph(graph)
    by_name = {s.name: s for s in sites}
    for name, qw in qws.items():  # codebook weights: fixed at the method's rounding
        if qw.codebook is not None:
            deq = torch.from_numpy(qw.dequantize().astype(np.float32))
            tg.constants[by_name[name].weight_name] = deq if by_name[name].transposed else deq.T.contiguous()
    fakes = [_fake(by_name[name], qw, graph) for name, qw in qws.items() if qw.codebook is None]
    if not fakes:
        raise NothingToTuneError("no weight on a uniform grid (codebook schemes are not tuned)")
    batches = _micro_batches(tg, feeds, targets, settings.micro_batch)
    train, held = _split(batches)
    how = (settings.per_token, settings.first_weight)
    before, train_before = _total(tg, fakes, held, how), _total(tg, fakes, train, how)
    params = [f.a for f in fakes] + ([f.v for f in fakes] if settings.offsets else [])
    opt = torch.optim.Adam(params, lr=settings.lr)
    order = np.random.default_rng(0).permutation(settings.steps) % len(train)
    for i in order:
        opt.zero_grad(set_to_none=True)
        _loss(tg, fakes, *train[i], how).backward()
        opt.step()
        with torch.no_grad():
            for f in fakes:
                f.a.clamp_(0.5, 1.5)
    after, train_after = _total(tg, fakes, held, how), _total(tg, fakes, train, how)
    report = {"error_before": before, "error_after": after, "train_error_before": train_before,
              "train_error_after": train_after, "seconds": time.perf_counter() - t0}  # fmt: skip
    if not after < before:
        return qws, report
    return {**qws, **{f.site.name: f.result() for f in fakes}}, report


def _split(batches: list[Batch]) -> tuple[list[Batch], list[Batch]]:
    """Every fourth micro batch held out: the tuned codes are kept only if they lower the error there
    (the offsets are as many as the block's weights, enough to fit the training sequences' noise)."""
    if len(batches) < 4:
        return batches, batches
    return [b for i, b in enumerate(batches) if i % 4 != 3], batches[3::4]


def _micro_batches(
    tg: TorchGraph, feeds: Sequence[dict[str, np.ndarray]], targets: Sequence[Sequence[np.ndarray]], size: int
) -> list[Batch]:
    """(feeds, targets) of ``size`` sequences each; feeds without the batch axis (shared tables) are shared."""
    out = []
    for feed, target in zip(feeds, targets, strict=True):
        n = target[0].shape[0]
        for i in range(0, n, size):
            part = {k: torch.from_numpy(_rows(v, n, i, size)) for k, v in feed.items() if k in tg.inputs}
            out.append((part, [_float_rows(t, n, i, size) for t in target]))
    return out


def _float_rows(t: np.ndarray, n: int, i: int, size: int) -> torch.Tensor | None:
    """Rows of a float output to match; None for integer outputs (shapes, indices), which are not fitted."""
    return torch.from_numpy(_rows(t, n, i, size)) if np.issubdtype(t.dtype, np.floating) else None


def _rows(v: np.ndarray, n: int, i: int, size: int) -> np.ndarray:
    return np.ascontiguousarray(v[i : i + size]) if v.ndim and v.shape[0] == n else v
