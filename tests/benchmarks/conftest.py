"""The benchmarks are scripts, not a package: each test module gets its script imported by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def quality() -> ModuleType:
    return _load("quality")


@pytest.fixture(scope="session")
def cuda_gemv() -> ModuleType:
    return _load("cuda_gemv")


@pytest.fixture(scope="session")
def rounding_device() -> ModuleType:
    return _load("rounding_device")


@pytest.fixture(scope="session")
def holdout_proxy() -> ModuleType:
    return _load("holdout_proxy")


@pytest.fixture(scope="session")
def quantize_time() -> ModuleType:
    return _load("quantize_time")
