"""Model card (README.md with YAML front matter) for a quantized output folder.

Every number in the card is measured: model size and bits per weight of the quantized layers (codes +
scales + zero points counted on the graph by the evaluation module), and the perplexities of
``eval_results.json`` when the export ran with ``--eval``. Nothing is estimated from the scheme alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "EVAL_FILE_NAME",
    "build_model_card",
    "fmt_mb",
    "fmt_num",
    "folder_size_bytes",
    "infer_base_model",
    "measure",
    "perplexity_of",
    "read_front_matter",
    "source_license",
    "write_model_card",
]

EVAL_FILE_NAME = "eval_results.json"
_MODEL_FILE_SUFFIXES = (".onnx", ".onnx_data", ".onnx.data")


def folder_size_bytes(folder: str | Path) -> int:
    """Bytes of the ONNX model files (graph + external data) in ``folder``."""
    return sum(
        p.stat().st_size
        for p in Path(folder).iterdir()
        if p.is_file() and p.name.endswith(_MODEL_FILE_SUFFIXES)
    )


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a README (``---`` ... ``---``), or {} when there is none or it is malformed."""
    import yaml

    m = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_license(source: str | Path | None) -> str | None:
    """License of the source model when known: its README front matter, else a ``license`` key in config.json."""
    if source is None:
        return None
    folder = Path(source)
    if not folder.is_dir():
        return None
    readme = folder / "README.md"
    if readme.is_file():
        lic = read_front_matter(readme.read_text(encoding="utf-8", errors="replace")).get("license")
        if isinstance(lic, str) and lic:
            return lic
    config = folder / "config.json"
    if config.is_file():
        try:
            lic = json.loads(config.read_text(encoding="utf-8")).get("license")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(lic, str) and lic:
            return lic
    return None


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def infer_base_model(source: str | Path | None) -> str | None:
    """The Hub id of the source model, or None when it cannot be known (the Hub rejects a card whose
    ``base_model`` is not a model id, so a local folder name is never used).

    A Hub id is used as is; a folder inside the Hub cache (``models--org--name/snapshots/...``) gives
    ``org/name``; otherwise the folder's config ``_name_or_path`` when it is a Hub id.
    """
    if source is None:
        return None
    text = str(source)
    path = Path(text)
    if not path.exists():
        return text if _is_repo_id(text) else None
    for part in path.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            candidate = "/".join(part[len("models--") :].split("--", 1))
            if _is_repo_id(candidate):
                return candidate
    config = _read_json(path / "config.json") if path.is_dir() else {}
    name = config.get("_name_or_path")
    return name if isinstance(name, str) and _is_repo_id(name) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _scheme_of(qconfig: Mapping[str, Any]) -> dict[str, Any]:
    scheme = qconfig.get("scheme", {})
    if isinstance(scheme, Mapping) and "data" in scheme:  # QuantScheme.to_dict() record
        scheme = scheme["data"]
    return dict(scheme) if isinstance(scheme, Mapping) else {}


def _method_of(qconfig: Mapping[str, Any]) -> str:
    method = qconfig.get("method", "unknown")
    if isinstance(method, Mapping):  # {"name": ..., "options": ...}
        method = method.get("name", "unknown")
    return str(method)


def fmt_mb(n: Any) -> str:
    """How sizes appear in the card (tests compare the card with eval_results.json through this)."""
    return f"{n / 1e6:,.2f} MB" if isinstance(n, (int, float)) else "-"


def fmt_num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def perplexity_of(report: Mapping[str, Any]) -> float | None:
    """The perplexity value of an ``EvalReport.to_dict()`` (None when it was not measured)."""
    ppl = report.get("perplexity")
    return ppl.get("perplexity") if isinstance(ppl, Mapping) else None


def measure(folder: str | Path) -> dict[str, Any]:
    """Size and bits per weight of the model in ``folder`` (no perplexity), from the evaluation module."""
    from .evaluation import evaluate

    return evaluate(folder, skip_perplexity=True, progress=False).to_dict()


def _group(scheme: Mapping[str, Any]) -> str | None:
    g = scheme.get("group_size")
    if g is None:
        return None
    return "pc" if g == -1 else f"g{g}"


