"""GPTQ on real fp32 weights (all-MiniLM-L6-v2 slices, real outliers) with correlated synthetic activations."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from optimum.adaround.graph_passes.errors import CalibrationError, InvalidModelError, InvalidOptionError
from optimum.adaround.graph_passes.rounding import hessian as hs
from optimum.adaround.graph_passes.rounding.base import SiteStats, build_method
from optimum.adaround.graph_passes.rounding.gptq import GPTQConfig, gptq_round
from optimum.adaround.graph_passes.rounding.grid import blockwise_minmax, grid_params
from optimum.adaround.graph_passes.rounding.metrics import proxy_loss
from optimum.adaround.graph_passes.rounding.rtn import RTNConfig, round_to_nearest
from optimum.adaround.graph_passes.scheme import QuantScheme

FFN = "encoder.layer.1.intermediate.dense.weight"  # [1536, 384]
DOWN = "encoder.layer.0.output.dense.weight"  # [384, 1536], |w| up to 7.9


@pytest.fixture(scope="module")
def site(minilm_weight, correlated_hessian):
    w = np.ascontiguousarray(minilm_weight(FFN)[:96])
    h, n = correlated_hessian(w.shape[1])
    return w, SiteStats(h, n)


@pytest.mark.parametrize("label", ["w4-g128-sym", "w3-g64-asym", "w4-pc-sym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_clearly_beats_rtn_on_the_proxy_loss(site, label, act_order):
    w, stats = site
    scheme = QuantScheme.parse(label)
    qw = build_method(GPTQConfig(act_order=act_order)).quantize(w, scheme, stats, site="ffn")
    qw.check()
    rtn = build_method(RTNConfig()).quantize(w, scheme, stats)  # the rtn method's default (MSE clip search)
    assert qw.metrics["proxy_loss"] == pytest.approx(
        proxy_loss(w, qw.dequantize(), stats.hessian, stats.n_tokens)
    )
    assert qw.metrics["proxy_loss_rtn"] == pytest.approx(rtn.metrics["proxy_loss"])
    assert qw.metrics["proxy_loss"] < 0.8 * qw.metrics["proxy_loss_rtn"]
    assert qw.metrics["fallback"] == 0 and qw.metrics["time_s"] > 0
    assert qw.metrics["output_sqnr_db"] > 0


def test_real_outlier_layer(minilm_weight, correlated_hessian):
    w = np.ascontiguousarray(minilm_weight(DOWN)[:48, :512])
    h, n = correlated_hessian(512, seed=3)
    qw = build_method(GPTQConfig()).quantize(w, QuantScheme.parse("w4-g128-sym"), SiteStats(h, n))
    assert qw.metrics["proxy_loss"] < 0.8 * qw.metrics["proxy_loss_rtn"]


def test_act_order_static_groups_need_no_g_idx(site):
    """With act_order the scales are the natural-order min-max grid of the original weight, and plain
    natural-order blockwise dequantization reproduces the weights GPTQ fed back bit for bit."""
    w, stats = site
    scheme = QuantScheme.parse("w4-g64-asym")
    prep = hs.prepare(stats.hessian, w.shape[1], "s")
    perm = torch.argsort(torch.diagonal(prep.h), descending=True, stable=True)
    assert not torch.equal(perm, torch.arange(w.shape[1]))  # the order really differs
    upper, _ = hs.inverse_cholesky(prep.h[perm][:, perm])
    codes, scales, zps, wq = gptq_round(torch.from_numpy(w), upper, scheme, perm=perm)
    s_ref, z_ref = grid_params(*blockwise_minmax(w, scheme), scheme)
    np.testing.assert_array_equal(scales, s_ref)
    np.testing.assert_array_equal(zps, z_ref)
    from optimum.adaround.graph_passes.records import QuantizedWeight

    deq = QuantizedWeight(codes.numpy(), scales, zps, scheme).dequantize()
    np.testing.assert_array_equal(deq, wq.numpy())


def test_dynamic_groups_dequantize_to_the_fed_back_weights(site):
    w, stats = site
    scheme = QuantScheme.parse("w3-g32-sym")  # groups smaller than the lazy block
    prep = hs.prepare(stats.hessian, w.shape[1], "s")
    upper, _ = hs.inverse_cholesky(prep.h)
    codes, scales, zps, wq = gptq_round(torch.from_numpy(w), upper, scheme, block_size=128)
    from optimum.adaround.graph_passes.records import QuantizedWeight

    np.testing.assert_array_equal(
        QuantizedWeight(codes.numpy(), scales, zps, scheme).dequantize(), wq.numpy()
    )
    # groups come from the *updated* weights: not the original weight's grid
    assert not np.array_equal(scales, grid_params(*blockwise_minmax(w, scheme), scheme)[0])


@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_reduce_to_round_to_nearest(minilm_weight, act_order):
    """With H = c I there is no error to feed back: GPTQ's loop is min-max RTN, code for code."""
    w = np.ascontiguousarray(minilm_weight(FFN)[:32, :200])  # K not a multiple of the group
    scheme = QuantScheme.parse("w4-g64-sym")
    gptq = build_method(GPTQConfig(act_order=act_order, refit_rounds=0))
    qw = gptq.quantize(w, scheme, SiteStats(np.eye(200) * 3.0, 10))
    codes, scales, _ = round_to_nearest(w, scheme, mse_clip=False)
    np.testing.assert_array_equal(qw.codes, codes)
    np.testing.assert_array_equal(qw.scales, scales)


