"""``edgekv demo``: the main job on the embedded default stream (see README)."""

from __future__ import annotations

import typer

from edgekv.cli import command

PLAN = """edgekv demo — what it does:
  1. take the default continual task stream (image+text and text tasks, generated offline)
  2. adapt the built-in model task after task under a fixed memory budget (edgekv adapt)
  3. export the backbone and memory for the device (edgekv export)
  4. answer held-out queries with the torch-free runtime (edgekv run) and print per-task
     accuracy before and after, the memory footprint after each task (constant) and the
     budget breakdown (edgekv profile)
"""

MISSING = """Not available yet in this version:
  - the default continual stream and `edgekv bench` (continual benchmark issue)
  - the built-in `tiny-vlm` model (multimodal issue)
What works today: `edgekv profile`, `edgekv adapt`, `edgekv export`, `edgekv run`, `edgekv inspect`
on text models (see README, 'The pipeline')."""


@command("demo")
def demo_cmd() -> None:
    """Run the main job end to end on the built-in defaults."""
    typer.echo(PLAN)
    typer.echo(MISSING)
