"""The benchmarks are scripts, not a package: their folder goes first on ``sys.path`` and each test module
gets its script imported by name, as the scripts import each other (and as a spawned job finds them)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

_BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")


def _script_fixture(name: str):
    """A session fixture named ``name`` that returns benchmarks/``name``.py imported."""

    def load():
        if _BENCHMARKS not in sys.path:
            sys.path.insert(0, _BENCHMARKS)
        return importlib.import_module(name)

    return pytest.fixture(scope="session", name=name)(load)


quality = _script_fixture("quality")
measure = _script_fixture("measure")
cuda_gemv = _script_fixture("cuda_gemv")
rounding_device = _script_fixture("rounding_device")
holdout_proxy = _script_fixture("holdout_proxy")
quantize_time = _script_fixture("quantize_time")
transforms = _script_fixture("transforms")
scale = _script_fixture("scale")
predictor = _script_fixture("predictor")
predictor_report = _script_fixture("predictor_report")
