"""Load and save models for rewriting, with onnx-ir and memory-mapped external data.

Inputs come in four kinds: a ``.onnx`` path, an exported model folder, an ``onnx.ModelProto`` or an
onnx-graphsurgeon ``gs.Graph``. Everything is converted to an ``ir.Model`` at the boundary and converted
back to the caller's kind on the way out (:func:`to_source_kind`). External data stays on disk: onnx-ir
memory-maps it, and weights are read one site at a time (:func:`read_weight`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from .errors import InvalidModelError
from .records import WeightSite

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "LoadedModel",
    "SourceKind",
    "check_inside",
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

# protobuf cannot parse a message over 2 GiB: a larger .onnx file is not a model.
_MAX_PROTO_BYTES = 2**31 - 1

# The checker's copy of a model keeps initializers up to this size (shape inference reads axes and shapes
# from them); larger ones are replaced by typed inputs.
_SKELETON_MAX_ELEMENTS = 1024
_PLACEHOLDER_DOMAIN = "ai.onnx.adaround.check"
# Ops onnxruntime registers in the ONNX domain that onnx itself lacks (onnxruntime-genai's model builder
# writes them there): the checker sees them in the placeholder domain, unchecked.
_ORT_ONNX_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})

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

    @property
    def directory(self) -> Path | None:
        """The folder given, else the ``.onnx`` file's folder (tokenizer, config, external data); None for
        in-memory inputs."""
        return self.folder or (self.path.parent if self.path is not None else None)


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


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_inside(folder: Path, name: str, what: str, where: Path | str | None = None, note: str = "") -> Path:
    """``folder/name`` as a regular file that resolves inside ``folder``, else one ``InvalidModelError`` line.

    Refuses absolute names, ``..`` and symlinks that leave the folder (a model must never make the tool read,
    quantize and publish a file from elsewhere), and pipes and devices (reading them blocks or never ends).
    ``what`` names the file's role in the message (``external data file``), ``where`` what refers to it,
    ``note`` ends the message's first clause (``(needed by W0)``).
    """
    where = where if where is not None else folder
    if not name or "\0" in name or os.path.isabs(name):  # no OS call takes a NUL byte in a path
        raise InvalidModelError(
            f"{where}: {what} {name!r}{note} is not a relative path inside the model folder {folder}: fix it"
        )
    path = folder / name
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        how = "points to" if ".." in Path(name).parts else "resolves through a symlink to"
        raise InvalidModelError(
            f"{where}: {what} {name}{note} {how} {real}, outside the model folder {folder}: copy the file into "
            "the folder (cp -L resolves links) and refer to the copy"
        )
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise InvalidModelError(f"{where}: {what} {name} is missing{note}") from None
    kind = _not_regular(mode)
    if kind is not None:
        raise InvalidModelError(
            f"{where}: {what} {name}{note} is {kind}, not a regular file: replace it with the file"
        )
    return path


def _all_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """Every tensor of the model: initializers of every graph and tensors held by node attributes."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield str(value.name), value.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                yield f"{node.name or node.op_type}.{attr.name}", attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from ((f"{node.name or node.op_type}.{attr.name}", t) for t in attr.value)


def _expected_bytes(name: str, tensor: ir.TensorProtocol, where: str) -> int:
    """The tensor's byte size from its shape and type, refusing negative dims and types without a size."""
    dims = list(tensor.shape.dims)
    if any(not isinstance(d, int) or d < 0 for d in dims):
        raise InvalidModelError(f"{where}: tensor {name!r} has dims {dims}: a stored tensor needs sizes >= 0")
    try:
        return int(tensor.nbytes)
    except (TypeError, ValueError):
        raise InvalidModelError(
            f"{where}: tensor {name!r} has data type {tensor.dtype.name}, which has no fixed size: fix its type"
        ) from None


def _check_external(name: str, tensor: ir.ExternalTensor, folder: Path, where: Path, sizes: dict) -> None:
    """Location inside the folder, a regular file with one link, offset/length equal to the tensor's bytes."""
    nbytes = _expected_bytes(name, tensor, str(where))
    location = str(tensor.location)
    path = check_inside(folder, location, "external data file", where, f" (needed by {name})")
    if location not in sizes:
        st = os.stat(path)
        # onnx-ir refuses to read a file with several hard links (another name could hide any file).
        if st.st_nlink > 1:
            raise InvalidModelError(
                f"{where}: external data file {location} has {st.st_nlink} hard links; onnx-ir reads only "
                f"files with one: replace it with a copy (cp {location} x && mv x {location})"
            )
        sizes[location] = st.st_size
    offset = tensor.offset or 0
    if tensor.length is not None and tensor.length != nbytes:
        raise InvalidModelError(
            f"{where}: external data of {name!r} says length {tensor.length}, but its shape and type take "
            f"{nbytes} bytes: fix the length or re-export the model"
        )
    if offset < 0 or sizes[location] < offset + nbytes:
        raise InvalidModelError(
            f"{where}: external data file {location} is truncated ({sizes[location]} bytes, {name} needs "
            f"{offset + nbytes} from offset {offset})"
        )


