"""Loader for the custom-op library (C++/CUDA kernels registered in onnxruntime).

The library registers the ops ``MatMulLowBit`` and ``MatMulCodebook`` of the domain
``com.optimum.adaround`` (version 1) for the CPU and, when built with CUDA, the CUDA execution provider.
Layout and math of the ops: :mod:`optimum.adaround.custom_ops.reference`.

This package stands alone: it imports nothing else from ``optimum.adaround``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "DOMAIN",
    "OP_TYPES",
    "CustomOpsNotBuiltError",
    "has_cuda_kernels",
    "library_path",
    "register",
    "session_options",
    "uses_custom_domain",
]

DOMAIN = "com.optimum.adaround"
OP_TYPES = ("MatMulLowBit", "MatMulCodebook")
ENV_VAR = "OPTIMUM_ADAROUND_CUSTOM_OPS_LIB"

_LIB_NAMES = {"win32": "optimum_adaround_ops.dll", "darwin": "liboptimum_adaround_ops.dylib"}
LIB_NAME = _LIB_NAMES.get(sys.platform, "liboptimum_adaround_ops.so")


class CustomOpsNotBuiltError(FileNotFoundError):
    """The compiled library is nowhere to be found (not built, or the wheel was built without it)."""


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    paths = []
    env = os.environ.get(ENV_VAR)
    if env:
        paths.append(Path(env))
    paths.append(here / LIB_NAME)  # installed wheel, or editable install after build_ext --inplace
    repo = here.parent.parent  # custom_ops/python -> repository root (source checkout)
    paths.append(repo / "build" / "custom_ops" / "custom_ops" / LIB_NAME)  # `cmake -B build/custom_ops`
    return paths


def library_path() -> Path:
    """Path of the compiled library: ``$OPTIMUM_ADAROUND_CUSTOM_OPS_LIB`` if set, else the newer of the
    package folder's copy (installed or ``pip install -e``) and the in-tree build ``build/custom_ops``, so
    that a developer's ``ninja -C build/custom_ops`` is not shadowed by an older installed copy."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).is_file():
            raise CustomOpsNotBuiltError(f"{ENV_VAR}={env} does not name a file")
        return Path(env)
    found = [p for p in _candidates() if p.is_file()]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime)
    tried = ", ".join(str(p) for p in _candidates())
    raise CustomOpsNotBuiltError(
        f"the optimum-adaround custom-op library ({LIB_NAME}) is not built; looked in: {tried}. Build it with "
        "`cmake -S . -B build/custom_ops -G Ninja && ninja -C build/custom_ops` or reinstall the package"
    )


def register(options: onnxruntime.SessionOptions) -> onnxruntime.SessionOptions:
    """Register the library's ops in ``options`` (returned for chaining)."""
    options.register_custom_ops_library(str(library_path()))
    return options


def session_options(**attributes: Any) -> onnxruntime.SessionOptions:
    """``onnxruntime.SessionOptions`` with the library registered; keyword arguments set attributes
    (``session_options(intra_op_num_threads=1, graph_optimization_level=...)``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    for name, value in attributes.items():
        if not hasattr(so, name):
            raise AttributeError(f"onnxruntime.SessionOptions has no attribute {name!r}")
        setattr(so, name, value)
    return register(so)


def uses_custom_domain(model: Any) -> bool:
    """True when a model (path, ``onnx.ModelProto`` or ``onnx_ir.Model``) uses an op of our domain."""
    if isinstance(model, (str, os.PathLike)):
        import onnx

        model = onnx.load(os.fspath(model), load_external_data=False)
    if hasattr(model, "opset_imports") and hasattr(model, "graph") and not hasattr(model, "opset_import"):
        # onnx_ir.Model
        if DOMAIN in model.opset_imports:
            return True
        return any(node.domain == DOMAIN for node in model.graph.all_nodes())
    if any(op.domain == DOMAIN for op in model.opset_import):
        return True
    return any(node.domain == DOMAIN for node in model.graph.node) or any(
        node.domain == DOMAIN for f in model.functions for node in f.node
    )


@functools.cache
def _lib() -> ctypes.CDLL:
    return ctypes.CDLL(str(library_path()))


def has_cuda_kernels() -> bool:
    """True when the library was compiled with its CUDA kernels (a GPU is still needed to run them)."""
    return bool(_lib().oa_has_cuda())
