"""Versioned quantization recipes: every option of ``quantize`` in one small file, saved next to the model.

A recipe is a frozen record; on disk it is a flat YAML (or JSON) mapping with a ``version`` key::

    version: 1
    name: w4-g128-adaround
    scheme: w4-g128          # QuantScheme label: bits, group size, symmetry (see QuantScheme.parse)
    method: adaround         # rtn | gptq | adaround | ...
    calib_samples: 128
    overrides:               # optional, first match wins: module-path regex -> scheme label
      - {pattern: "mlp\\.down_proj", scheme: w8-g128}

Unknown keys are rejected with a message that names them (a typo must not silently fall back to a default).
Named presets (``PRESETS``) cover the common cases; ``resolve_recipe`` accepts a preset name, a file path,
a mapping or a Recipe.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .defaults import DEFAULT_SEQ_LEN, DEFAULT_SINK_WEIGHT, default_calib_samples
from .graph_passes.errors import UserError
from .graph_passes.scheme import QuantScheme, WeightFormat

__all__ = [
    "PRESETS",
    "RECIPE_FILE_NAME",
    "ModuleOverride",
    "Recipe",
    "RecipeError",
    "get_preset",
    "load_recipe",
    "resolve_recipe",
    "save_recipe",
]

RECIPE_FILE_NAME = "quantization_recipe.yaml"


class RecipeError(UserError):
    """A recipe file or mapping is malformed: unknown key, wrong type, unknown preset, bad version."""


@dataclasses.dataclass(frozen=True)
class ModuleOverride:
    """Modules whose path matches ``pattern`` (``re.search``) use ``scheme`` instead of the recipe's."""

    pattern: str
    scheme: str

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise RecipeError(f"overrides: pattern {self.pattern!r} is not a valid regex ({e})") from None
        QuantScheme.parse(self.scheme)  # raises UnsupportedSchemeError naming the label