def _check_inline(name: str, tensor: ir.TensorProtocol, where: Path | str) -> None:
    """Inline data must hold exactly what the dims and type say (the checker lets longer raw_data through)."""
    nbytes = _expected_bytes(name, tensor, str(where))
    proto = getattr(tensor, "raw", None)
    if not isinstance(proto, onnx.TensorProto):
        return
    if proto.HasField("raw_data"):
        if len(proto.raw_data) != nbytes:
            raise InvalidModelError(
                f"{where}: tensor {name!r} holds {len(proto.raw_data)} bytes of raw_data, but its dims "
                f"{list(proto.dims)} and type {tensor.dtype.name} take {nbytes}: fix or re-export the model"
            )
        return
    try:  # typed fields (float_data, int32_data, ...): small by nature, decoding them is the check
        tensor.numpy()
    except (ValueError, TypeError) as e:
        raise InvalidModelError(
            f"{where}: tensor {name!r} has data that does not fit its dims {list(proto.dims)} and type "
            f"{tensor.dtype.name} ({_why(e)}): fix or re-export the model"
        ) from None


def _check_tensors(model: ir.Model, path: Path | None) -> None:
    """Every tensor's data matches its dims and type; external data stays inside the model's folder."""
    where = path if path is not None else "in-memory model"
    sizes: dict[str, int] = {}
    for name, tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            if path is None:
                raise InvalidModelError(
                    f"in-memory model: tensor {name!r} keeps its data in external file {tensor.location}, which "
                    "has no folder to be read from: pass the .onnx path instead"
                )
            _check_external(name, tensor, path.parent, path, sizes)
        else:
            _check_inline(name, tensor, where)


def _read_model_bytes(path: Path) -> bytes:
    """The file's bytes: a regular file of at most 2 GiB, read without blocking on a pipe or device."""
    try:
        # O_NONBLOCK: opening a FIFO would wait for a writer; the type is checked on the open descriptor.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InvalidModelError(f"{path}: cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        kind = _not_regular(st.st_mode)
        if kind is not None:
            raise InvalidModelError(f"{path}: is {kind}, not a regular file: pass the .onnx file itself")
        if st.st_size > _MAX_PROTO_BYTES:
            raise InvalidModelError(
                f"{path}: {st.st_size / 2**30:.1f} GiB is over protobuf's 2 GiB limit for one .onnx file, so "
                "it is not an ONNX model (large models keep their weights in external data files)"
            )
        return fh.read(_MAX_PROTO_BYTES + 1)


