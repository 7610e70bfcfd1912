"""One-line export: a Hugging Face model (local folder or Hub id) -> quantized ONNX folder ready to publish.

``export`` = Optimum's ``main_export`` into a temporary folder -> ``api.quantize`` (once per recipe override
group, then once for the rest) -> recipe, evaluation, extended ``quantization_config.json`` and model card ->
one rename into place. Nothing is left behind on error or Ctrl-C: all work happens in temporary siblings of
the output folder, and an existing output folder is replaced only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .graph_passes.errors import InvalidModelError, NoQuantizableWeightsError, OutputPathError
from .graph_passes.scheme import QuantScheme
from .model_card import EVAL_FILE_NAME, folder_size_bytes, infer_base_model, source_license, write_model_card
from .recipes import RECIPE_FILE_NAME, Recipe, RecipeError, resolve_recipe, save_recipe

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


# -- output folder handling ------------------------------------------------------------------------------------
def _check_output(output: Path, source: Path | None, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise OutputPathError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputPathError(
            f"output folder {output} is not empty: pass overwrite=True (--overwrite) to replace it"
        )
    if source is not None:
        out, src = output.resolve(), source.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise OutputPathError(
                f"output {output} must not be the model folder {source}, inside it, or contain it"
            )


@contextlib.contextmanager
def _temp_sibling(output: Path, tag: str) -> Iterator[Path]:
    """A temporary folder next to ``output`` (same filesystem, so the final rename is atomic), always removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.{tag}-", dir=output.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_folder(new: Path, output: Path) -> None:
    """Move the finished ``new`` folder to ``output``, replacing an existing one only at the very end."""
    if output.exists():
        trash = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, trash)
        os.replace(new, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, output)


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
def _merge_recipe(
    recipe: Recipe | None, scheme: str | QuantScheme | None, method: str | None, kw: dict[str, Any]
) -> Recipe:
    base = recipe or Recipe()
    changes: dict[str, Any] = {}
    if scheme is not None:
        if isinstance(scheme, QuantScheme):
            changes["scheme"] = scheme.label
            kw.setdefault("format", scheme.format.value)
        else:
            changes["scheme"] = str(scheme)
    if method is not None:
        changes["method"] = method
    recipe_keys = set(Recipe().to_dict()) - {"version", "name", "overrides"}
    for key in list(kw):
        if key == "calib_data" and kw[key] is not None and not isinstance(kw[key], (str, os.PathLike)):
            continue  # token ids given as an array: passed to quantize as is, not a recipe value
        if key in recipe_keys and kw[key] is not None:
            value = kw.pop(key)
            if key in ("include", "exclude"):
                value = tuple(value)
            changes[key] = str(value) if key == "calib_data" else value
        elif key in recipe_keys:
            kw.pop(key)
    if changes and recipe is not None and recipe.name:
        changes["name"] = f"{recipe.name} (modified)"
    try:
        return base.replace(**changes)
    except TypeError as e:
        raise RecipeError(str(e)) from None


def _preflight(recipe: Recipe) -> None:
    """Fail on an unknown method / bad method options / bad scheme+format before minutes of Optimum export."""
    from .api import resolve_scheme
    from .graph_passes.errors import UnsupportedSchemeError
    from .graph_passes.packing.base import get_packer
    from .graph_passes.rounding.base import get_method

    for label in (recipe.scheme, *(o.scheme for o in recipe.overrides)):
        scheme = resolve_scheme(label, recipe.format)
        # a shape every block size divides: only scheme-level limits can fail here (per-site checks come later)
        reason = get_packer(scheme.format).supports(scheme, 4096, 64)
        if reason is not None:
            raise UnsupportedSchemeError(f"scheme {label} as format={scheme.format.value}: {reason}")
    get_method(recipe.method, **dict(recipe.method_options))


