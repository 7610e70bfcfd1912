"""Proxy loss and SQNR metrics against direct definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optimum.adaround.graph_passes.rounding.metrics import (
    output_sqnr_db,
    proxy_loss,
    quadratic_form,
    site_quality,
    sqnr_db,
)


def test_proxy_loss_is_the_mean_output_error_per_token():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 12)).astype(np.float32)
    w = rng.standard_normal((7, 12)).astype(np.float32)
    wq = w + 0.01 * rng.standard_normal((7, 12)).astype(np.float32)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    direct = float(((x.astype(np.float64) @ (wq - w).astype(np.float64).T) ** 2).sum()) / 50
    assert proxy_loss(w, wq, h, 50) == pytest.approx(direct, rel=1e-10)
    # torch and numpy inputs agree
    assert proxy_loss(torch.from_numpy(w), torch.from_numpy(wq), torch.from_numpy(h), 50) == pytest.approx(
        direct, rel=1e-10
    )


def test_quadratic_form_accumulates_in_float64():
    d = np.full((1, 4096), 1e-4, np.float32)
    h = np.ones((4096, 4096), np.float32) * 1e4
    assert quadratic_form(d, h) == pytest.approx((4096 * 1e-4) ** 2 * 1e4, rel=1e-6)


def test_sqnr_values():
    w = np.array([[1.0, -2.0, 3.0]], np.float32)
    assert sqnr_db(w, 0.9 * w) == pytest.approx(20.0, abs=1e-4)
    assert sqnr_db(w, w) == math.inf
    h = np.diag([1.0, 2.0, 3.0])
    assert output_sqnr_db(w, 0.9 * w, h) == pytest.approx(20.0, abs=1e-4)
    assert output_sqnr_db(w, w, h) == math.inf
    # output SQNR weighs errors by H: an error on an unused input costs nothing
    wq = w.copy()
    wq[0, 0] += 0.5
    assert output_sqnr_db(w, wq, np.diag([0.0, 1.0, 1.0])) == math.inf


def test_site_quality_matches_the_single_metrics():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 8))
    h = x.T @ x
    w = rng.standard_normal((4, 8)).astype(np.float32)
    wq = (w + 0.05 * rng.standard_normal((4, 8))).astype(np.float32)
    q = site_quality(w, wq, h, 30)
    assert q["proxy_loss"] == pytest.approx(proxy_loss(w, wq, h, 30))
    assert q["sqnr_db"] == pytest.approx(sqnr_db(w, wq))
    assert q["output_sqnr_db"] == pytest.approx(output_sqnr_db(w, wq, h))
