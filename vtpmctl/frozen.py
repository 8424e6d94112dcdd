"""Immutable value classes without ``dataclasses``.

Every module the zygote imports costs each vTPM daemon resident memory, and
``dataclasses`` brings ``inspect``, ``ast`` and ``dis`` with it (0.9 MiB a
daemon; docs/architecture.md, "The zygote"). The daemon's value types list
their fields in ``__slots__``, set them once with ``_init``, and get from
here what a frozen dataclass gave them: equality and hashing by fields, a
repr that names them, ``replace``, and ``copy``/``pickle`` (their
``__init__`` takes the fields in slot order).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self


class Frozen:
    """Fields are the ``__slots__`` of the class and its bases; none changes after ``_init``."""

    __slots__ = ()

    def _init(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            names.extend(klass.__dict__.get("__slots__", ()))
        return tuple(names)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields())
        return f"{type(self).__name__}({fields})"

    def __reduce__(self) -> tuple[type[Self], tuple[object, ...]]:
        """``copy`` and ``pickle`` remake it through ``__init__`` (fields in slot order)."""
        return type(self), self._values()

    def replace(self, **changes: object) -> Self:
        """A copy with some fields changed (``dataclasses.replace``)."""
        new = object.__new__(type(self))
        for name in self._fields():
            object.__setattr__(new, name, changes.pop(name, getattr(self, name)))
        if changes:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(changes))!r}")
        return new
