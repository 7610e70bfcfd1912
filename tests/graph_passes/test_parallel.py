"""Rounding in worker processes: how many, in which order, and the same bytes as rounding in-process."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import types
from typing import ClassVar

import numpy as np
import pytest

from optimum.adaround.graph_passes.config import QuantConfig
from optimum.adaround.graph_passes.errors import InvalidOptionError, UserError
from optimum.adaround.graph_passes.model_io import load_model
from optimum.adaround.graph_passes.parallel import (
    AUTO_MIN_WEIGHTS,
    MAX_AUTO_WORKERS,
    in_order,
    resolve_workers,
    result_of,
    round_site,
    rounding_pool,
)
from optimum.adaround.graph_passes.pipeline import prepare_sites, quantize_model
from optimum.adaround.graph_passes.records import WeightSite
from optimum.adaround.graph_passes.rounding.adaround import AdaRoundConfig
from optimum.adaround.graph_passes.rounding.base import METHODS, MethodConfig, SiteStats, register_method
from optimum.adaround.graph_passes.rounding.gptq import GPTQConfig
from optimum.adaround.graph_passes.scheme import QuantScheme


def _sites(weights: int) -> list[WeightSite]:
    site = WeightSite("s", "n", "MatMul", "w", k=1, n=weights, transposed=False, activation="x")
    return [site]


def test_resolve_workers_explicit_and_automatic():
    assert resolve_workers(3, _sites(10)) == 3  # asked for: given, whatever the size
    assert resolve_workers(None, _sites(AUTO_MIN_WEIGHTS - 1), cpu_count=8) == 1  # small: not worth a start
    assert resolve_workers(None, _sites(AUTO_MIN_WEIGHTS), cpu_count=2) == 2
    assert resolve_workers(None, _sites(AUTO_MIN_WEIGHTS), cpu_count=64) == MAX_AUTO_WORKERS
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidOptionError, match="workers="):
            resolve_workers(bad, _sites(10))  # type: ignore[arg-type]


def test_in_order_keeps_order_and_window():
    submitted: list[int] = []
    handed: list[int] = []

    def submit(i: int):
        submitted.append(i)
        assert len(submitted) - len(handed) <= 3  # never more than the window in flight
        return lambda: i * i

    out = []
    for i, job in in_order(range(10), submit, 3):
        handed.append(i)
        out.append((i, result_of(job)))
    assert out == [(i, i * i) for i in range(10)]


def test_in_order_raises_what_the_job_raised():
    def boom() -> None:
        raise ValueError("site 2: bad")

    jobs = in_order([1, 2], lambda i: boom if i == 2 else (lambda: i), 1)
    assert result_of(next(jobs)[1]) == 1
    with pytest.raises(ValueError, match="site 2"):
        result_of(next(jobs)[1])


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_worker_processes_give_the_same_bytes(tiny_hf_onnx, method):
    """Two spawned workers round a block's sites side by side; codes, scales and the per-site report
    equal an in-process run's exactly."""
    ids = np.random.default_rng(0).integers(0, 300, (4, 16))
    runs = {}
    for workers in (1, 2):
        model = load_model(tiny_hf_onnx("llama")).model
        config = QuantConfig().with_overrides(scheme="w4-g32", method=method, workers=workers)
        with quantize_model(
            model, config, sites=prepare_sites(model), token_ids=ids, progress=False
        ) as result:
            arrays = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
            metrics = [{k: v for k, v in s.metrics.items() if k != "time_s"} for s in result.sites]
            runs[workers] = (arrays, [s.name for s in result.sites], metrics)
    (a1, names1, m1), (a2, names2, m2) = runs[1], runs[2]
    assert names1 == names2 and len(names1) == 14
    assert m1 == m2
    assert a1.keys() == a2.keys()
    for name in a1:
        np.testing.assert_array_equal(a1[name], a2[name], err_msg=name)


@pytest.mark.parametrize("config", [GPTQConfig(), AdaRoundConfig(iters=20, free_cols=32, tile_rows=16)])
def test_a_site_rounded_in_a_worker_equals_one_rounded_here(config, minilm_weight, correlated_hessian):
    """The worker receives the config, builds the method and rounds: the same bytes as in this process."""
    w = np.ascontiguousarray(minilm_weight("encoder.layer.1.intermediate.dense.weight")[:32])
    h, n = correlated_hessian(w.shape[1])
    args = (config, w, QuantScheme.parse("w4-g64"), SiteStats(h, n), "ffn")
    here, _ = round_site(*args)
    with rounding_pool(2) as pool:
        there, seconds = pool.submit(round_site, *args).result()
    assert seconds > 0
    np.testing.assert_array_equal(here.codes, there.codes)
    np.testing.assert_array_equal(here.scales, there.scales)
    assert {k: v for k, v in here.metrics.items() if k != "time_s"} == {
        k: v for k, v in there.metrics.items() if k != "time_s"
    }


@dataclasses.dataclass(frozen=True)
class _DiesConfig(MethodConfig):
    name: ClassVar[str] = "dies_in_worker"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})


class _Dies:
    """A calibrated method whose worker process dies (as if killed for memory)."""

    def __init__(self, config: _DiesConfig) -> None:
        self.config = config

    def quantize(self, weight, scheme, stats=None, *, site="?"):
        os._exit(9)


# Registered on import, so a worker process that unpickles the config can build the method too; listed as
# a method only inside the test that uses it.
register_method(_DiesConfig)(_Dies)
del METHODS[_DiesConfig.name]


def test_a_dead_worker_is_a_one_line_error(tiny_hf_onnx, monkeypatch):
    monkeypatch.setitem(METHODS, _DiesConfig.name, _DiesConfig)
    model = load_model(tiny_hf_onnx("llama")).model
    ids = np.random.default_rng(0).integers(0, 300, (2, 8))
    config = QuantConfig().with_overrides(scheme="w4-g32", method=_DiesConfig(), workers=2)
    with pytest.raises(UserError, match=r"worker process ended abruptly.*--workers 1"):
        quantize_model(model, config, token_ids=ids, progress=False)


def test_a_daemonic_process_rounds_in_process(monkeypatch, caplog):
    # multiprocessing forbids children of daemonic processes (a Pool worker, the benchmark's old job
    # process): the pool must step aside with a warning instead of failing the whole quantization
    monkeypatch.setattr(multiprocessing, "current_process", lambda: types.SimpleNamespace(daemon=True))
    with caplog.at_level(logging.WARNING), rounding_pool(2) as pool:
        assert pool is None
    assert "workers=2 ignored: this is a daemonic process" in caplog.text
