"""Load a quantized output folder for generation: ``load(out_dir)`` -> ``ORTModelForCausalLM``.

Two things a plain ``ORTModelForCausalLM.from_pretrained`` does not do for our folders:
- register the custom-op library when the graph uses our ``com.optimum.adaround`` domain (format=lowbit);
- set ``num_key_value_heads`` from the config: optimum-onnx 0.1.0 only reads it for a fixed list of model
  types (Phi-3 and gemma3_text fall back to the attention-head count, which breaks their GQA past-key-values).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .graph_passes.errors import InvalidModelError, UserError

if TYPE_CHECKING:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

__all__ = ["CUSTOM_DOMAIN", "load", "session_options", "uses_custom_domain"]

CUSTOM_DOMAIN = "com.optimum.adaround"

# session config key that keeps ORT's DQ->MatMul fusion (MatMulNBits) on exact fp32 math when set to 0.
_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


def _custom_ops() -> Any | None:
    try:
        from . import custom_ops
    except ImportError:  # pragma: no cover - the loader is part of the package; guard a broken build anyway
        return None
    return custom_ops


def session_options(
    *, accuracy_level: int | None = None, config_entries: dict[str, str] | None = None, **attributes: Any
) -> ort.SessionOptions:
    """``onnxruntime.SessionOptions`` with our custom ops registered when the library is available.

    ``attributes`` are set on the options object (``intra_op_num_threads=2``, ``graph_optimization_level=...``);
    ``accuracy_level`` sets ORT's MatMulNBits accuracy level for fused QDQ graphs (0 = exact fp32, 4 = int8
    activations, faster); ``config_entries`` are passed to ``add_session_config_entry``.
    """
    import onnxruntime as ort

    ops = _custom_ops()
    factory = getattr(ops, "session_options", None)
    so: ort.SessionOptions = factory() if callable(factory) else ort.SessionOptions()
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
    return so


def uses_custom_domain(model_path: str | Path) -> bool:
    """Whether the ONNX file imports our custom-op domain (checked without loading weights)."""
    ops = _custom_ops()
    check = getattr(ops, "uses_custom_domain", None)
    if callable(check):
        return bool(check(model_path))
    import onnx_ir as ir

    # Fallback while custom_ops has no helper: onnx-ir leaves external data on disk (memory-mapped).
    return CUSTOM_DOMAIN in ir.load(str(model_path)).opset_imports


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
    so = session_options if session_options is not None else globals()["session_options"]()
    if uses_custom_domain(folder / name):
        ops = _custom_ops()
        register = getattr(ops, "register", None)
        if not callable(register):
            raise UserError(
                f"{folder / name} uses custom ops ({CUSTOM_DOMAIN}) but optimum.adaround.custom_ops cannot "
                "register them: build the op library (pip install with the CMake build) first"
            )
        register(so)  # idempotent for options made by custom_ops.session_options()

    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(
        folder, file_name=name, provider=provider, session_options=so, **kwargs
    )
    _fix_kv_heads(model)
    return model
