"""Atomic output folders and ``quantization_config.json``.

Everything is written into a temporary sibling of the output folder and renamed into place at the very
end, so a failure or Ctrl-C leaves nothing where the output should be (and an existing output, replaced
with ``overwrite``, stays intact until the new one is complete). The input is never written to.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .graph_passes.errors import OutputPathError

__all__ = [
    "CONFIG_NAME",
    "CONFIG_VERSION",
    "COPIED_FILES",
    "RECIPE_NAME",
    "atomic_output",
    "check_output_path",
    "copy_side_files",
    "library_versions",
    "write_output",
    "write_quantization_config",
]

CONFIG_NAME = "quantization_config.json"
RECIPE_NAME = "quantization_recipe.yaml"
"""The run's QuantConfig as a recipe file: ``--recipe OUT/quantization_recipe.yaml`` repeats the run."""
CONFIG_VERSION = 1

# Files of an exported folder that a quantized copy needs besides the model (tokenizer and configs).
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def check_output_path(
    output: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False
) -> Path:
    """Validate ``output`` against the inputs; return it resolved.

    Refuses: an output equal to or inside an input folder (or equal to an input file or its folder),
    an input inside the output when overwriting (it would be deleted), an existing file, and an
    existing non-empty folder unless ``overwrite``.
    """
    out = Path(output).expanduser().resolve()
    for item in inputs:
        src = Path(item).expanduser().resolve()
        if src.is_dir() and _is_within(out, src):
            raise OutputPathError(
                f"output {output} is the input folder {src} or inside it: choose a folder outside it"
            )
        if not src.is_dir() and out in (src, src.parent):
            raise OutputPathError(f"output {output} is the input {src} or its folder: choose another folder")
        if overwrite and _is_within(src, out):
            raise OutputPathError(
                f"output {output} contains the input {item}: overwriting it would delete the input"
            )
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output {output} exists and is a file: give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputPathError(
            f"output {output} exists and is not empty: pass overwrite=True / --overwrite to replace it"
        )
    return out


@contextlib.contextmanager
def atomic_output(
    output: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes ``output``, on any failure it is removed."""
    out = check_output_path(output, inputs, overwrite)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise _write_error(output, e) from e
    try:
        yield tmp
        if out.exists():
            # Move the old output aside first so that at every instant either it or the new one is in place.
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the old output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:  # full disk, permissions, quota: the user's to fix, so a one-line UserError
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(output, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_error(output: str | os.PathLike, e: OSError) -> OutputPathError:
    where = f" at {e.filename}" if e.filename else ""
    return OutputPathError(
        f"writing the output {output} failed ({e.strerror or e}{where}): free space or choose another "
        "folder; nothing was written"
    )


def copy_side_files(
    src_folder: Path, dst_folder: Path, model: Any = None, model_file: str | None = None
) -> list[str]:
    """Copy config, generation config and tokenizer files of an exported folder; return their names. Given
    the quantized ``model`` (an ``ir.Model``) and its file name, ``genai_config.json`` is copied and updated
    or written for it too, where onnxruntime-genai can run it (``genai.write_genai_config``; with our op
    library beside it when the model uses our ops)."""
    copied = []
    for name in COPIED_FILES:
        f = src_folder / name
        if f.is_file():
            shutil.copy2(f, dst_folder / name)
            copied.append(name)
    if model is not None and model_file is not None:
        from .genai import write_genai_config

        copied += write_genai_config(src_folder, dst_folder, model, model_file)
    return copied


def library_versions() -> dict[str, str]:
    """Versions of the tool and the libraries that shaped the output (missing ones are left out)."""
    versions = {"python": platform.python_version()}
    for dist in (
        "optimum-adaround",
        "onnx",
        "onnx-ir",
        "onnxruntime",
        "onnxruntime-gpu",
        "numpy",
        "optimum",
        "optimum-onnx",
        "transformers",
        "torch",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def _json_default(obj: Any) -> Any:
    """NumPy scalars/arrays and paths in reports become plain JSON values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_quantization_config(folder: Path, report: dict[str, Any]) -> Path:
    """Write ``quantization_config.json`` (versioned) with ``report`` plus tool/library versions and a date."""
    record = {
        "type": "optimum-adaround.QuantizationConfig",
        "version": CONFIG_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **report,
    }
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return path


def write_output(
    output: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    overwrite: bool,
    fill: Callable[[Path], dict[str, Any]],
    after: Callable[[Path], Any] | None = None,
) -> Path:
    """The one output writer: ``fill(tmp)`` writes the model files into a temporary sibling and returns the
    record; the record (``quantization_config.json``) and the config as a recipe file are written once,
    then ``after(tmp)`` may add what reads them (the model card), and the folder is committed atomically
    (rolled back on any failure). Returns the output path."""
    with atomic_output(output, inputs, overwrite) as tmp:
        record = fill(tmp)
        if "config" in record:
            from .recipes import save_config

            save_config(record["config"], tmp / RECIPE_NAME)
            record["recipe_file"] = RECIPE_NAME
        write_quantization_config(tmp, record)
        if after is not None:
            after(tmp)
    return Path(output)
