"""The ``edgekv`` command: a thin typer shell over the library.

Every command prints a readable summary by default and a JSON object with ``--json``.
Errors a user can fix come out as one line on stderr (``edgekv: error: ...``) and the
exit code of their :mod:`edgekv.errors` class; never a traceback.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import typer

from edgekv import __version__
from edgekv.errors import EdgeKVError

app = typer.Typer(
    name="edgekv",
    help="Fixed-footprint continual adaptation for LLMs on edge devices (InduceKV).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# "Class.field" -> the flags of the option that sets it (see field_option): an error that names
# the field gets the flag added, so a user sees which option to change
FIELD_FLAGS: dict[str, str] = {}
_FROM_FIELD = object()


def field_option(cls: type, name: str, *flags: str, default: Any = _FROM_FIELD, **kwargs: Any) -> Any:
    """A typer option that sets the config field ``cls.name``: its help is the field's help and
    its default the field's default (:mod:`edgekv.configs`), written once, in the config.

    ``default=None``: the option stays unset unless given (e.g. so that the library can tell an
    explicit value from the default); the field's default is still the one shown in ``--help``.
    """
    from edgekv.configs import field_default, field_help

    value = field_default(cls, name)
    if default is not _FROM_FIELD and value is not None:
        kwargs.setdefault("show_default", str(value))
    info = typer.Option(value if default is _FROM_FIELD else default, *flags, help=field_help(cls, name), **kwargs)
    info.config_field = (cls, name)  # for tests/test_cli_core.py: the help and default come from here
    FIELD_FLAGS[f"{cls.__name__}.{name}"] = "/".join(flags)
    return info


def with_flags(message: str) -> str:
    """``message`` with the flag of every option whose config field it names, e.g.
    "RuntimeConfig.k must be >= 0 (option -k/--entries)"."""
    flags = [f for field, f in FIELD_FLAGS.items() if re.search(rf"\b{re.escape(field)}\b", message)]
    return f"{message} (option {', '.join(dict.fromkeys(flags))})" if flags else message


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"edgekv: error: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """``fn`` with edgekv errors turned into one line on stderr and their exit code."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except EdgeKVError as e:
            fail(with_flags(str(e)), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def command(*args: Any, **kwargs: Any) -> Callable:
    """``app.command`` that turns edgekv errors into one line on stderr and an exit code."""

    def decorate(fn: Callable) -> Callable:
        return app.command(*args, **kwargs)(guarded(fn))

    return decorate


def emit(data: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=_json_default))
    else:
        typer.echo(human(data))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edgekv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """edgekv: build a fixed-size KV memory on the host, run it on the device."""


# Commands live in their own modules; importing them registers them on ``app``.
from edgekv import commands  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except EdgeKVError as e:  # errors raised outside a command body (e.g. callbacks)
        print(f"edgekv: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