def _run_quantize(src: Path, dest: Path, recipe: Recipe, extra: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Quantize ``src`` into ``dest`` (must not exist), one pass per override then one for the rest.

    Each pass reads the previous pass's output; already-quantized layers are no longer MatMul/Gemm with a
    float weight, so later passes leave them alone. Returns the quantization_config of every pass.
    """
    from .api import quantize

    base = recipe.quantize_kwargs()
    passes: list[tuple[str | None, dict[str, Any]]] = []
    taken: list[str] = []
    for o in recipe.overrides:
        passes.append(
            (
                o.pattern,
                {**base, "scheme": o.scheme, "include": (o.pattern,), "exclude": (*recipe.exclude, *taken)},
            )
        )
        taken.append(o.pattern)
    passes.append((None, {**base, "exclude": (*recipe.exclude, *taken)}))

    configs: list[dict[str, Any]] = []
    current = src
    with contextlib.ExitStack() as stack:
        for i, (pattern, kw) in enumerate(passes):
            last = i == len(passes) - 1
            out = dest if last else stack.enter_context(_temp_sibling(dest, f"pass{i}")) / "out"
            try:
                quantize(current, out, **{**kw, **extra})
            except NoQuantizableWeightsError as e:
                if pattern is not None:
                    raise NoQuantizableWeightsError(
                        f"recipe override {pattern!r} matches no quantizable layer ({e})"
                    ) from None
                if not taken:
                    raise
                # every layer was taken by an override: the last pass has nothing left, just copy through
                shutil.copytree(current, out)
            configs.append(_read_json(out / "quantization_config.json"))
            current = out
    return configs


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _calib_tokens_hash(recipe: Recipe, model_dir: Path, given: Any = None) -> str | None:
    """sha256 of the calibration token ids (same sampler and arguments as quantize); None for data-free methods."""
    from .graph_passes.rounding import base

    factory = base.METHODS.get(recipe.method)
    if factory is None or not getattr(factory, "needs", frozenset()):
        return None
    import numpy as np

    from .data.text import calibration_token_ids

    if given is not None:  # token ids passed by the caller
        return hashlib.sha256(np.ascontiguousarray(given, dtype=np.int64).tobytes()).hexdigest()
    tokens = calibration_token_ids(
        model_dir, recipe.calib_data, recipe.samples, recipe.seq_len, seed=recipe.seed
    )
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def _extend_qconfig(
    folder: Path,
    *,
    source: str,
    task: str | None,
    recipe: Recipe,
    passes: list[dict[str, Any]],
    tokens_sha: str | None,
) -> None:
    """Add what quantize cannot know (the model it came from, calibration hash, override passes); keep the rest."""
    path = folder / "quantization_config.json"
    qconfig = _read_json(path)
    src = dict(qconfig.get("source") or {})
    if task is not None:  # quantize saw only our temporary export folder: record the real source instead
        src.update(model=source, path=None, exported_by="optimum main_export", task=task)
    else:
        src.setdefault("model", source)
    qconfig["source"] = src
    calib = qconfig.get("calibration")
    if isinstance(calib, dict) and tokens_sha is not None:
        calib.setdefault("tokens_sha256", tokens_sha)
    qconfig["recipe_file"] = RECIPE_FILE_NAME
    if len(passes) > 1:
        # quantize wrote the last pass only: list every pass's sites (with their scheme) as one model
        qconfig["override_passes"] = [
            {"pattern": o.pattern, "scheme": o.scheme, "sites": [s.get("name") for s in cfg.get("sites", [])]}
            for o, cfg in zip(recipe.overrides, passes[:-1], strict=False)
        ]
        earlier = [
            {**site, "scheme": o.scheme}
            for o, cfg in zip(recipe.overrides, passes[:-1], strict=False)
            for site in cfg.get("sites", [])
        ]
        last = [{**site, "scheme": recipe.scheme} for site in qconfig.get("sites", [])]
        qconfig["sites"] = earlier + last
        qconfig["n_sites"] = len(qconfig["sites"])
        # the last pass reports the earlier passes' nodes as "already quantized": they are listed above
        qconfig["skipped"] = [
            s
            for s in qconfig.get("skipped", [])
            if not str(s.get("reason", "")).startswith("already quantized")
        ]
    path.write_text(json.dumps(qconfig, indent=2, default=str) + "\n", encoding="utf-8")


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
    scheme: str | QuantScheme | None = None,
    method: str | None = None,
    *,
    task: str = DEFAULT_TASK,
    opset: int | None = None,
    recipe: str | Path | Mapping[str, Any] | Recipe | None = None,
    eval: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    trust_remote_code: bool = False,
    export_options: Mapping[str, Any] | None = None,
    eval_options: Mapping[str, Any] | None = None,
    **quantize_kwargs: Any,
) -> Path:
    """Export ``model_id_or_path`` with Optimum and quantize it into ``output_dir``; returns the folder.

    ``scheme`` (default ``w4-g128``) and ``method`` (default ``adaround``) override the recipe's, as do
    ``quantize_kwargs`` (``calib_data``, ``calib_samples``, ``exclude``, ``format``, ``device``...). ``recipe``
    is a preset name (``w4-g128-gptq``...), a YAML/JSON file, a mapping or a Recipe. A folder that already
    holds ``model.onnx`` is quantized directly (no Optimum export). ``eval=True`` measures perplexity before and
    after and puts it in the model card; ``push_to_hub="user/name"`` uploads the finished folder.
    """
    output = Path(output_dir).expanduser()
    extra = dict(
        quantize_kwargs
    )  # _merge_recipe moves the recipe's keys out; the rest goes to quantize as is
    merged = _merge_recipe(resolve_recipe(recipe), scheme, method, extra)
    _preflight(merged)
    extra.pop("overwrite", None)
    model, local_only = resolve_source(model_id_or_path, trust_remote_code=trust_remote_code)
    local = Path(model) if Path(model).is_dir() else None
    _check_output(output, local, overwrite)
    onnx_input = local is not None and _is_onnx_folder(local)
    if not onnx_input:
        _check_config(model, local_files_only=local_only, trust_remote_code=trust_remote_code)
    if opset is None and merged.format == "qdq":
        opset = _QDQ_MIN_OPSET

    with _temp_sibling(output, "export") as work:
        if local is not None and onnx_input:
            exported: Path = local
        else:
            exported = work / "onnx"
            _optimum_export(
                model, exported, task=task, opset=opset, local_files_only=local_only,
                trust_remote_code=trust_remote_code, **dict(export_options or {}),
            )  # fmt: skip
        staged = work / "quantized"
        passes = _run_quantize(exported, staged, merged, extra)
        save_recipe(merged, staged / RECIPE_FILE_NAME)
        calib = _read_json(staged / "quantization_config.json").get("calibration")
        tokens_sha = (
            _calib_tokens_hash(merged, exported, extra.get("calib_data"))
            if isinstance(calib, dict) and "tokens_sha256" not in calib  # quantize may record it itself
            else None
        )
        _extend_qconfig(
            staged, source=str(model_id_or_path), task=None if onnx_input else task, recipe=merged,
            passes=passes, tokens_sha=tokens_sha,
        )  # fmt: skip
        if eval:
            record = _evaluate(exported, staged, dict(eval_options or {}))
            (staged / EVAL_FILE_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        write_model_card(
            staged,
            base_model=infer_base_model(model_id_or_path),
            license=source_license(local),
            original_size_bytes=folder_size_bytes(exported),
            command=_command_line(model_id_or_path, output, merged, task=task, eval=eval),
        )
        _replace_folder(staged, output)
    if push_to_hub:
        from .hub import push_to_hub as _push

        _push(output, push_to_hub)
    return output


def _command_line(model: Any, output: Path, recipe: Recipe, *, task: str, eval: bool) -> str:
    s = QuantScheme.parse(recipe.scheme)
    parts = [
        "optimum-cli export onnx-quant",
        f"--model {model}",
        f"--task {task}" if task != DEFAULT_TASK else "",
        f"--weight-bits {s.bits} --group-size {s.group_size} {'--sym' if s.symmetric else '--asym'}",
        f"--method {recipe.method}",
        f"--format {recipe.format}" if recipe.format else "",
        f"--calib-data {recipe.calib_data}" if recipe.calib_data else "",
        f"--calib-samples {recipe.samples} --seq-len {recipe.seq_len}",
        *(f"--exclude '{x}'" for x in recipe.exclude),
        "--recipe quantization_recipe.yaml" if recipe.overrides else "",
        "--eval" if eval else "",
        output.name,
    ]
    return " ".join(p for p in parts if p)
