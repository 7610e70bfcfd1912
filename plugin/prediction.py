"""Predict a quantization's perplexity without running it: ``predict(model, config, **options)``.

The predictor (``graph_passes/predict``). One configuration: a joint probe (``joint.py``), every site's
weight moved at once by the error its rounding leaves, on a few calibration sequences. Under
``target_bits`` or ``max_size``, or from kept sensitivities (``sensitivity``): each layer group's
sensitivity probed through onnxruntime, each site's relative output error estimated from one float
calibration pass, the loss increase from the linear law through the measured link; the prediction is that
of the allocation the run would choose.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from .api import run_config
from .graph_passes.model_io import load_model
from .graph_passes.pipeline import plan_schemes, prepare_sites
from .graph_passes.predict.estimate import packed_bytes
from .graph_passes.predict.int8_inputs import input_blocks
from .graph_passes.predict.joint import predict_joint
from .graph_passes.predict.law import predict as predict_law
from .graph_passes.predict.plan import measure_profile, plan_allocation
from .graph_passes.predict.units import lookup_site, site_errors
from .recipes import ConfigLike
from .run_inputs import (
    allocation_budget,
    calibration_ids,
    candidate_schemes,
    given_sensitivity,
    pop_token_ids,
)

__all__ = ["predict"]


def predict(
    model: str | os.PathLike, config: ConfigLike = None, *, progress: bool = True, **overrides: Any
) -> dict[str, Any]:
    """The predicted increase of ln(perplexity) (``delta_nll``, its standard error ``delta_nll_se``) of
    quantizing ``model`` under ``config`` + ``overrides`` (the options of ``quantize``), the float and
    predicted perplexity on the probe tokens, bits per weight, and the seconds each step took. An
    allocation's prediction (and one from ``sensitivity``) carries the sensitivities (``sensitivity``),
    which a later prediction or run can reuse; one configuration's joint probe carries ``joint``."""
    token_ids = pop_token_ids(overrides)
    cfg = run_config(config, **overrides)
    loaded = load_model(model)
    sel = cfg.selection
    sites = prepare_sites(loaded.model, sel.include, sel.exclude, sel.quantize_lm_head).sites
    ids, _ = calibration_ids(cfg, loaded, token_ids, force=True)
    folder = loaded.directory
    t0 = time.perf_counter()
    given = given_sensitivity(cfg, loaded.model, sites)
    if cfg.allocation.allocates:
        budget, asked = allocation_budget(cfg, loaded.model, loaded.path, sites)
        planned = plan_allocation(
            loaded.model, sites, candidate_schemes(cfg, sites), cfg.method, ids,
            budget=budget, asked=asked, probe_samples=cfg.allocation.probe_samples,
            accuracy_level=cfg.output.accuracy_level, progress=progress, model_dir=folder, sensitivity=given,
        )  # fmt: skip
        alloc = planned.allocation
        result = {"allocation": alloc.to_dict(), "bits_per_weight": alloc.bits_per_weight}
        sens, prediction, seconds = planned.sensitivity, alloc.prediction, planned.seconds
    else:
        _, schemes = plan_schemes(cfg, sites)
        if given is None:
            return _joint(cfg, loaded, sites, {s.name: schemes[s.name] for s in sites}, ids, progress, t0)
        labels = {s.name: schemes[s.name].label for s in sites}
        sens, errors, seconds = measure_profile(
            loaded.model, sites, {schemes[s.name].label: schemes[s.name] for s in sites}, cfg.method, ids,
            probe_samples=cfg.allocation.probe_samples, given=given,
            progress=progress, model_dir=folder, accuracy_level=cfg.output.accuracy_level,
        )  # fmt: skip
        t = site_errors(labels, errors.errors, lookup_site(sites))
        prediction = predict_law(sens, t, input_blocks(labels, sites, cfg.output.accuracy_level))
        nbytes = sum(packed_bytes(schemes[s.name], s.k, s.n, cfg.output.accuracy_level) for s in sites)
        result = {
            "schemes": sorted(set(labels.values())),
            "bits_per_weight": 8 * nbytes / sum(s.k * s.n for s in sites),
        }
    ppl = math.exp(sens.base_nll)
    return {
        **result,
        "method": cfg.method.name,
        "delta_nll": prediction.delta,
        "delta_nll_se": prediction.delta_se,
        "probe_perplexity": ppl,
        "predicted_perplexity": ppl * math.exp(prediction.delta),
        "seconds": {**seconds, "total": time.perf_counter() - t0},
        "sensitivity": sens.to_dict(),
    }


def _joint(cfg: Any, loaded: Any, sites: list[Any], schemes: dict[str, Any], ids: Any, progress: bool,
           t0: float) -> dict[str, Any]:  # fmt: skip
    """One configuration's prediction by the joint probe."""
    labels = {name: scheme.label for name, scheme in schemes.items()}
    level = cfg.output.accuracy_level
    found = predict_joint(
        loaded.model, sites, schemes, cfg.method, ids, int8_blocks=input_blocks(labels, sites, level),
        model_dir=loaded.directory, progress=progress,
    )  # fmt: skip
    nbytes = sum(packed_bytes(schemes[s.name], s.k, s.n, level) for s in sites)
    ppl = math.exp(found.base_nll)
    return {
        "schemes": sorted(set(labels.values())),
        "bits_per_weight": 8 * nbytes / sum(s.k * s.n for s in sites),
        "method": cfg.method.name,
        "delta_nll": found.delta,
        "delta_nll_se": found.delta_se,
        "probe_perplexity": ppl,
        "predicted_perplexity": ppl * math.exp(found.delta),
        "seconds": {**found.seconds, "total": time.perf_counter() - t0},
        "joint": {"tokens": found.n_tokens, "factor": found.factor, "ratios": dict(found.ratios)},
    }
