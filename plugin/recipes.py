"""Recipe files and presets: a recipe is the serialisation of a ``QuantConfig``.

On disk (YAML or JSON) it is the config's ``{type, version, data}`` record, the file written next to every
output (``quantization_recipe.yaml``)::

    type: QuantConfig
    version: 1
    data:
      scheme: {type: QuantScheme, version: 1, data: {bits: 4, group_size: 128, ...}}
      method: {type: gptq, version: 1, data: {percdamp: 0.01, ...}}
      calibration: {calib_samples: 64}
      selection: {overrides: [{pattern: "mlp\\\\.down_proj", scheme: w8-g128}]}

A hand-written recipe may also be a flat mapping of the API keywords (``scheme: w4-g128``,
``method: adaround``, ``calib_samples: 128``...). Unknown keys are errors naming the accepted ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .graph_passes.config import QuantConfig
from .graph_passes.errors import InvalidOptionError, UserError

__all__ = ["PRESETS", "ConfigLike", "get_preset", "load_config", "resolve_config", "save_config"]

ConfigLike = QuantConfig | str | Path | Mapping[str, Any] | None

_PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "w4-g128-rtn": {"scheme": "w4-g128", "method": "rtn"},
    "w4-g128-gptq": {"scheme": "w4-g128", "method": "gptq"},
    "w4-g128-adaround": {"scheme": "w4-g128", "method": "adaround"},
    "w4-g64-gptq": {"scheme": "w4-g64", "method": "gptq"},
    "w4-g64-adaround": {"scheme": "w4-g64", "method": "adaround"},
    "w3-g128-gptq": {"scheme": "w3-g128", "method": "gptq"},
    "w3-g128-adaround": {"scheme": "w3-g128", "method": "adaround"},
    "w8-pc-rtn": {"scheme": "w8-pc", "method": "rtn"},
}
PRESETS = tuple(_PRESET_OPTIONS)


def get_preset(name: str) -> QuantConfig:
    if name not in _PRESET_OPTIONS:
        raise InvalidOptionError(f"unknown recipe preset {name!r}: choose one of {', '.join(PRESETS)}")
    return QuantConfig().with_overrides(**_PRESET_OPTIONS[name])


def config_from_mapping(data: Mapping[str, Any]) -> QuantConfig:
    """A config from its record (``type: QuantConfig``) or from a flat mapping of API keywords."""
    if not isinstance(data, Mapping):
        raise InvalidOptionError(f"a recipe must be a mapping of options, got {type(data).__name__}")
    if "type" in data:
        return QuantConfig.from_dict(data)
    flat = {k: v for k, v in data.items() if k not in ("version", "name")}
    if data.get("version", 1) != 1:
        raise InvalidOptionError(
            f"recipe version {data['version']!r} is not supported (this version reads 1)"
        )
    return QuantConfig().with_overrides(**flat)


def load_config(path: str | Path) -> QuantConfig:
    """Read a recipe from a ``.yaml``/``.yml`` or ``.json`` file."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidOptionError(
            f"cannot read recipe file {p}: {getattr(e, 'strerror', None) or e}"
        ) from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise InvalidOptionError(f"recipe file {p} is not valid {kind}: {first}") from None
    try:
        return config_from_mapping(data if data is not None else {})
    except UserError as e:
        raise type(e)(f"{p}: {e}") from None


def save_config(config: QuantConfig | Mapping[str, Any], path: str | Path) -> Path:
    """Write a config (or its record) as YAML, or JSON when the suffix is ``.json``; returns the path."""
    import yaml

    record = config.to_dict() if isinstance(config, QuantConfig) else dict(config)
    p = Path(path)
    if p.suffix == ".json":
        p.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    else:
        header = (
            "# optimum-adaround quantization recipe: reuse with --recipe FILE or quantize(..., config=FILE)\n"
        )
        p.write_text(header + yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    return p


def resolve_config(config: ConfigLike) -> QuantConfig:
    """A QuantConfig from a config, a preset name, a recipe file, a mapping, or None (the defaults)."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_mapping(config)
    if isinstance(config, str) and config in _PRESET_OPTIONS:
        return get_preset(config)
    if not isinstance(config, (str, Path)):
        raise InvalidOptionError(
            f"config={config!r}: give a QuantConfig, a preset name, a recipe file or a mapping"
        )
    p = Path(config)
    if p.is_file():
        return load_config(p)
    if p.suffix in (".yaml", ".yml", ".json"):
        raise InvalidOptionError(f"recipe file {p} does not exist")
    raise InvalidOptionError(
        f"recipe {str(config)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file"
    )
