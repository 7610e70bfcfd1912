"""Hessian helpers: accumulation, validation (NaN/Inf/shape -> CalibrationError), dead inputs, dampening
retries and the documented fallback (None -> caller uses RTN)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from optimum.adaround.graph_passes.errors import CalibrationError, UserError
from optimum.adaround.graph_passes.rounding import hessian as hs


def test_accumulate_is_float64_sum_over_all_tokens():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((2, 5, 8)).astype(np.float32)  # [batch, seq, K]: flattened into tokens
    x2 = rng.standard_normal((3, 8)).astype(np.float32)
    h = hs.empty_hessian(8)
    assert h.dtype == np.float64 and not h.any()
    out = hs.accumulate(h, x1)
    assert out is h
    hs.accumulate(h, x2)
    x = np.concatenate([x1.reshape(-1, 8), x2]).astype(np.float64)
    np.testing.assert_allclose(h, x.T @ x, rtol=1e-12)


def test_accumulate_keeps_small_directions_float32_would_lose():
    # 1e4-scale activations plus a 1e-3 direction: the float64 sum keeps the tiny eigenvalue positive.
    x = np.zeros((4, 2), np.float32)
    x[:, 0] = 1e4
    x[0, 1], x[1, 1] = 1e-3, -1e-3
    h = hs.accumulate(hs.empty_hessian(2), x)
    assert h[1, 1] == pytest.approx(2e-6, rel=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_hessian_names_the_site(bad):
    h = np.eye(4)
    h[1, 2] = bad
    with pytest.raises(CalibrationError, match=r"model\.layers\.3\.mlp\.up_proj.*NaN/Inf"):
        hs.prepare(h, 4, "model.layers.3.mlp.up_proj")
    assert issubclass(CalibrationError, UserError)


def test_missing_or_misshaped_hessian():
    with pytest.raises(CalibrationError, match=r"site s: .*needs calibration statistics"):
        hs.prepare(None, 4, "s")
    with pytest.raises(CalibrationError, match=r"shape \(3, 3\) does not match K=4"):
        hs.prepare(np.eye(3), 4, "s")


def test_prepare_patches_dead_inputs_without_touching_the_input():
    h = np.diag([2.0, 0.0, 3.0])
    prep = hs.prepare(h, 3, "s")
    assert prep.dead.tolist() == [False, True, False]
    assert prep.h[1, 1] == 1 and h[1, 1] == 0
    assert prep.source is h  # checked, not copied: the copy is made by the methods that factor H


def test_dampen_adds_a_fraction_of_the_mean_diagonal():
    h = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(hs.dampen(h, 0.5), torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64)))
    assert torch.equal(
        hs.dampen(torch.zeros(2, 2, dtype=torch.float64), 0.1), 0.1 * torch.eye(2, dtype=torch.float64)
    )


def test_inverse_cholesky_of_a_positive_definite_hessian():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 6))
    h = torch.from_numpy(x.T @ x)
    upper, damp = hs.inverse_cholesky(h, 0.01)
    assert damp == 0.01
    assert torch.equal(upper, torch.triu(upper))
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(hs.dampen(h, 0.01)))


def test_rank_deficient_hessian_is_rescued_by_dampening():
    x = np.random.default_rng(2).standard_normal((3, 8))  # 3 tokens, K = 8: rank 3
    assert hs.inverse_cholesky(torch.from_numpy(x.T @ x), 0.01) is not None


def test_indefinite_hessian_retries_then_returns_none(caplog):
    h = -torch.eye(4, dtype=torch.float64)  # dampening of 0.01x..1x cannot fix this
    with caplog.at_level(logging.WARNING):
        assert hs.inverse_cholesky(h, 0.01, site="layers.0.q_proj") is None
    assert "layers.0.q_proj" in caplog.text and "round-to-nearest" in caplog.text
    # a mildly indefinite one needs more dampening, which the retry finds
    h2 = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05], dtype=torch.float64))
    out = hs.inverse_cholesky(h2, 0.01)
    assert out is not None and out[1] == pytest.approx(0.1)


@pytest.mark.parametrize("k", [40, hs.WIDE_K // 64])
def test_permuted_equals_indexing_the_prepared_hessian_twice(k):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3 * k, k))
    x[:, [1, k - 2]] = 0  # two dead inputs
    prep = hs.prepare(x.T @ x, k, "s")
    perm = torch.from_numpy(rng.permutation(k))
    got = prep.permuted(perm, columns=7)  # blocks that do not divide K
    assert got.dtype == hs.work_dtype(k)
    assert torch.equal(got, prep.h[perm][:, perm])
    assert torch.equal(prep.diagonal(), torch.diagonal(prep.h))


def test_a_wide_hessian_is_prepared_in_float32():
    k = hs.WIDE_K
    prep = hs.prepare(np.eye(k), k, "s")
    assert prep.permuted(torch.arange(k), columns=4096).dtype == torch.float32


def test_factoring_fresh_arrays_in_place_gives_the_same_bits_and_leaves_a_given_h_alone():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 9))  # rank 5: positive definite only once dampened
    h = torch.from_numpy(x.T @ x)
    kept = h.clone()
    upper, damp = hs.inverse_cholesky(h, 0.01)
    assert damp == 0.01 and torch.equal(h, kept)  # the caller's array is not the one factored
    lower = torch.linalg.cholesky(hs.dampen(h, 0.01))  # the out-of-place steps, for the bits
    assert torch.equal(upper, torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True))
    built = []

    def fresh() -> torch.Tensor:
        built.append(1)
        return h.clone()

    assert torch.equal(hs.inverse_cholesky(fresh, 0.01)[0], upper) and len(built) == 1
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.05], dtype=torch.float64))
    out = hs.inverse_cholesky(lambda: built.append(1) or indefinite.clone(), 0.01)
    assert out is not None and out[1] == pytest.approx(0.1) and len(built) == 3  # one fresh array per try
