"""RTN: exact on grid-aligned weights, MSE clip search, edge cases, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from optimum.adaround.graph_passes.errors import InvalidOptionError, UnsupportedSchemeError, UserError
from optimum.adaround.graph_passes.records import QuantizedWeight
from optimum.adaround.graph_passes.rounding.base import METHODS, SiteStats, build_method
from optimum.adaround.graph_passes.rounding.rtn import RTN, RTNConfig
from optimum.adaround.graph_passes.scheme import PER_CHANNEL, QuantScheme


def _grid_aligned(rng: np.random.Generator, scheme: QuantScheme, n: int, k: int) -> QuantizedWeight:
    """Random codes/scales where every block reaches code 0 (and qmax when asymmetric), so min-max RTN
    of the dequantized weight must find this very grid."""
    nb, block = scheme.n_blocks(k), scheme.block_size(k)
    codes = rng.integers(0, scheme.qmax + 1, (n, k)).astype(np.uint8)
    for b in range(nb):
        lo, hi = b * block, min((b + 1) * block, k)
        codes[:, lo] = 0
        codes[:, hi - 1] = scheme.qmax
    scales = (rng.uniform(0.5, 2.0, (n, nb)) * 1e-2).astype(scheme.scale_dtype).astype(np.float32)
    zp = None if scheme.symmetric else rng.integers(1, scheme.qmax, (n, nb)).astype(np.uint8)
    return QuantizedWeight(codes, scales, zp, scheme)


SCHEMES = [
    QuantScheme(bits=b, group_size=g, symmetric=s, scale_dtype=d)
    for b in (2, 3, 4, 8)
    for g in (16, 128, PER_CHANNEL)
    for s in (True, False)
    for d in ("float32", "float16")
    if not (d == "float16" and g == 16)
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.label}-{s.scale_dtype}")
@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_reproduces_grid_aligned_codes(scheme, search):
    rng = np.random.default_rng(scheme.bits)
    qw = _grid_aligned(rng, scheme, 12, 200)  # 200: short last block for 16 and 128
    got = build_method(RTNConfig(search=search)).quantize(qw.dequantize(), scheme)
    assert got.codes.tobytes() == qw.codes.tobytes()
    if scheme.symmetric:  # absmax = 2**(b-1) * s exactly, so the scale itself comes back bit for bit
        assert got.scales.tobytes() == qw.scales.tobytes()
    else:  # (max - min) / qmax may differ from s in the last bit; codes and zero points do not
        np.testing.assert_allclose(got.scales, qw.scales, rtol=2e-7 if scheme.scale_dtype == "float32" else 0)
        assert got.zero_points.tobytes() == qw.zero_points.tobytes()
    assert got.metrics["sqnr_db"] > 100 or got.metrics["sqnr_db"] == float("inf")


def test_registered_without_statistics():
    assert METHODS["rtn"] is RTNConfig
    m = build_method(RTNConfig(search="minmax"))
    assert isinstance(m, RTN) and m.config.needs == frozenset() and m.config.name == "rtn"


def _outlier_weight(rng: np.random.Generator, n: int = 64, k: int = 576) -> np.ndarray:
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    mask = rng.random(w.shape) < 2e-3
    w[mask] *= 12
    return w


@pytest.mark.parametrize(
    "scheme", [QuantScheme.parse(s) for s in ("w4-g128-sym", "w3-g64-asym", "w2-g32-asym")]
)
def test_mse_search_never_worse_per_block(scheme):
    rng = np.random.default_rng(5)
    w = _outlier_weight(rng)
    mm = build_method(RTNConfig(search="minmax")).quantize(w, scheme)
    mse = build_method(RTNConfig(search="mse")).quantize(w, scheme)
    block = scheme.block_size(w.shape[1])

    def block_err(qw):  # zero-padded, so a short last block counts its real entries only
        d = qw.dequantize() - w
        d = np.pad(d, ((0, 0), (0, -d.shape[1] % block)))
        return (d.reshape(d.shape[0], -1, block) ** 2).sum(axis=2)

    # clip ratio 1.0 (= min-max) is a candidate, so no block can get worse
    assert (block_err(mse) <= block_err(mm) * (1 + 1e-6)).all()
    assert mse.metrics["sqnr_db"] > mm.metrics["sqnr_db"]
    assert mse.metrics["clip_mean"] < 1.0


def test_short_last_block_padding_does_not_count():
    """The MSE of a short last block counts only its real entries (padding repeats the edge value)."""
    rng = np.random.default_rng(2)
    scheme = QuantScheme(bits=3, group_size=64, symmetric=False)
    w = _outlier_weight(rng, 16, 70)  # last block: 6 real values
    full = build_method(RTNConfig(search="mse")).quantize(w, scheme)
    alone = build_method(RTNConfig(search="mse")).quantize(
        np.ascontiguousarray(w[:, 64:]), QuantScheme(bits=3, group_size=PER_CHANNEL, symmetric=False)
    )
    assert full.codes[:, 64:].tobytes() == alone.codes.tobytes()
    np.testing.assert_array_equal(full.scales[:, -1], alone.scales[:, 0])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_all_zero_blocks_dequantize_to_exact_zeros(symmetric, search):
    w = np.zeros((4, 96), np.float32)
    w[1, 40:60] = np.linspace(-1, 2, 20)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    qw = build_method(RTNConfig(search=search)).quantize(w, scheme)
    assert qw.scales[0].tolist() == [0.0, 0.0, 0.0] and qw.scales[1, 0] == 0.0
    deq = qw.dequantize()
    assert np.array_equal(deq[[0, 2, 3]], np.zeros((3, 96), np.float32))
    assert np.array_equal(deq[1, :32], np.zeros(32, np.float32))
    assert np.isfinite(deq).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_raise_user_error(bad):
    w = np.ones((3, 32), np.float32)
    w[2, 7] = bad
    with pytest.raises(UserError, match=r"NaN/Inf.*\[2, 7\]"):
        build_method(RTNConfig()).quantize(w, QuantScheme(bits=4, group_size=16))


def test_bad_options_and_inputs():
    with pytest.raises(InvalidOptionError, match="rtn option search='hqq'"):
        RTNConfig(search="hqq")
    with pytest.raises(InvalidOptionError, match="rtn option grid='gguf'"):
        RTNConfig(grid="gguf")
    with pytest.raises(InvalidOptionError, match="use search='minmax'"):
        RTNConfig(grid="ort", search="mse")
    for bad in ({"min_clip": 0.0}, {"n_grid": 0}, {"chunk_rows": 0}):
        with pytest.raises(InvalidOptionError, match=f"rtn option {next(iter(bad))}="):
            RTNConfig(**bad)
    with pytest.raises(UnsupportedSchemeError, match="2-D"):
        build_method(RTNConfig()).quantize(np.ones(32, np.float32), QuantScheme())
    with pytest.raises(UnsupportedSchemeError, match="nf4"):
        build_method(RTNConfig()).quantize(
            np.ones((2, 64), np.float32), QuantScheme(bits=4, group_size=64, data_type="nf4", format="lowbit")
        )


def test_float16_scales_are_exact_in_float16():
    rng = np.random.default_rng(9)
    w = _outlier_weight(rng, 8, 256)
    for search in ("minmax", "mse"):
        qw = build_method(RTNConfig(search=search)).quantize(
            w, QuantScheme(bits=4, group_size=64, scale_dtype="float16")
        )
        assert np.array_equal(qw.scales.astype(np.float16).astype(np.float32), qw.scales)


def test_metrics_sqnr_and_proxy_loss():
    rng = np.random.default_rng(4)
    w = _outlier_weight(rng, 16, 64)
    x = rng.standard_normal((300, 64))
    stats = SiteStats(hessian=x.T @ x, n_tokens=300)
    qw = build_method(RTNConfig()).quantize(w, QuantScheme(bits=3, group_size=32), stats)
    dw = qw.dequantize().astype(np.float64) - w
    want_sqnr = 10 * np.log10((w.astype(np.float64) ** 2).sum() / (dw**2).sum())
    assert qw.metrics["sqnr_db"] == pytest.approx(want_sqnr, rel=1e-6)  # float32 block sums
    want_proxy = ((x @ dw.T) ** 2).sum() / 300  # mean over tokens of the squared output error
    assert qw.metrics["proxy_loss"] == pytest.approx(want_proxy, rel=1e-9)
    assert (
        "proxy_loss" not in build_method(RTNConfig()).quantize(w, QuantScheme(bits=3, group_size=32)).metrics
    )


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(8)
    w = _outlier_weight(rng, 37, 192)
    scheme = QuantScheme(bits=4, group_size=64, symmetric=False)
    a = build_method(RTNConfig(chunk_rows=5)).quantize(w, scheme)
    b = build_method(RTNConfig(chunk_rows=4096)).quantize(w, scheme)
    assert a.codes.tobytes() == b.codes.tobytes() and a.scales.tobytes() == b.scales.tobytes()
    assert a.zero_points.tobytes() == b.zero_points.tobytes()
    assert a.metrics["clip_mean"] == pytest.approx(b.metrics["clip_mean"])


def test_progress_shows_a_bar_over_the_row_chunks(capsys):
    w = _outlier_weight(np.random.default_rng(9), 40, 128)
    build_method(RTNConfig(chunk_rows=8, progress=True)).quantize(w, QuantScheme(bits=4, group_size=64))
    err = capsys.readouterr().err
    assert "rtn:" in err and "/5 [" in err  # 40 rows in chunks of 8
    build_method(RTNConfig(chunk_rows=8)).quantize(w, QuantScheme(bits=4, group_size=64))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("chunk_rows", [3, 4096])
def test_non_finite_weights_are_named_from_any_chunk(chunk_rows):
    w = np.ones((9, 32), np.float32)
    w[7, 5] = np.nan
    with pytest.raises(UserError, match=r"\[9, 32\] has 1 NaN/Inf.*\[7, 5\]"):
        build_method(RTNConfig(chunk_rows=chunk_rows)).quantize(w, QuantScheme(bits=4, group_size=16))


def test_a_stored_view_is_read_a_chunk_at_a_time(tmp_path):
    """The pipeline hands rtn the stored tensor as is (here float16, [K, N] on disk, a transposed view):
    the same codes as from a float32 copy, without making one (traced peak under the copy's size)."""
    import tracemalloc

    rng = np.random.default_rng(10)
    stored = np.lib.format.open_memmap(tmp_path / "w.npy", "w+", np.float16, (512, 8192))
    stored[:] = (0.02 * rng.standard_normal((512, 8192))).astype(np.float16)
    view = stored.T  # [N, K] = [8192, 512], float16, not contiguous
    scheme = QuantScheme(bits=4, group_size=128)
    method = build_method(RTNConfig(chunk_rows=256))
    want = method.quantize(np.ascontiguousarray(view, dtype=np.float32), scheme)
    tracemalloc.start()
    got = method.quantize(view, scheme)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.codes.tobytes() == want.codes.tobytes() and got.scales.tobytes() == want.scales.tobytes()
    assert got.metrics["sqnr_db"] == pytest.approx(want.metrics["sqnr_db"], rel=1e-9)
    assert peak < 0.6 * 4 * view.size, f"traced peak {peak / 2**20:.1f} MB"
