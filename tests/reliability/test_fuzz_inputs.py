"""Property-based test of hostile inputs: mutated valid models through the CLI and the API (hypothesis).

The base is a two-weight model with its weights in ``model.onnx_data``. Each example applies one to three
mutations: truncate or flip bytes of ``model.onnx`` or of its external data, drop or duplicate a node or an
initializer, rename a value, change an initializer's dims or data type or a value's element type, point its
external location, offset or length elsewhere (``..``, an absolute path, ``/etc/passwd``, the decoy folder
next to the model's). Then:

- the CLI exits 0 with a model that onnxruntime loads, or 2 with one line; never 1, and never hangs (each
  run under a SIGALRM timeout);
- the API raises nothing but ``UserError`` subclasses (the types that escaped are collected and checked);
- no file is opened outside the model's folder (the ``open`` audit events of both runs are checked: nothing
  in the decoy folder, nothing under the example's folder but the model's folder and the output's).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from reliability_helpers import K, N, matmul_model, save

from optimum.adaround import quantize
from optimum.adaround.cli import main
from optimum.adaround.graph_passes.errors import UserError

RNG = np.random.default_rng(5)
WEIGHTS = [RNG.standard_normal((K, N)).astype(np.float32), RNG.standard_normal((N, N)).astype(np.float32)]
TIMEOUT_S = 60
LOCATIONS = (
    "../outside/model.onnx_data",
    "/etc/passwd",
    "",
    "sub/../../outside/model.onnx_data",
    "model.onnx",
)
DTYPES = (onnx.TensorProto.DOUBLE, onnx.TensorProto.INT32, onnx.TensorProto.FLOAT16, 0, 99, 40)

_opened: list[str] | None = None  # the paths opened while a run is audited


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while ``_opened`` is a list


@contextlib.contextmanager
def _audited_and_bounded() -> Iterator[list[str]]:
    """Record opened paths, and raise TimeoutError if the block runs past TIMEOUT_S (a hang)."""
    global _opened

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the run blocked for {TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, hung)
    _opened = []
    signal.alarm(TIMEOUT_S)
    try:
        yield _opened
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        _opened = None


MUTATION = st.one_of(
    st.tuples(st.sampled_from(["truncate_model", "truncate_data"]), st.floats(0.0, 0.99)),
    st.tuples(st.sampled_from(["flip_model", "flip_data"]), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.sampled_from(["drop_node", "dup_node", "drop_init", "dup_init"]), st.integers(0, 5)),
    st.tuples(st.just("rename"), st.integers(0, 5), st.sampled_from(["x", "y", "h0", "W1", "zz", ""])),
    st.tuples(st.just("dims"), st.integers(0, 1), st.lists(st.integers(-2, 80), min_size=0, max_size=3)),
    st.tuples(st.just("dtype"), st.integers(0, 1), st.sampled_from(DTYPES)),
    st.tuples(st.just("value_type"), st.integers(0, 2), st.sampled_from(DTYPES)),
    st.tuples(st.just("location"), st.integers(0, 1), st.sampled_from(LOCATIONS)),
    st.tuples(st.sampled_from(["offset", "length"]), st.integers(0, 1), st.integers(-10, 20000)),
)


def _entry(t: onnx.TensorProto, key: str, value: str) -> None:
    for e in t.external_data:
        if e.key == key:
            e.value = value
            return
    t.external_data.add(key=key, value=value)


def _mutate_proto(proto: onnx.ModelProto, mutation: tuple[Any, ...], root: Path) -> None:
    kind, g = mutation[0], proto.graph
    nodes, inits = g.node, g.initializer
    if kind in ("drop_node", "dup_node") and len(nodes):
        i = mutation[1] % len(nodes)
        if kind == "drop_node":
            del nodes[i]
        else:
            nodes.insert(i, nodes[i])
    elif kind in ("drop_init", "dup_init") and len(inits):
        i = mutation[1] % len(inits)
        if kind == "drop_init":
            del inits[i]
        else:
            inits.append(inits[i])
    elif kind == "value_type":  # the element type of the graph input, the graph output or an inner value
        value = [*g.input, *g.output][mutation[1]] if mutation[1] < 2 else g.value_info.add(name="h0")
        value.type.tensor_type.elem_type = mutation[2]
    elif kind == "rename" and len(nodes):
        node = nodes[mutation[1] % len(nodes)]
        if len(node.input):
            node.input[0] = mutation[2]
        else:
            node.output[0] = mutation[2]
    elif len(inits) and kind in ("dims", "dtype", "location", "offset", "length"):
        t = inits[mutation[1] % len(inits)]
        if kind == "dims":
            t.dims[:] = mutation[2]
        elif kind == "dtype":
            t.data_type = mutation[2]
        elif kind == "location":
            _entry(t, "location", mutation[2])
        else:
            _entry(t, kind, str(mutation[2]))


def _mutate_bytes(path: Path, mutation: tuple[Any, ...]) -> None:
    if not path.is_file():
        return
    data = bytearray(path.read_bytes())
    if mutation[0].startswith("truncate"):
        data = data[: int(len(data) * mutation[1])]
    elif data:
        data[mutation[1] % len(data)] ^= mutation[2]
    path.write_bytes(bytes(data))


def _build(root: Path, mutations: list[tuple[Any, ...]]) -> Path:
    src = save(matmul_model(WEIGHTS), root / "src", external=True)
    (root / "outside").mkdir()
    shutil.copy(src.parent / "model.onnx_data", root / "outside" / "model.onnx_data")  # the decoy
    proto = onnx.load(str(src), load_external_data=False)
    for m in mutations:
        if not m[0].endswith(("_model", "_data")):
            _mutate_proto(proto, m, root)
    onnx.save(proto, str(src))
    for m in mutations:
        if m[0].endswith("_model"):
            _mutate_bytes(src, m)
        elif m[0].endswith("_data"):
            _mutate_bytes(src.parent / "model.onnx_data", m)
    return src


def _check_opened(opened: list[str], root: Path) -> None:
    root = Path(os.path.realpath(root))
    for path in map(Path, opened):
        assert path != Path("/etc/passwd"), "read /etc/passwd"
        if root in path.parents:
            rel = path.relative_to(root).parts[0]
            assert rel == "src" or rel.startswith((".out", "out", ".api", "api")), f"opened {path} outside"


ESCAPED: set[str] = set()  # exception types the API let out on fuzzed input


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
@example(mutations=[("value_type", 1, 0)])  # a graph output of type 0: onnxruntime refuses the model
@example(mutations=[("flip_model", 251, 96)])  # a data file name with a line break in it
def test_mutated_models_exit_0_or_2_and_read_only_their_folder(mutations):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = _build(root, mutations)
        err = io.StringIO()
        with _audited_and_bounded() as opened, contextlib.redirect_stderr(err):
            rc = main(
                [
                    "quantize",
                    str(src),
                    str(root / "out"),
                    "--group-size",
                    "32",
                    "--no-progress",
                    "--method",
                    "rtn",
                ]
            )
        _check_opened(opened, root)
        lines = err.getvalue().strip().splitlines()
        event(f"exit {rc}")
        assert rc in (0, 2), err.getvalue()
        if rc == 2:
            assert len(lines) == 1 and lines[0].startswith("optimum-adaround: error: "), err.getvalue()
        else:
            ort.InferenceSession(str(root / "out" / "model.onnx"))
        with _audited_and_bounded() as opened:
            try:
                quantize(src, root / "api", scheme="w4-g32", method="rtn", progress=False)
            except UserError as e:
                assert "\n" not in str(e)
            except Exception as e:  # recorded, then the test fails below with the type
                ESCAPED.add(f"{type(e).__name__}: {e}"[:300])
        _check_opened(opened, root)
        assert not ESCAPED, ESCAPED
        assert (rc == 0) == (root / "api").exists(), "the CLI and the API disagree"
