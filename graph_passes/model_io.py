"""Load and save models for rewriting, with onnx-ir and memory-mapped external data.

Inputs come in four kinds: a ``.onnx`` path, an exported model folder, an ``onnx.ModelProto`` or an
onnx-graphsurgeon ``gs.Graph``. Everything is converted to an ``ir.Model`` at the boundary and converted
back to the caller's kind on the way out (:func:`to_source_kind`). External data stays on disk: onnx-ir
memory-maps it, and weights are read one site at a time (:func:`read_weight`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from .errors import InvalidModelError
from .records import WeightSite

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "LoadedModel",
    "SourceKind",
    "find_model_file",
    "initializer_bytes",
    "load_model",
    "read_weight",
    "save_model",
    "to_source_kind",
]

SourceKind = Literal["path", "proto", "gs"]

# A protobuf message cannot exceed 2 GiB; stay clear of it (other fields take room too).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# Decoder files of Optimum exports, in the order they are preferred inside a folder.
_DECODER_FILES = (
    "model.onnx",
    "decoder_model_merged.onnx",
    "decoder_model.onnx",
    "decoder_with_past_model.onnx",
)


@dataclasses.dataclass
class LoadedModel:
    """An ``ir.Model`` plus where it came from, so the result can be handed back in the same kind."""

    model: ir.Model
    kind: SourceKind
    path: Path | None = None
    """The ``.onnx`` file read (None for in-memory inputs)."""
    folder: Path | None = None
    """The exported folder given by the user (None when a file or an object was given)."""
    external: bool = False
    """The weights came in external data files: save the result that way too (see :func:`save_model`)."""


def find_model_file(folder: Path) -> Path:
    """The decoder ``.onnx`` file of an exported folder (``model.onnx`` first, then Optimum's decoder names)."""
    for name in _DECODER_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("*.onnx"))
    if len(found) == 1:
        return folder / found[0]
    if not found:
        raise InvalidModelError(f"{folder}: no .onnx file in this folder")
    raise InvalidModelError(f"{folder}: several .onnx files ({', '.join(found)}); pass the one to quantize")


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every external tensor must point at an existing file that is long enough (else fail now, in one line)."""
    sizes: dict[str, int] = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            data = tensor.path
            if data not in sizes:
                sizes[data] = os.path.getsize(data) if os.path.isfile(data) else -1
            if sizes[data] < 0:
                raise InvalidModelError(
                    f"{path}: external data file {tensor.location!s} is missing (needed by {value.name})"
                )
            end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
            if sizes[data] < end:
                raise InvalidModelError(
                    f"{path}: external data file {tensor.location!s} is truncated "
                    f"({sizes[data]} bytes, {value.name} needs {end})"
                )


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file or folder")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf raises DecodeError / RuntimeError for garbage or truncated files
        raise InvalidModelError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None
    if model.ir_version == 0 or len(model.graph) == 0:
        raise InvalidModelError(f"{path}: not an ONNX model (no ir_version or an empty graph)")
    _check_external_data(model, path)
    return model


def load_model(source: Any) -> LoadedModel:
    """Load ``source`` (path to a .onnx file or exported folder, ModelProto, or gs.Graph) as an ``ir.Model``.

    Paths are loaded with external data memory-mapped (never read whole); in-memory inputs are converted.
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        file = find_model_file(p) if p.is_dir() else p
        model = _load_path(file)
        return LoadedModel(model, "path", file, p if p.is_dir() else None, external=_has_external(model))
    kind = _object_kind(source)
    if kind == "gs":
        import onnx_graphsurgeon as gs

        source = gs.export_onnx(source)
    try:
        model = ir.serde.deserialize_model(source)
    except Exception as e:
        raise InvalidModelError(
            f"in-memory ModelProto could not be converted: {type(e).__name__}: {e}"
        ) from None
    if len(model.graph) == 0:
        raise InvalidModelError("in-memory model has an empty graph")
    return LoadedModel(model, kind)


def _object_kind(source: Any) -> SourceKind:
    cls = type(source)
    if cls.__name__ == "ModelProto" and cls.__module__.startswith("onnx"):
        return "proto"
    if cls.__name__ == "Graph" and cls.__module__.startswith("onnx_graphsurgeon"):
        return "gs"
    raise InvalidModelError(
        f"cannot read a model from a {cls.__module__}.{cls.__qualname__}: pass a .onnx path, an exported "
        "folder, an onnx.ModelProto or an onnx_graphsurgeon.Graph"
    )


def to_source_kind(model: ir.Model, kind: SourceKind) -> Any:
    """Hand ``model`` back as the kind the user gave: ``ir.Model`` for paths, ModelProto, or gs.Graph."""
    if kind == "path":
        return model
    proto = ir.serde.serialize_model(model)
    if kind == "proto":
        return proto
    import onnx_graphsurgeon as gs

    return gs.import_onnx(proto)


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of all initializers (main graph and subgraphs), without reading any of them."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value)


def _has_external(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values()
    )


def _materialize_external_attributes(model: ir.Model) -> None:
    """Load the (small) external tensors still held in node attributes, so none points at the old data file."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                t = attr.value
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(t.numpy(), dtype=t.dtype, name=t.name))


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Save ``model`` to ``path`` streaming tensors to ``<name>_data`` when large, external or asked.

    ``external_data=None`` decides: external when the initializers exceed ~1.8 GB or any of them still
    lives in an external file (the copy must not point at the input's data file). Inline saving builds the
    whole protobuf in memory, so callers that care about memory (a quantized copy of a model that came with
    external data) pass ``external_data=True``: tensors are then streamed one at a time. Constant nodes are lifted
    to initializers first so their data is rewritten too (else they keep pointing at the old file).
    Returns the files written.
    """
    path = Path(path)
    if external_data is None:
        external_data = _has_external(model) or initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        ir.save(model, path)
        return [path]
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024)(model)
    _materialize_external_attributes(model)
    data_name = f"{path.name}_data"
    ir.save(model, path, external_data=data_name, size_threshold_bytes=1024)
    return [path, path.parent / data_name]


def read_weight(model: ir.Model, site: WeightSite) -> np.ndarray:
    """The site's weight as a contiguous float32 ``[N, K]`` array (one weight read through the mmap)."""
    value = _initializer(model, site.weight_name)
    tensor = value.const_value
    if tensor is None:
        raise InvalidModelError(f"weight {site.weight_name!r} of {site.node_name} has no constant value")
    array = tensor.numpy()
    if array.shape != ((site.n, site.k) if site.transposed else (site.k, site.n)):
        raise InvalidModelError(
            f"weight {site.weight_name!r} of {site.node_name} has shape {array.shape}, expected "
            f"{(site.n, site.k) if site.transposed else (site.k, site.n)}"
        )
    w = array if site.transposed else array.T
    return np.ascontiguousarray(w, dtype=np.float32)


def _initializer(model: ir.Model, name: str) -> ir.Value:
    value = model.graph.initializers.get(name)
    if value is None:
        raise InvalidModelError(f"no initializer named {name!r} in the graph")
    return value
