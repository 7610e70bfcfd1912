"""MatMulLowBit / MatMulCodebook in onnxruntime against the NumPy reference, plus error handling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
from ops_helpers import LIB, cached_session, needs_lib, op_model, rel_err, session

from optimum.adaround.custom_ops import reference as ref

pytestmark = [needs_lib, pytest.mark.custom_ops]

N_ROWS = 19  # awkward N: not a multiple of the 4-row GEMM tile nor of the task split


def _inputs(rng, *, m, k, n, bits, block, zp, bias, x_dtype=np.float32, scale_dtype=np.float32, x_rank=2):
    nb = -(-k // block)
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.5, (n, nb)) * 0.05).astype(scale_dtype)
    feeds = {"B": ref.pack_lowbit(codes, bits), "scales": scales}
    zpa = rng.integers(0, 1 << bits, (n, nb), dtype=np.uint8) if zp else None
    if zp:
        feeds["zero_points"] = zpa
    b = rng.standard_normal(n).astype(x_dtype) if bias else None
    if bias:
        feeds["bias"] = b
    shape = (m, k) if x_rank == 2 else (2, m, k)
    feeds["X"] = rng.standard_normal(shape).astype(x_dtype)
    return feeds


def _reference(feeds: dict[str, np.ndarray], **layout: int) -> np.ndarray:
    """The NumPy reference of the op ``feeds`` are for (``MatMulCodebook`` when they hold a codebook)."""
    x, b, s = feeds["X"].astype(np.float32), feeds["B"], feeds["scales"]
    if "codebook" in feeds:
        return ref.matmul_codebook_ref(x, b, s, feeds["codebook"], feeds.get("bias"), **layout)
    return ref.matmul_lowbit_ref(x, b, s, feeds.get("zero_points"), feeds.get("bias"), **layout)


def _run_lowbit(
    rng, *, m, k, bits, block, zp, bias, x_dtype=np.float32, scale_dtype=np.float32, acc=0, x_rank=2
):
    key = (
        "MatMulLowBit",
        tuple(
            dict(
                k=k, n=N_ROWS, bits=bits, block_size=block, x_dtype=x_dtype, scale_dtype=scale_dtype,
                zero_points=zp, bias=bias, accuracy_level=acc, x_rank=x_rank,
            ).items()
        ),
    )  # fmt: skip
    feeds = _inputs(
        rng, m=m, k=k, n=N_ROWS, bits=bits, block=block, zp=zp, bias=bias, x_dtype=x_dtype,
        scale_dtype=scale_dtype, x_rank=x_rank,
    )  # fmt: skip
    (y,) = cached_session(key).run(None, feeds)
    want = _reference(feeds, k=k, bits=bits, block_size=block)
    assert y.dtype == x_dtype and y.shape == (*feeds["X"].shape[:-1], N_ROWS)
    return y, want


# bits x block x symmetry x dtype; K is never a multiple of the block (nor of the 32-value chunk).
CASES = [
    (bits, block, zp, dt)
    for bits in range(2, 9)
    for block in (16, 32, 128, -1)
    for zp in (False, True)
    for dt in (np.float32, np.float16)
]


@pytest.mark.parametrize(("bits", "block", "zp", "dtype"), CASES)
def test_lowbit_matches_reference(bits, block, zp, dtype):
    rng = np.random.default_rng(bits * 100 + block + 7 * zp)
    k = 201 if block == -1 else 2 * block + 13 + (bits % 3)
    block = k if block == -1 else block
    for m in (1, 2, 6):  # fused decode path (M < 4) and dequantize+GEMM path (M >= 4)
        y, want = _run_lowbit(rng, m=m, k=k, bits=bits, block=block, zp=zp, bias=m == 2, x_dtype=dtype)
        tol = 1e-5 if dtype == np.float32 else 2e-3  # float16: X rounded on input, Y on output
        want = want.astype(dtype).astype(np.float32) if dtype == np.float16 else want
        assert rel_err(y, want) < tol, (m, rel_err(y, want))


@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("x_dtype", [np.float16, np.float32])
def test_scale_dtype_independent_of_x(x_dtype, scale_dtype):
    rng = np.random.default_rng(1)
    for m in (1, 5):
        y, want = _run_lowbit(
            rng, m=m, k=96, bits=3, block=32, zp=True, bias=True, x_dtype=x_dtype, scale_dtype=scale_dtype
        )
        assert rel_err(y, want) < (1e-5 if x_dtype == np.float32 else 2e-3)


@pytest.mark.parametrize(("k", "block"), [(576, 64), (1536, 128), (100, 16), (33, 33), (7, 7), (40, 64)])
def test_llm_and_tiny_shapes_rank3(k, block):
    rng = np.random.default_rng(k)
    for m in (1, 3, 4):
        y, want = _run_lowbit(rng, m=m, k=k, bits=3, block=block, zp=False, bias=True, x_rank=3)
        assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 7, 8])
@pytest.mark.parametrize("block", [16, 64, -1])
def test_accuracy_level_4_int8_activations(bits, block):
    """Integer dot products on int8 activations: close to the exact result (~0.5% of max |y|), and an
    8-bit weight (which keeps fp32 for saturation reasons) stays exact."""
    rng = np.random.default_rng(bits + block)
    k = 300 if block == -1 else 4 * block + 9
    block = k if block == -1 else block
    for zp in (False, True):
        y, want = _run_lowbit(rng, m=1, k=k, bits=bits, block=block, zp=zp, bias=False, acc=4)
        err = rel_err(y, want)
        assert err < (1e-5 if bits == 8 else 2e-2), err
        if bits < 8:
            assert err > 1e-7  # the int8 path really ran (exact math would agree to ~1e-7)


def test_threads_agree_with_one_thread():
    rng = np.random.default_rng(3)
    k, n = 640, 301
    model = op_model("MatMulLowBit", k=k, n=n, bits=3, block_size=64, zero_points=True)
    feeds = _inputs(rng, m=1, k=k, n=n, bits=3, block=64, zp=True, bias=False)
    feeds.pop("bias", None)
    for m in (1, 9):
        feeds["X"] = rng.standard_normal((m, k)).astype(np.float32)
        y1 = session(model, threads=1).run(None, feeds)[0]
        y2 = session(model, threads=2).run(None, feeds)[0]
        np.testing.assert_array_equal(y1, y2)


def test_empty_batch():
    rng = np.random.default_rng(0)
    feeds = _inputs(rng, m=0, k=64, n=N_ROWS, bits=4, block=32, zp=False, bias=False)
    (y,) = session(op_model("MatMulLowBit", k=64, n=N_ROWS, bits=4, block_size=32)).run(None, feeds)
    assert y.shape == (0, N_ROWS)


# ---- MatMulCodebook ---------------------------------------------------------------------------------------

CODEBOOKS = {
    "nf4": (4, ref.NF4_CODEBOOK),
    "fp4": (4, ref.FP4_E2M1_CODEBOOK),
    "learned3": (3, np.sort(np.random.default_rng(5).standard_normal(8)).astype(np.float32)),
    "learned2": (2, np.array([-1.5, -0.5, 0.25, 1.0], np.float32)),
    "learned6": (6, np.linspace(-1, 1, 64).astype(np.float32) ** 3),  # gather path
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("block", [16, 64, -1])
@pytest.mark.parametrize("name", sorted(CODEBOOKS))
def test_codebook_matches_reference(name, block, dtype):
    bits, cb = CODEBOOKS[name]
    rng = np.random.default_rng(len(name) + block)
    k = 150 if block == -1 else 3 * block + 5
    block = k if block == -1 else block
    key = (
        "MatMulCodebook",
        tuple(dict(k=k, n=N_ROWS, bits=bits, block_size=block, x_dtype=dtype, bias=True).items()),
    )
    for m in (1, 5):
        feeds = _inputs(rng, m=m, k=k, n=N_ROWS, bits=bits, block=block, zp=False, bias=True, x_dtype=dtype)
        feeds["codebook"] = cb
        (y,) = cached_session(key).run(None, feeds)
        want = _reference(feeds, k=k, bits=bits, block_size=block)
        assert rel_err(y, want) < (1e-5 if dtype == np.float32 else 2e-3)


# ---- malformed models and inputs: an onnxruntime error naming the problem, never a crash ---------------


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({"bits": 1}, r"bits=1 is not supported \(use 2..8\)"),
        ({"bits": 9}, r"bits=9 is not supported"),
        ({"block_size": 7}, r"block_size=7 must be a power of two >= 16, or equal K=64"),
        ({"block_size": 8}, r"block_size=8 must be a power of two"),
        ({"accuracy_level": 5}, r"accuracy_level=5 must be in 0..4"),
        ({"k": 0}, r"attribute K=0 must be in"),
        ({"n": -3}, r"attribute N=-3 must be in"),
    ],
)
def test_bad_attributes_fail_at_session_creation(attrs, match):
    kw = {"k": 64, "n": 8, "bits": 4, "block_size": 32, **attrs}
    with pytest.raises(Exception, match=match) as info:
        session(op_model("MatMulLowBit", **kw))
    assert "MatMulLowBit node 'node0'" in str(info.value)


def test_missing_attribute_and_bad_scale_type():
    m = op_model("MatMulLowBit", k=64, n=8, bits=4, block_size=32)
    del m.graph.node[0].attribute[0]  # K
    with pytest.raises(Exception, match="missing required int attribute 'K'"):
        session(m)
    m = op_model("MatMulLowBit", k=64, n=8, bits=4, block_size=32)
    m.graph.input[2].type.tensor_type.elem_type = 6  # int32 scales
    with pytest.raises(Exception, match="scales must be float32 or float16"):
        session(m)


def _feeds(k=64, n=8, bits=4, block=32, m=1):
    rng = np.random.default_rng(0)
    feeds = _inputs(rng, m=m, k=k, n=n, bits=bits, block=block, zp=True, bias=True)
    return feeds


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda f: f.update(X=np.zeros((1, 63), np.float32)),
            r"X has shape \[1, 63\]: its last dimension must equal K=64",
        ),
        (
            lambda f: f.update(B=f["B"].reshape(-1)[:-1]),
            r"B has 255 bytes \[255\], expected N\*ceil\(K/32\)\*4\*bits = 256",
        ),
        (lambda f: f.update(B=np.zeros((8, 3, 16), np.uint8)), r"B has 384 bytes"),
        (
            lambda f: f.update(scales=f["scales"][:, :1].copy()),
            r"scales has 8 values \[8, 1\], expected N\*n_blocks = 16",
        ),
        (
            lambda f: f.update(zero_points=f["zero_points"][:3]),
            r"zero_points has 6 values \[3, 2\], expected N\*n_blocks = 16",
        ),
        (lambda f: f.update(bias=np.zeros(7, np.float32)), r"bias has 7 values, expected N=8"),
    ],
)
def test_bad_inputs_fail_at_run(change, match):
    # symbolic K in the graph input, so that onnxruntime's own shape check leaves X to the kernel
    sess = session(
        op_model(
            "MatMulLowBit", k=64, n=8, bits=4, block_size=32, zero_points=True, bias=True, symbolic_k=True
        )
    )
    feeds = _feeds()
    sess.run(None, feeds)  # the unmodified feeds run
    change(feeds)
    with pytest.raises(Exception, match=match) as info:
        sess.run(None, feeds)
    assert "MatMulLowBit node 'node0'" in str(info.value)


def test_codebook_wrong_size():
    sess = session(op_model("MatMulCodebook", k=64, n=8, bits=3, block_size=32))
    feeds = _feeds(bits=3)
    for key in ("zero_points", "bias"):
        feeds.pop(key)
    feeds["codebook"] = np.zeros(16, np.float32)
    with pytest.raises(Exception, match=r"codebook has 16 entries, expected 2\^bits = 8"):
        sess.run(None, feeds)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_isa_kernels_match_reference(isa):
    """The portable fallback and the plain AVX2 kernels (forced by OPTIMUM_ADAROUND_ISA; the main process
    runs the best kernels of this CPU) give the same numbers, int8 path included."""
    code = textwrap.dedent(
        """
        import numpy as np, sys
        sys.path.insert(0, sys.argv[1])
        from ops_helpers import op_model, session, rel_err
        from optimum.adaround.custom_ops import reference as ref
        rng = np.random.default_rng(0)
        for bits, block, m, acc in [(3, 16, 1, 0), (4, 64, 5, 0), (5, 70, 2, 0), (3, 16, 1, 4), (4, 32, 2, 4), (2, 70, 1, 4)]:
            k, n = 70, 11
            nb = -(-k // block)
            codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
            s = rng.uniform(0.01, 0.1, (n, nb)).astype(np.float32)
            z = rng.integers(0, 1 << bits, (n, nb), dtype=np.uint8)
            x = rng.standard_normal((m, k)).astype(np.float32)
            b = ref.pack_lowbit(codes, bits)
            sess = session(op_model("MatMulLowBit", k=k, n=n, bits=bits, block_size=block, zero_points=True, accuracy_level=acc))
            y = sess.run(None, {"X": x, "B": b, "scales": s, "zero_points": z})[0]
            err = rel_err(y, ref.matmul_lowbit_ref(x, b, s, z, k=k, bits=bits, block_size=block))
            assert err < (1e-5 if acc == 0 or sys.argv[2] == "scalar" else 2e-2), err
        print("ok")
        """
    )
    env = {**os.environ, "OPTIMUM_ADAROUND_ISA": isa}
    here = os.path.dirname(__file__)
    out = subprocess.run(
        [sys.executable, "-c", code, here, isa], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---- CUDA (needs a GPU and onnxruntime-gpu) ----------------------------------------------------------------


def _cuda_available() -> bool:
    from optimum.adaround import custom_ops

    return (
        LIB is not None
        and "CUDAExecutionProvider" in ort.get_available_providers()
        and custom_ops.has_cuda_kernels()
    )


@pytest.mark.cuda
@pytest.mark.skipif(
    not _cuda_available(), reason="needs onnxruntime-gpu, a GPU and a CUDA build of the library"
)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_matches_reference(bits, dtype):
    rng = np.random.default_rng(bits)
    k, block = 300, 64
    model = op_model(
        "MatMulLowBit", k=k, n=N_ROWS, bits=bits, block_size=block, x_dtype=dtype, zero_points=True, bias=True
    )
    sess = session(model, provider="CUDAExecutionProvider")
    for m in (1, 37):
        feeds = _inputs(rng, m=m, k=k, n=N_ROWS, bits=bits, block=block, zp=True, bias=True, x_dtype=dtype)
        (y,) = sess.run(None, feeds)
        want = _reference(feeds, k=k, bits=bits, block_size=block)
        assert rel_err(y, want) < (1e-5 if dtype == np.float32 else 2e-3)
