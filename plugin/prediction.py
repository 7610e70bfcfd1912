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
from collections.abc import Mapping
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
        by_site = {s.name: schemes[s.name] for s in sites}
        labels = {name: scheme.label for name, scheme in by_site.items()}
        level = cfg.output.accuracy_level
        nbytes = sum(packed_bytes(by_site[s.name], s.k, s.n, level) for s in sites)
        result = {
            "schemes": sorted(set(labels.values())),
            "bits_per_weight": 8 * nbytes / sum(s.k * s.n for s in sites),
        }
        if given is None:  # one configuration: the joint probe
            found = predict_joint(
                loaded.model, sites, by_site, cfg.method, ids, int8_blocks=input_blocks(labels, sites, level),
                model_dir=folder, progress=progress,
            )  # fmt: skip
            joint = {"tokens": found.n_tokens, "factor": found.factor, "ratios": dict(found.ratios)}
            return _answer(cfg, {**result, "joint": joint}, found.base_nll, found.delta, found.delta_se,
                           found.seconds, t0)  # fmt: skip
        sens, errors, seconds = measure_profile(
            loaded.model, sites, {lab: by_site[n] for n, lab in labels.items()}, cfg.method, ids,
            probe_samples=cfg.allocation.probe_samples, given=given,
            progress=progress, model_dir=folder, accuracy_level=level,
        )  # fmt: skip
        t = site_errors(labels, errors.errors, lookup_site(sites))
        prediction = predict_law(sens, t, input_blocks(labels, sites, level))
    result["sensitivity"] = sens.to_dict()
    return _answer(cfg, result, sens.base_nll, prediction.delta, prediction.delta_se, seconds, t0)


def _answer(cfg: Any, result: dict[str, Any], base_nll: float, delta: float, delta_se: float,
            seconds: Mapping[str, float], t0: float) -> dict[str, Any]:  # fmt: skip
    """A prediction's record: what was predicted (``result``), the increase and the perplexities."""
    ppl = math.exp(base_nll)
    return {
        **result,
        "method": cfg.method.name,
        "delta_nll": delta,
        "delta_nll_se": delta_se,
        "probe_perplexity": ppl,
        "predicted_perplexity": ppl * math.exp(delta),
        "seconds": {**seconds, "total": time.perf_counter() - t0},
    }
