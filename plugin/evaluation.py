"""Evaluate a deployed ONNX causal LM: perplexity through onnxruntime, size, bits per weight, SQNR.

Perplexity protocol (fixed, so numbers are comparable across tools and runs):

- The text is tokenized per document without special tokens and the documents are joined by the tokens
  of a blank line (``data.text.token_stream``); ``max_tokens`` keeps the first tokens of that stream.
- The stream is cut into **non-overlapping** windows of ``context_length`` tokens. Each window starts with
  the tokenizer's own prefix (BOS) when the tokenizer adds one, followed by the next ``context_length -
  len(prefix)`` stream tokens; a last, shorter window is kept when it holds at least 2 tokens.
- Every window token that has a preceding token in its window is scored (the prefix itself is not); with a
  BOS prefix that is every stream token. Perplexity is ``exp(sum NLL / tokens scored)``, NLL from a
  float64 log-softmax of the model's logits.
- Feeds are the model's own inputs: ``input_ids``, an all-ones ``attention_mask``, ``position_ids =
  arange(T)`` and zero-length ``past_key_values.*`` (so one export serves evaluation and generation).

Non-overlapping windows give each token at most ``context_length - 1`` tokens of context (less at the
start of a window), so the numbers are somewhat higher than a sliding-window evaluation would give.

Bits per weight count what is stored for the quantized linear weights (codes + scales + zero points) over
their number of weights. SQNR compares each dequantized weight against the same site's fp32 weight in a
reference export (matched by module path): ``10 log10(|W|^2 / |W - Wq|^2)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from .custom_ops import DOMAIN as CUSTOM_DOMAIN
from .custom_ops import uses_custom_domain
from .data.text import evaluation_text, load_tokenizer, special_prefix, token_stream
from .graph_passes.calibration.feeds import feed_specs, make_feeds
from .graph_passes.errors import InvalidModelError, UserError
from .graph_passes.model_io import find_model_file, load_model, read_weight
from .graph_passes.packing.base import PackedWeight, get_packer
from .graph_passes.rounding.metrics import sqnr_db
from .graph_passes.scheme import PER_CHANNEL, DataType, QuantScheme, WeightFormat
from .graph_passes.sites import find_weight_sites, module_path

__all__ = [
    "CUSTOM_DOMAIN",
    "EvalReport",
    "PerplexityResult",
    "QuantizedSite",
    "create_session",
    "evaluate",
    "make_windows",
    "model_bytes",
    "perplexity",
    "quantized_sites",
    "sqnr_db",
    "weight_sqnr",
    "window_nll",
]


class EvaluationError(UserError):
    """Evaluation cannot run: too little text, a model output missing, a reference that does not match."""


# -- perplexity math (pure) ----------------------------------------------------------------------------


def make_windows(stream: np.ndarray, context_length: int, prefix: Sequence[int] = ()) -> list[np.ndarray]:
    """Non-overlapping windows ``prefix + stream[i*b:(i+1)*b]`` with ``b = context_length - len(prefix)``."""
    body = context_length - len(prefix)
    if body < 1:
        raise EvaluationError(
            f"context_length={context_length} leaves no room after {len(prefix)} prefix tokens"
        )
    pre = np.asarray(prefix, dtype=np.int64)
    windows = []
    for start in range(0, int(stream.size), body):
        chunk = stream[start : start + body]
        if len(pre) + chunk.size >= 2:
            windows.append(np.concatenate([pre, chunk]).astype(np.int64))
    return windows


def window_nll(logits: np.ndarray, ids: np.ndarray, first_target: int = 1) -> tuple[float, int]:
    """Sum of ``-log p(ids[t] | ids[:t])`` over ``t >= first_target`` and the number of such t.

    ``logits[T, V]`` are the model's outputs for ``ids[T]`` (row t predicts token t+1).
    """
    first_target = max(1, first_target)
    pred = np.asarray(logits[first_target - 1 : -1], dtype=np.float64)
    targets = np.asarray(ids[first_target:], dtype=np.int64)
    if targets.size == 0:
        return 0.0, 0
    shift = pred.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(pred - shift).sum(axis=-1)) + shift[:, 0]
    picked = pred[np.arange(targets.size), targets]
    return float((log_z - picked).sum()), int(targets.size)


# -- onnxruntime session ----------------------------------------------------------------------------


def create_session(
    model_file: str | Path,
    *,
    uses_custom_ops: bool = False,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    session_config: dict[str, str] | None = None,
    intra_op_threads: int = 0,
) -> Any:  # onnxruntime.InferenceSession
    """An InferenceSession; registers our op library when the model uses ``com.optimum.adaround``."""
    import onnxruntime as ort

    if uses_custom_ops:
        from .custom_ops import session_options

        so = session_options()  # a missing/unbuilt library raises the loader's own clear error
    else:
        so = ort.SessionOptions()
    for key, value in (session_config or {}).items():
        so.add_session_config_entry(key, value)
    so.intra_op_num_threads = intra_op_threads
    # Spinning worker threads only burn a shared CPU between the many small calls of decoding.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_file), sess_options=so, providers=list(providers))
    except Exception as e:  # ORT raises its own exception types for invalid graphs
        raise InvalidModelError(
            f"{model_file}: onnxruntime cannot load it: {str(e).splitlines()[0][:300]}"
        ) from e


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    tokens: int
    """Tokens scored."""
    windows: int
    context_length: int
    seconds: float


def _batches(windows: Sequence[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
    # Only windows of equal length share a batch (no padding: every token is scored exactly as alone).
    batch: list[np.ndarray] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w.size != batch[0].size):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def perplexity(
    model_dir: str | Path,
    text: str | None = None,
    *,
    tokenizer_dir: str | Path | None = None,
    context_length: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 1,
    session: Any = None,
    session_config: dict[str, str] | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of the ONNX model in ``model_dir`` on ``text`` (default: the embedded evaluation split).

    See the module docstring for the exact protocol. ``tokenizer_dir`` defaults to ``model_dir``.
    """
    model_dir = Path(model_dir)
    model_file = find_model_file(model_dir) if model_dir.is_dir() else model_dir
    tokenizer = load_tokenizer(str(tokenizer_dir or model_file.parent))
    stream = token_stream(tokenizer, [text if text is not None else evaluation_text()])
    if max_tokens is not None:
        stream = stream[:max_tokens]
    prefix = special_prefix(tokenizer)
    windows = make_windows(stream, context_length, prefix)
    if not windows:
        raise EvaluationError("the evaluation text is empty after tokenization")
    if session is None:
        session = create_session(
            model_file,
            uses_custom_ops=uses_custom_domain(model_file),  # reads the graph only, not external data
            providers=providers,
            session_config=session_config,
        )
    specs = feed_specs([_InputView(i) for i in session.get_inputs()])
    if "logits" not in [o.name for o in session.get_outputs()]:
        raise EvaluationError(f"{model_file} has no 'logits' output")
    total, count = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress, leave=False)
    for batch in _batches(windows, batch_size):
        ids = np.stack(batch)
        (logits,) = session.run(["logits"], make_feeds(specs, ids))
        for row, w in zip(logits, batch, strict=True):
            s, c = window_nll(row, w, first_target=max(1, len(prefix)))
            total += s
            count += c
        bar.update(len(batch))
    bar.close()
    if count == 0:
        raise EvaluationError("no token could be scored: the text is shorter than two tokens")
    nll = total / count
    return PerplexityResult(
        math.exp(nll), nll, count, len(windows), context_length, time.perf_counter() - start
    )


