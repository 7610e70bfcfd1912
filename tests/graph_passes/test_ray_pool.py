"""Rounding as Ray tasks (``executor="ray"``): the same bytes as a local run, one-line errors, no Ray needed
to import the package.

One local Ray instance (loopback only) serves the module. Its workers find this module on PYTHONPATH, so
the stand-in methods below, registered on import, can be built there too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import time
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from optimum.adaround import quantize
from optimum.adaround.graph_passes.errors import InvalidOptionError, UserError
from optimum.adaround.graph_passes.parallel import round_site
from optimum.adaround.graph_passes.ray_pool import ray_pool
from optimum.adaround.graph_passes.rounding.base import (
    METHODS,
    MethodConfig,
    SiteStats,
    get_method,
    register_method,
)
from optimum.adaround.graph_passes.rounding.gptq import GPTQConfig
from optimum.adaround.graph_passes.scheme import QuantScheme

# The model's own files; quantization_config.json, the recipe and the model card also record the options
# (executor included) and timings.
_RECORDS = {"quantization_config.json", "quantization_recipe.yaml", "README.md"}
_DYING_SITE = r"layers\.1\.mlp\.down_proj"


@dataclasses.dataclass(frozen=True)
class _DiesConfig(MethodConfig):
    name: ClassVar[str] = "dies_in_ray_worker"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})


class _Dies:
    """A calibrated method whose worker dies (as if killed for memory) on one site; the others are RTN."""

    def __init__(self, config: _DiesConfig) -> None:
        self.config = config

    def quantize(self, weight, scheme, stats=None, *, site="?"):
        if re.search(_DYING_SITE, site):
            os._exit(1)
        return get_method("rtn").quantize(weight, scheme)


# Registered on import (in Ray's workers too, which unpickle the config by this module's name); listed as a
# method only inside the test that uses it.
register_method(_DiesConfig)(_Dies)
del METHODS[_DiesConfig.name]


def _rejects(*args) -> None:
    raise InvalidOptionError("site ffn: method option x=1: use 0")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance started by ``ray_pool`` (as a run starts it), shared by the module's tests."""
    ray = pytest.importorskip("ray")
    here = str(Path(__file__).parent)
    stack = contextlib.ExitStack()
    with pytest.MonkeyPatch.context() as mp:  # read by Ray's processes as they start
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
        pool = stack.enter_context(ray_pool(None))
    with stack:
        yield ray, pool
    assert not ray.is_initialized()  # started here, so shut down on exit


def _ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 300, (2, 32))


def test_a_local_instance_listens_on_loopback_only(local_ray):
    ray, pool = local_ray
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    resources = ray.cluster_resources()
    assert pool.workers == (int(resources.get("GPU", 0)) or int(resources["CPU"]))  # per GPU, else per CPU


def test_ray_tasks_give_the_same_files_as_local_processes(local_ray, tiny_hf_onnx, tmp_path, tree_hash):
    src = tiny_hf_onnx("llama")
    kw = dict(scheme="w4-g32", method="gptq", calib_data=_ids(), workers=2, progress=False)
    seconds = {}
    for executor in ("local", "ray"):
        t0 = time.perf_counter()
        quantize(src, tmp_path / executor, executor=executor, **kw)
        seconds[executor] = time.perf_counter() - t0
    print(f"local {seconds['local']:.1f} s, ray {seconds['ray']:.1f} s")  # shown with pytest -s
    for executor in ("local", "ray"):
        for name in _RECORDS:
            (tmp_path / executor / name).unlink(missing_ok=True)
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(
        p.name for p in (tmp_path / "local").iterdir()
    )
    assert tree_hash(tmp_path / "ray") == tree_hash(tmp_path / "local")


def test_shared_statistics_are_stored_once_and_errors_come_back_as_themselves(local_ray, correlated_hessian):
    _, pool = local_ray
    w = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    stats = SiteStats(*correlated_hessian(w.shape[1]))
    scheme = QuantScheme.parse("w4-g64")
    before = len(pool._shared)
    futures = [pool.submit(round_site, GPTQConfig(), w, scheme, stats, f"s{i}") for i in range(3)]
    assert len(pool._shared) == min(before + 1, 4)  # q/k/v-like siblings: one object in the store
    here, _ = round_site(GPTQConfig(), w, scheme, stats, "s0")
    for future in futures:
        there, _ = future.result()
        np.testing.assert_array_equal(here.codes, there.codes)
        np.testing.assert_array_equal(here.scales, there.scales)
    with pytest.raises(InvalidOptionError, match=r"^site ffn: method option x=1: use 0$"):
        pool.submit(_rejects, w).result()


def test_a_dead_ray_worker_is_a_one_line_error_and_writes_nothing(
    local_ray, tiny_hf_onnx, tmp_path, monkeypatch
):
    monkeypatch.setitem(METHODS, _DiesConfig.name, _DiesConfig)
    out = tmp_path / "q"
    with pytest.raises(UserError) as caught:
        quantize(
            tiny_hf_onnx("llama"),
            out,
            method=_DiesConfig.name,
            executor="ray",
            calib_data=_ids(),
            progress=False,
        )
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(rf"^\S*{_DYING_SITE}\S*: Ray lost the task rounding it \(WorkerCrashedError", message)
    assert "--executor local" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nor a half-written sibling


def test_without_ray_the_option_says_what_to_install(monkeypatch, tiny_hf_onnx, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    expected = r'^executor="ray" needs Ray: pip install "optimum-adaround\[ray\]"$'
    with pytest.raises(InvalidOptionError, match=expected), ray_pool(None):
        pass
    out = tmp_path / "q"
    with pytest.raises(InvalidOptionError, match=expected):
        quantize(tiny_hf_onnx("llama"), out, method="gptq", executor="ray", calib_data=_ids(), progress=False)
    assert not out.exists()


def test_an_address_that_cannot_be_joined_is_a_one_line_option_error(monkeypatch):
    def init(**kw):
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify one.")

    stub = types.SimpleNamespace(
        is_initialized=lambda: False,
        init=init,
        exceptions=types.SimpleNamespace(RayError=type("RayError", (Exception,), {})),
    )
    monkeypatch.setitem(sys.modules, "ray", stub)  # Ray's own join retries an unreachable head for minutes
    with (
        pytest.raises(
            InvalidOptionError,
            match=r"^ray_address='10\.0\.0\.1:6379': could not join a Ray cluster there \(ConnectionError: "
            r"Could not find any running Ray instance\.\); give its head's host:port",
        ) as caught,
        ray_pool(None, "10.0.0.1:6379"),
    ):
        pass
    assert "\n" not in str(caught.value)
