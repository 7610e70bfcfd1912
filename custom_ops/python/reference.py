"""NumPy references of the ``com.optimum.adaround`` ops and of their packed weight layout ("lowbit v1").

These functions are the test oracle of the C++/CUDA kernels. The layout itself is defined by the package's
``lowbit`` packer; this module, which imports nothing of the package, is tested to write and read the same
bytes.

Layout of the packed codes ``B`` (uint8, shape ``[N, n_chunks, 4 * bits]``, ``n_chunks = ceil(K / 32)``):

* Row ``n`` holds the ``K`` codes of output channel ``n`` along K, zero-padded to ``n_chunks * 32`` values
  and cut into chunks of 32 consecutive values; chunk ``c`` of row ``n`` starts at byte
  ``(n * n_chunks + c) * 4 * bits``. Scale blocks are independent of chunks.
* A chunk stores its codes as bit planes of widths 4, 2, 1 (the binary digits of ``bits``, widest first;
  ``bits = 8`` is one 8-bit plane): 3 = 2+1, 4 = 4, 5 = 4+1, 6 = 4+2, 7 = 4+2+1. Plane ``i`` holds the next
  ``w`` bits of every code, starting at bit 0, and takes ``4 * w`` bytes; planes follow one another.
* In a plane of width ``w`` the bits of value ``j`` (0..31) sit in byte ``j % (4 w)`` at bit offset
  ``w * (j // (4 w))``. For 3 bits a chunk is 12 bytes: byte ``p`` (0..7) is
  ``v[p] | v[p+8] << 2 | v[p+16] << 4 | v[p+24] << 6`` (low two bits), byte ``8 + p`` (0..3) is
  ``sum_i bit2(v[p + 4 i]) << i``.

Why: one plane becomes 32 code bytes with a broadcast, a per-lane variable shift and a mask in AVX2, and a
CUDA thread reads a chunk as ``bits`` aligned 32-bit words.

Dequantization (``W[N, K]``, blocks of ``block_size`` along K, the last one may be short):

* ``MatMulLowBit``: ``W[n, k] = (code[n, k] - zp[n, k // block_size]) * scales[n, k // block_size]``, with the
  implied zero point ``2 ** (bits - 1)`` when there are no zero points.
* ``MatMulCodebook``: ``W[n, k] = codebook[code[n, k]] * scales[n, k // block_size]``.

Both compute ``Y[..., N] = X[..., K] @ W.T (+ bias)``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CHUNK",
    "FP4_E2M1_CODEBOOK",
    "NF4_CODEBOOK",
    "dequantize_codebook",
    "dequantize_lowbit",
    "matmul_codebook_ref",
    "matmul_lowbit_ref",
    "n_blocks",
    "n_chunks",
    "pack_lowbit",
    "packed_shape",
    "plane_widths",
    "unpack_lowbit",
]

CHUNK = 32
"""Values per chunk of the packed layout."""

# QLoRA's NormalFloat-4 levels (quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero).
NF4_CODEBOOK = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
# FP4 e2m1 values by code (sign bit 3): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
FP4_E2M1_CODEBOOK = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes of a ``bits``-bit code, widest first (``3 -> (2, 1)``)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: the lowbit layout supports 2..8 bits")
    if bits == 8:
        return (8,)
    return tuple(w for w in (4, 2, 1) if bits & w)


def n_chunks(k: int) -> int:
    return -(-k // CHUNK)


def n_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def packed_shape(n: int, k: int, bits: int) -> tuple[int, int, int]:
    """Shape of ``B`` for an ``[N, K]`` weight: ``(N, ceil(K / 32), 4 * bits)``."""
    return (n, n_chunks(k), 4 * bits)


def pack_lowbit(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``uint8[N, K]`` (each ``< 2**bits``) into the lowbit layout."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes exceed {bits} bits (max {int(codes.max())})")
    n, k = codes.shape
    nch = n_chunks(k)
    v = np.zeros((n, nch * CHUNK), dtype=np.uint8)
    v[:, :k] = codes
    v = v.reshape(n, nch, CHUNK)
    planes = []
    shift = 0
    for w in plane_widths(bits):
        nbytes = 4 * w
        part = ((v >> shift) & ((1 << w) - 1)).reshape(n, nch, CHUNK // nbytes, nbytes)
        byte = np.zeros((n, nch, nbytes), dtype=np.uint8)
        for i in range(CHUNK // nbytes):  # value j = i * nbytes + p sits at bit offset w * i of byte p
            byte |= (part[:, :, i, :] << (w * i)).astype(np.uint8)
        planes.append(byte)
        shift += w
    return np.concatenate(planes, axis=-1)


def unpack_lowbit(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_lowbit`: ``uint8[N, K]`` codes from ``B`` (any shape with N rows)."""
    packed = np.asarray(packed, dtype=np.uint8)
    nch = n_chunks(k)
    per_row = nch * 4 * bits
    if packed.size % per_row:
        raise ValueError(f"packed size {packed.size} is not a multiple of ceil(K/32)*4*bits = {per_row}")
    n = packed.size // per_row
    b = packed.reshape(n, nch, 4 * bits)
    out = np.zeros((n, nch, CHUNK), dtype=np.uint8)
    offset = shift = 0
    for w in plane_widths(bits):
        nbytes = 4 * w
        plane = b[:, :, offset : offset + nbytes]
        parts = [(plane >> (w * i)) & ((1 << w) - 1) for i in range(CHUNK // nbytes)]
        out |= (np.stack(parts, axis=2).reshape(n, nch, CHUNK) << shift).astype(np.uint8)
        offset += nbytes
        shift += w
    return out.reshape(n, nch * CHUNK)[:, :k]


def _expand(per_block: np.ndarray, n: int, k: int, block_size: int) -> np.ndarray:
    nb = n_blocks(k, block_size)
    arr = np.asarray(per_block).reshape(n, nb)
    return np.repeat(arr, block_size, axis=1)[:, :k]


def dequantize_lowbit(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    k: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """``float32[N, K]`` weight of a ``MatMulLowBit`` node (same numbers as ``QuantizedWeight.dequantize``)."""
    codes = unpack_lowbit(packed, k, bits)
    n = codes.shape[0]
    s = _expand(np.asarray(scales, dtype=np.float32), n, k, block_size)
    if zero_points is None or np.asarray(zero_points).size == 0:
        zp: np.ndarray | np.float32 = np.float32(1 << (bits - 1))
    else:
        zp = _expand(zero_points, n, k, block_size).astype(np.float32)
    return ((codes.astype(np.float32) - zp) * s).astype(np.float32)


def dequantize_codebook(
    packed: np.ndarray, scales: np.ndarray, codebook: np.ndarray, *, k: int, bits: int, block_size: int
) -> np.ndarray:
    """``float32[N, K]`` weight of a ``MatMulCodebook`` node."""
    codes = unpack_lowbit(packed, k, bits)
    n = codes.shape[0]
    s = _expand(np.asarray(scales, dtype=np.float32), n, k, block_size)
    cb = np.asarray(codebook, dtype=np.float32).reshape(-1)
    if cb.size != 1 << bits:
        raise ValueError(f"codebook has {cb.size} entries, expected 2**bits = {1 << bits}")
    return (cb[codes] * s).astype(np.float32)


def _matmul(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x)
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(-1)
    return y.astype(x.dtype)


def matmul_lowbit_ref(x, packed, scales, zero_points=None, bias=None, **layout: int) -> np.ndarray:
    """``MatMulLowBit``: ``x[..., K] @ dequant(B).T (+ bias)``, accumulated in float64, returned in x's dtype.

    ``layout`` is the op's attributes ``k``, ``bits``, ``block_size``; arrays as in :func:`dequantize_lowbit`.
    """
    return _matmul(x, dequantize_lowbit(packed, scales, zero_points, **layout), bias)


def matmul_codebook_ref(x, packed, scales, codebook, bias=None, **layout: int) -> np.ndarray:
    """``MatMulCodebook``: ``x[..., K] @ (codebook[codes] * scales).T (+ bias)`` (see :func:`matmul_lowbit_ref`)."""
    return _matmul(x, dequantize_codebook(packed, scales, codebook, **layout), bias)
