"""``edgekv demo``: the main job on the embedded defaults (see :mod:`edgekv.demo`)."""

from __future__ import annotations

import sys

import typer

from edgekv.cli import command, emit


@command("demo")
def demo_cmd(
    model: str = typer.Option("tiny-vlm", "--model", help="Built-in name or model folder."),
    stream: str = typer.Option("edge6", "--stream", help="Built-in stream name or a stream folder."),
    budget: str = typer.Option("16MiB", "--budget", help="Memory file budget (fixed footprint), e.g. 16MiB."),
    num_test: int = typer.Option(12, "--num-test", help="Held-out queries per task (0: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the stream's instances and of adapt."),
    work_dir: str = typer.Option(None, "--work-dir", help="Where artifacts and memory go (default $EDGEKV_CACHE/demo)."),
    threads: int = typer.Option(None, "--threads", help="Threads for torch and onnxruntime."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON (steps still go to stderr)."),
) -> None:
    """Adapt the built-in tiny VLM task after task at a fixed budget, run it on-device, print the table."""
    from edgekv.demo import DemoConfig, render, run_demo

    cfg = DemoConfig(model=model, stream=stream, budget=budget, num_test=num_test, seed=seed,
                     work_dir=work_dir, threads=threads)
    res = run_demo(cfg, say=lambda line: typer.echo(line, err=True), progress=sys.stderr.isatty())
    emit(res.to_dict(), json_out, lambda d: render(res))
