"""Learned block scales (adaround_ls): exact least-squares refit, and never worse than adaround."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum.adaround.graph_passes.errors import InvalidOptionError
from optimum.adaround.graph_passes.records import QuantizedWeight
from optimum.adaround.graph_passes.rounding.adaround import AdaRoundConfig
from optimum.adaround.graph_passes.rounding.base import METHODS, SiteStats, build_method
from optimum.adaround.graph_passes.rounding.gptq import GPTQConfig
from optimum.adaround.graph_passes.rounding.learned_scale import AdaRoundLS, AdaRoundLSConfig, refit_scales
from optimum.adaround.graph_passes.rounding.metrics import quadratic_form
from optimum.adaround.graph_passes.scheme import QuantScheme

FFN = "encoder.layer.1.intermediate.dense.weight"
FAST = {"iters": 40, "rounds": 1, "free_cols": 64, "tile_rows": 16}


@pytest.mark.parametrize("symmetric", [True, False])
def test_refit_recovers_the_true_scales_of_grid_aligned_weights(symmetric, correlated_hessian):
    rng = np.random.default_rng(0)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    n, k = 8, 80  # short last block
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    nb = scheme.n_blocks(k)
    true_s = rng.uniform(0.01, 0.1, (n, nb)).astype(np.float32)
    zps = None if symmetric else rng.integers(4, 12, (n, nb)).astype(np.uint8)
    w = QuantizedWeight(codes, true_s, zps, scheme).dequantize()
    h, _ = correlated_hessian(k, tokens=256)
    start = (true_s * rng.uniform(0.7, 1.3, true_s.shape)).astype(np.float32)
    got = refit_scales(w, codes, start, zps, scheme, h)
    np.testing.assert_allclose(got, true_s, rtol=1e-5)


def test_refit_never_increases_a_row_loss(minilm_weight, correlated_hessian):
    w = np.ascontiguousarray(minilm_weight(FFN)[:32])
    h, n = correlated_hessian(w.shape[1])
    scheme = QuantScheme.parse("w3-g64-sym", scale_dtype="float16")
    qw = build_method(GPTQConfig(refit_rounds=0)).quantize(w, scheme, SiteStats(h, n))
    new = refit_scales(w, qw.codes, qw.scales, None, scheme, h)
    np.testing.assert_array_equal(new, new.astype(np.float16).astype(np.float32))  # stored dtype respected
    moved = QuantizedWeight(qw.codes, new, None, scheme)
    for r in range(w.shape[0]):
        d_old = qw.dequantize()[r : r + 1] - w[r : r + 1]
        d_new = moved.dequantize()[r : r + 1] - w[r : r + 1]
        assert quadratic_form(d_new, h) <= quadratic_form(d_old, h) * (1 + 1e-12)
    assert quadratic_form(moved.dequantize() - w, h) < quadratic_form(qw.dequantize() - w, h)


def test_adaround_ls_is_registered_and_beats_adaround(minilm_weight, correlated_hessian):
    assert METHODS["adaround_ls"] is AdaRoundLSConfig
    config = AdaRoundLSConfig(**FAST, scale_steps=1)
    assert isinstance(build_method(config), AdaRoundLS)
    assert config.final_refit == "none" and AdaRoundConfig().final_refit == "guarded"
    assert config.default_calib_samples == AdaRoundConfig.default_calib_samples == 128
    w = np.ascontiguousarray(minilm_weight(FFN)[:32])
    h, n = correlated_hessian(w.shape[1])
    scheme = QuantScheme.parse("w4-g128-sym")
    ls = build_method(config).quantize(w, scheme, SiteStats(h, n), site="ffn")
    ada = build_method(AdaRoundConfig(**FAST)).quantize(w, scheme, SiteStats(h, n))
    ls.check()
    assert ls.metrics["proxy_loss"] < ada.metrics["proxy_loss"] < ls.metrics["proxy_loss_init"]
    assert ls.metrics["kept_init"] == 0
    assert 0.5 < ls.metrics["clip_mean"] < 1.5
    assert np.array_equal(np.sign(ls.scales), np.sign(ada.scales))  # refits never flip a signed scale


def test_zero_scale_steps_is_adaround_without_its_final_refit(minilm_weight, correlated_hessian):
    w = np.ascontiguousarray(minilm_weight(FFN)[:32])
    h, n = correlated_hessian(w.shape[1])
    scheme = QuantScheme.parse("w3-g64-sym")
    ls = build_method(AdaRoundLSConfig(**FAST, scale_steps=0)).quantize(w, scheme, SiteStats(h, n))
    ada = build_method(AdaRoundConfig(**FAST, final_refit="none")).quantize(w, scheme, SiteStats(h, n))
    np.testing.assert_array_equal(ls.codes, ada.codes)
    np.testing.assert_array_equal(ls.scales, ada.scales)
    with pytest.raises(InvalidOptionError, match=r"^adaround_ls option scale_steps=-1: use an integer >= 0"):
        AdaRoundLSConfig(scale_steps=-1)


def test_block_gram_matches_the_normal_equations_in_any_row_chunks(monkeypatch):
    from optimum.adaround.graph_passes.rounding import scales as sc

    rng = np.random.default_rng(5)
    n, k, g = 7, 90, 32  # a short last block
    a = torch.from_numpy(rng.integers(-8, 8, (n, k)).astype(np.float64))
    w = torch.from_numpy(rng.standard_normal((n, k)))
    x = rng.standard_normal((200, k))
    h = torch.from_numpy(x.T @ x)
    nb = -(-k // g)
    blocks = torch.zeros(n, nb, k, dtype=torch.float64)  # A_r: a[r] on each block's columns
    for b in range(nb):
        blocks[:, b, b * g : (b + 1) * g] = a[:, b * g : (b + 1) * g]
    want_gram = blocks @ h @ blocks.transpose(1, 2)
    want_rhs = (blocks @ h @ w[:, :, None])[..., 0]
    for chunk_bytes in (8 * k * 3, 1 << 23):  # three rows at a time, and every row at once
        monkeypatch.setattr(sc, "REFIT_CHUNK_BYTES", chunk_bytes)
        gram, rhs = sc.block_gram(a, w, h, g)
        torch.testing.assert_close(gram, want_gram, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(rhs, want_rhs, rtol=1e-12, atol=1e-9)
