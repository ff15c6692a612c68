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
    out: str = typer.Option(..., "--out", "-o", help="Folder to write (new, empty, or an older stream to replace)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the instances (edge6's label mappings never change; "
                                                "facts4 draws its facts from the seed)."),
    order: str = typer.Option(None, "--order", help="Comma-separated task names, e.g. home-city,shape-code."),
    train: int = field_option(SplitSizes, "train", "--train", default=None),
    val: int = field_option(SplitSizes, "val", "--val", default=None),
    test: int = field_option(SplitSizes, "test", "--test", default=None),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Write a stream as stream.json + tasks/<task>/{train,val,test}.json (LLaVA) + PNG images.

    Sizes not given are the stream's defaults: 48 / 16 / 24, and 64 / 16 / 32 for facts4."""
    import json
    import os

    from edgekv.data.stream import default_sizes, write_stream

    tasks = None if order is None else [t.strip() for t in order.split(",") if t.strip()]
    base = default_sizes(name, tasks)
    sizes = SplitSizes(*(base_v if v is None else v for v, base_v in
                         ((train, base.train), (val, base.val), (test, base.test))))
    path = write_stream(name, out, seed=seed, order=tasks, sizes=sizes)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    data = {"name": meta["name"], "seed": meta["seed"], "path": os.path.dirname(path), "order": meta["order"],
            "tasks": [{k: t[k] for k in ("name", "kind", "num_examples", "files")} for t in meta["tasks"]]}
    emit(data, json_out, _human_write)


@_sub("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the built-in streams and tasks."""
    from edgekv.data.stream import ALL_TASKS, HELD_OUT_STREAMS, list_streams

    data = {"streams": list_streams(), "held_out_streams": list(HELD_OUT_STREAMS),
            "tasks": {t.name: {"kind": t.kind, "description": t.description, "held_out": t.held_out}
                      for t in ALL_TASKS.values()}}

    def human(d: dict) -> str:
        held = "  (held out: never tuned on)"
        rows = [(f"stream {k}", " -> ".join(v) + (held if k in d["held_out_streams"] else ""))
                for k, v in d["streams"].items()]
        rows += [(f"task {k}", f"{v['kind']:5}  {v['description']}") for k, v in d["tasks"].items()]
        return table(rows)

    emit(data, json_out, human)