class _InputView:
    """Adapts an onnxruntime ``NodeArg`` to the few ``ir.Value`` attributes ``feed_specs`` reads."""

    _DTYPES: ClassVar[dict[str, ir.DataType]] = {
        "tensor(int64)": ir.DataType.INT64,
        "tensor(int32)": ir.DataType.INT32,
        "tensor(float)": ir.DataType.FLOAT,
        "tensor(float16)": ir.DataType.FLOAT16,
        "tensor(bfloat16)": ir.DataType.BFLOAT16,
    }

    def __init__(self, arg: Any) -> None:
        self.name = arg.name
        self.dtype = self._DTYPES.get(arg.type)
        self.shape = None if arg.shape is None else [d if isinstance(d, int) else None for d in arg.shape]


# -- size, bits per weight, SQNR ------------------------------------------------------------------


def model_bytes(model_file: str | Path, model: ir.Model | None = None) -> int:
    """Bytes on disk of the model file plus every external-data file its tensors reference."""
    model_file = Path(model_file)
    model = model if model is not None else load_model(model_file).model
    files = {
        Path(v.const_value.base_dir or model_file.parent) / v.const_value.location
        for g in model.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    return model_file.stat().st_size + sum(f.stat().st_size for f in files if f.is_file())


@dataclasses.dataclass
class QuantizedSite:
    """One quantized linear weight found in a deployed graph."""

    name: str
    """Module path (``model.layers.0.self_attn.q_proj``)."""
    op_type: str
    k: int
    n: int
    bits: int
    block_size: int
    stored_bytes: int
    """Bytes of codes + scales + zero points."""
    tensors: dict[str, ir.TensorProtocol]
    attributes: dict[str, Any]

    @property
    def weights(self) -> int:
        return self.k * self.n

    def dequantize(self) -> np.ndarray:
        """The float32 ``W[N, K]`` this site computes with."""
        return _DEQUANTIZERS[self.op_type](self)


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _const_inputs(node: ir.Node, roles: Sequence[str]) -> dict[str, ir.TensorProtocol]:
    out = {}
    for role, value in zip(roles, node.inputs, strict=False):  # optional inputs may be absent
        if value is not None and value.const_value is not None:
            out[role] = value.const_value
    return out


def _tensor_bytes(t: ir.TensorProtocol) -> int:
    return int(t.nbytes)


def _numpy(t: ir.TensorProtocol) -> np.ndarray:
    return np.asarray(t.numpy())


def _matmulnbits_site(node: ir.Node) -> QuantizedSite | None:
    tensors = _const_inputs(node, ("A", "B", "scales", "zero_points"))
    if "B" not in tensors or "scales" not in tensors:
        return None
    return QuantizedSite(
        module_path(node.name or ""),
        "MatMulNBits",
        int(_attr(node, "K")),
        int(_attr(node, "N")),
        int(_attr(node, "bits", 4)),
        int(_attr(node, "block_size")),
        sum(_tensor_bytes(t) for r, t in tensors.items() if r != "A"),
        {r: t for r, t in tensors.items() if r != "A"},
        {"K": _attr(node, "K"), "N": _attr(node, "N")},
    )


def _dequantize_matmulnbits(site: QuantizedSite) -> np.ndarray:
    zp = site.tensors.get("zero_points")
    zp_arr = None if zp is None else _numpy(zp)
    scheme = QuantScheme(bits=site.bits, group_size=site.block_size, symmetric=zp is None)
    arrays = {"B": _numpy(site.tensors["B"]), "scales": _numpy(site.tensors["scales"])}
    nb = scheme.n_blocks(site.k)
    if zp_arr is not None and zp_arr.dtype != np.uint8:
        # Float zero points (onnxruntime's HQQ): value = (code - zp) * scale, zp per block.
        qw = get_packer(WeightFormat.MATMULNBITS).unpack(
            PackedWeight(arrays, {}), dataclasses.replace(scheme, symmetric=True), site.k, site.n
        )
        z = qw.expand(zp_arr.astype(np.float32).reshape(site.n, nb))
        return ((qw.codes.astype(np.float32) - z) * qw.expand(qw.scales)).astype(np.float32)
    if zp_arr is not None:
        arrays["zero_points"] = zp_arr.reshape(site.n, -1)
    return (
        get_packer(WeightFormat.MATMULNBITS)
        .unpack(PackedWeight(arrays, {}), scheme, site.k, site.n)
        .dequantize()
    )


def _dq_site(node: ir.Node) -> QuantizedSite | None:
    """A DequantizeLinear of a constant 2-D integer weight feeding a MatMul (input B) or Gemm."""
    tensors = _const_inputs(node, ("q", "scales", "zero_points"))
    q = tensors.get("q")
    if q is None or "scales" not in tensors or len(q.shape) != 2:
        return None
    consumers = [u.node for u in node.outputs[0].uses()]
    target = next(
        (c for c in consumers if c.op_type in ("MatMul", "Gemm") and c.inputs[1] is node.outputs[0]), None
    )
    if target is None:
        return None
    if target.op_type == "Gemm" and _attr(target, "transB", 0):
        return None  # [N, K]-stored DQ weights are not produced by our packers or onnxruntime's quantizer
    k, n = (int(d) for d in q.shape)
    axis = int(_attr(node, "axis", 1))
    block = int(_attr(node, "block_size", 0)) or (k if axis == 1 else 1)
    bits = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT2: 2, ir.DataType.UINT2: 2}.get(
        q.dtype, 8
    )
    return QuantizedSite(
        module_path(target.name or ""),
        "DequantizeLinear",
        k,
        n,
        bits,
        block,
        sum(_tensor_bytes(t) for t in tensors.values()),
        tensors,
        {"axis": axis, "block_size": _attr(node, "block_size", 0)},
    )


