"""plugin/defaults.py: calibration size per method, as the API, the CLIs and recipes resolve it."""

from __future__ import annotations

import pytest

from optimum.adaround.defaults import DEFAULT_CALIB_SAMPLES, default_calib_samples
from optimum.adaround.recipes import Recipe


@pytest.mark.parametrize(
    ("method", "samples"),
    [
        ("rtn", DEFAULT_CALIB_SAMPLES),
        ("gptq", DEFAULT_CALIB_SAMPLES),
        ("adaround", 128),
        ("adaround_ls", 128),
    ],
)
def test_each_method_gets_its_own_calibration_size(method, samples):
    assert default_calib_samples(method) == samples
    assert Recipe(method=method).samples == samples  # None in the recipe: the method decides
    assert Recipe(method=method, calib_samples=7).samples == 7  # an explicit number always wins


def test_an_unknown_method_gets_the_shared_default():
    assert default_calib_samples("no_such_method") == DEFAULT_CALIB_SAMPLES


def test_the_clis_leave_the_choice_to_the_method():
    from optimum.adaround.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["quantize", "in.onnx", "out"])
    assert args.calib_samples is None
