"""The lowbit layout (pack/unpack), the NumPy references, and the loader.

The layout is defined by the ``lowbit`` packer (``graph_passes/packing/lowbit.py``); the reference here is
the kernels' oracle and must read and write exactly the packer's bytes (the op library imports nothing of
the package, so the two are written apart and compared here).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ops_helpers import LIB, needs_lib, op_model

from optimum.adaround import custom_ops
from optimum.adaround.custom_ops import reference as ref
from optimum.adaround.graph_passes.packing import lowbit


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 5), k=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(bits, n, k, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (n, k), dtype=np.uint8)
    packed = ref.pack_lowbit(codes, bits)
    assert packed.shape == ref.packed_shape(n, k, bits) and packed.dtype == np.uint8
    np.testing.assert_array_equal(ref.unpack_lowbit(packed, k, bits), codes)
    # any byte string of the right size unpacks to in-range codes, and repacks to itself when K fills chunks
    raw = np.random.default_rng(seed + 1).integers(
        0, 256, ref.packed_shape(n, 32 * ref.n_chunks(k), bits), dtype=np.uint8
    )
    back = ref.unpack_lowbit(raw, 32 * ref.n_chunks(k), bits)
    assert int(back.max()) < 1 << bits
    np.testing.assert_array_equal(ref.pack_lowbit(back, bits), raw)


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 5), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_reference_writes_and_reads_the_packers_bytes(bits, n, k, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (n, k), dtype=np.uint8)
    packed = lowbit.pack_codes(codes, bits)
    assert packed.shape == lowbit.packed_shape(n, k, bits) == ref.packed_shape(n, k, bits)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(ref.pack_lowbit(codes, bits), packed)
    np.testing.assert_array_equal(ref.unpack_lowbit(packed, k, bits), codes)
    np.testing.assert_array_equal(lowbit.unpack_codes(packed, k, bits), codes)


def test_reference_names_the_packers_domain_and_layout():
    assert custom_ops.DOMAIN == lowbit.DOMAIN and ref.CHUNK == lowbit.CHUNK
    assert [ref.plane_widths(b) for b in range(2, 9)] == [lowbit.plane_widths(b) for b in range(2, 9)]
    assert set(custom_ops.OP_TYPES) == {op for _, op in lowbit.LowbitPacker.reads}


def _imported_modules(folder: Path) -> set[str]:
    """Every module a folder's Python files import (relative imports as ``.name`` with their dots)."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


def test_layers_point_one_way():
    """The op library imports nothing of the package, and graph_passes does not import the op library."""
    ops = _imported_modules(Path(custom_ops.__file__).parent)
    assert not [m for m in ops if m.startswith(("..", "optimum"))]
    passes = _imported_modules(Path(lowbit.__file__).parents[1])
    assert not [m for m in passes if "custom_ops" in m]


def _bit(v: int, i: int) -> int:
    return (v >> i) & 1


def test_three_bit_layout_byte_by_byte():
    """The documented 3-bit chunk: bytes 0-7 hold the low bit pairs, bytes 8-11 the high bits."""
    v = np.random.default_rng(0).integers(0, 8, 32, dtype=np.uint8)
    b = ref.pack_lowbit(v[None, :], 3)[0, 0]
    assert b.shape == (12,)
    for p in range(8):
        want = (v[p] & 3) | (v[p + 8] & 3) << 2 | (v[p + 16] & 3) << 4 | (v[p + 24] & 3) << 6
        assert b[p] == want
    for p in range(4):
        assert b[8 + p] == sum(_bit(int(v[p + 4 * i]), 2) << i for i in range(8))