# (field name, accepted python types) for the plain scalar/sequence fields, used for type checks on load.
_SEQ_FIELDS = ("include", "exclude")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything ``optimum.adaround.api.quantize`` needs besides the input and output paths."""

    VERSION = 1

    name: str | None = None
    scheme: str = "w4-g128"
    """QuantScheme label (``w4-g128``, ``w3-g64-asym``, ``w4-pc``...)."""
    method: str = "adaround"
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    format: str | None = None
    """matmulnbits | qdq | lowbit; None lets quantize pick the format that runs the scheme."""
    calib_data: str | None = None
    """Calibration text source (file, folder, or a name the data module knows); None = built-in text."""
    calib_samples: int | None = None
    """Calibration sequences; None = the method's default (``defaults.default_calib_samples``)."""
    seq_len: int = DEFAULT_SEQ_LEN
    sequential: bool = True
    sink_weight: float = DEFAULT_SINK_WEIGHT
    """Weight of each calibration sequence's first position in the q/k/v projections' statistics."""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    seed: int = 0
    overrides: tuple[ModuleOverride, ...] = ()

    def __post_init__(self) -> None:
        # Normalise containers so that equality does not depend on list vs tuple.
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "method_options", dict(self.method_options))
        object.__setattr__(
            self,
            "overrides",
            tuple(o if isinstance(o, ModuleOverride) else _override_from(o) for o in self.overrides),
        )
        self.validate()

    def validate(self) -> None:
        QuantScheme.parse(self.scheme)
        if self.format is not None and self.format not in {f.value for f in WeightFormat}:
            raise RecipeError(
                f"format={self.format!r}: use one of {', '.join(f.value for f in WeightFormat)} (or leave it unset)"
            )
        if not isinstance(self.method, str) or not self.method:
            raise RecipeError(
                f"method={self.method!r}: give a rounding method name such as rtn, gptq, adaround"
            )
        for key in ("calib_samples", "seq_len"):
            value = getattr(self, key)
            if key == "calib_samples" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RecipeError(f"{key}={value!r}: must be a positive integer")
        sw = self.sink_weight
        if isinstance(sw, bool) or not isinstance(sw, (int, float)) or not 1 <= sw <= 1e6:
            raise RecipeError(f"sink_weight={sw!r}: must be a number in [1, 1e6] (1 = off)")
        for key in ("sequential", "quantize_lm_head"):
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"{key}={getattr(self, key)!r}: must be true or false")
        for key in _SEQ_FIELDS:
            for pattern in getattr(self, key):
                if not isinstance(pattern, str):
                    raise RecipeError(f"{key}: {pattern!r} is not a regex string")
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise RecipeError(f"{key}: {pattern!r} is not a valid regex ({e})") from None

    @property
    def quant_scheme(self) -> QuantScheme:
        return QuantScheme.parse(self.scheme)

    def replace(self, **changes: Any) -> Recipe:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise RecipeError(f"unknown recipe key(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    @property
    def samples(self) -> int:
        """``calib_samples``, or the method's default when it is None."""
        return default_calib_samples(self.method) if self.calib_samples is None else self.calib_samples

    def quantize_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``api.quantize`` (overrides are applied by the caller, see export.py)."""
        return {
            "scheme": self.scheme,
            "method": self.method,
            "method_options": dict(self.method_options) or None,
            "format": self.format,
            "calib_data": self.calib_data,
            "calib_samples": self.calib_samples,
            "seq_len": self.seq_len,
            "sequential": self.sequential,
            "sink_weight": float(self.sink_weight),
            "include": self.include,
            "exclude": self.exclude,
            "quantize_lm_head": self.quantize_lm_head,
            "seed": self.seed,
        }

    # -- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat, YAML/JSON-friendly mapping (lists, not tuples), with the format ``version``."""
        d: dict[str, Any] = {"version": self.VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "overrides":
                value = [{"pattern": o.pattern, "scheme": o.scheme} for o in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            d[f.name] = value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        if not isinstance(d, Mapping):
            raise RecipeError(f"a recipe must be a mapping of options, got {type(d).__name__}")
        data = dict(d)
        version = data.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise RecipeError(
                f"recipe version {version!r} is not supported (this tool reads version {cls.VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(
                f"unknown recipe key(s): {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})"
            )
        for key in _SEQ_FIELDS:
            if isinstance(data.get(key), str):  # a single regex given as a scalar
                data[key] = (data[key],)
            elif key in data and not isinstance(data[key], (list, tuple)):
                raise RecipeError(f"{key}: expected a list of regexes, got {data[key]!r}")
        if "overrides" in data:
            overrides = data["overrides"]
            if isinstance(overrides, Mapping):  # shorthand {regex: scheme}
                overrides = [{"pattern": k, "scheme": v} for k, v in overrides.items()]
            if not isinstance(overrides, (list, tuple)):
                raise RecipeError(f"overrides: expected a list of {{pattern, scheme}}, got {overrides!r}")
            data["overrides"] = tuple(_override_from(o) for o in overrides)
        if "method_options" in data and data["method_options"] is None:
            data["method_options"] = {}
        if "method_options" in data and not isinstance(data["method_options"], Mapping):
            raise RecipeError(f"method_options: expected a mapping, got {data['method_options']!r}")
        for key in ("scheme", "method"):
            if key in data and not isinstance(data[key], str):
                raise RecipeError(f"{key}={data[key]!r}: expected a string")
        return cls(**data)


def _override_from(o: Any) -> ModuleOverride:
    if isinstance(o, ModuleOverride):
        return o
    if not isinstance(o, Mapping) or set(o) != {"pattern", "scheme"}:
        raise RecipeError(f"overrides: each entry needs exactly the keys pattern and scheme, got {o!r}")
    return ModuleOverride(pattern=str(o["pattern"]), scheme=str(o["scheme"]))


# -- presets ------------------------------------------------------------------------------------------
def _preset(name: str, **kw: Any) -> Recipe:
    return Recipe(name=name, **kw)


PRESETS: dict[str, Recipe] = {
    r.name: r  # type: ignore[misc]
    for r in (
        _preset("w4-g128-rtn", scheme="w4-g128", method="rtn"),
        _preset("w4-g128-gptq", scheme="w4-g128", method="gptq"),
        _preset("w4-g128-adaround", scheme="w4-g128", method="adaround"),
        _preset("w4-g64-gptq", scheme="w4-g64", method="gptq"),
        _preset("w4-g64-adaround", scheme="w4-g64", method="adaround"),
        _preset("w3-g128-gptq", scheme="w3-g128", method="gptq", format="lowbit"),
        _preset("w3-g128-adaround", scheme="w3-g128", method="adaround", format="lowbit"),
        _preset("w8-pc-rtn", scheme="w8-pc", method="rtn"),
    )
}


def get_preset(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise RecipeError(f"unknown recipe preset {name!r}: choose one of {', '.join(PRESETS)}") from None


# -- files ------------------------------------------------------------------------------------------------
def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a ``.yaml``/``.yml`` or ``.json`` file."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {p}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(
            f"recipe file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {first}"
        ) from None
    try:
        return Recipe.from_dict(data if data is not None else {})
    except UserError as e:
        raise type(e)(f"{p}: {e}") from None


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write ``recipe`` as YAML (or JSON when the suffix is ``.json``); returns the path."""
    import yaml

    p = Path(path)
    if p.suffix == ".json":
        p.write_text(json.dumps(recipe.to_dict(), indent=2) + "\n", encoding="utf-8")
    else:
        header = (
            "# optimum-adaround quantization recipe: reuse with --recipe FILE or export(..., recipe=FILE)\n"
        )
        p.write_text(header + yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    return p


def resolve_recipe(recipe: str | Path | Mapping[str, Any] | Recipe | None) -> Recipe | None:
    """A preset name, a recipe file, a mapping, a Recipe, or None."""
    if recipe is None or isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, str) and recipe in PRESETS:
        return PRESETS[recipe]
    p = Path(recipe)
    if p.is_file():
        return load_recipe(p)
    if p.suffix in (".yaml", ".yml", ".json"):
        raise RecipeError(f"recipe file {p} does not exist")
    raise RecipeError(
        f"recipe {str(recipe)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file"
    )
