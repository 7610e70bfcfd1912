"""Units' per-site quantities: the tied lookup's error and the per-site errors of a choice of labels."""

from __future__ import annotations

import numpy as np
import pytest

from optimum.adaround.graph_passes.predict.units import LOOKUP, lookup_error, site_errors


def test_lookup_error_weights_each_row_by_how_often_it_is_read():
    rows = np.array([[3.0, 4.0], [1.0, 0.0]])
    approx = np.array([[3.0, 4.0], [0.0, 0.0]])  # only the second row is wrong, entirely
    assert lookup_error(rows, approx, np.array([1, 1])) == pytest.approx(1 / 26)
    assert lookup_error(rows, approx, np.array([0, 5])) == pytest.approx(1.0)
    assert lookup_error(rows, rows, np.array([2, 3])) == 0.0
    assert lookup_error(np.zeros((2, 2)), approx, np.array([1, 1])) == 0.0


def test_site_errors_give_the_lookup_the_label_of_its_tied_projection():
    errors = {"w2": {"a": 0.3, "head": 0.05, LOOKUP: 0.2}, "w8": {"a": 0.01, "head": 0.001, LOOKUP: 0.002}}
    t = site_errors({"a": "w8", "head": "w2"}, errors, tied="head")
    assert t == {"a": 0.01, "head": 0.05, LOOKUP: 0.2}
    assert LOOKUP not in site_errors({"a": "w8", "head": "w2"}, errors, tied=None)
    assert LOOKUP not in site_errors({"a": "w8"}, errors, tied="head")  # the head kept in float
    errors["float"] = {"a": 0.0, "head": 0.0}
    assert site_errors({"a": "w2", "head": "float"}, errors, tied="head")[LOOKUP] == 0.0
