"""Validate and time the CUDA kernels of the custom-op library without onnxruntime-gpu.

Calls the library's C entry point ``oa_lowbit_matmul_cuda`` through ctypes on device buffers owned by
torch (CUDA build) or CuPy, checks every case against the NumPy reference, then times the M = 1 GEMV with
CUDA events and reports the achieved weight bandwidth (packed codes + scales read per call).

Needs a GPU, a CUDA build of the library (``OPTIMUM_ADAROUND_CUDA=ON cmake -S . -B build/custom_ops ...``,
pointed to by ``OPTIMUM_ADAROUND_CUSTOM_OPS_LIB`` if it is not the default build) and torch with CUDA or
CuPy. Runs from a source checkout too (custom_ops/python is imported by path when the package is not
installed), so a machine with a GPU needs only a checkout and a built library.

    python benchmarks/cuda_gemv.py                     # check + time, writes benchmarks/results/cuda_gemv.{json,md}
    python benchmarks/cuda_gemv.py --check-only
    python benchmarks/cuda_gemv.py --peak-gbps 3350    # override the nominal peak read from the device
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np


def _import_custom_ops():
    """The installed package, or (on a machine with only a source checkout) custom_ops/python by path.

    custom_ops/python stands alone (it imports nothing else from the package), so a checkout plus a built
    library is enough to run this script.
    """
    try:
        from optimum.adaround import custom_ops
        from optimum.adaround.custom_ops import reference

        return custom_ops, reference
    except ImportError:
        import importlib.util

        src = Path(__file__).resolve().parents[1] / "custom_ops" / "python"
        spec = importlib.util.spec_from_file_location(
            "oa_custom_ops", src / "__init__.py", submodule_search_locations=[str(src)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["oa_custom_ops"] = mod
        spec.loader.exec_module(mod)
        import oa_custom_ops.reference as reference

        return mod, reference


custom_ops, ref = _import_custom_ops()


class OaCudaArgs(ctypes.Structure):
    """Mirror of ``OaCudaArgs`` in custom_ops/cuda/lowbit_cuda.h (field order and types must match)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zp", ctypes.c_void_p),
        ("codebook", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("M", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("x_half", ctypes.c_int32),
        ("scales_half", ctypes.c_int32),
    ]


class Device:
    """Device arrays through torch (preferred) or CuPy: upload, download, pointer, events."""

    def __init__(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                self.torch = torch
                self.name = torch.cuda.get_device_name()
                return
        except ImportError:
            pass
        self.torch = None
        try:
            import cupy

            self.cupy = cupy
            self.name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except ImportError:
            sys.exit("needs torch with CUDA or cupy, and a GPU")

    def upload(self, a: np.ndarray):
        if self.torch is not None:
            return self.torch.from_numpy(np.ascontiguousarray(a)).cuda()
        return self.cupy.asarray(a)

    def empty(self, shape, dtype):
        if self.torch is not None:
            t = {np.float32: self.torch.float32, np.float16: self.torch.float16}[dtype]
            return self.torch.empty(shape, dtype=t, device="cuda")
        return self.cupy.empty(shape, dtype=dtype)

    def ptr(self, a) -> int | None:
        if a is None:
            return None
        return a.data_ptr() if self.torch is not None else a.data.ptr

    def download(self, a) -> np.ndarray:
        return a.cpu().numpy() if self.torch is not None else self.cupy.asnumpy(a)

    def sync(self) -> None:
        if self.torch is not None:
            self.torch.cuda.synchronize()
        else:
            self.cupy.cuda.runtime.deviceSynchronize()

    def free(self) -> None:
        if self.torch is not None:
            self.torch.cuda.empty_cache()
        else:
            self.cupy.get_default_memory_pool().free_all_blocks()

    def peak_gbps(self) -> float | None:
        """Nominal DRAM bandwidth from the device's memory clock and bus width (double data rate)."""
        try:
            import cupy

            p = cupy.cuda.runtime.getDeviceProperties(0)
            return 2 * p["memoryClockRate"] * 1e3 * p["memoryBusWidth"] / 8 / 1e9
        except Exception:  # no cupy, or a property missing: the caller passes --peak-gbps
            return None

    def time_launches(self, fns, iters: int) -> float:
        """Milliseconds per launch: the launches `fns` (each called with a stream handle) captured once in
        a CUDA graph and replayed `iters` times between two events; without torch, or if capture fails,
        the launches are issued on a stream `iters` times over (then host launch cost may show)."""
        if self.torch is not None:
            t = self.torch
            stream = t.cuda.Stream()
            with t.cuda.stream(stream):
                for f in fns:  # warm-up (and lazy module loading) outside the capture
                    f(stream.cuda_stream)
            t.cuda.synchronize()
            try:
                graph = t.cuda.CUDAGraph()
                with t.cuda.graph(graph):
                    handle = t.cuda.current_stream().cuda_stream
                    for f in fns:
                        f(handle)
                run = graph.replay
                self.timing = "cuda graph"
            except RuntimeError as e:
                print(f"graph capture failed ({e}); timing plain launches", flush=True)
                t.cuda.synchronize()

                def run() -> None:
                    for f in fns:
                        f(stream.cuda_stream)

                self.timing = "stream"
            with t.cuda.stream(stream):
                run()
                start, end = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    run()
                end.record()
            end.synchronize()
            return start.elapsed_time(end) / (iters * len(fns))
        cp = self.cupy
        stream = cp.cuda.Stream(non_blocking=True)
        for f in fns:
            f(stream.ptr)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(iters):
            for f in fns:
                f(stream.ptr)
        end.record(stream)
        end.synchronize()
        self.timing = "stream"
        return cp.cuda.get_elapsed_time(start, end) / (iters * len(fns))


def load_library(path: str | Path | None = None) -> ctypes.CDLL:
    path = Path(path) if path else custom_ops.library_path()
    lib = ctypes.CDLL(str(path))
    if not lib.oa_has_cuda():
        sys.exit(f"{path} was built without CUDA kernels (build with OPTIMUM_ADAROUND_CUDA=ON)")
    lib.oa_lowbit_matmul_cuda.argtypes = [ctypes.POINTER(OaCudaArgs), ctypes.c_void_p]
    lib.oa_lowbit_matmul_cuda.restype = ctypes.c_int
    lib.oa_cuda_error_string.argtypes = [ctypes.c_int]
    lib.oa_cuda_error_string.restype = ctypes.c_char_p
    return lib


class Case:
    """One problem: host data, its device copies, and the reference result."""

    def __init__(
        self,
        dev,
        rng,
        *,
        m,
        k,
        n,
        bits,
        block,
        zp,
        dtype,
        scale_dtype=np.float32,
        codebook=False,
        bias=False,
        with_reference=True,
    ):
        nb = -(-k // block)
        codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
        self.packed = ref.pack_lowbit(codes, bits)
        self.scales = (rng.uniform(0.5, 1.5, (n, nb)) * 0.02).astype(scale_dtype)
        self.zp = rng.integers(0, 1 << bits, (n, nb), dtype=np.uint8) if zp and not codebook else None
        self.cb = np.sort(rng.standard_normal(1 << bits)).astype(np.float32) if codebook else None
        self.bias = rng.standard_normal(n).astype(dtype) if bias else None
        self.x = rng.standard_normal((m, k)).astype(dtype)
        kw = {"k": k, "bits": bits, "block_size": block}
        xf = self.x.astype(np.float32)
        if not with_reference:  # timing only
            self.want = None
        elif codebook:
            self.want = ref.matmul_codebook_ref(xf, self.packed, self.scales, self.cb, self.bias, **kw)
        else:
            self.want = ref.matmul_lowbit_ref(xf, self.packed, self.scales, self.zp, self.bias, **kw)
        self.dev = dev
        self.d = {name: (dev.upload(a) if a is not None else None) for name, a in self._host().items()}
        self.y = dev.empty((m, n), dtype)
        self.args = OaCudaArgs(
            x=dev.ptr(self.d["x"]), b=dev.ptr(self.d["b"]), scales=dev.ptr(self.d["scales"]), zp=dev.ptr(self.d["zp"]),
            codebook=dev.ptr(self.d["cb"]), bias=dev.ptr(self.d["bias"]), y=dev.ptr(self.y),
            M=m, K=k, N=n, block_size=block, bits=bits, x_half=int(dtype == np.float16),
            scales_half=int(scale_dtype == np.float16),
        )  # fmt: skip
        self._keep: list[dict] = []
        self.weight_bytes = (
            self.packed.nbytes + self.scales.nbytes + (self.zp.nbytes if self.zp is not None else 0)
        )

    def _host(self) -> dict:
        return {
            "x": self.x,
            "b": self.packed,
            "scales": self.scales,
            "zp": self.zp,
            "cb": self.cb,
            "bias": self.bias,
        }

    def clone_weights(self) -> OaCudaArgs:
        """The same problem on fresh device copies of the weight-side buffers (kept alive by this case)."""
        copies = {
            name: self.dev.upload(getattr(self, attr))
            for name, attr in (("b", "packed"), ("scales", "scales"))
        }
        self._keep.append(copies)
        args = OaCudaArgs.from_buffer_copy(self.args)
        args.b, args.scales = self.dev.ptr(copies["b"]), self.dev.ptr(copies["scales"])
        return args

    def run(self, lib, args: OaCudaArgs | None = None, stream: int | None = None) -> None:
        err = lib.oa_lowbit_matmul_cuda(ctypes.byref(args or self.args), stream)
        if err:
            raise RuntimeError(lib.oa_cuda_error_string(err).decode())

    def error(self, lib) -> float:
        self.run(lib)
        self.dev.sync()
        y = self.dev.download(self.y).astype(np.float64)
        return float(np.max(np.abs(y - self.want)) / max(float(np.max(np.abs(self.want))), 1e-12))


def check(lib, dev) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for bits in range(2, 9):
        for block in (16, 32, 128, -1):
            for zp in (False, True):
                for dtype in (np.float32, np.float16):
                    for m in (1, 3, 4, 37):
                        k = 200 if block == -1 else 3 * block + 5
                        blk = k if block == -1 else block
                        c = Case(
                            dev, rng, m=m, k=k, n=45, bits=bits, block=blk, zp=zp, dtype=dtype, bias=m == 3
                        )
                        rows.append(
                            {
                                "bits": bits,
                                "block": blk,
                                "zp": zp,
                                "dtype": np.dtype(dtype).name,
                                "M": m,
                                "rel_err": c.error(lib),
                            }
                        )
    # the tensor-core GEMV (fp16 X, K % 8 == 0, blocks of 128+ values, M <= 8): partial last quad and
    # block, rows past a 16-row tile, every M it takes
    for bits in range(2, 9):
        for block in (128, 256, -1):
            for zp in (False, True):
                for m in (1, 2, 5, 8):
                    k = 680 if block != -1 else 136
                    blk = k if block == -1 else block
                    c = Case(
                        dev, rng, m=m, k=k, n=45, bits=bits, block=blk, zp=zp, dtype=np.float16, bias=m == 2
                    )
                    rows.append(
                        {
                            "bits": bits,
                            "block": blk,
                            "zp": zp,
                            "dtype": "float16",
                            "M": m,
                            "rel_err": c.error(lib),
                        }
                    )
    for bits in (3, 4):
        for m in (1, 3, 37):
            c = Case(
                dev,
                rng,
                m=m,
                k=300,
                n=45,
                bits=bits,
                block=64,
                zp=False,
                dtype=np.float32,
                codebook=True,
                scale_dtype=np.float16,
            )
            rows.append({"bits": bits, "block": 64, "codebook": True, "M": m, "rel_err": c.error(lib)})
    return rows


ROTATE_BYTES = 512 << 20  # weights cycled through per timed pass: ten times the L2 of an H100/H200


def _rotations(nbytes: int) -> int:
    """Distinct weight copies so that one pass reads ROTATE_BYTES: every launch then misses L2 and the
    figure is DRAM bandwidth, not the L2 bandwidth that re-reading one small matrix would give."""
    return max(2, min(256, -(-ROTATE_BYTES // nbytes)))


SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672))


def bench(
    libs: dict, dev, iters: int, peak: float | None, shapes=SHAPES, dtypes=("float16", "float32")
) -> list[dict]:
    """M = 1 GEMV over LLM shapes, for each library of `libs` (name -> CDLL) on the same data. Each
    timing is one CUDA graph (or, without torch, one stream of launches) over `_rotations` distinct weight
    copies, replayed `iters` times: per-call time = total / launches, so neither the Python launch cost nor
    L2 residency inflates the bandwidth. Baselines measured in the same run: cuBLAS fp16 GEMV through torch
    on the same rotation, and a device-to-device copy."""
    rng = np.random.default_rng(1)
    rows = []
    for k, n in shapes:
        for bits in (3, 4):
            for dtype in dtypes:
                c = Case(
                    dev,
                    rng,
                    m=1,
                    k=k,
                    n=n,
                    bits=bits,
                    block=128,
                    zp=False,
                    dtype=np.dtype(dtype).type,
                    with_reference=False,
                )
                r = _rotations(c.weight_bytes)
                copies = [c.args] + [c.clone_weights() for _ in range(r - 1)]
                for name, lib in libs.items():
                    ms = dev.time_launches(
                        [lambda s, a=a, c=c, lib=lib: c.run(lib, a, s) for a in copies], iters
                    )
                    gbps = c.weight_bytes / (ms * 1e-3) / 1e9
                    row = {
                        "variant": name,
                        "K": k,
                        "N": n,
                        "bits": bits,
                        "dtype": np.dtype(dtype).name,
                        "ms": ms,
                    }
                    row["weight_GBps"] = gbps
                    if peak:
                        row["pct_of_peak"] = 100 * gbps / peak
                    rows.append(row)
                    print(row, flush=True)
                del copies, c
                dev.free()
        if dev.torch is not None:  # cuBLAS fp16 GEMV on the same rotation: the bar a dense fp16 model sets
            t = dev.torch
            wbytes = k * n * 2
            ws = [
                t.empty((n, k), dtype=t.float16, device="cuda").normal_() for _ in range(_rotations(wbytes))
            ]
            x = t.randn((1, k), dtype=t.float16, device="cuda")
            ms = dev.time_launches([lambda s, w=w, x=x, t=t: t.matmul(x, w.t()) for w in ws], iters)
            row = {"variant": "cuBLAS", "K": k, "N": n, "bits": 16, "dtype": "float16 (cuBLAS)", "ms": ms}
            row["weight_GBps"] = wbytes / (ms * 1e-3) / 1e9
            if peak:
                row["pct_of_peak"] = 100 * row["weight_GBps"] / peak
            rows.append(row)
            print(row, flush=True)
            del ws
            dev.free()
    return rows


def copy_gbps(dev, iters: int) -> float | None:
    """Device-to-device copy of 1 GiB through torch in a CUDA graph (bytes read + written per second): a
    reference point measured in the same run (on an H200 it moved less than a cuBLAS GEMV reads)."""
    if dev.torch is None:
        return None
    t = dev.torch
    a = t.empty(1 << 29, dtype=t.float16, device="cuda")
    b = t.empty_like(a)
    ms = dev.time_launches([lambda s: b.copy_(a)], max(5, iters // 20))
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9


def _variants(specs: list[str] | None) -> dict:
    """name -> loaded library: the default build, or each NAME=PATH of --variant."""
    if not specs:
        return {"default": load_library()}
    libs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            sys.exit(f"--variant {spec!r}: expected NAME=PATH of a built library")
        libs[name] = load_library(path)
    return libs


def _markdown(result: dict, variants: list[str]) -> list[str]:
    checks = result["checks"]
    lines = [f"# CUDA GEMV ({result['device']}, {result['date']})", ""]
    for name in variants:
        rows = [r for r in checks if r["variant"] == name]
        bad = [r for r in rows if not r["ok"]]
        worst = max(r["rel_err"] for r in rows)
        label = f"{name}: " if len(variants) > 1 else ""
        lines.append(f"Checks: {label}{len(rows)} cases, worst rel. error {worst:.2e}, {len(bad)} failures.")
    lines.append("")
    if "gemv" in result:
        peak, cp = result["nominal_peak_GBps"], result["copy_GBps"]
        lines += [
            f"M = 1, block 128, symmetric, fp32 scales; timing: {result['timing']}, weights rotated over "
            f"{ROTATE_BYTES >> 20} MiB so every call reads DRAM. Nominal peak "
            f"{peak or 0:.0f} GB/s; a 1 GiB device copy moved {cp or 0:.0f} GB/s (read + write) in this run.",
            "",
        ]
        many = len(variants) > 1
        head = "| K | N | bits | dtype | ms | weight GB/s | % peak |"
        lines += [("| variant " if many else "") + head, "|---" * (7 + many) + "|"]
        for r in result["gemv"]:
            pct = f"{r['pct_of_peak']:.0f}" if "pct_of_peak" in r else "-"
            lines.append(
                (f"| {r['variant']} " if many else "")
                + f"| {r['K']} | {r['N']} | {r['bits']} | {r['dtype']} | {r['ms']:.4f} | {r['weight_GBps']:.0f} | {pct} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument(
        "--peak-gbps", type=float, help="nominal DRAM bandwidth (default: from the device properties)"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cuda_gemv"))
    ap.add_argument(
        "--variant", action="append", metavar="NAME=PATH",
        help="check and time this build of the library (repeat to compare builds side by side on the same data)",
    )  # fmt: skip
    ap.add_argument("--shapes", nargs="+", metavar="KxN", help="GEMV shapes to time (default: the LLM set)")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    ap.add_argument(
        "--profile", nargs=3, type=int, metavar=("K", "N", "BITS"),
        help="only launch this fp16 M=1 GEMV a few times (for ncu / compute-sanitizer), then exit",
    )  # fmt: skip
    args = ap.parse_args(argv)
    libs, dev = _variants(args.variant), Device()
    if args.profile:
        k, n, bits = args.profile
        c = Case(
            dev, np.random.default_rng(2), m=1, k=k, n=n, bits=bits, block=128, zp=False, dtype=np.float16
        )
        for lib in libs.values():
            for _ in range(3):
                c.run(lib)
        dev.sync()
        return 0
    checks, n_bad = [], 0
    for name, lib in libs.items():
        rows = check(lib, dev)
        for r in rows:
            r["variant"] = name
            r["ok"] = r["rel_err"] <= (2e-3 if r.get("dtype") == "float16" else 1e-5)
        bad = [r for r in rows if not r["ok"]]
        n_bad += len(bad)
        worst = max(r["rel_err"] for r in rows)
        print(
            f"{name}: {len(rows)} cases checked against the NumPy reference, worst relative error {worst:.2e}, "
            f"{len(bad)} over tolerance",
            flush=True,
        )
        for r in bad:
            print("  FAIL", r)
        checks += rows
    result = {
        "device": dev.name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "variants": {name: str(getattr(lib, "_name", "")) for name, lib in libs.items()},
        "checks": checks,
    }
    if not args.check_only:
        peak = args.peak_gbps or dev.peak_gbps()
        result["nominal_peak_GBps"] = peak
        result["copy_GBps"] = copy_gbps(dev, args.iters)
        print(f"nominal peak {peak} GB/s, device copy {result['copy_GBps']} GB/s", flush=True)
        shapes = SHAPES
        if args.shapes:
            try:
                shapes = tuple(tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes)
            except ValueError:
                sys.exit(f"--shapes {args.shapes}: expected KxN, e.g. 4096x4096")
        result["gemv"] = bench(libs, dev, args.iters, peak, shapes, args.dtypes)
        result["timing"] = getattr(dev, "timing", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = _markdown(result, list(libs))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-60:]))
    return 1 if n_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