def _dequantize_dq(site: QuantizedSite) -> np.ndarray:
    q = _numpy(site.tensors["q"]).astype(np.float32)  # [K, N]
    scales = _numpy(site.tensors["scales"]).astype(np.float32)
    zp_t = site.tensors.get("zero_points")
    zp = np.zeros_like(scales) if zp_t is None else _numpy(zp_t).astype(np.float32)
    if scales.ndim == 1:  # per-axis
        shape = (1, -1) if site.attributes["axis"] == 1 else (-1, 1)
        return ((q - zp.reshape(shape)) * scales.reshape(shape)).T.astype(np.float32)
    axis, block = site.attributes["axis"], site.attributes["block_size"]
    s = np.repeat(scales, block, axis=axis)
    z = np.repeat(zp, block, axis=axis)
    s, z = (s[: site.k], z[: site.k]) if axis == 0 else (s[:, : site.n], z[:, : site.n])
    return ((q - z) * s).T.astype(np.float32)


def _lowbit_site(node: ir.Node) -> QuantizedSite | None:
    """Our ``MatMulLowBit`` (A, B, scales, zero_points, bias) / ``MatMulCodebook`` (A, B, scales, codebook, bias)."""
    fourth = "codebook" if node.op_type == "MatMulCodebook" else "zero_points"
    tensors = _const_inputs(node, ("A", "B", "scales", fourth))
    if "B" not in tensors or "scales" not in tensors:
        return None
    tensors.pop("A", None)
    return QuantizedSite(
        module_path(node.name or ""),
        node.op_type,
        int(_attr(node, "K")),
        int(_attr(node, "N")),
        int(_attr(node, "bits")),
        int(_attr(node, "block_size")),
        sum(_tensor_bytes(t) for t in tensors.values()),
        tensors,
        {},
    )


