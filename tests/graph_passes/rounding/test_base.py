"""The method configs and their registry, weight_first_position and the default sink-site pattern."""

from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pytest

from optimum.adaround.graph_passes.errors import InvalidOptionError
from optimum.adaround.graph_passes.options import option_help
from optimum.adaround.graph_passes.rounding.adaround import AdaRound, AdaRoundConfig
from optimum.adaround.graph_passes.rounding.base import (
    FIRST_POSITION,
    FIRST_POSITION_TOKENS,
    METHODS,
    SINK_SITES,
    MethodConfig,
    SiteStats,
    build_method,
    first_position_hessian,
    method_config,
    weight_first_position,
)
from optimum.adaround.graph_passes.rounding.gptq import GPTQ, GPTQConfig
from optimum.adaround.graph_passes.rounding.learned_scale import AdaRoundLS, AdaRoundLSConfig
from optimum.adaround.graph_passes.rounding.rtn import RTN, RTNConfig
from optimum.adaround.graph_passes.scheme import QuantScheme

RNG = np.random.default_rng(5)


def _stats(n_seq: int = 4, seq: int = 8, k: int = 6) -> tuple[SiteStats, np.ndarray, np.ndarray]:
    x = RNG.standard_normal((n_seq, seq, k))
    x[:, 0] *= 30.0  # a sink-like first position
    first, rest = x[:, 0], x[:, 1:].reshape(-1, k)
    h = first.T @ first + rest.T @ rest
    extra = {FIRST_POSITION: first, FIRST_POSITION_TOKENS: np.asarray(n_seq)}
    return SiteStats(hessian=h, n_tokens=n_seq * seq, extra=extra), first, rest


def test_weighting_counts_the_first_position_that_many_times():
    stats, first, rest = _stats()
    before = {k: np.array(v, copy=True) for k, v in stats.extra.items()}
    h_before = stats.hessian.copy()
    out = weight_first_position(stats, 16.0)
    # Same as stacking 16 copies of every first-position row with the other tokens.
    stacked = np.concatenate([np.repeat(first, 16, axis=0), rest])
    np.testing.assert_allclose(out.hessian, stacked.T @ stacked, rtol=1e-12)
    assert out.n_tokens == stacked.shape[0] == 16 * 4 + 4 * 7
    np.testing.assert_allclose(first_position_hessian(out), 16 * (first.T @ first), rtol=1e-12)
    assert int(out.extra[FIRST_POSITION_TOKENS]) == 64
    # The shared input record is untouched (q/k/v and other users keep reading it).
    np.testing.assert_array_equal(stats.hessian, h_before)
    assert stats.n_tokens == 32
    for key, value in before.items():
        np.testing.assert_array_equal(stats.extra[key], value)


def test_weight_one_or_no_first_position_statistics_is_a_no_op():
    stats, _, _ = _stats()
    assert weight_first_position(stats, 1.0) is stats
    bare = SiteStats(hessian=np.eye(3), n_tokens=5)
    assert weight_first_position(bare, 64.0) is bare


def test_default_pattern_picks_the_attention_input_projections():
    hits = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.3.self_attn.k_proj",
        "model.layers.3.self_attn.v_proj",
        "model.layers.1.self_attn.qkv_proj",
        "transformer.h.2.attn.c_attn",
        "gpt_neox.layers.0.attention.query_key_value",
        "/model/layers.0/self_attn/k_proj/MatMul",
    ]
    misses = [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "transformer.h.2.attn.c_proj",
        "lm_head",
    ]
    assert all(re.search(SINK_SITES, name) for name in hits)
    assert not any(re.search(SINK_SITES, name) for name in misses)


def test_every_method_is_registered_by_its_config():
    assert {
        "rtn": RTNConfig,
        "gptq": GPTQConfig,
        "adaround": AdaRoundConfig,
        "adaround_ls": AdaRoundLSConfig,
    } == METHODS
    for config_class, impl in ((RTNConfig, RTN), (GPTQConfig, GPTQ), (AdaRoundConfig, AdaRound)):
        method = build_method(config_class())
        assert type(method) is impl and method.config == config_class()
    assert type(build_method(AdaRoundLSConfig())) is AdaRoundLS
    assert RTNConfig.needs == frozenset()
    assert GPTQConfig.needs == AdaRoundConfig.needs == AdaRoundLSConfig.needs == {"hessian"}
    assert (GPTQConfig.default_calib_samples, AdaRoundConfig.default_calib_samples) == (32, 128)


@pytest.mark.parametrize("config_class", [RTNConfig, GPTQConfig, AdaRoundConfig, AdaRoundLSConfig])
def test_each_option_has_one_line_of_help_and_the_config_round_trips(config_class):
    for field in dataclasses.fields(config_class):
        help_text = option_help(field)
        assert help_text and "\n" not in help_text, field.name
    config = config_class()
    assert MethodConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["type"] == config.name
    assert pickle.loads(pickle.dumps(config)) == config  # what a worker process receives


def test_an_unknown_method_option_names_the_accepted_ones():
    with pytest.raises(
        InvalidOptionError, match=r"^gptq has no option 'damp'; accepted: act_order, block_size"
    ):
        method_config("gptq", {"damp": 0.1})
    for removed in ("target", "target_damp", "start", "seed"):  # measured harmful or drawing nothing
        with pytest.raises(InvalidOptionError, match=f"adaround has no option '{removed}'"):
            method_config("adaround", {removed: 0})
    assert method_config("adaround", {"iters": 5}) == AdaRoundConfig(iters=5)


def test_an_option_of_the_wrong_type_is_a_one_line_error():
    with pytest.raises(InvalidOptionError, match=r"^gptq option act_order='yes': expected bool$"):
        GPTQConfig(act_order="yes")
    with pytest.raises(InvalidOptionError, match=r"^rtn option n_grid=2.5: expected int$"):
        RTNConfig(n_grid=2.5)


def test_a_config_built_in_another_process_rounds_the_same(correlated_hessian):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 64)) * 0.05).astype(np.float32)
    h, n = correlated_hessian(64)
    config = pickle.loads(pickle.dumps(GPTQConfig(act_order=False)))
    a = build_method(config).quantize(w, QuantScheme.parse("w4-g32"), SiteStats(h, n))
    b = GPTQ(GPTQConfig(act_order=False)).quantize(w, QuantScheme.parse("w4-g32"), SiteStats(h, n))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