def _predicted_row(qconfig: Mapping[str, Any], before: float | None) -> list[str]:
    """The allocation's predicted perplexity (from the float model's measured one) beside the measurement."""
    alloc = qconfig.get("allocation")
    if not isinstance(alloc, Mapping) or before is None or "predicted_delta_nll" not in alloc:
        return []
    value = before * math.exp(alloc["predicted_delta_nll"])
    spread = value * alloc.get("predicted_delta_nll_se", 0.0)
    return [
        f"| perplexity predicted before the run (`--target-bits`) | - | {fmt_num(value)} +/- {fmt_num(spread)} |"
    ]


def _results_table(
    evaluation: Mapping[str, Any], after: Mapping[str, Any], original_size: int | None,
    qconfig: Mapping[str, Any] | None = None,
) -> list[str]:  # fmt: skip
    before = evaluation.get("original") or {}
    lines = [
        "| | original | quantized |",
        "|---|---|---|",
        f"| ONNX model size | {fmt_mb(before.get('model_bytes', original_size))} | {fmt_mb(after.get('model_bytes'))} |",
    ]
    if after.get("bits_per_weight") is not None:
        lines.append(
            f"| bits per weight, quantized layers ({after.get('sites')} layers, "
            f"{after.get('quantized_weights', 0) / 1e6:.3f}M weights) | 32 | {fmt_num(after['bits_per_weight'])} |"
        )
    if after.get("mean_weight_sqnr_db") is not None:
        lines.append(f"| mean weight SQNR (dB) | - | {fmt_num(after['mean_weight_sqnr_db'], 2)} |")
    if perplexity_of(after) is not None:
        p = after["perplexity"]
        where = f"{evaluation.get('dataset', 'text')}, context {p.get('context_length')}, {p.get('tokens')} tokens"
        lines.append(
            f"| perplexity ({where}) | {fmt_num(perplexity_of(before))} | {fmt_num(perplexity_of(after))} |"
        )
        lines += _predicted_row(qconfig or {}, perplexity_of(before))
    else:
        lines += ["", "Perplexity was not measured for this folder (export with `--eval` to measure it)."]
    return lines


def build_model_card(
    folder: str | Path,
    *,
    base_model: str | None = None,
    license: str | None = None,
    original_size_bytes: int | None = None,
    command: str | None = None,
) -> str:
    """README.md text for ``folder`` (model.onnx, quantization_config.json, optional eval_results.json).

    Numbers come from ``eval_results.json`` when the export ran with ``--eval``; otherwise size and bits
    per weight are measured here on the graph and perplexity is reported as not measured.
    """
    folder = Path(folder)
    qconfig = _read_json(folder / "quantization_config.json")
    evaluation = _read_json(folder / EVAL_FILE_NAME)
    scheme = _scheme_of(qconfig)
    method = _method_of(qconfig)
    fmt = qconfig.get("format") or scheme.get("format")
    raw_source = qconfig.get("source")
    source: Mapping[str, Any] = raw_source if isinstance(raw_source, Mapping) else {}
    base = base_model or infer_base_model(source.get("model"))
    name = base or (Path(str(source["model"])).name if source.get("model") else folder.name)
    after = evaluation.get("quantized") or measure(folder)
    lines = [
        *_front_matter(scheme, method, fmt, base, license),
        *_introduction(name, scheme, method, fmt),
        "## Measured results",
        "",
        *_results_table(evaluation, after, original_size_bytes, qconfig),
        "",
        *_quantization_table(qconfig, scheme, method),
        *_USAGE,
    ]
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    if (folder / "quantization_recipe.yaml").is_file():
        lines += [
            "The full recipe is in `quantization_recipe.yaml` (`--recipe quantization_recipe.yaml`).",
            "",
        ]
    return "\n".join(lines)


