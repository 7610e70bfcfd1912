"""Fixtures of the reliability tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def llama(tiny_hf_onnx) -> Path:
    """The Optimum export of the tiny random Llama (config + tokenizer + model.onnx)."""
    return tiny_hf_onnx("llama")
