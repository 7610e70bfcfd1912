"""The rounding-method registry and the statistics record methods consume.

A method is a small class registered under a name (``rtn``, ``gptq``, ``adaround``, ...). It declares
which calibration statistics it needs (``needs``); the pipeline gathers exactly those (nothing for RTN,
``H = X^T X`` for the others) and calls ``quantize`` once per weight site, one weight in memory at a time.
Dispatch is by registry lookup, never by string ``if``s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import InvalidOptionError
from ..options import Options, check_keys
from ..records import QuantizedWeight
from ..scheme import QuantScheme
from . import hessian as hs

__all__ = [
    "DEFAULT_CALIB_SAMPLES",
    "FIRST_POSITION",
    "FIRST_POSITION_TOKENS",
    "METHODS",
    "ROW_ALIGN",
    "SINK_SITES",
    "MethodConfig",
    "RoundingMethod",
    "SiteStats",
    "build_method",
    "chunk_rows",
    "first_position_hessian",
    "get_method",
    "method_class",
    "method_config",
    "register_method",
    "weight_first_position",
]


FIRST_POSITION = "first_position_rows"
"""``SiteStats.extra`` key of the activations ``x_0`` at the *first* position of every calibration
sequence, float64 ``[sequences, K]`` (their ``sum x_0^T x_0`` is part of ``hessian``: see
``first_position_hessian``); ``FIRST_POSITION_TOKENS`` holds how many times they count. Kept as rows, not
as a ``K x K`` sum: a few hundred rows are far smaller than ``K^2`` for wide layers. In LLMs the first
position carries massive activations (an attention sink): on SmolLM2 up to 99.9% of trace(H) of some
down_proj inputs comes from those 32 of 8192 tokens, so methods can check a change against the other tokens
too."""
FIRST_POSITION_TOKENS = "first_position_tokens"

SINK_SITES = r"(?:^|[./_])(?:q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|Wqkv)(?:$|[./_])"
"""Default pattern (``re.search`` on the site name) of the attention input projections whose first
position ``weight_first_position`` upweights: Llama/Mistral/Qwen (q/k/v_proj), Phi-3 (qkv_proj),
GPT-NeoX/Falcon (query_key_value), GPT-2 (c_attn), MPT (Wqkv)."""


@dataclasses.dataclass
class SiteStats:
    """Calibration statistics of the activation ``X[tokens, K]`` that feeds one or more weight sites.

    ``hessian`` is the *sum* ``X^T X`` over all ``n_tokens`` calibration tokens, float64 ``[K, K]``
    (divide by ``n_tokens`` for the mean). Sites fed by the same activation share one SiteStats object.
    """

    hessian: np.ndarray | None = None
    n_tokens: int = 0
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


ROW_ALIGN = 64
"""Row chunks are multiples of this many rows (AdaRound's default row tile)."""


def chunk_rows(budget: float | None, k: int, bytes_per_weight: float, align: int = ROW_ALIGN) -> int | None:
    """Rows per chunk so that ``bytes_per_weight`` bytes per weight of ``K = k`` rows fit ``budget`` bytes:
    a multiple of ``align`` (at least one), or None (no bound) when ``budget`` is None."""
    if budget is None:
        return None
    rows = int(max(budget, 0) // max(bytes_per_weight * k, 1.0))
    return max(rows // align, 1) * align


DEFAULT_CALIB_SAMPLES = 32
"""Calibration sequences (of 256 tokens) a method gets when none are asked for and it states no other need:
GPTQ's output error changes little beyond a few thousand tokens (benchmarks/results/adaround_calibration.md)."""


@dataclasses.dataclass(frozen=True)
class MethodConfig(Options):
    """Base of every rounding method's config: its fields are the method's options (declared with
    ``option``), its class attributes say what the method needs. ``register_method(ConfigClass)`` binds it
    to the class that does the rounding; serialised as ``{type: <method name>, version, data}``."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    """Statistics required, e.g. ``frozenset({"hessian"})``; empty for data-free methods."""
    default_calib_samples: ClassVar[int] = DEFAULT_CALIB_SAMPLES
    row_bytes: ClassVar[float] = 0.0
    """Bytes per weight a row chunk holds at the method's peak (measured: benchmarks/results/scale.md);
    0 = rounds in bounded chunks of its own."""
    hessian_copies: ClassVar[float] = 0.0
    """``K x K`` float64 arrays the method holds besides the statistics it is given."""

    def fixed_bytes(self, n: int, k: int) -> int:
        """Bytes a site holds whatever the chunk size: the Hessian's working copies (float32 from
        ``hessian.WIDE_K`` inputs) and the codes (returned and referenced). The weight is read a chunk at a
        time from wherever it is (a memory-mapped file, or the caller's array)."""
        return int(self.hessian_copies * (4 if k >= hs.WIDE_K else 8) * k * k) + 2 * n * k

    def rows_within(self, memory: int | None, n: int, k: int) -> int | None:
        """Rows per chunk so that a site ``[n, k]`` fits ``memory`` bytes (None: no bound, one chunk)."""
        if memory is None or self.row_bytes <= 0:
            return None
        return chunk_rows(memory - self.fixed_bytes(n, k), k, self.row_bytes, self.row_align)

    @property
    def row_align(self) -> int:
        """Chunks are multiples of this many rows (methods that tile rows say so)."""
        return ROW_ALIGN

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.OWNER = cls.name or cls.__name__

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, "version": self.VERSION, "data": self.to_data()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodConfig:
        """Any registered method's config from its record (the ``type`` names the method)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("type"), str):
            raise InvalidOptionError(f"a method record needs a 'type' naming the method, got {d!r}")
        config_cls = method_class(d["type"])
        if d.get("version", config_cls.VERSION) != config_cls.VERSION:
            raise InvalidOptionError(
                f"{d['type']} record version {d.get('version')!r} is not supported (this version reads "
                f"{config_cls.VERSION})"
            )
        check_keys(f"method record {d['type']}", d, ("type", "version", "data"))
        return config_cls.from_data(d.get("data") or {})


class RoundingMethod(Protocol):
    """What the class registered for a MethodConfig provides: it is built as ``Impl(config)``."""

    config: MethodConfig

    def quantize(
        self,
        weight: np.ndarray,
        scheme: QuantScheme,
        stats: SiteStats | None = None,
        *,
        site: str = "?",
        memory: int | None = None,
    ) -> QuantizedWeight:
        """Quantize ``weight[N, K]`` (float32, not modified) and return codes/scales/zero points.

        ``site`` names the weight in warnings and errors (``site <name>: ...``). ``memory``: bytes the
        rounding may hold (it then works in row chunks; the result does not depend on it).

        ``QuantizedWeight.metrics`` should carry at least ``sqnr_db`` and, when a Hessian is given,
        ``proxy_loss`` = ``tr(dW H dW^T) / n_tokens`` for the returned rounding.
        """
        ...


METHODS: dict[str, type[MethodConfig]] = {}
"""Registered methods: name -> config class."""
_IMPLEMENTATIONS: dict[type[MethodConfig], Callable[[Any], RoundingMethod]] = {}
_LEGACY: dict[str, Any] = {}


def register_method(config_cls: type[MethodConfig]) -> Callable[[type], type]:
    """Class decorator binding a config class to the class that rounds:
    ``@register_method(GPTQConfig) class GPTQ: def __init__(self, config: GPTQConfig) ...``."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        _LEGACY[config_cls.name] = METHODS[config_cls.name] = config_cls  # type: ignore  # TRANSITION
        return config_cls  # type: ignore[return-value]

    def bind(impl: type) -> type:
        name = config_cls.name
        if not name or name in METHODS:
            raise ValueError(f"rounding method {name!r} has no name or is registered twice")
        METHODS[name] = config_cls
        _IMPLEMENTATIONS[config_cls] = impl
        return impl

    return bind


def method_class(name: str) -> type[MethodConfig]:
    if name not in METHODS:
        raise InvalidOptionError(
            f"unknown rounding method {name!r}; choose one of {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def method_config(name: str, options: Mapping[str, Any] | None = None) -> MethodConfig:
    """The config of method ``name`` with ``options`` (an unknown option is an error naming the accepted ones)."""
    return method_class(name).from_data(dict(options or {}))


def build_method(config: MethodConfig) -> RoundingMethod:
    """The rounding object for ``config``."""
    return _IMPLEMENTATIONS[type(config)](config)


def get_method(name: str, **options: Any) -> RoundingMethod:
    """Shorthand for ``build_method(method_config(name, options))``."""
    if name in _LEGACY:
        return _LEGACY[name](**options)
    return build_method(method_config(name, options))


def first_position_hessian(stats: SiteStats) -> np.ndarray | None:
    """``sum x_0^T x_0`` over the first positions (float64 ``[K, K]``), or None without them."""
    rows = stats.extra.get(FIRST_POSITION)
    if rows is None:
        return None
    r = np.asarray(rows, dtype=np.float64)
    return r.T @ r


def weight_first_position(stats: SiteStats, weight: float) -> SiteStats:
    """``stats`` with each sequence's first position counted ``weight`` times (a new record; ``stats``,
    which sites fed by the same activation share, is not modified).

    Why: the first position is the attention sink. Every later query attends to its key and value, so
    an error in the sink's K/V projections reaches every position's output, while ``H = X^T X`` counts
    it as one token in 256. On SmolLM2 W4 g128 GPTQ (32768 evaluation tokens), counting it 64 times in
    the q/k/v projections' objective took perplexity from 32.92 to 31.12 (fp32: 27.63).
    """
    first = first_position_hessian(stats)
    if weight == 1.0 or first is None or stats.hessian is None:
        return stats
    n_first = int(stats.extra[FIRST_POSITION_TOKENS])
    extra = dict(stats.extra)
    extra[FIRST_POSITION] = (
        np.sqrt(weight) * stats.extra[FIRST_POSITION]
    )  # rows whose x^T x is weight * first
    extra[FIRST_POSITION_TOKENS] = np.asarray(round(weight * n_first))
    return SiteStats(
        hessian=stats.hessian + (weight - 1.0) * first,
        n_tokens=stats.n_tokens + round((weight - 1.0) * n_first),
        extra=extra,
    )