@pytest.mark.parametrize("bits", range(2, 9))
def test_planes_follow_the_binary_digits(bits):
    widths = ref.plane_widths(bits)
    assert sum(widths) == bits and list(widths) == sorted(widths, reverse=True)
    # bit b of value j is found where the docstring says
    v = np.random.default_rng(bits).integers(0, 1 << bits, 32, dtype=np.uint8)
    chunk = ref.pack_lowbit(v[None, :], bits)[0, 0]
    offset = shift = 0
    for w in widths:
        for j in range(32):
            byte = int(chunk[offset + j % (4 * w)])
            assert (byte >> (w * (j // (4 * w)))) & ((1 << w) - 1) == (int(v[j]) >> shift) & ((1 << w) - 1)
        offset += 4 * w
        shift += w


def test_bad_pack_arguments():
    with pytest.raises(ValueError, match="exceed 3 bits"):
        ref.pack_lowbit(np.full((1, 4), 8, np.uint8), 3)
    with pytest.raises(ValueError, match=r"2\.\.8 bits"):
        ref.plane_widths(9)
    with pytest.raises(ValueError, match="not a multiple"):
        ref.unpack_lowbit(np.zeros(13, np.uint8), 32, 3)
    with pytest.raises(ValueError, match="codebook has 4 entries"):
        ref.dequantize_codebook(
            ref.pack_lowbit(np.zeros((1, 8), np.uint8), 3), np.ones(1), np.ones(4), k=8, bits=3, block_size=8
        )


def test_references_against_a_direct_formula():
    rng = np.random.default_rng(1)
    n, k, bits, block = 3, 50, 3, 16
    codes = rng.integers(0, 8, (n, k), dtype=np.uint8)
    s = rng.uniform(0.1, 1, (n, 4)).astype(np.float32)
    z = rng.integers(0, 8, (n, 4), dtype=np.uint8)
    x = rng.standard_normal((2, k)).astype(np.float32)
    packed = ref.pack_lowbit(codes, bits)
    w = np.array(
        [[(codes[i, j] - float(z[i, j // block])) * s[i, j // block] for j in range(k)] for i in range(n)]
    )
    np.testing.assert_allclose(
        ref.matmul_lowbit_ref(x, packed, s, z, k=k, bits=bits, block_size=block), x @ w.T, rtol=1e-5
    )
    w_sym = (codes.astype(np.float32) - 4) * np.repeat(s, block, axis=1)[:, :k]
    np.testing.assert_allclose(
        ref.dequantize_lowbit(packed, s, None, k=k, bits=bits, block_size=block), w_sym
    )
    cb = rng.standard_normal(8).astype(np.float32)
    np.testing.assert_allclose(
        ref.dequantize_codebook(packed, s, cb, k=k, bits=bits, block_size=block),
        cb[codes] * np.repeat(s, block, axis=1)[:, :k],
    )


def test_codebook_constants():
    assert (
        ref.NF4_CODEBOOK.shape == (16,)
        and ref.NF4_CODEBOOK[7] == 0
        and ref.NF4_CODEBOOK[[0, 15]].tolist() == [-1, 1]
    )
    assert sorted(set(np.abs(ref.FP4_E2M1_CODEBOOK).tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


# ---- loader ----------------------------------------------------------------------------------------------------


@needs_lib
def test_library_path_and_session_options(monkeypatch):
    assert LIB is not None and LIB.is_file()
    so = custom_ops.session_options(intra_op_num_threads=1)
    assert so.intra_op_num_threads == 1
    with pytest.raises(AttributeError, match="no attribute 'not_an_option'"):
        custom_ops.session_options(not_an_option=1)
    assert isinstance(custom_ops.has_cuda_kernels(), bool)
    monkeypatch.setenv(custom_ops.ENV_VAR, "/nonexistent/lib.so")
    with pytest.raises(custom_ops.CustomOpsNotBuiltError, match="does not name a file"):
        custom_ops.library_path()
    monkeypatch.setenv(custom_ops.ENV_VAR, str(LIB))
    assert custom_ops.library_path() == LIB


def test_uses_custom_domain(tmp_path):
    import onnx_ir as ir
    from onnx import TensorProto, helper

    ours = op_model("MatMulLowBit", k=32, n=4, bits=3, block_size=32)
    plain = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
    )  # fmt: skip
    assert custom_ops.uses_custom_domain(ours) and not custom_ops.uses_custom_domain(plain)
    path = tmp_path / "m.onnx"
    onnx.save(ours, path)
    assert custom_ops.uses_custom_domain(path) and custom_ops.uses_custom_domain(str(path))
    assert custom_ops.uses_custom_domain(ir.serde.deserialize_model(ours))
    assert not custom_ops.uses_custom_domain(ir.serde.deserialize_model(plain))
