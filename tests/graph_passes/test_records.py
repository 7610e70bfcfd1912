import numpy as np

from optimum.adaround.graph_passes.records import QuantizedWeight
from optimum.adaround.graph_passes.scheme import QuantScheme


def test_dequantize_symmetric_short_last_block():
    scheme = QuantScheme(bits=4, group_size=16)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(3, 40), dtype=np.uint8)  # 3 blocks, the last one 8 wide
    scales = rng.random((3, 3), dtype=np.float32)
    qw = QuantizedWeight(codes, scales, None, scheme)
    qw.check()
    w = qw.dequantize()
    for b in range(3):
        sl = slice(16 * b, min(16 * b + 16, 40))
        np.testing.assert_array_equal(w[:, sl], (codes[:, sl].astype(np.float32) - 8) * scales[:, b : b + 1])


def test_dequantize_with_zero_points_and_codebook():
    scheme = QuantScheme(bits=2, group_size=-1, symmetric=False)
    codes = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    qw = QuantizedWeight(codes, np.array([[0.5]], np.float32), np.array([[1]], np.uint8), scheme)
    np.testing.assert_array_equal(qw.dequantize(), [[-0.5, 0.0, 0.5, 1.0]])
    nf = QuantScheme(bits=4, group_size=16, format="lowbit", data_type="codebook")
    book = np.linspace(-1, 1, 16, dtype=np.float32)
    codes = np.arange(16, dtype=np.uint8)[None, :]
    qw = QuantizedWeight(codes, np.array([[2.0]], np.float32), None, nf, codebook=book)
    qw.check()
    np.testing.assert_array_equal(qw.dequantize(), 2.0 * book[None, :])
