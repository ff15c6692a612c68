"""``edgekv demo``: the main job on the embedded defaults (see :mod:`edgekv.demo`)."""

from __future__ import annotations

import sys

import typer

from edgekv.cli import command, emit, field_option
from edgekv.demo import DemoConfig


@command("demo")
def demo_cmd(
    model: str = field_option(DemoConfig, "model", "--model", "-m"),
    stream: str = field_option(DemoConfig, "stream", "--stream"),
    budget: str = field_option(DemoConfig, "budget", "--budget"),
    num_test: int = field_option(DemoConfig, "num_test", "--num-test"),
    prompt_num_test: int = field_option(DemoConfig, "prompt_num_test", "--prompt-num-test"),
    ttft_queries: int = field_option(DemoConfig, "ttft_queries", "--ttft-queries"),
    seed: int = field_option(DemoConfig, "seed", "--seed"),
    work_dir: str = field_option(DemoConfig, "work_dir", "--work-dir"),
    threads: int = field_option(DemoConfig, "threads", "--threads", "-t"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON (steps still go to stderr)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (they show only on a terminal)."),
) -> None:
    """Adapt the built-in tiny VLM task after task at a fixed budget, run it on-device, compare prompt text, print the table."""
    from edgekv.demo import render, run_demo

    cfg = DemoConfig(model=model, stream=stream, budget=budget, num_test=num_test, prompt_num_test=prompt_num_test,
                     ttft_queries=ttft_queries, seed=seed, work_dir=work_dir, threads=threads)
    res = run_demo(cfg, say=lambda line: typer.echo(line, err=True), progress=sys.stderr.isatty() and not no_progress)
    emit(res.to_dict(), json_out, lambda d: render(res))
