"""``edgekv stream write|list``: the built-in continual task streams (thin shell over edgekv.data.stream)."""

from __future__ import annotations

from collections.abc import Callable

import typer

from edgekv.cli import app, emit, field_option, guarded, table
from edgekv.data.stream import SplitSizes

stream_app = typer.Typer(help="Built-in continual task streams: list them, write one out as LLaVA data.",
                         no_args_is_help=True)
app.add_typer(stream_app, name="stream")


def _sub(name: str) -> Callable:
    """``stream_app.command`` with edgekv errors as one line on stderr and an exit code."""
    return lambda fn: stream_app.command(name)(guarded(fn))


def _human_write(d: dict) -> str:
    rows = [("stream", f"{d['name']} (seed {d['seed']})"), ("written to", d["path"])]
    rows += [(f"{i + 1}. {t['name']}", f"{t['kind']:5}  train {t['num_examples']['train']}, val "
                                       f"{t['num_examples']['val']}, test {t['num_examples']['test']}")
             for i, t in enumerate(d["tasks"])]
    return table(rows)


@_sub("write")
def write_cmd(
    name: str = typer.Argument(..., help="Built-in stream (see 'edgekv stream list'), or a new name with --order."),
    out: str = typer.Option(..., "--out", help="Folder to write (new, empty, or an older stream to replace)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the instances (label mappings never change)."),
    order: str = typer.Option(None, "--order", help="Comma-separated task names, e.g. home-city,shape-code."),
    train: int = field_option(SplitSizes, "train", "--train"),
    val: int = field_option(SplitSizes, "val", "--val"),
    test: int = field_option(SplitSizes, "test", "--test"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Write a stream as stream.json + tasks/<task>/{train,val,test}.json (LLaVA) + PNG images."""
    import json
    import os

    from edgekv.data.stream import write_stream

    tasks = None if order is None else [t.strip() for t in order.split(",") if t.strip()]
    path = write_stream(name, out, seed=seed, order=tasks, sizes=SplitSizes(train, val, test))
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    data = {"name": meta["name"], "seed": meta["seed"], "path": os.path.dirname(path), "order": meta["order"],
            "tasks": [{k: t[k] for k in ("name", "kind", "num_examples", "files")} for t in meta["tasks"]]}
    emit(data, json_out, _human_write)


@_sub("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the built-in streams and tasks."""
    from edgekv.data.stream import TASKS, list_streams

    data = {"streams": list_streams(),
            "tasks": {t.name: {"kind": t.kind, "description": t.description} for t in TASKS.values()}}

    def human(d: dict) -> str:
        rows = [(f"stream {k}", " -> ".join(v)) for k, v in d["streams"].items()]
        rows += [(f"task {k}", f"{v['kind']:5}  {v['description']}") for k, v in d["tasks"].items()]
        return table(rows)

    emit(data, json_out, human)
