"""Typed option records: the one way an option is declared.

Every concept with options (a rounding method, calibration, selection, output, the whole run) is a frozen
dataclass deriving from :class:`Options`, each field declared once with :func:`option` (default and a
one-line help). Everything else is derived from those fields: type checks, the ``{type, version, data}``
serialisation written next to every output, the API keywords and the command-line flags (plugin/config.py),
so a default cannot differ between entry points and an unknown key is an error naming the accepted ones.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from .errors import InvalidOptionError

__all__ = ["Options", "check_keys", "option", "option_help"]

T = TypeVar("T", bound="Options")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its one-line ``help`` (shown by ``--help``); ``metadata`` is free-form
    (e.g. ``flag`` for a command-line spelling other than ``--field-name``)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def option_help(field: dataclasses.Field) -> str:
    return str(field.metadata.get("help", ""))


def check_keys(
    owner: str, given: Mapping[str, Any] | set[str], accepted: list[str] | tuple[str, ...]
) -> None:
    """Raise InvalidOptionError for the first key of ``given`` not in ``accepted``, naming the accepted ones."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InvalidOptionError(
            f"{owner} has no option {unknown[0]!r}; accepted: {', '.join(sorted(accepted)) or 'none'}"
        )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """(ok, value converted to ``tp``) for the types options use; no lossy conversions."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _coerce(arg, value)
            if ok:
                return True, out
        return False, value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return False, value
        item = typing.get_args(tp)[0]
        pairs = [_coerce(item, v) for v in value]
        return all(ok for ok, _ in pairs), tuple(v for _, v in pairs)
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return True, tp(value)
        except ValueError:
            return False, value
    if isinstance(tp, type) and issubclass(tp, Options):
        if isinstance(value, tp):
            return True, value
        if isinstance(value, Mapping):
            return True, tp.from_data(value)
        return False, value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Options):
        return value.to_data()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of the option records. Subclasses are frozen dataclasses whose fields use :func:`option`;
    they may override ``validate`` (ranges, combinations) and raise InvalidOptionError."""

    VERSION: ClassVar[int] = 1
    OWNER: ClassVar[str] = "options"
    """How messages name the record (``gptq``, ``calibration``...)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok, converted = _coerce(hints[f.name], value)
            if not ok:
                raise InvalidOptionError(
                    f"{self.OWNER} option {f.name}={value!r}: expected {_type_name(hints[f.name])}"
                )
            object.__setattr__(self, f.name, converted)
        self.validate()

    def validate(self) -> None:
        """Range and combination checks; raise InvalidOptionError naming the option."""

    def reject(self, name: str, what: str) -> typing.NoReturn:
        raise InvalidOptionError(f"{self.OWNER} option {name}={getattr(self, name)!r}: {what}")

    # -- keys ---------------------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self: T, **changes: Any) -> T:
        check_keys(self.OWNER, changes, self.names())
        return dataclasses.replace(self, **changes)

    # -- serialisation: {type, version, data} ---------------------------------------------------------------
    def to_data(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "version": self.VERSION, "data": self.to_data()}

    @classmethod
    def from_data(cls: type[T], data: Mapping[str, Any]) -> T:
        if not isinstance(data, Mapping):
            raise InvalidOptionError(f"{cls.OWNER}: expected a mapping of options, got {data!r}")
        check_keys(cls.OWNER, data, cls.names())
        return cls(**dict(data))

    @classmethod
    def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
        if not isinstance(d, Mapping) or d.get("type") != cls.__name__:
            got = d.get("type") if isinstance(d, Mapping) else type(d).__name__
            raise InvalidOptionError(f"expected a {cls.__name__} record, got type={got!r}")
        if d.get("version") != cls.VERSION:
            raise InvalidOptionError(
                f"{cls.__name__} version {d.get('version')!r} is not supported (this version reads {cls.VERSION})"
            )
        check_keys(cls.__name__, d, ("type", "version", "data"))
        return cls.from_data(d.get("data") or {})
