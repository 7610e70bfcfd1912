"""Online block-Hadamard rotation of the down projection's input: same function, one MatMul more per layer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum.adaround.graph_passes.transforms.online import HadamardDownProjPass, block_hadamard

VOCAB = 40  # the random decoders' vocabulary (conftest.py)


@pytest.mark.parametrize("b", [1, 16, 128])
def test_the_block_matrix_is_orthogonal(b):
    h = block_hadamard(b, seed=2)
    np.testing.assert_allclose(h @ h.T, np.eye(b), atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    d=st.sampled_from([8, 16, 24]),
    layers=st.integers(1, 3),
    style=st.sampled_from(["fused", "div", "gemma"]),
    bias=st.booleans(),
    max_block=st.sampled_from([16, 32, 128]),
    seed=st.integers(0, 2**16),
)
def test_rotated_down_projections_compute_the_same_function(
    d, layers, style, bias, max_block, seed, random_decoder, run_logits
):
    rng = np.random.default_rng(seed)
    model = random_decoder(rng, d, layers, style, bias, readers=2)  # writer fed by a product of projections
    ids = rng.integers(0, VOCAB, (2, 5))
    want = run_logits(model, ids)
    matmuls = sum(n.op_type == "MatMul" for n in model.graph)
    online = HadamardDownProjPass(seed=seed, max_block=max_block)
    assert online(model).modified
    k = 2 * d  # the writer's K in the random decoder
    assert online.record == {
        "applied": True,
        "layers": layers,
        "block": [min(k & -k, max_block)],
        "seed": seed,
    }
    assert sum(n.op_type == "MatMul" for n in model.graph) == matmuls + layers
    np.testing.assert_allclose(run_logits(model, ids), want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_writers_fed_by_anything_but_a_product_are_left_alone(random_decoder):
    model = random_decoder(np.random.default_rng(0), 16, 2, "div", False, readers=1)  # Relu feeds the writer
    online = HadamardDownProjPass()
    assert not online(model).modified
    assert "no down projection" in online.record["reason"]