def _dequantize_lowbit(site: QuantizedSite) -> np.ndarray:
    codebook = site.op_type == "MatMulCodebook"
    scheme = QuantScheme(
        bits=site.bits,
        group_size=PER_CHANNEL if site.block_size == site.k else site.block_size,
        symmetric="zero_points" not in site.tensors,
        format=WeightFormat.LOWBIT,
        data_type=DataType.CODEBOOK if codebook else DataType.INT,
    )
    arrays = {role: _numpy(t) for role, t in site.tensors.items()}
    return (
        get_packer(WeightFormat.LOWBIT).unpack(PackedWeight(arrays, {}), scheme, site.k, site.n).dequantize()
    )


_SITE_FINDERS = {
    ("com.microsoft", "MatMulNBits"): _matmulnbits_site,
    ("", "DequantizeLinear"): _dq_site,
    (CUSTOM_DOMAIN, "MatMulLowBit"): _lowbit_site,
    (CUSTOM_DOMAIN, "MatMulCodebook"): _lowbit_site,
}
_DEQUANTIZERS = {
    "MatMulNBits": _dequantize_matmulnbits,
    "DequantizeLinear": _dequantize_dq,
    "MatMulLowBit": _dequantize_lowbit,
    "MatMulCodebook": _dequantize_lowbit,
}


