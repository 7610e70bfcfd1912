"""Model card (README.md with YAML front matter) for a quantized output folder.

Every number in the card is read from files in the folder or measured on the graph: file sizes, bits per
weight of the quantized layers (counted from the packed initializers), and the perplexities of
``eval_results.json`` when the export ran with ``--eval``. Nothing is estimated from the scheme alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "EVAL_FILE_NAME",
    "WeightStats",
    "build_model_card",
    "folder_size_bytes",
    "measure_weight_stats",
    "read_front_matter",
    "source_license",
    "write_model_card",
]

EVAL_FILE_NAME = "eval_results.json"
_MODEL_FILE_SUFFIXES = (".onnx", ".onnx_data", ".onnx.data")


@dataclasses.dataclass(frozen=True)
class WeightStats:
    """Counted on the graph: how many weights are stored quantized and how many bits they take in all."""

    quantized_layers: int
    quantized_params: int
    quantized_bits: int
    """Codes + scales + zero points of the quantized layers, in bits."""
    float_params: int
    """Parameters left in floating point (embeddings, norms, layers excluded from quantization...)."""

    @property
    def bits_per_weight(self) -> float | None:
        return self.quantized_bits / self.quantized_params if self.quantized_params else None


def _const_bits(value: Any) -> int:
    tensor = value.const_value if value is not None else None
    if tensor is None:
        return 0
    return int(tensor.size) * int(tensor.dtype.bitwidth)


def measure_weight_stats(model_path: str | Path) -> WeightStats:
    """Count quantized weights and their storage in an ONNX file (weights stay memory-mapped)."""
    import onnx_ir as ir

    model = ir.load(str(model_path))
    layers = params = bits = 0
    counted: set[str] = set()
    for node in model.graph.all_nodes():
        consts = [v for v in node.inputs if v is not None and v.const_value is not None]
        if node.op_type == "MatMulNBits" or (
            node.domain.startswith("com.optimum") and "K" in node.attributes
        ):
            k, n = node.attributes["K"].as_int(), node.attributes["N"].as_int()
            layers, params = layers + 1, params + k * n
            bits += sum(_const_bits(v) for v in consts[:3] if v.name not in counted)
            counted.update(v.name for v in consts if v.name)
        elif node.op_type == "DequantizeLinear" and consts and consts[0] is node.inputs[0]:
            x = node.inputs[0]
            if x.const_value is not None and x.const_value.dtype.is_integer() and x.const_value.ndim == 2:
                layers, params = layers + 1, params + int(x.const_value.size)
                bits += sum(_const_bits(v) for v in consts if v.name not in counted)
                counted.update(v.name for v in consts if v.name)
    float_params = sum(
        int(v.const_value.size)
        for v in model.graph.initializers.values()
        if v.name not in counted
        and v.const_value is not None
        and v.const_value.dtype.is_floating_point()
        and v.const_value.ndim >= 1
        and v.const_value.size > 1
    )
    return WeightStats(layers, params, bits, float_params)


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


def _fmt_mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _fmt_num(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def build_model_card(
    folder: str | Path,
    *,
    base_model: str | None = None,
    license: str | None = None,
    original_size_bytes: int | None = None,
    command: str | None = None,
) -> str:
    """README.md text for ``folder`` (model.onnx, quantization_config.json, optional eval_results.json)."""
    import yaml

    folder = Path(folder)
    qconfig = _read_json(folder / "quantization_config.json")
    evaluation = _read_json(folder / EVAL_FILE_NAME)
    scheme = _scheme_of(qconfig)
    bits = scheme.get("bits")
    method = str(qconfig.get("method", "unknown"))
    fmt = scheme.get("format") or qconfig.get("format")
    model_file = folder / "model.onnx"
    stats = measure_weight_stats(model_file) if model_file.is_file() else None
    size = folder_size_bytes(folder)
    base = base_model or qconfig.get("source_model") or qconfig.get("base_model")

    tags = ["onnx", "optimum", "onnxruntime", "quantized", "optimum-adaround", "text-generation"]
    if isinstance(bits, int):
        tags.append(f"int{bits}" if bits in (2, 4, 8) else f"{bits}-bit")
    tags += [method] + ([str(fmt)] if fmt else [])
    front: dict[str, Any] = {"library_name": "onnx", "pipeline_tag": "text-generation", "tags": tags}
    if base:
        front["base_model"] = str(base)
    lic = license or qconfig.get("license")
    if lic:
        front["license"] = lic

    label = "-".join(x for x in (f"w{bits}" if bits else None, _group(scheme), method) if x)
    title = f"{Path(str(base)).name if base else folder.name} ({label}, ONNX)"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += [
        f"Weight-only {bits}-bit quantization of "
        + (f"`{base}`" if base else "this model")
        + f" for ONNX Runtime, codes chosen by **{method}** rounding "
        + f"(scheme `{scheme.get('bits', '?')}` bits, group size `{scheme.get('group_size', '?')}`, "
        + f"{'symmetric' if scheme.get('symmetric', True) else 'asymmetric'}), stored as `{fmt}`. "
        + "Made with [optimum-adaround](https://github.com/optimum-adaround/optimum-adaround).",
        "",
        "## Measured results",
        "",
        "| | original | quantized |",
        "|---|---|---|",
        f"| ONNX file size | {_fmt_mb(original_size_bytes)} | {_fmt_mb(size)} |",
    ]
    if stats is not None and stats.bits_per_weight is not None:
        lines.append(
            f"| bits per weight, quantized layers ({stats.quantized_layers} layers, "
            f"{stats.quantized_params / 1e6:.2f}M weights) | 32 | {stats.bits_per_weight:.3f} |"
        )
    ppl = evaluation.get("perplexity", {}) if evaluation else {}
    if ppl:
        where = ", ".join(
            f"{k}={evaluation[k]}"
            for k in ("dataset", "seq_len", "n_tokens")
            if evaluation.get(k) is not None
        )
        lines.append(
            f"| perplexity ({where}) | {_fmt_num(ppl.get('original'))} | {_fmt_num(ppl.get('quantized'))} |"
        )
    else:
        lines += ["", "Perplexity was not measured for this export (run it with `--eval`)."]
    lines += ["", "## Quantization", "", "| option | value |", "|---|---|"]
    for key in ("method", "format", "calib_data", "calib_samples", "seq_len", "calib_tokens_sha256"):
        if key in qconfig and not isinstance(qconfig[key], (dict, list)):
            lines.append(f"| {key} | `{qconfig[key]}` |")
    for key, value in scheme.items():
        lines.append(f"| scheme.{key} | `{value}` |")
    if stats is not None:
        lines.append(f"| weights left in floating point | {stats.float_params / 1e6:.2f}M |")
    versions = qconfig.get("versions", {})
    if isinstance(versions, Mapping) and versions:
        lines.append("| versions | " + ", ".join(f"{k} {v}" for k, v in versions.items()) + " |")
    lines += [
        "",
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
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    if (folder / "quantization_recipe.yaml").is_file():
        lines += [
            "The full recipe is in `quantization_recipe.yaml` (`--recipe quantization_recipe.yaml`).",
            "",
        ]
    return "\n".join(lines)


def _group(scheme: Mapping[str, Any]) -> str | None:
    g = scheme.get("group_size")
    if g is None:
        return None
    return "pc" if g == -1 else f"g{g}"


def write_model_card(folder: str | Path, **kwargs: Any) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(build_model_card(folder, **kwargs), encoding="utf-8")
    return path
