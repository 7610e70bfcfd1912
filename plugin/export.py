"""One-line export: a Hugging Face model (local folder or Hub id) -> quantized ONNX folder ready to publish.

``export`` = Optimum's ``main_export`` into a temporary folder -> ``api.quantize_into`` inside the one output
writer (``output.write_output``), which adds the evaluation and the model card before the folder is renamed
into place. Nothing is left behind on error or Ctrl-C: all work happens in temporary siblings of the output
folder, and an existing output folder is replaced only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .graph_passes.config import QuantConfig
from .graph_passes.errors import InvalidModelError, InvalidOptionError, UnsupportedSchemeError
from .graph_passes.scheme import WeightFormat
from .model_card import EVAL_FILE_NAME, folder_size_bytes, infer_base_model, source_license, write_model_card
from .output import RECIPE_NAME, check_output_path, write_output
from .recipes import ConfigLike

__all__ = ["DEFAULT_TASK", "export", "resolve_source"]

DEFAULT_TASK = "text-generation-with-past"
_QDQ_MIN_OPSET = 21  # blockwise DequantizeLinear (block_size attribute) needs opset >= 21


# -- model source -------------------------------------------------------------------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_source(model_id_or_path: str | Path, *, trust_remote_code: bool = False) -> tuple[str, bool]:
    """Return ``(model, local_files_only)`` for Optimum, or raise a one-line UserError.

    Local folders are used as they are; a Hub id must already be in the local cache or the Hub must be
    reachable (checked up front: huggingface_hub would otherwise retry for ~25 s and print tracebacks).
    """
    text = str(model_id_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise InvalidModelError(
            f"{text} is a file: pass the model folder (with config.json), or a Hub model id"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1
    try:
        validate_repo_id(text)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise InvalidModelError(f"{text}: no such folder, and it is not a Hugging Face Hub model id either")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(text, local_files_only=True, trust_remote_code=trust_remote_code)
        return text, True  # in the local Hub cache: export works offline
    except Exception:  # any failure here only means "not cached"
        pass
    if not _hub_reachable():
        raise InvalidModelError(
            f"{text!r} is not a local folder nor in the Hugging Face cache, and the Hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1): download the model elsewhere and pass its folder"
        )
    return text, False


def _check_config(model: str, *, local_files_only: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            model, local_files_only=local_files_only, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # transformers raises ValueError/OSError/KeyError with long multi-line texts
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidModelError(f"{model}: cannot read the model config ({first})") from None


def _is_onnx_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model.onnx").is_file()


# -- work folder ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _temp_sibling(output: Path, tag: str) -> Iterator[Path]:
    """A temporary folder next to ``output`` (same filesystem, so the final rename is atomic), always removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.{tag}-", dir=output.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- optimum export ---------------------------------------------------------------------------------------------
def _optimum_export(
    model: str, dest: Path, *, task: str, opset: int | None, local_files_only: bool, **kw: Any
) -> None:
    from optimum.exporters.onnx import main_export

    try:
        main_export(model, dest, task=task, opset=opset, local_files_only=local_files_only, **kw)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        # Optimum reports unsupported architectures / tasks as ValueError or KeyError with a long text.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidModelError(f"Optimum cannot export {model} for task {task}: {first}") from None
    if not (dest / "model.onnx").is_file():
        made = ", ".join(sorted(p.name for p in dest.glob("*.onnx"))) or "no ONNX file"
        raise InvalidModelError(
            f"Optimum exported {made} for {model}, expected a single model.onnx (task {task})"
        )


# -- quantization -----------------------------------------------------------------------------------------------
def _preflight(config: QuantConfig) -> None:
    """Fail on a scheme no format can store before minutes of Optimum export."""
    from .graph_passes.packing.base import get_packer
    from .graph_passes.pipeline import choose_format

    for o in (None, *config.selection.overrides):
        scheme = config.scheme if o is None else config.with_overrides(scheme=o.scheme).scheme
        # a shape every block size divides: only scheme-level limits can fail here (per-site checks come later)
        chosen = choose_format(scheme, [(4096, 64)])
        reason = get_packer(chosen.format).supports(chosen, 4096, 64)
        if reason is not None:
            raise UnsupportedSchemeError(f"scheme {scheme.label} as format={chosen.format.value}: {reason}")


def _source_record(record: dict[str, Any], source: str, task: str | None) -> None:
    """Add what quantize cannot know: the model it came from."""
    src = dict(record.get("source") or {})
    if task is not None:  # quantize saw only our temporary export folder: record the real source instead
        src.update(model=source, path=None, exported_by="optimum main_export", task=task)
    else:
        src.setdefault("model", source)
    record["source"] = src


