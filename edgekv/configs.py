"""What every config dataclass shares: a JSON round trip and one place for each option's help.

A config is a frozen dataclass that subclasses :class:`Config`:

* ``to_dict()`` gives plain JSON values (tuples as lists, nested configs as dicts);
  ``from_dict()`` takes them back (lists to tuples where the field is a tuple, dicts to the
  nested config) and refuses an unknown or missing key with an :class:`InputError` naming it;
* a field declared with :func:`knob` carries its help text (``metadata["help"]``): the CLI
  option that sets the field shows that text and the field's default
  (:func:`field_help`, :func:`field_default`), so neither is written twice.

Validation stays in each config's ``__post_init__``, which raises :class:`InputError` naming
the field as ``ClassName.field``. Plain Python, no third-party imports: the device runtime
and the CLI use it too.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

from edgekv.errors import InputError

C = TypeVar("C", bound="Config")


def knob(default: Any = dataclasses.MISSING, help: str = "", *,
         default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that carries its help text: ``top_k: int = knob(4, "Entries ...")``."""
    if not help:
        raise RuntimeError("knob() needs the field's help text")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise RuntimeError(f"{cls.__name__} has no field {name!r}")  # a typo in the caller: a bug


def field_help(cls: type, name: str) -> str:
    """The help text of ``cls.name`` (declared with :func:`knob`)."""
    text = _field(cls, name).metadata.get("help")
    if not text:
        raise RuntimeError(f"{cls.__name__}.{name} has no help text: declare it with knob(default, help)")
    return text


def field_default(cls: type, name: str) -> Any:
    """The default of ``cls.name`` (its factory called, if it has one)."""
    f = _field(cls, name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise RuntimeError(f"{cls.__name__}.{name} has no default")


class Config:
    """Base of the config dataclasses: ``to_dict`` / ``from_dict`` through JSON values."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], d: dict) -> C:
        name = cls.__name__
        if not isinstance(d, dict):
            raise InputError(f"{name}: expected a JSON object of fields, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise InputError(f"unknown {name} fields: {', '.join(unknown)} (its fields: {', '.join(fields)})")
        missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise InputError(f"{name} field {missing[0]!r} is missing")
        hints = _hints(cls)
        return cls(**{k: _typed(hints[k], v) for k, v in d.items()})


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _typed(tp: Any, value: Any) -> Any:
    """``value`` (a JSON value) as the field of type ``tp`` holds it."""
    for t in _alternatives(tp):
        if isinstance(value, dict) and isinstance(t, type) and issubclass(t, Config):
            return t.from_dict(value)
        if isinstance(value, list) and (t is tuple or typing.get_origin(t) is tuple):
            args = typing.get_args(t)
            inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
            return tuple(_typed(inner, v) if inner is not None else v for v in value)
    return value


def _alternatives(tp: Any) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)
