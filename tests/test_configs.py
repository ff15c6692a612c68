"""Every config dataclass of the package: JSON round trip, unknown keys, validation that names the field.

The configs are found by walking every module of the package (``edgekv``, and ``edgekv.export``,
``edgekv.runtime``, ``edgekv.devices``): a dataclass whose name ends in ``Config`` or that
subclasses :class:`edgekv.configs.Config`, so a new config is covered without editing this file.
A non-default instance changes every field it can (each change kept only if the config accepts
it), nested configs included.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import re
import typing

import pytest

from edgekv.configs import Config, field_help
from edgekv.errors import InputError

PACKAGES = ("edgekv", "edgekv.export", "edgekv.runtime", "edgekv.devices")


def _modules():
    seen = set()
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        yield pkg
        for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            if info.name not in seen and not info.name.endswith("__main__"):
                seen.add(info.name)
                yield importlib.import_module(info.name)


def discover() -> list[type]:
    found = {}
    for mod in _modules():
        for obj in vars(mod).values():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == mod.__name__
                    and (obj.__name__.endswith("Config") or issubclass(obj, Config))):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


CONFIGS = discover()


def _example(cls: type):
    """An instance with the defaults; the configs with required fields get a valid example."""
    from edgekv.devices.profiles import load_profile
    from edgekv.runtime.vision import ImageProcessorConfig

    examples = {
        "DeviceProfile": lambda: load_profile("rpi4-4gb"),
        "ImageProcessorConfig": lambda: ImageProcessorConfig("clip", 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3),
                                                             shortest_edge=30, crop_size=(30, 30)),
    }
    if cls.__name__ in examples:
        return examples[cls.__name__]()
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert not required, f"{cls.__name__} has required fields {required}: add an example instance here"
    return cls()


def _candidates(tp, value) -> list:
    """Other values a field of type ``tp`` holding ``value`` could take (some may be refused)."""
    if isinstance(value, Config):
        return [_changed(value)]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2]
    if isinstance(value, float):
        return [value / 2, value * 2 if value else 0.5, value + 1]
    if isinstance(value, str):
        return [value + "x", value.upper(), value[::-1]]
    if isinstance(value, tuple):
        return [value[:1], value + value[:1], tuple(reversed(value))]
    if value is None:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return [{int: 1, float: 0.5, str: "x"}.get(a) for a in args if a in (int, float, str)]
    return []


def _changed(base):
    """``base`` with every field changed that the config accepts changed."""
    hints = typing.get_type_hints(type(base))
    cur = base
    for f in dataclasses.fields(base):
        for cand in _candidates(hints[f.name], getattr(base, f.name)):
            try:
                nxt = dataclasses.replace(cur, **{f.name: cand})
            except InputError:
                continue
            if getattr(nxt, f.name) != getattr(base, f.name):
                cur = nxt
                break
    return cur


def _round_trip(cfg):
    return type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict(), sort_keys=True)))


def test_every_config_is_found():
    names = {c.__name__ for c in CONFIGS}
    assert len(CONFIGS) >= 13, names
    assert {"AdaptConfig", "BenchConfig", "RuntimeConfig", "ProfileConfig", "ExportOptions"} <= names


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_round_trips_through_json(cls):
    assert issubclass(cls, Config), f"{cls.__name__}: subclass edgekv.configs.Config (to_dict/from_dict)"
    assert cls.__dataclass_params__.frozen, f"{cls.__name__} must be frozen"
    base = _example(cls)
    assert _round_trip(base) == base
    other = _changed(base)
    changed = [f.name for f in dataclasses.fields(cls) if getattr(other, f.name) != getattr(base, f.name)]
    assert changed, f"no field of {cls.__name__} could be changed"
    assert _round_trip(other) == other and other != base


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_unknown_key_is_refused_by_name(cls):
    data = _example(cls).to_dict() | {"no_such_field": 1}
    with pytest.raises(InputError, match="no_such_field"):
        cls.from_dict(data)


def _bad_values(value) -> list:
    if isinstance(value, bool) or isinstance(value, Config):
        return []
    if isinstance(value, (int, float)) or value is None:
        return [-10**6]
    if isinstance(value, str):
        return ["\x00nope"]
    if isinstance(value, tuple):
        return [()]
    return []


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_a_refused_value_is_an_input_error_naming_the_field(cls):
    base = _example(cls)
    for f in dataclasses.fields(cls):
        for bad in _bad_values(getattr(base, f.name)):
            try:
                dataclasses.replace(base, **{f.name: bad})
            except InputError as e:
                assert re.search(rf"\b{re.escape(f.name)}\b", str(e)), (f.name, str(e))
                assert not re.search(r"(^|\s)--?[a-z]", str(e)), f"names a CLI flag: {e}"


def test_field_help_is_declared_once():
    from edgekv.induce.config import AdaptConfig, EntryConfig

    assert field_help(AdaptConfig, "top_k").startswith("Entries retrieved per query")
    assert field_help(EntryConfig, "pooled_len").startswith("KV positions per entry")
    with pytest.raises(RuntimeError, match="no help text"):
        field_help(AdaptConfig, "proj_dirs")
