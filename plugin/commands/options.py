"""Command-line flags derived from ``QuantConfig``: the one source of every quantization flag.

``flag_specs`` turns each leaf option (``graph_passes.config.flat_fields``) into an argparse spec
``(flags, kwargs)`` with the option's help and its real default; ``overrides_from_args`` reads back
the flags that were given (every default is ``argparse.SUPPRESS``, so a recipe's value is replaced only by
a flag on the command line). The optimum-cli hook keeps a static copy of these specs (it must import
nothing of ours); a test checks it against ``flag_specs(HOOK_SPELLING)``.
"""

from __future__ import annotations

import argparse
import enum
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from ..graph_passes.config import DEFAULT_METHOD, flat_fields
from ..graph_passes.errors import InvalidOptionError
from ..graph_passes.options import option_help
from ..graph_passes.rounding.base import METHODS
from ..graph_passes.scheme import QuantScheme

__all__ = ["HOOK_SKIP", "HOOK_SPELLING", "add_config_arguments", "flag_specs", "overrides_from_args"]

Spec = tuple[tuple[str, ...], dict[str, Any]]

# optimum-cli export onnx-quant: Optimum has its own --device (the export device, also used here), and
# the hook keeps the names its users already have.
HOOK_SPELLING = {"bits": "--weight-bits"}
HOOK_SKIP = ("device",)
# bool options on by default: (flag that turns them on, flag that turns them off, help of the off flag)
_ON_OFF = {
    "symmetric": ("--sym", "--asym", "asymmetric grid with zero points"),
    "sequential": ("--sequential", "--one-pass", "calibrate the float model in one pass"),
    "fuse": ("--fuse", "--no-fuse", "keep one MatMulNBits per projection"),
    "share_shapes": ("--share-shapes", "--no-share-shapes", "keep the graph's own shape computations"),
}


def _leaf_type(hint: Any) -> tuple[Any, bool]:
    """(inner type, optional) of a field annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _default_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        value = "on" if value else "off"
    return "" if value in (None, ()) else f" (default {value})"


def _field_spec(
    name: str, hint: Any, default: Any, help: str, flag: str | None, metavar: str | None = None
) -> list[Spec]:
    tp, _ = _leaf_type(hint)
    dest = {"dest": name, "default": argparse.SUPPRESS}
    if tp is bool and default is True:
        on, off, off_help = _ON_OFF[name]
        return [
            ((on,), {**dest, "action": "store_true", "help": f"{help} (default)", "exclusive": name}),
            ((off,), {**dest, "action": "store_false", "help": off_help, "exclusive": name}),
        ]
    flags = (flag or f"--{name.replace('_', '-')}",)
    if tp is bool:
        return [(flags, {**dest, "action": "store_true", "help": help + _default_text(default)})]
    if typing.get_origin(tp) is tuple:
        return [(flags, {**dest, "action": "append", "metavar": metavar or "REGEX", "help": help})]
    kw: dict[str, Any] = {**dest, "help": help + _default_text(default)}
    if typing.get_origin(tp) is Literal:
        kw["choices"] = list(typing.get_args(tp))
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        kw["choices"] = [m.value for m in tp]
    else:
        kw["type"] = tp.__name__
    return [(flags, kw)]


def flag_specs(spelling: Mapping[str, str] | None = None, skip: tuple[str, ...] = ()) -> list[Spec]:
    """Every quantization flag as ``(flags, argparse kwargs)``; ``type`` is a builtin's name."""
    spelling = dict(spelling or {})
    specs: list[Spec] = [
        (("--recipe",), {"dest": "recipe", "default": argparse.SUPPRESS, "metavar": "RECIPE",
                         "help": "a recipe file (YAML/JSON) or preset name; the flags given override it"}),
        (("--scheme",), {"dest": "scheme", "default": argparse.SUPPRESS, "metavar": "LABEL",
                         "help": "scheme label such as w4-g128, w3-g64-asym, w4-pc (flags below override its parts)"}),
        (("--method",), {"dest": "method", "default": argparse.SUPPRESS, "metavar": "METHOD",
                         "help": f"rounding method: {', '.join(sorted(METHODS))} (default {DEFAULT_METHOD})"}),
        (("--method-option",), {"dest": "method_options", "default": argparse.SUPPRESS, "action": "append",
                                "metavar": "KEY=VALUE",
                                "help": "an option of the rounding method (repeatable; VALUE read as JSON when it can be)"}),
    ]  # fmt: skip
    defaults = QuantScheme(format="auto")
    for f in flat_fields():
        if f.name in skip or ("flag" in f.field.metadata and f.field.metadata["flag"] is None):
            continue
        hint = typing.get_type_hints(f.owner)[f.name]
        default = getattr(defaults, f.name) if f.group == "scheme" else f.field.default
        help = option_help(f.field)
        flag = spelling.get(f.name, f.field.metadata.get("flag"))
        specs += _field_spec(f.name, hint, default, help, flag, f.field.metadata.get("metavar"))
    return specs


def add_config_arguments(parser: Any, specs: list[Spec] | None = None) -> None:
    """Add the quantization flags to ``parser`` (an argparse parser or group)."""
    from optimum.commands.register.adaround_onnx_quant import add_flag_specs

    add_flag_specs(parser, specs if specs is not None else flag_specs())


def parse_method_options(items: list[str]) -> dict[str, Any]:
    """``["percdamp=0.01", "act_order=true"]`` -> ``{"percdamp": 0.01, "act_order": True}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidOptionError(f"--method-option {item!r}: use KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def overrides_from_args(args: argparse.Namespace, specs: list[Spec] | None = None) -> dict[str, Any]:
    """The options given on the command line, by flat name (``recipe`` excluded)."""
    given = vars(args)
    dests = {kw["dest"] for _, kw in (specs if specs is not None else flag_specs())} - {"recipe"}
    out = {d: given[d] for d in dests if d in given and given[d] is not None}
    if "method_options" in out:
        out["method_options"] = parse_method_options(out["method_options"])
    for key, value in out.items():
        if isinstance(value, list) and key != "method_options":  # repeatable flags: tuple options
            out[key] = tuple(value)
    return out


def config_from_args(args: argparse.Namespace, specs: list[Spec] | None = None, **extra: Any) -> Any:
    """The run's QuantConfig: ``--recipe`` (or the defaults) with the given flags and ``extra`` applied."""
    from ..api import run_config

    return run_config(getattr(args, "recipe", None), **{**overrides_from_args(args, specs), **extra})