def _front_matter(
    scheme: Mapping[str, Any], method: str, fmt: Any, base: str | None, license: str | None
) -> list[str]:
    """The YAML block the Hub reads: tags (bits, method, format), base model and license."""
    import yaml

    bits = scheme.get("bits")
    tags = ["onnx", "optimum", "onnxruntime", "quantized", "optimum-adaround", "text-generation"]
    if isinstance(bits, int):
        tags.append(f"int{bits}" if bits in (2, 4, 8) else f"{bits}-bit")
    tags += [method] + ([str(fmt)] if fmt else [])
    front: dict[str, Any] = {"library_name": "onnx", "pipeline_tag": "text-generation", "tags": tags}
    if base:
        front["base_model"] = str(base)
    if license:
        front["license"] = license
    return ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]


def _introduction(name: str, scheme: Mapping[str, Any], method: str, fmt: Any) -> list[str]:
    bits = scheme.get("bits")
    label = "-".join(x for x in (f"w{bits}" if bits else None, _group(scheme), method) if x)
    symmetric = "symmetric" if scheme.get("symmetric", True) else "asymmetric"
    return [
        f"# {Path(str(name)).name} ({label}, ONNX)",
        "",
        f"Weight-only {bits}-bit quantization of `{name}` for ONNX Runtime. "
        f"The integer codes were chosen by **{method}** rounding (group size {scheme.get('group_size', '?')}, "
        f"{symmetric}) and are stored as `{fmt}`. Made with "
        "[optimum-adaround](https://github.com/optimum-adaround/optimum-adaround).",
        "",
    ]


def _quantization_table(qconfig: Mapping[str, Any], scheme: Mapping[str, Any], method: str) -> list[str]:
    lines = [
        "## Quantization",
        "",
        "| option | value |",
        "|---|---|",
        f"| method | `{method}` |",
        *(f"| scheme.{k} | `{v}` |" for k, v in scheme.items()),
    ]
    lines += _site_scheme_rows(qconfig) + _embedding_rows(qconfig)
    calib = qconfig.get("calibration")
    if isinstance(calib, Mapping):
        lines += [f"| calibration.{k} | `{v}` |" for k, v in calib.items()]
    else:
        lines.append("| calibration | none (data-free method) |")
    versions = qconfig.get("versions", {})
    if isinstance(versions, Mapping) and versions:
        lines.append("| versions | " + ", ".join(f"{k} {v}" for k, v in versions.items()) + " |")
    return [*lines, ""]


def _site_scheme_rows(qconfig: Mapping[str, Any]) -> list[str]:
    """One row per scheme when the layers do not all share the run's: the output projection has its own
    bits by default, and recipe overrides give matching layers theirs (so bits per weight is not the
    scheme's alone)."""
    by_scheme: dict[str, list[str]] = {}
    for site in qconfig.get("sites") or []:
        if isinstance(site, Mapping) and site.get("scheme"):
            by_scheme.setdefault(str(site["scheme"]), []).append(str(site.get("name", "?")))
    if len(by_scheme) < 2:
        return []
    return [
        f"| layers at `{label}` | "
        + (", ".join(f"`{n}`" for n in names) if len(names) <= 3 else f"{len(names)} layers")
        + " |"
        for label, names in by_scheme.items()
    ]


def _embedding_rows(qconfig: Mapping[str, Any]) -> list[str]:
    """The token embedding tables stored as ``GatherBlockQuantized`` (their bytes are not in bits per weight,
    which counts the linear layers)."""
    rows = []
    for table in qconfig.get("embeddings") or []:
        if not isinstance(table, Mapping):
            continue
        shared = table.get("shared_with")
        codes = f"the codes of `{shared}`" if shared else "its own codes"
        rows.append(
            f"| embedding `{table.get('table')}` | GatherBlockQuantized, {table.get('bits')} bits, "
            f"block {table.get('block_size')}, {codes} |"
        )
    return rows


_USAGE = [
    "## Usage",
    "",
    "```python",
    "from transformers import AutoTokenizer",
    "from optimum.adaround import load",
    "",
    'model = load("path/to/this/folder")  # ORTModelForCausalLM; registers custom ops if the graph needs them',
    'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
    'inputs = tokenizer("The capital of France is", return_tensors="pt")',
    "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
    "```",
    "",
]


def write_model_card(folder: str | Path, **kwargs: Any) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(build_model_card(folder, **kwargs), encoding="utf-8")
    return path