def _why(e: BaseException) -> str:
    """The innermost cause of an exception, as ``Type: first line`` (onnx-ir wraps the real reason)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def _check_graph(proto: onnx.ModelProto, where: Path | str) -> None:
    """onnx.checker with strict shape inference: refuse what onnxruntime could not load before rewriting it.

    Dangling inputs (a dropped node or initializer), duplicate initializers or outputs, unknown ops, type and
    shape mismatches, a missing opset: each would survive the rewrite and make an output nobody can load.
    The checker sees the graph without its large weights (:func:`_skeleton`), so this costs no copy of them.
    """
    try:
        onnx.checker.check_model(_skeleton(proto, where), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise InvalidModelError(
            f"{where}: not a valid ONNX model (onnx.checker: {_why(e)}); fix it or re-export it"
        ) from None
    except UnicodeDecodeError:  # the checker's message quotes a name whose bytes are not UTF-8
        raise InvalidModelError(
            f"{where}: not a valid ONNX model (a name or text field is not UTF-8); fix it or re-export it"
        ) from None


def _skeleton(proto: onnx.ModelProto, where: Path | str) -> onnx.ModelProto:
    """The model for the checker: big initializers become typed graph inputs (types and shapes, no data).

    Graph inputs and outputs without a shape are legal for onnxruntime but not for the checker: an input
    becomes the output of a placeholder node of an unchecked domain (its type kept in ``value_info``), an
    output a plain ``value_info`` entry, after checking here that something produces it.
    """
    src = proto.graph
    sk = onnx.ModelProto(ir_version=proto.ir_version)
    sk.opset_import.extend(proto.opset_import)
    sk.functions.extend(proto.functions)
    g = sk.graph
    g.name = src.name or "graph"
    listed = {vi.name for vi in src.input}
    names: set[str] = set()
    for t in src.initializer:
        if t.name in names:
            raise InvalidModelError(f"{where}: initializer {t.name!r} is defined twice: keep one")
        names.add(t.name)
        if t.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(t.dims)) <= _SKELETON_MAX_ELEMENTS:
            g.initializer.append(t)
        elif t.name not in listed:
            vi = g.input.add(name=t.name)
            vi.type.tensor_type.elem_type = t.data_type
            vi.type.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=d) for d in t.dims)
    placeholders = [vi for vi in src.input if vi.type.HasField("tensor_type") and not _has_shape(vi)]
    if placeholders:
        sk.opset_import.add(domain=_PLACEHOLDER_DOMAIN, version=1)
        g.node.add(op_type="Input", domain=_PLACEHOLDER_DOMAIN, output=[vi.name for vi in placeholders])
        g.value_info.extend(placeholders)
    g.input.extend(vi for vi in src.input if vi not in placeholders)
    g.node.extend(src.node)
    ort_ops = [n for n in g.node if n.domain in ("", "ai.onnx") and n.op_type in _ORT_ONNX_DOMAIN_OPS]
    for node in ort_ops:
        node.domain = _PLACEHOLDER_DOMAIN
    if ort_ops and not placeholders:
        sk.opset_import.add(domain=_PLACEHOLDER_DOMAIN, version=1)
    _inline_external_attributes(g.node)
    # A Constant's own tensor gives its shape: onnxruntime-genai's builder declares 1-D constants rank 0.
    constants = {
        o for n in src.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx") for o in n.output
    }
    g.value_info.extend(vi for vi in src.value_info if vi.name not in constants)
    g.sparse_initializer.extend(src.sparse_initializer)
    known = listed | {t.name for t in src.initializer} | {o for n in src.node for o in n.output}
    for vi in src.output:
        if vi.type.HasField("tensor_type") and not _has_shape(vi):
            if vi.name not in known:
                raise InvalidModelError(f"{where}: graph output {vi.name!r} is not produced by any node")
            g.value_info.append(vi)
        else:
            g.output.append(vi)
    return sk


def _inline_external_attributes(nodes: Iterable[onnx.NodeProto]) -> None:
    """Give the skeleton's external tensors in attributes and subgraphs zero bytes of their size.

    They were checked against their files already; the checker would look for the files relative to the
    current folder instead of the model's.
    """
    for node in nodes:
        for attr in node.attribute:
            tensors = [attr.t] if attr.HasField("t") else []
            tensors += list(attr.tensors)
            for graph in [attr.g] if attr.HasField("g") else []:
                tensors += list(graph.initializer)
                _inline_external_attributes(graph.node)
            for t in tensors:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    bits = ir.DataType(t.data_type).bitwidth
                    t.ClearField("external_data")
                    t.data_location = onnx.TensorProto.DEFAULT
                    t.raw_data = bytes((int(np.prod(t.dims)) * bits + 7) // 8)


def _has_shape(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.tensor_type.HasField("shape")


def _check_names(model: ir.Model, where: Path | str) -> None:
    """Names, op types and domains must be text: protobuf lets invalid UTF-8 through as bytes."""

    def bad(*names: Any) -> bool:
        return any(n is not None and not isinstance(n, str) for n in names)

    for graph in model.graphs():
        for value in [*graph.inputs, *graph.outputs, *graph.initializers.values()]:
            if bad(value.name):
                raise InvalidModelError(
                    f"{where}: value name {value.name!r} is not UTF-8 text: fix or re-export"
                )
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        names = [node.name, node.op_type, node.domain, *node.attributes.keys()]
        names += [v.name for v in (*node.inputs, *node.outputs) if v is not None]
        if bad(*names):
            raise InvalidModelError(
                f"{where}: node {node.name!r} has a name, type or input that is not UTF-8 text: fix or re-export"
            )


def _check_value_types(model: ir.Model, where: Path | str) -> None:
    """No value may be typed as a tensor of UNDEFINED elements (type 0): the checker lets such a graph
    output or value_info entry through, onnxruntime refuses the model ("Invalid tensor data type 0")."""
    for graph in model.graphs():
        values = [*graph.inputs, *graph.outputs]
        values += [v for node in graph for v in node.outputs if v is not None]
        for value in values:
            if value.type is not None and value.dtype == ir.DataType.UNDEFINED:
                raise InvalidModelError(
                    f"{where}: value {value.name!r} has element type UNDEFINED (0), which onnxruntime cannot "
                    "load: set its type or re-export the model"
                )


def _unique_node_names(model: ir.Model) -> None:
    """Give unnamed MatMul/Gemm nodes and every repeated node name a unique name.

    Sites, calibration blocks and the rewrite find nodes by name; names are free-form in ONNX, so the
    loaded copy is renamed (the input file is untouched). Models with unique names are not changed.
    """
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    taken = {n.name for n in nodes if n.name}
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        name = node.name
        if name and name not in seen:
            seen.add(name)
            continue
        if not name and node.op_type not in ("MatMul", "Gemm"):
            continue
        # A suffix on the scope, not the last part: the rewrite names its initializers after the scope.
        scope, _, last = (name or f"/{node.op_type}_{i}/{node.op_type}").rpartition("/")
        candidate, j = f"{scope}/{last}", 2
        while candidate in taken:
            candidate, j = f"{scope}_{j}/{last}", j + 1
        node.name = candidate
        taken.add(candidate)
        seen.add(candidate)


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file or folder")
    data = _read_model_bytes(path)
    try:
        proto = onnx.ModelProto.FromString(data)
    except Exception as e:  # protobuf raises DecodeError / RuntimeError for garbage or truncated files
        raise InvalidModelError(f"{path}: not a readable ONNX model ({_why(e)})") from None
    del data
    if proto.ir_version == 0 or len(proto.graph.node) == 0:
        raise InvalidModelError(f"{path}: not an ONNX model (no ir_version or an empty graph)")
    model = _deserialize(proto, path)
    ir.external_data.set_base_dir(model.graph, path.parent)
    _check_names(model, path)
    _check_value_types(model, path)
    _check_tensors(model, path)
    _check_graph(proto, path)
    del proto
    _unique_node_names(model)
    return model


_UNKNOWN_KEY = "Ignoring unknown external data key"  # onnx's warning for a key outside the spec's five


def _deserialize(proto: onnx.ModelProto, where: Path | str) -> ir.Model:
    # onnx-ir logs a warning per dangling input while converting; the checker refuses those models in one
    # line afterwards, so the warnings would only add lines to stderr.
    logger = logging.getLogger("onnx_ir.serde")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # onnx ignores (with a warning) an external data key it does not know; onnxruntime refuses the
            # model: refuse it here too, in one line, naming the key and the tensor
            warnings.filterwarnings("error", _UNKNOWN_KEY, UserWarning)
            return ir.serde.deserialize_model(proto)
    except Exception as e:
        why = _why(e)
        if why.startswith(f"UserWarning: {_UNKNOWN_KEY}"):
            raise InvalidModelError(
                f"{where}: {why.removeprefix('UserWarning: Ignoring ')}; onnxruntime refuses such a model: "
                "fix or remove the key"
            ) from None
        raise InvalidModelError(f"{where}: not a readable ONNX model ({why})") from None
    finally:
        logger.setLevel(level)


def load_model(source: Any) -> LoadedModel:
    """Load ``source`` (path to a .onnx file or exported folder, ModelProto, or gs.Graph) as an ``ir.Model``.

    Paths are loaded with external data memory-mapped (never read whole); in-memory inputs are converted.
    Every input is validated first, so a bad one fails here in one ``InvalidModelError`` line: regular
    files only (no pipes or devices), external data inside the model's folder and matching each tensor's
    size, inline data matching dims, and ``onnx.checker`` with strict shape inference.
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            _check_folder(p)
        file = find_model_file(p) if p.is_dir() else p
        model = _load_path(file)
        return LoadedModel(model, "path", file, p if p.is_dir() else None, external=_has_external(model))
    kind = _object_kind(source)
    if kind == "gs":
        import onnx_graphsurgeon as gs

        source = gs.export_onnx(source)
    if len(source.graph.node) == 0:
        raise InvalidModelError("in-memory model has an empty graph")
    model = _deserialize(source, "in-memory ModelProto")
    _check_names(model, "in-memory model")
    _check_value_types(model, "in-memory model")
    _check_tensors(model, None)
    _check_graph(source, "in-memory model")
    _unique_node_names(model)
    return LoadedModel(model, kind)


def _check_folder(folder: Path) -> None:
    """The files of an exported folder are read or copied to the output: each must be a regular file inside."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            continue
        if entry.is_symlink() and entry.is_dir():
            real = os.path.realpath(entry.path)
            if os.path.commonpath([os.path.realpath(folder), real]) == os.path.realpath(folder):
                continue  # a link to a subfolder of its own
        check_inside(folder, entry.name, "file")


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


def read_weight(model: ir.Model, site: WeightSite, copy: bool = True) -> np.ndarray:
    """The site's weight as a contiguous float32 ``[N, K]`` array (one weight read through the mmap); with
    ``copy=False`` an ``[N, K]`` view of the stored tensor in its own dtype and layout instead (no copy:
    a weight in external data stays file-backed, to be read a row chunk at a time)."""
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
    return np.ascontiguousarray(w, dtype=np.float32) if copy else w


def _initializer(model: ir.Model, name: str) -> ir.Value:
    value = model.graph.initializers.get(name)
    if value is None:
        raise InvalidModelError(f"no initializer named {name!r} in the graph")
    return value
