"""weight_first_position and the default sink-site pattern."""

from __future__ import annotations

import re

import numpy as np

from optimum.adaround.graph_passes.rounding.base import (
    FIRST_POSITION,
    FIRST_POSITION_TOKENS,
    SINK_SITES,
    SiteStats,
    weight_first_position,
)

RNG = np.random.default_rng(5)


def _stats(n_seq: int = 4, seq: int = 8, k: int = 6) -> tuple[SiteStats, np.ndarray, np.ndarray]:
    x = RNG.standard_normal((n_seq, seq, k))
    x[:, 0] *= 30.0  # a sink-like first position
    first, rest = x[:, 0], x[:, 1:].reshape(-1, k)
    h = first.T @ first + rest.T @ rest
    extra = {FIRST_POSITION: first.T @ first, FIRST_POSITION_TOKENS: np.asarray(n_seq)}
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
    np.testing.assert_allclose(out.extra[FIRST_POSITION], 16 * (first.T @ first), rtol=1e-12)
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
