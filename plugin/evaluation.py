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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from .custom_ops import DOMAIN as CUSTOM_DOMAIN
from .custom_ops import OP_TYPES, uses_custom_domain
from .data.text import evaluation_text, load_tokenizer, special_prefix, token_stream
from .graph_passes.calibration.feeds import FeedSpec, feed_specs, make_feeds, window_capacities
from .graph_passes.errors import InvalidModelError, InvalidOptionError, UserError
from .graph_passes.fuse import fused_parts
from .graph_passes.model_io import find_model_file, load_model, read_weight
from .graph_passes.packing.base import StoredWeight, read_stored_weight
from .graph_passes.rounding.metrics import sqnr_db
from .graph_passes.sites import find_weight_sites, module_path

__all__ = [
    "CUSTOM_DOMAIN",
    "RUNTIMES",
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


RUNTIMES = ("onnxruntime", "genai")
"""Runtimes perplexity is measured through: onnxruntime directly, or onnxruntime-genai's ``og.Model``."""


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
    # Spinning worker threads burn CPU that other processes need between the many small calls of decoding.
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
    runtime: str = "onnxruntime",
    graph: ir.Graph | None = None,
) -> PerplexityResult:
    """Perplexity of the ONNX model in ``model_dir`` on ``text`` (default: the embedded evaluation split).

    See the module docstring for the exact protocol. ``tokenizer_dir`` defaults to ``model_dir``.
    ``runtime="genai"`` computes the logits through onnxruntime-genai from the folder's
    ``genai_config.json`` (its providers and session options; ``session``, ``session_config``,
    ``providers`` and ``batch_size`` do not apply). ``graph``: the model's graph when the caller has
    loaded it (read for its inputs, not loaded again).
    """
    if runtime not in RUNTIMES:
        raise InvalidOptionError(f"runtime={runtime!r}: use one of {', '.join(RUNTIMES)}")
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
    if runtime == "genai":
        from .genai import genai_logits

        logits_of = genai_logits(model_file.parent)
    else:
        if session is None:
            session = create_session(
                model_file,
                uses_custom_ops=uses_custom_domain(model_file),  # reads the graph only, not external data
                providers=providers,
                session_config=session_config,
            )
        logits_of = _session_logits(session, model_file, graph)
    total, count = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress, leave=False)
    for batch in _batches(windows, batch_size):
        for row, w in zip(logits_of(np.stack(batch)), batch, strict=True):
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


def model_feed_specs(model_file: Path, graph: ir.Graph | None = None) -> list[FeedSpec]:
    """How to feed every input of ``model_file`` (whose graph the caller may have loaded already) from
    token ids: empty caches, of window capacity where a windowed attention needs it, with the cache dims
    the graph leaves symbolic taken from the folder's genai_config.json / config.json (as calibration does)."""
    graph = graph if graph is not None else load_model(model_file).model.graph
    return feed_specs(list(graph.inputs), folder=model_file.parent, capacities=window_capacities(graph))


def _session_logits(
    session: Any, model_file: Path, graph: ir.Graph | None
) -> Callable[[np.ndarray], np.ndarray]:
    """``logits_of(ids[B, T])`` on an onnxruntime session fed the model's own inputs."""
    specs = model_feed_specs(model_file, graph)
    if "logits" not in [o.name for o in session.get_outputs()]:
        raise EvaluationError(f"{model_file} has no 'logits' output")
    return lambda ids: session.run(["logits"], make_feeds(specs, ids))[0]


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
    """One quantized linear weight found in a deployed graph, read by the packer of its format."""

    name: str
    """Module path (``model.layers.0.self_attn.q_proj``)."""
    k: int
    n: int
    stored_bytes: int
    """Bytes of codes + scales + zero points (or codebook)."""
    tensors: dict[str, ir.TensorProtocol]
    """Role -> stored tensor, as the format's packer names them (``B``/``q``, ``scales``, ...)."""
    stored: StoredWeight
    """What the packer read; ``stored.scheme`` says bits, block size and format."""
    rows: tuple[int, int] | None = None
    """The rows of ``stored`` that are this module's, when one fused node holds several modules."""

    @property
    def weights(self) -> int:
        return self.k * self.n

    def dequantize(self) -> np.ndarray:
        """The float32 ``W[N, K]`` this site computes with."""
        zp = self.tensors.get("zero_points")
        if zp is not None and zp.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            w = _float_zero_point_weight(self.stored, np.asarray(zp.numpy(), dtype=np.float32))
        else:
            w = self.stored.unpack().dequantize()
        return w if self.rows is None else w[self.rows[0] : self.rows[1]]


def _float_zero_point_weight(stored: StoredWeight, zp: np.ndarray) -> np.ndarray:
    """MatMulNBits with float zero points (onnxruntime's HQQ): ``(code - zp) * scale``, zp per block.
    A QuantizedWeight holds integer zero points only, so the codes are unpacked without them."""
    tensors = {r: t for r, t in stored.tensors.items() if r != "zero_points"}
    scheme = dataclasses.replace(stored.scheme, symmetric=True)
    qw = dataclasses.replace(stored, scheme=scheme, tensors=tensors).unpack()
    z = qw.expand(zp.reshape(stored.n, -1))
    return ((qw.codes.astype(np.float32) - z) * qw.expand(qw.scales)).astype(np.float32)


def quantized_sites(model: ir.Model) -> tuple[list[QuantizedSite], list[str]]:
    """Quantized linear weights of ``model`` and the nodes of our custom domain that could not be read."""
    sites: list[QuantizedSite] = []
    unknown: list[str] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        stored = read_stored_weight(node)
        if stored is not None:
            sites += _modules_of(stored)
        elif node.domain == CUSTOM_DOMAIN and node.op_type not in OP_TYPES:
            unknown.append(f"{node.name} ({node.op_type})")
    return sites, unknown


def _modules_of(stored: StoredWeight) -> list[QuantizedSite]:
    """One site per module: a fused node (``graph_passes/fuse.py``) holds several, row after row; its
    stored bytes are shared in proportion to the rows."""
    parts = fused_parts(stored.node) or [(stored.node.name or "", stored.n)]
    out, start = [], 0
    for name, n in parts:
        rows = None if len(parts) == 1 else (start, start + n)
        share = stored.nbytes * n // stored.n
        out.append(QuantizedSite(module_path(name), stored.k, n, share, stored.tensors, stored, rows))
        start += n
    return out


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
    reference: str | Path | None = None,
    skip_perplexity: bool = False,
    progress: bool = True,
    **perplexity_options: Any,
) -> EvalReport:
    """Perplexity, size, bits per weight and (with an fp32 ``reference`` export) per-site weight SQNR.

    ``perplexity_options`` are :func:`perplexity`'s keywords (``text``, ``context_length``, ``max_tokens``,
    ``batch_size``, ``session_config``, ``providers``).
    """
    loaded = load_model(model_dir)
    model, model_file = loaded.model, Path(loaded.path or model_dir)
    sites, unknown = quantized_sites(model)
    sqnr: dict[str, float] = {}
    if reference is not None:
        sqnr = weight_sqnr(sites, load_model(reference).model, progress=progress)
    ppl = (
        None
        if skip_perplexity
        else perplexity(model_file, progress=progress, graph=model.graph, **perplexity_options)
    )
    return EvalReport(
        model=str(model_dir),
        perplexity=ppl,
        model_bytes=model_bytes(model_file, model),
        quantized_weights=sum(s.weights for s in sites),
        quantized_bytes=sum(s.stored_bytes for s in sites),
        sites=len(sites),
        weight_sqnr_db=sqnr,
        unreadable_sites=unknown,
    )