def quantized_sites(model: ir.Model) -> tuple[list[QuantizedSite], list[str]]:
    """Quantized linear weights of ``model`` and the nodes of our custom domain that could not be read."""
    sites: list[QuantizedSite] = []
    unknown: list[str] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        finder = _SITE_FINDERS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if finder is not None:
            site = finder(node)
            if site is not None:
                sites.append(site)
        elif node.domain == CUSTOM_DOMAIN:
            unknown.append(f"{node.name} ({node.op_type})")
    return sites, unknown


def weight_sqnr(
    sites: Sequence[QuantizedSite], reference: ir.Model, *, progress: bool = True
) -> dict[str, float]:
    """SQNR (dB) of every quantized site against the fp32 weight of the same module in ``reference``."""
    report = find_weight_sites(reference, quantize_lm_head=True)
    by_name = {s.name: s for s in report.sites}
    out: dict[str, float] = {}
    for site in tqdm(sites, desc="weight SQNR", unit="site", disable=not progress, leave=False):
        ref = by_name.get(site.name)
        if ref is None:
            raise EvaluationError(f"reference has no fp32 weight for {site.name!r} (is it the same model?)")
        if (ref.n, ref.k) != (site.n, site.k):
            raise EvaluationError(
                f"{site.name}: reference weight is [{ref.n}, {ref.k}], quantized [{site.n}, {site.k}]"
            )
        out[site.name] = sqnr_db(read_weight(reference, ref), site.dequantize())
    return out


@dataclasses.dataclass
class EvalReport:
    model: str
    perplexity: PerplexityResult | None
    model_bytes: int
    quantized_weights: int
    """Number of weights in the quantized linear layers."""
    quantized_bytes: int
    """Bytes of their codes + scales + zero points."""
    sites: int
    weight_sqnr_db: dict[str, float] = dataclasses.field(default_factory=dict)
    unreadable_sites: list[str] = dataclasses.field(default_factory=list)

    @property
    def bits_per_weight(self) -> float | None:
        return 8.0 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bits_per_weight"] = self.bits_per_weight
        finite = [v for v in self.weight_sqnr_db.values() if math.isfinite(v)]
        d["mean_weight_sqnr_db"] = float(np.mean(finite)) if finite else None
        return d


def evaluate(
    model_dir: str | Path,
    *,
    text: str | None = None,
    reference: str | Path | None = None,
    context_length: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 1,
    skip_perplexity: bool = False,
    session_config: dict[str, str] | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: bool = True,
) -> EvalReport:
    """Perplexity, size, bits per weight and (with an fp32 ``reference`` export) per-site weight SQNR."""
    loaded = load_model(model_dir)
    assert loaded.path is not None
    model = loaded.model
    sites, unknown = quantized_sites(model)
    sqnr: dict[str, float] = {}
    if reference is not None:
        sqnr = weight_sqnr(sites, load_model(reference).model, progress=progress)
    ppl = None
    if not skip_perplexity:
        session = create_session(
            loaded.path,
            uses_custom_ops=uses_custom_domain(model),
            providers=providers,
            session_config=session_config,
        )
        ppl = perplexity(
            loaded.path,
            text,
            context_length=context_length,
            max_tokens=max_tokens,
            batch_size=batch_size,
            session=session,
            progress=progress,
        )
    return EvalReport(
        model=str(model_dir),
        perplexity=ppl,
        model_bytes=model_bytes(loaded.path, model),
        quantized_weights=sum(s.weights for s in sites),
        quantized_bytes=sum(s.stored_bytes for s in sites),
        sites=len(sites),
        weight_sqnr_db=sqnr,
        unreadable_sites=unknown,
    )
