"""Equivalent transforms of the float graph, applied before calibration and rounding (``--transform``).

Each transform rewrites initializers so that the float model computes the same function while its weights
become easier to round. ``apply_transforms`` runs the asked ones in order and checks the claim: the
logits of the transformed graph on a few token sequences must match the original's, else nothing is
rounded (``TransformError``). What each did, and the measured difference, go into the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ..calibration.feeds import feed_specs, make_feeds, window_capacities
from ..calibration.sessions import open_session
from ..embeddings import id_lookups
from ..errors import InternalError
from .online import HadamardDownProjPass
from .rotate import RotateResidualPass
from .scale import ScaleInputsPass

__all__ = ["DATA_AWARE", "TRANSFORMS", "TransformError", "apply_transforms", "check_ids", "logit_tolerance"]

TRANSFORMS = {"rotate": RotateResidualPass, "rotate_down": HadamardDownProjPass, "awq": ScaleInputsPass}
DATA_AWARE = frozenset({"awq"})
"""Transforms measured on calibration text (``apply_transforms``' ``calibration``)."""


class TransformError(InternalError):
    """A transform changed what the float model computes beyond float tolerance."""


def logit_tolerance(model: ir.Model) -> float:
    """The largest accepted ``max |logits' - logits| / max |logits|``: float32 rounding of the rewritten
    weights moves logits by ~1e-6 of their range on SmolLM2; half precision by ~1e-3."""
    dtypes = {v.const_value.dtype for v in model.graph.initializers.values() if v.const_value is not None}
    return 2e-2 if dtypes & {ir.DataType.FLOAT16, ir.DataType.BFLOAT16} else 1e-3


def check_ids(model: ir.Model, token_ids: np.ndarray | None) -> np.ndarray:
    """Token ids the check runs on: the first two calibration sequences (64 tokens), else two random
    sequences over the vocabulary of the graph's embedding table."""
    if token_ids is not None:
        return np.asarray(token_ids)[:2, :64]
    vocab = [n.inputs[0].const_value.shape[0] for n in id_lookups(model.graph)]  # type: ignore[union-attr]
    return np.random.default_rng(0).integers(0, min(vocab, default=2), size=(2, 32))


def _logits(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = open_session(model, ["CPUExecutionProvider"])
    return np.asarray(session.run([session.get_outputs()[0].name], feeds)[0], dtype=np.float64)


def apply_transforms(
    model: ir.Model, names: Sequence[str], token_ids: np.ndarray, *, seed: int = 0, folder: Path | None = None,
    calibration: np.ndarray | None = None, scheme: Any = None, method: Any = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Apply the transforms ``names`` to ``model`` in place and check its logits on ``token_ids``
    (``[b, T]``) against the original's. Returns one record per transform and one for the check."""
    if not names:
        return []
    specs = feed_specs(model.graph.inputs, folder=folder, capacities=window_capacities(model.graph))
    feeds = make_feeds(specs, np.asarray(token_ids, dtype=np.int64))
    before = _logits(model, feeds)
    records: list[dict[str, Any]] = []
    for name in names:
        if name in DATA_AWARE:  # chosen on the calibration text for the run's scheme
            transform = TRANSFORMS[name](seed=seed, token_ids=calibration, scheme=scheme, folder=folder,
                                         method=method)  # fmt: skip
        else:
            transform = TRANSFORMS[name](seed=seed)
        transform(model)
        records.append({"name": name, **transform.record})
    RemoveUnusedNodesPass()(model)
    after = _logits(model, feeds)
    error = float(np.abs(after - before).max() / max(np.abs(before).max(), 1e-30))
    limit = logit_tolerance(model)
    records.append({"name": "check", "max_relative_logit_error": error, "limit": limit,
                    "token_ids": list(np.shape(token_ids))})  # fmt: skip
    if not error <= limit:
        raise TransformError(
            f"the transformed float model's logits differ from the original's by {error:.2e} of their range "
            f"(limit {limit:.0e}) after {', '.join(names)}; nothing was written"
        )
    return records
