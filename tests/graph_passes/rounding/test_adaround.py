"""AdaRound on real fp32 weights (all-MiniLM-L6-v2 slices) with correlated synthetic activations."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from optimum.adaround.graph_passes.errors import CalibrationError, InvalidOptionError
from optimum.adaround.graph_passes.rounding import adaround as ar
from optimum.adaround.graph_passes.rounding.adaround import AdaRoundConfig
from optimum.adaround.graph_passes.rounding.base import (
    FIRST_POSITION,
    FIRST_POSITION_TOKENS,
    SiteStats,
    build_method,
)
from optimum.adaround.graph_passes.rounding.gptq import GPTQConfig
from optimum.adaround.graph_passes.rounding.learned_scale import AdaRoundLSConfig
from optimum.adaround.graph_passes.rounding.metrics import row_quadratic_forms
from optimum.adaround.graph_passes.rounding.rtn import RTNConfig
from optimum.adaround.graph_passes.scheme import QuantScheme

FFN = "encoder.layer.1.intermediate.dense.weight"  # [1536, 384]
# Small, fast settings for unit tests (the defaults are sized for LLM layers).
FAST_OPTIONS = {"iters": 60, "rounds": 2, "free_cols": 64, "tile_rows": 16}
FAST = AdaRoundConfig(**FAST_OPTIONS)
GPTQ = build_method(GPTQConfig())


@pytest.fixture(scope="module")
def site(minilm_weight, correlated_hessian):
    w = np.ascontiguousarray(minilm_weight(FFN)[:64])
    h, n = correlated_hessian(w.shape[1])
    return w, SiteStats(h, n)


def test_rectified_sigmoid_round_trip():
    h = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99])
    torch.testing.assert_close(ar.rectified_sigmoid(ar.inverse_rectified_sigmoid(h)), h)
    assert ar.rectified_sigmoid(torch.tensor([-50.0, 50.0])).tolist() == [
        0.0,
        1.0,
    ]  # exactly binary at the ends


def test_state_reproduces_init_codes_including_the_range_ends():
    s = torch.full((1, 6), 0.5)
    z = torch.full((1, 6), 8.0)
    w = torch.tensor([[-9.0, -3.9, 0.1, 0.26, 3.6, 9.0]])  # codes below 0 / above 15 are clamped
    codes = torch.tensor([[0.0, 0.0, 8.0, 9.0, 15.0, 15.0]])  # 0.26 -> 9 is a GPTQ-style "round up"
    st = ar.RoundingState.from_codes(w, s, z, codes, 15)
    assert torch.equal(st.codes(), codes)
    assert set(st.h.unique().tolist()) <= {0.0, 1.0}
    assert bool((st.base >= 0).all() and (st.base + 1 <= 15).all())  # both choices stay on the code range


@pytest.mark.parametrize("label", ["w4-g128-sym", "w3-g64-asym"])
def test_adaround_beats_its_gptq_init_and_rtn(site, label):
    w, stats = site
    scheme = QuantScheme.parse(label)
    qw = build_method(FAST).quantize(w, scheme, stats, site="ffn")
    qw.check()
    m = qw.metrics
    gptq = GPTQ.quantize(w, scheme, stats)
    assert m["proxy_loss_init"] == pytest.approx(gptq.metrics["proxy_loss"])  # the default init is gptq
    assert m["proxy_loss"] < m["proxy_loss_init"] < m["proxy_loss_rtn"]
    assert m["kept_init"] == 0 and m["fallback"] == 0
    assert 0 <= m["nonbinary_frac"] <= 1 and m["flipped_frac"] > 0
    fixed = build_method(FAST.replace(final_refit="none")).quantize(w, scheme, stats, site="ffn")
    np.testing.assert_array_equal(fixed.scales, gptq.scales)  # without the final refit: the init's scales
    np.testing.assert_array_equal(fixed.codes, qw.codes)  # the refit moves scales only
    assert m["proxy_loss"] <= fixed.metrics["proxy_loss"] and m["final_refit_rows"] > 0


def test_relaxed_rounding_hardens_to_binary_and_never_gets_worse(site):
    w, stats = site
    scheme = QuantScheme.parse("w4-g128-sym")
    init = GPTQ.quantize(w, scheme, stats)
    st = ar.state_from(w, init)
    hm = torch.from_numpy(stats.hessian) / stats.n_tokens
    before = row_quadratic_forms(st.dequantize() - st.w, hm)
    st, info = ar.adaround_refine(st, hm, FAST.replace(polish_steps=0))
    assert bool(((st.h == 0) | (st.h == 1)).all())
    after = row_quadratic_forms(st.dequantize() - st.w, hm)
    assert bool((after <= before).all()) and float(after.sum()) < float(before.sum())
    assert info["proxy_loss_before_polish"] == pytest.approx(float(after.sum()), rel=1e-9)


def test_dense_mode_and_rtn_init(site):
    w, stats = site
    scheme = QuantScheme.parse("w4-g128-sym")
    dense = AdaRoundConfig(init="rtn", iters=80, rounds=1, free_cols=None, polish_steps=0)
    qw = build_method(dense).quantize(w, scheme, stats)
    assert qw.metrics["proxy_loss_init"] == pytest.approx(qw.metrics["proxy_loss_rtn"])
    assert qw.metrics["proxy_loss"] < qw.metrics["proxy_loss_rtn"]


def test_greedy_flips_end_at_a_local_minimum():
    rng = np.random.default_rng(0)
    k = 12
    x = rng.standard_normal((40, k)) @ rng.standard_normal((k, k))
    hm = torch.from_numpy(x.T @ x / 40)
    w = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    s = torch.full((3, k), 0.4)
    z = torch.full((3, k), 4.0)
    codes = (torch.round(w / s) + z).clamp(0, 7)
    st = ar.RoundingState.from_codes(w, s, z, codes, 7)
    assert ar.greedy_flips(st, hm, 1000) > 0
    loss = row_quadratic_forms(st.dequantize() - st.w, hm)
    for r, j in itertools.product(range(3), range(k)):  # no single flip improves any row
        h = st.h.clone()
        h[r, j] = 1 - h[r, j]
        assert float(row_quadratic_forms(st.dequantize(h) - st.w, hm)[r]) >= float(loss[r]) - 1e-9


def test_same_input_same_codes(site):
    w, stats = site
    scheme = QuantScheme.parse("w4-g64-sym")
    a = build_method(FAST).quantize(w, scheme, stats)
    b = build_method(FAST).quantize(w, scheme, stats)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)


def test_fallback_and_bad_input(site, caplog):
    w, stats = site
    scheme = QuantScheme.parse("w4-g128-sym")
    with caplog.at_level(logging.WARNING):
        qw = build_method(FAST).quantize(w, scheme, SiteStats(-np.eye(w.shape[1]), 5), site="l0.q")
    assert qw.metrics["fallback"] == 1 and "l0.q" in caplog.text
    np.testing.assert_array_equal(qw.codes, build_method(RTNConfig()).quantize(w, scheme).codes)
    h = stats.hessian.copy()
    h[2, 3] = np.inf
    with pytest.raises(CalibrationError, match=r"l0\.q"):
        build_method(AdaRoundConfig()).quantize(w, scheme, SiteStats(h, 5), site="l0.q")
    with pytest.raises(CalibrationError, match=r"l0\.q: this method needs calibration statistics"):
        build_method(FAST).quantize(w, scheme, None, site="l0.q")


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        ({"init": "foo"}, "expected 'gptq' | 'rtn'"),
        ({"soft_init": 0.0}, r"use a value in \(0, 1\]"),
        ({"warmup": 1.0}, r"use a fraction in \[0, 1\)"),
        ({"iters": -1}, "use an integer >= 0"),
        ({"polish_steps": -1}, "use an integer >= 0"),
        ({"free_cols": 0}, "use a positive integer, or null"),
        ({"tile_rows": 0}, "use a positive integer"),
        ({"lr": 0.0}, "use a value > 0"),
        ({"lam": -1.0}, "use a value >= 0"),
        ({"refit_rounds": -1}, "use an integer >= 0"),
        ({"threads": 0}, "use a positive integer"),
        ({"guard_first_position": "both"}, "expected 'rest' | 'none' or bool"),
        ({"final_refit": "always"}, "expected 'guarded' | 'full' | 'none' or bool"),
    ],
)
def test_options_out_of_range_are_one_line_errors(bad, what):
    name, value = next(iter(bad.items()))
    with pytest.raises(InvalidOptionError, match=rf"^adaround option {name}={value!r}: {what}"):
        AdaRoundConfig(**bad)


def test_true_and_false_are_spellings_of_the_modes():
    assert AdaRoundConfig(guard_first_position=True, final_refit=True) == AdaRoundConfig()
    off = AdaRoundConfig(guard_first_position=False, final_refit=False)
    assert (off.guard_first_position, off.final_refit) == ("none", "none")
    assert off.to_data()["guard_first_position"] == "none"


def test_the_gptq_init_takes_the_shared_options():
    config = AdaRoundConfig(percdamp=0.1, act_order=False, mse_clip=True, refit_rounds=0, threads=None)
    assert config.gptq() == GPTQConfig(
        percdamp=0.1, act_order=False, mse_clip=True, refit_rounds=0, threads=None
    )


def test_first_position_guard(site):
    """A first position with massive activations owns most of H. Guarded, no row's loss over the other
    tokens rises above its GPTQ start, the full loss still falls below it, and the guard changed codes."""
    w, stats = site
    k = w.shape[1]
    rng = np.random.default_rng(7)
    n_seq = 32
    scale = np.sqrt(np.diag(stats.hessian).mean() / stats.n_tokens)
    v = rng.standard_normal(k)  # one massive direction shared by every sink token, as in LLMs
    sink = scale * (
        30.0 * np.outer(1 + 0.1 * rng.standard_normal(n_seq), v) + rng.standard_normal((n_seq, k))
    )
    first = sink.T @ sink
    h = stats.hessian + first
    extra = {FIRST_POSITION: sink, FIRST_POSITION_TOKENS: np.array(n_seq)}
    both = SiteStats(h, stats.n_tokens + n_seq, extra=extra)
    scheme = QuantScheme.parse("w4-g64-sym")
    guarded = build_method(FAST).quantize(w, scheme, both)
    free = build_method(FAST.replace(guard_first_position="none")).quantize(w, scheme, both)
    init = GPTQ.quantize(w, scheme, both)

    def rows(qw, hh):
        d = torch.from_numpy((qw.dequantize() - w).astype(np.float64))
        return row_quadratic_forms(d, torch.from_numpy(hh)).numpy()

    rest = stats.hessian
    assert (rows(guarded, rest) <= rows(init, rest) * (1 + 1e-6) + 1e-9).all()
    assert (rows(free, rest) > rows(init, rest) * (1 + 1e-6)).any()  # what the guard prevents
    assert (guarded.codes != free.codes).any()
    assert rows(guarded, h).sum() < rows(init, h).sum()
    assert (rows(guarded, first) > rows(init, first) * (1 + 1e-6)).any()  # the first positions may lose


def test_without_first_position_statistics_the_guard_has_nothing_to_do(site):
    w, stats = site
    scheme = QuantScheme.parse("w4-g64-sym")
    guarded = build_method(FAST).quantize(w, scheme, stats)
    free = build_method(FAST.replace(guard_first_position="none")).quantize(w, scheme, stats)
    np.testing.assert_array_equal(guarded.codes, free.codes)
    np.testing.assert_array_equal(guarded.scales, free.scales)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu0", "cuda:"])
def test_device_option_names_what_is_accepted(device):
    with pytest.raises(InvalidOptionError, match="use 'cpu', 'cuda' or 'cuda:N'"):
        AdaRoundConfig(device=device)
    with pytest.raises(InvalidOptionError, match="adaround option device=3: expected str"):
        AdaRoundConfig(device=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize("config_class", [AdaRoundConfig, AdaRoundLSConfig])
def test_cuda_without_a_gpu_is_a_one_line_error(config_class):
    config = config_class(device="cuda")  # a record written on a GPU host still reads here
    with pytest.raises(
        InvalidOptionError, match=f"{config.name} option device='cuda': torch .* sees no CUDA"
    ):
        build_method(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a CUDA GPU")
@pytest.mark.parametrize("config_class", [AdaRoundConfig, AdaRoundLSConfig])
def test_cuda_refinement_matches_the_cpu_one(site, config_class):
    # float32 sums in another order can flip near-ties: compare the loss, not every code
    w, stats = site
    scheme = QuantScheme.parse("w4-g64-sym")
    cpu = build_method(config_class(**FAST_OPTIONS)).quantize(w, scheme, stats)
    gpu = build_method(config_class(**FAST_OPTIONS, device="cuda")).quantize(w, scheme, stats)
    assert gpu.codes.dtype == np.uint8 and gpu.codes.max() <= scheme.qmax
    assert gpu.metrics["proxy_loss"] <= 1.02 * cpu.metrics["proxy_loss"]
    assert gpu.metrics["proxy_loss"] < gpu.metrics["proxy_loss_init"]


@pytest.mark.parametrize("mode", ["guarded", "full", True, False])
def test_final_refit_modes_never_raise_the_loss(site, mode):
    w, stats = site
    scheme = QuantScheme.parse("w4-g64-sym")
    none = build_method(FAST.replace(final_refit="none")).quantize(w, scheme, stats)
    qw = build_method(FAST.replace(final_refit=mode)).quantize(w, scheme, stats)
    np.testing.assert_array_equal(qw.codes, none.codes)
    assert qw.metrics["proxy_loss"] <= none.metrics["proxy_loss"] * (1 + 1e-12)
    if mode is False:
        np.testing.assert_array_equal(qw.scales, none.scales)
    else:
        assert qw.metrics["final_refit_rows"] > 0


@pytest.mark.parametrize("guarded", [False, True])
def test_greedy_flips_by_row_tiles_make_the_same_flips_as_all_rows_at_once(guarded, monkeypatch):
    rng = np.random.default_rng(6)
    n, k = 37, 16
    x = rng.standard_normal((80, k)) @ rng.standard_normal((k, k))
    hm = torch.from_numpy(x.T @ x / 80)
    guard = torch.from_numpy(x[8:].T @ x[8:] / 72) if guarded else None
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    s = torch.from_numpy(rng.uniform(0.2, 0.5, (n, k)).astype(np.float32))
    z = torch.full((n, k), 4.0)
    codes = (torch.round(w / s) + z).clamp(0, 7)
    results = []
    for tile_bytes in (4 * k * 5, 1 << 20):  # 5 rows per tile (the last one short), and one tile
        monkeypatch.setattr(ar, "FLIP_TILE_BYTES", tile_bytes)
        st = ar.RoundingState.from_codes(w, s, z, codes, 7)
        results.append((ar.greedy_flips(st, hm, 50, guard), st.h))
    (flips_a, h_a), (flips_b, h_b) = results
    assert flips_a == flips_b > 0 and torch.equal(h_a, h_b)