def test_dead_inputs_are_zeroed(site):
    w, stats = site
    h = stats.hessian.copy()
    dead = [3, 100, 383]
    h[dead, :] = 0
    h[:, dead] = 0
    scheme = QuantScheme.parse("w4-g128-sym")
    qw = build_method(GPTQConfig()).quantize(w, scheme, SiteStats(h, stats.n_tokens))
    assert qw.metrics["dead_columns"] == 3
    assert (qw.codes[:, dead] == scheme.implied_zero_point).all()
    assert qw.metrics["proxy_loss"] < 0.8 * qw.metrics["proxy_loss_rtn"]


def test_nan_hessian_is_a_calibration_error(site):
    w, stats = site
    h = stats.hessian.copy()
    h[0, 0] = np.nan
    with pytest.raises(CalibrationError, match=r"site layers\.2\.fc1: .*NaN/Inf"):
        build_method(GPTQConfig()).quantize(w, QuantScheme(), SiteStats(h, 8), site="layers.2.fc1")
    with pytest.raises(CalibrationError, match="needs calibration statistics"):
        build_method(GPTQConfig()).quantize(w, QuantScheme(), None, site="x")
    bad_w = w.copy()
    bad_w[1, 2] = np.inf
    with pytest.raises(InvalidModelError, match="NaN/Inf"):
        build_method(GPTQConfig()).quantize(bad_w, QuantScheme(), stats)


def test_non_positive_definite_hessian_falls_back_to_rtn(site, caplog):
    w, _ = site
    scheme = QuantScheme.parse("w4-g128-sym")
    h = -np.eye(w.shape[1])
    with caplog.at_level(logging.WARNING):
        qw = build_method(GPTQConfig()).quantize(w, scheme, SiteStats(h, 10), site="layers.0.q")
    assert qw.metrics["fallback"] == 1
    assert "layers.0.q" in caplog.text
    rtn = build_method(RTNConfig()).quantize(w, scheme)
    np.testing.assert_array_equal(qw.codes, rtn.codes)
    np.testing.assert_array_equal(qw.scales, rtn.scales)


def test_deterministic_and_fp16_scales(site):
    w, stats = site
    scheme = QuantScheme.parse("w4-g64-sym", scale_dtype="float16")
    a = build_method(GPTQConfig(mse_clip=True)).quantize(w, scheme, stats)
    b = build_method(GPTQConfig(mse_clip=True)).quantize(w, scheme, stats)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, a.scales.astype(np.float16).astype(np.float32))
    assert a.metrics["proxy_loss"] < a.metrics["proxy_loss_rtn"]


def test_refit_rounds_lower_the_proxy_loss_row_by_row(site):
    """Closed-form scale refits after GPTQ (and GPTQ again on the refit grid) never raise a row's loss and
    lower the total; the codes stay a plain blockwise weight of the scheme."""
    from optimum.adaround.graph_passes.rounding.metrics import quadratic_form

    w, stats = site
    scheme = QuantScheme.parse("w4-g128-sym")
    base = build_method(GPTQConfig(refit_rounds=0)).quantize(w, scheme, stats)
    losses = [base.metrics["proxy_loss"]]
    for rounds in (1, 2):
        qw = build_method(GPTQConfig(refit_rounds=rounds)).quantize(w, scheme, stats)
        qw.check()
        assert np.array_equal(np.sign(qw.scales), np.sign(base.scales))  # refits never flip a scale
        for r in range(w.shape[0]):
            d_new, d_old = (
                qw.dequantize()[r : r + 1] - w[r : r + 1],
                base.dequantize()[r : r + 1] - w[r : r + 1],
            )
            assert quadratic_form(d_new, stats.hessian) <= quadratic_form(d_old, stats.hessian) * (1 + 1e-9)
        losses.append(qw.metrics["proxy_loss"])
    assert losses[1] < 0.99 * losses[0] and losses[2] <= losses[1] * (1 + 1e-9)


@pytest.mark.parametrize(
    "bad", [{"refit_rounds": -1}, {"percdamp": -0.1}, {"percdamp": 10.0}, {"block_size": 0}, {"threads": 0}]
)
def test_options_out_of_range_are_one_line_errors(bad):
    name, value = next(iter(bad.items()))
    with pytest.raises(InvalidOptionError, match=rf"^gptq option {name}={value!r}: use "):
        GPTQConfig(**bad)


@pytest.mark.parametrize("threads", [1, 2, None])
def test_threads_hold_while_rounding_and_are_restored(site, monkeypatch, threads):
    w, stats = site
    seen = []
    real = torch.linalg.cholesky_ex

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    before = torch.get_num_threads()
    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    build_method(GPTQConfig(threads=threads)).quantize(w, QuantScheme.parse("w4-g128"), stats)
    assert seen and set(seen) == {before if threads is None else threads}
    assert torch.get_num_threads() == before