# -- evaluation -------------------------------------------------------------------------------------------------
def _evaluate(original: Path, quantized: Path, eval_options: Mapping[str, Any]) -> dict[str, Any]:
    """Perplexity of both models on the same text (the evaluation module's protocol) + size/bpw/SQNR."""
    from .evaluation import evaluate

    opts = {k: v for k, v in eval_options.items() if v is not None}
    dataset = opts.pop("dataset", None)
    sqnr = bool(opts.pop("sqnr", False))  # per-site weight SQNR against the fp32 export (slower)
    if dataset is not None:
        from .data.text import evaluation_text

        opts["text"] = evaluation_text(dataset)
    before = evaluate(original, **opts).to_dict()
    after = evaluate(quantized, reference=original if sqnr else None, **opts).to_dict()
    return {
        "dataset": str(dataset) if dataset is not None else "wikipedia (embedded evaluation split)",
        "original": before,
        "quantized": after,
    }


# -- the one-liner ----------------------------------------------------------------------------------------------
def export(
    model_id_or_path: str | Path,
    output_dir: str | Path,
    config: ConfigLike = None,
    *,
    task: str = DEFAULT_TASK,
    opset: int | None = None,
    recipe: ConfigLike = None,
    eval: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    trust_remote_code: bool = False,
    export_options: Mapping[str, Any] | None = None,
    eval_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Export ``model_id_or_path`` with Optimum and quantize it into ``output_dir``; returns the folder.

    ``config`` (or ``recipe``, the same thing): a QuantConfig, preset name (``w4-g128-gptq``...), recipe
    file or mapping; ``overrides``: any quantization option by its flat name, as for ``quantize``. A folder
    that already holds ``model.onnx`` is quantized directly (no Optimum export). ``eval=True`` measures
    perplexity before and after and puts it in the model card; ``push_to_hub="user/name"`` uploads the
    finished folder.
    """
    from .api import quantize_into, run_config
    from .run_inputs import pop_token_ids

    if config is not None and recipe is not None:
        raise InvalidOptionError("give config or recipe, not both (they are the same thing)")
    token_ids = pop_token_ids(overrides)
    cfg = run_config(config if config is not None else recipe, **overrides)
    _preflight(cfg)
    output = Path(output_dir).expanduser()
    model, local_only = resolve_source(model_id_or_path, trust_remote_code=trust_remote_code)
    local = Path(model) if Path(model).is_dir() else None
    check_output_path(output, [local] if local is not None else [], overwrite)
    onnx_input = local is not None and _is_onnx_folder(local)
    if not onnx_input:
        _check_config(model, local_files_only=local_only, trust_remote_code=trust_remote_code)
    if opset is None and cfg.scheme.format is WeightFormat.QDQ:
        opset = _QDQ_MIN_OPSET

    with _temp_sibling(output, "export") as work:
        exported: Path = local if (local is not None and onnx_input) else work / "onnx"
        if exported != local:
            _optimum_export(
                model, exported, task=task, opset=opset, local_files_only=local_only,
                trust_remote_code=trust_remote_code, **dict(export_options or {}),
            )  # fmt: skip

        def finish(folder: Path, record: dict[str, Any]) -> None:
            _source_record(record, str(model_id_or_path), None if onnx_input else task)
            if eval:
                result = _evaluate(exported, folder, dict(eval_options or {}))
                (folder / EVAL_FILE_NAME).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

        def card(folder: Path) -> None:
            write_model_card(
                folder,
                base_model=infer_base_model(model_id_or_path),
                license=source_license(local),
                original_size_bytes=folder_size_bytes(exported),
                command=_command_line(model_id_or_path, output, cfg, task=task, eval=eval),
            )

        def fill(folder: Path) -> dict[str, Any]:
            return quantize_into(folder, exported, cfg, progress=progress, token_ids=token_ids, extend=finish)

        write_output(output, [local] if local is not None else [], overwrite, fill, card)
    if push_to_hub:
        from .hub import push_to_hub as _push

        _push(output, push_to_hub)
    return output


def _command_line(model: Any, output: Path, config: QuantConfig, *, task: str, eval: bool) -> str:
    """The optimum-cli command that repeats this export (with its recipe file for everything else)."""
    s = config.scheme
    parts = [
        "optimum-cli export onnx-quant",
        f"--model {model}",
        f"--task {task}" if task != DEFAULT_TASK else "",
        f"--weight-bits {s.bits} --group-size {s.group_size} {'--sym' if s.symmetric else '--asym'}",
        f"--method {config.method.name}",
        f"--format {s.format.value}",
        f"--recipe {RECIPE_NAME}",
        "--eval" if eval else "",
        output.name,
    ]
    return " ".join(p for p in parts if p)
