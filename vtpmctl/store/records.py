"""Records: the dataclasses vtpmctl keeps as JSON, and the one way they cross.

``config.json``, ``meta.json``, a bundle's ``manifest.json`` and the inspect
child's answer are dataclasses. ``to_json`` turns one into the JSON object
written today (fields in declaration order; nested records, lists, maps and
enums as plain JSON values). ``from_json`` builds one back and checks every
value against its field's annotation on the way, so a string where a bool
belongs is an error, not ``bool("no")``. What a value must mean beyond its
type (a hex digest, fields that must agree) stays with the record's owner.

Errors go through the caller's ``fail`` (one line in, the caller's exception
out), so each file keeps the message that tells the user what to do.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

R = TypeVar("R")
Fail = Callable[[str], Exception]
"""Turns "what is wrong" into the exception the caller raises."""

_ABSENT = "vtpmctl.records.absent"
_REQUIRED = "vtpmctl.records.required"
_CHOICES = "vtpmctl.records.choices"
_OMIT_DEFAULT = "vtpmctl.records.omit_default"


def when_absent(value: object) -> dict[str, object]:
    """Field metadata: the value a record read back gets for a missing key.

    For a default that changed after files were written with the key left
    out (the field's own default is for new records).
    """
    return {_ABSENT: value}


def required() -> dict[str, object]:
    """Field metadata: a key files must have, although new records get a default."""
    return {_REQUIRED: True}


def omitted_at_default() -> dict[str, object]:
    """Field metadata: a key written only when its value is not the default.

    For settings added after files were written: a record that does not use
    them keeps the bytes it always had (and reads back the default).
    """
    return {_OMIT_DEFAULT: True}


def one_of(*values: str) -> dict[str, object]:
    """Field metadata: a ``str`` field that holds one of a few words."""
    return {_CHOICES: values}


# ---------------------------------------------------------------- write


def to_json(record: object) -> dict[str, Any]:
    """The record as a JSON object; fields in declaration order."""
    return {
        f.name: _plain(getattr(record, f.name))
        for f in dataclasses.fields(record)  # type: ignore[arg-type]
        if not (f.metadata.get(_OMIT_DEFAULT) and getattr(record, f.name) == f.default)
    }


def _plain(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- read


def from_json(
    cls: type[R],
    data: object,
    fail: Fail,
    *,
    exact: bool = False,
    handled: Collection[str] = (),
    where: str = "",
) -> R:
    """Build ``cls`` from a decoded JSON object, checking every value's type.

    With ``exact``, the keys must be the fields (plus ``handled``, keys the
    caller checked itself) with none missing, in nested records too;
    otherwise unknown keys are ignored and missing ones take the default.
    """
    if not isinstance(data, dict):
        raise fail(f"{_field(where) if where else 'it'} is not a JSON object")
    fields = _fields(typing.cast(type, cls))
    if exact:
        expected = {f.name for f, _ in fields} | set(handled)
        if set(data) != expected:
            extra, missing = sorted(set(data) - expected), sorted(expected - set(data))
            raise fail(f"{_at(where)}unexpected keys {extra}, missing keys {missing}")
    values: dict[str, Any] = {}
    for f, hint in fields:
        key = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            values[f.name] = _value(hint, f.metadata, data[f.name], key, fail, exact)
        elif _ABSENT in f.metadata:
            values[f.name] = f.metadata[_ABSENT]
        elif f.metadata.get(_REQUIRED) or (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ):
            raise fail(f"{_field(key)} is missing")
    return cls(**values)


@functools.cache
def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _field(key: str) -> str:
    return f"field {key!r}"


def _at(where: str) -> str:
    return f"{_field(where)}: " if where else ""


def _value(
    hint: Any, meta: Mapping[str, Any], value: object, key: str, fail: Fail, exact: bool
) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"records cannot read {key!r} of type {hint!r}")
        hint = rest[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    choices = meta.get(_CHOICES) or (args if origin is typing.Literal else None)
    if choices is not None:
        if not any(type(value) is type(c) and value == c for c in choices):
            raise fail(f"{_field(key)} is {value!r}, not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        items = _typed(value, list, key, fail)
        return [_value(args[0], {}, v, f"{key}[{i}]", fail, exact) for i, v in enumerate(items)]
    if origin is dict:
        mapping = _typed(value, dict, key, fail)
        return {k: _value(args[1], {}, v, f"{key}[{k!r}]", fail, exact) for k, v in mapping.items()}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        words = [m.value for m in hint]
        if value not in words or isinstance(value, bool):
            raise fail(f"{_field(key)} is {value!r}, not one of {', '.join(map(str, words))}")
        return hint(value)
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, fail, exact=exact, where=key)  # type: ignore[arg-type]
    if hint is object or hint is Any:
        return value
    if hint in (str, int, bool):
        return _typed(value, hint, key, fail)
    raise TypeError(f"records cannot read {key!r} of type {hint!r}")


def _typed(value: object, kind: type[R], key: str, fail: Fail) -> R:
    # bool is an int in Python: never accept one for the other.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise fail(f"{_field(key)} is {type(value).__name__}, not {kind.__name__}")
    return value
