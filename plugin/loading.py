"""Load a quantized output folder for generation: ``load(out_dir)`` -> ``ORTModelForCausalLM``.

Two things a plain ``ORTModelForCausalLM.from_pretrained`` does not do for our folders:
- register the custom-op library when the graph uses our ``com.optimum.adaround`` domain (format=lowbit);
- set ``num_key_value_heads`` from the config: optimum-onnx 0.1.0 reads it only for a fixed list of model
  types; others (Phi-3) fall back to the attention-head count, which breaks GQA past-key-values.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .custom_ops import DOMAIN as CUSTOM_DOMAIN
from .graph_passes.errors import InvalidModelError, UserError

if TYPE_CHECKING:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

__all__ = ["CUSTOM_DOMAIN", "load", "session_options", "uses_custom_domain"]

# session config key that keeps ORT's DQ->MatMul fusion (MatMulNBits) on exact fp32 math when set to 0.
_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


# Options objects we registered the library on: registering twice makes session creation fail
# ("Domain already set in registry").
_REGISTERED: weakref.WeakSet[Any] = weakref.WeakSet()


def _register(so: ort.SessionOptions) -> ort.SessionOptions:
    from . import custom_ops

    if so in _REGISTERED:
        return so
    try:
        custom_ops.register(so)
    except FileNotFoundError as e:  # CustomOpsNotBuiltError
        raise UserError(f"this model needs the optimum-adaround custom-op library: {e}") from None
    _REGISTERED.add(so)
    return so


def _library_available() -> bool:
    from . import custom_ops

    try:
        custom_ops.library_path()
    except FileNotFoundError:
        return False
    return True


def session_options(
    *,
    custom_ops: bool | None = None,
    accuracy_level: int | None = None,
    config_entries: dict[str, str] | None = None,
    **attributes: Any,
) -> ort.SessionOptions:
    """``onnxruntime.SessionOptions`` ready for our models.

    ``custom_ops``: register the custom-op library (True: required, error if it is not built; None: when it
    is built; False: never). ``attributes`` are set on the options object (``intra_op_num_threads=2``,
    ``graph_optimization_level=...``); ``accuracy_level`` sets ORT's MatMulNBits accuracy level for fused
    QDQ graphs (0 = exact fp32, 4 = int8 activations, faster); ``config_entries`` go to
    ``add_session_config_entry``.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in attributes.items():
        if key.startswith("_") or not hasattr(so, key):
            raise UserError(f"session_options: onnxruntime.SessionOptions has no attribute {key!r}")
        setattr(so, key, value)
    entries = dict(config_entries or {})
    if accuracy_level is not None:
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"session_options: accuracy_level={accuracy_level!r}, use 0..4")
        entries[_ACCURACY_KEY] = str(accuracy_level)
    for key, value in entries.items():
        so.add_session_config_entry(key, str(value))
    if custom_ops or (custom_ops is None and _library_available()):
        _register(so)
    return so


def uses_custom_domain(model_path: str | Path) -> bool:
    """Whether the ONNX file uses an op of our custom-op domain (read without its external data)."""
    from . import custom_ops

    return bool(custom_ops.uses_custom_domain(Path(model_path)))


def _pick_onnx_file(folder: Path, file_name: str | None) -> str:
    if file_name is not None:
        if not (folder / file_name).is_file():
            raise InvalidModelError(f"{folder / file_name} does not exist")
        return file_name
    if (folder / "model.onnx").is_file():
        return "model.onnx"
    found = sorted(p.name for p in folder.glob("*.onnx"))
    if len(found) != 1:
        what = "no .onnx file" if not found else f"several .onnx files ({', '.join(found)}); pass file_name="
        raise InvalidModelError(f"{folder}: {what}")
    return found[0]


def _fix_kv_heads(model: Any) -> None:
    config = model.config
    heads = getattr(config, "num_key_value_heads", None)
    if heads is None and hasattr(config, "text_config"):
        heads = getattr(config.text_config, "num_key_value_heads", None)
    if heads:
        model.num_key_value_heads = int(heads)


def load(
    out_dir: str | Path,
    *,
    file_name: str | None = None,
    provider: str = "CPUExecutionProvider",
    session_options: ort.SessionOptions | None = None,
    **kwargs: Any,
) -> ORTModelForCausalLM:
    """Open a folder written by ``quantize``/``export`` as an ``ORTModelForCausalLM`` ready to ``generate``.

    ``kwargs`` go to ``ORTModelForCausalLM.from_pretrained`` (``use_cache``, ``provider_options``...).
    """
    folder = Path(out_dir)
    if not folder.is_dir():
        raise InvalidModelError(f"{folder} is not a folder (expected the output folder of quantize/export)")
    if not (folder / "config.json").is_file():
        raise InvalidModelError(
            f"{folder} has no config.json: load() needs the folder written by quantize/export"
        )
    name = _pick_onnx_file(folder, file_name)
    needs_ops = uses_custom_domain(folder / name)
    so = (
        session_options
        if session_options is not None
        else globals()["session_options"](custom_ops=needs_ops or None)
    )

    from optimum.onnxruntime import ORTModelForCausalLM

    def open_model() -> ORTModelForCausalLM:
        return ORTModelForCausalLM.from_pretrained(
            folder, file_name=name, provider=provider, session_options=so, **kwargs
        )

    if needs_ops and so not in _REGISTERED:
        # Options built elsewhere may or may not carry the library already (registering twice fails):
        # try as given, register only if onnxruntime does not know our ops.
        try:
            model = open_model()
        except Exception as e:
            if CUSTOM_DOMAIN not in str(e) and "not a registered" not in str(e):
                raise
            _register(so)
            model = open_model()
    else:
        model = open_model()
    _fix_kv_heads(model)
    return model
