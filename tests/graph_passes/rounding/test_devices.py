"""Every calibrated method on a torch device: the same correctness checks on CPU tensors and, where a GPU
is present, on CUDA (skipped cleanly without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum.adaround.graph_passes.errors import InvalidOptionError
from optimum.adaround.graph_passes.rounding.base import SiteStats, build_method, method_config
from optimum.adaround.graph_passes.scheme import QuantScheme

FAST = {
    "gptq": {},
    "adaround": {"iters": 20, "polish_steps": 20},
    "adaround_ls": {"iters": 10, "polish_steps": 10, "scale_steps": 1},
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture(scope="module")
def site(correlated_hessian):
    h, tokens = correlated_hessian(256, tokens=1024, seed=3)
    w = (np.random.default_rng(3).standard_normal((200, 256)) * 0.05).astype(np.float32)
    return w, SiteStats(hessian=h, n_tokens=tokens)


@pytest.mark.parametrize("method", sorted(FAST))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", ["w4-g64", "w3-g128-asym"])
def test_the_method_on_a_device_rounds_as_on_the_cpu(site, method, device, label):
    """On CPU tensors the device path is the CPU path, bit for bit. On a GPU, float32 sums in another
    order may flip near-ties: the loss may differ by 2% at most, and stays below round-to-nearest's."""
    w, stats = site
    scheme = QuantScheme.parse(label)
    reference = build_method(method_config(method, FAST[method])).quantize(w, scheme, stats, site="s")
    config = method_config(method, {**FAST[method], "device": device})
    qw = build_method(config).quantize(w, scheme, stats, site="s")
    qw.check()
    if device == "cpu":
        np.testing.assert_array_equal(qw.codes, reference.codes)
        np.testing.assert_array_equal(qw.scales, reference.scales)
    else:
        assert qw.metrics["proxy_loss"] <= 1.02 * reference.metrics["proxy_loss"]
        assert np.mean(qw.codes == reference.codes) >= 0.9
    assert qw.metrics["proxy_loss"] < qw.metrics["proxy_loss_rtn"]
    chunked = build_method(config).quantize(
        w, scheme, stats, site="s", memory=config.fixed_bytes(200, 256) + 1
    )
    assert chunked.metrics["proxy_loss"] == pytest.approx(qw.metrics["proxy_loss"], rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize("method", sorted(FAST))
def test_cuda_without_a_gpu_is_a_one_line_error(method):
    config = method_config(method, {"device": "cuda:0"})  # a record written on a GPU host still reads here
    with pytest.raises(InvalidOptionError, match=rf"^{method} option device='cuda:0': torch .* sees no CUDA"):
        build_method(config)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_gptq_device_option_names_what_is_accepted(device):
    with pytest.raises(InvalidOptionError, match="use 'cpu', 'cuda' or 'cuda:N'"):
        method_config("gptq", {"device": device})
