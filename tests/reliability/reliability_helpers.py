"""Helpers of the reliability tests: tiny hand-built ONNX models, output-folder inspectors, and the runner
of the bad-input catalogue (one case through the CLI in-process and through the API)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, N = 64, 32


def matmul_model(
    weights: list[np.ndarray] | None = None,
    *,
    opset: int = 18,
    extra_nodes: list[onnx.NodeProto] | None = None,
    extra_inits: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    """``x -> MatMul(W0) -> MatMul(W1) ... -> Relu -> y``; node names look like Optimum's module paths."""
    if weights is None:
        weights = [np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)]
    nodes, inits, x = [], [], "x"
    for i, w in enumerate(weights):
        nodes.append(
            helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"/model/layers.{i}/mlp/proj/MatMul")
        )
        inits.append(numpy_helper.from_array(np.asarray(w, np.float32), f"W{i}"))
        x = f"h{i}"
    nodes.append(helper.make_node("Relu", [x], ["y"], name="/model/act/Relu"))
    nodes += extra_nodes or []
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", weights[0].shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", weights[-1].shape[1]])],
        inits + list(extra_inits or []),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def save(model: onnx.ModelProto, folder: Path, *, external: bool = False) -> Path:
    """Save ``model`` as ``folder/model.onnx`` (weights in ``model.onnx_data`` if ``external``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=external, location="model.onnx_data", size_threshold=0)
    return path


def leftovers(parent: Path) -> list[str]:
    """Temporary or set-aside siblings an atomic write may have left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@dataclasses.dataclass
class Case:
    """One catalogued bad input: where it is, what must be raised, and the options that reach it."""

    src: Path
    out: Path
    error: type[Exception]
    needle: str
    cli: list[str] | None = dataclasses.field(default_factory=list)
    """Extra CLI flags (None: not expressible with the CLI)."""
    api: dict[str, Any] | None = dataclasses.field(default_factory=dict)
    """Extra API keywords (None: a CLI-only flag)."""
    watch: Path | None = None
    """The folder whose bytes must not change (default: the input's folder)."""
    model: Any = None
    """An in-memory model for the API instead of ``src`` (ModelProto cases)."""
    stat_only: bool = False
    """Compare the input by names, sizes and mtimes instead of bytes (a 2 GiB sparse file)."""


def snapshot(path: Path) -> dict[str, bytes] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _input_state(case: Case, tree_hash: Callable[[Path], str]) -> Any:
    watch = case.watch or (case.src if case.src.is_dir() else case.src.parent)
    if not watch.exists():
        return ""
    if case.stat_only:
        return sorted((str(p), p.lstat().st_size, p.lstat().st_mtime_ns) for p in watch.rglob("*"))
    return tree_hash(watch)


def check_case(case: Case, run: Callable[[], str], tree_hash: Callable[[Path], str]) -> str:
    """Run one case (``run`` returns the one-line message) and check nothing was written or changed."""
    before_in, before_out = _input_state(case, tree_hash), snapshot(case.out)
    message = run()
    assert "\n" not in message and "Traceback" not in message, message
    assert case.needle in message, message
    assert snapshot(case.out) == before_out, "the destination changed"
    assert _input_state(case, tree_hash) == before_in, "the input changed"
    assert leftovers(case.out.parent) == [], "a temporary sibling was left behind"
    return message


def undocumented(names) -> list[str]:
    """The case names docs/ERRORS.md does not list (each case has a table row naming it in backticks)."""
    doc = (Path(__file__).parents[2] / "docs" / "ERRORS.md").read_text()
    return [name for name in names if f"`{name}`" not in doc]
