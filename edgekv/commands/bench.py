"""``edgekv bench``: the continual benchmark, InduceKV against baselines at matched byte budgets."""

from __future__ import annotations

import shlex

import typer

from edgekv.cli import command, emit, table
from edgekv.errors import InputError
from edgekv.units import format_size, parse_size


def parse_budgets(budget: str, budgets: str | None, fractions: tuple[float, ...]) -> tuple[int, list[int]]:
    """(main budget, every budget of the sweep): --budgets as given, or fractions of --budget."""
    main = parse_size(budget)
    if main <= 0:
        raise InputError(f"--budget must be a positive size, got {budget!r}")
    if budgets:
        sweep = [parse_size(b) for b in budgets.split(",") if b.strip()]
        if any(b <= 0 for b in sweep):
            raise InputError(f"--budgets must be positive sizes, got {budgets!r}")
    else:
        sweep = [int(main * f) for f in fractions]
    return main, sorted(set(sweep) | {main})


def load_model(model: str):
    try:
        from edgekv.induce.vision import load_adapt_backbone
    except ImportError:
        from edgekv.export.models import load_backbone as load_adapt_backbone
    return load_adapt_backbone(model)


def _human(d: dict) -> str:
    rows = []
    for r in d["runs"]:
        m = r["metrics"]
        budget = "-" if r["budget"] is None else format_size(r["budget"])
        last = "-" if m["last"] is None else f"{100 * m['last']:.1f}"
        avg = "-" if m["avg"] is None else f"{100 * m['avg']:.1f}"
        bwt = "-" if m["bwt"] is None else f"{100 * m['bwt']:+.1f}"
        rows.append((f"{r['method']} @ {budget}", f"Avg {avg}  Last {last}  BWT {bwt}  deployed "
                                                 f"{r['deployed_bytes'][-1]} B"
                                                 f"{'' if r['bytes_constant'] else ' (CHANGED between tasks)'}"))
    rows.append(("results", d["outputs"]["md"]))
    rows.append(("time", f"{d['seconds_total']} s"))
    return table(rows)


@command("bench")
def bench_cmd(
    model: str = typer.Option(..., "--model", help="Hugging Face model folder, .gguf, or built-in name."),
    stream: str = typer.Option(..., "--stream", help="Task stream: a built-in name (edge6) or a stream folder."),
    budget: str = typer.Option(..., "--budget", help="Main byte budget (16MiB): every method runs at it."),
    budgets: str = typer.Option(None, "--budgets", help="Comma-separated budgets of the sweep "
                                "(default: 1/4 and 1/2 of --budget, plus --budget)."),
    methods: str = typer.Option("all", "--methods", help="Comma-separated methods (default: all)."),
    out: str = typer.Option(..., "--out", help="Output folder (results, plots, resumable stages)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the stream and of every method."),
    quick: bool = typer.Option(False, "--quick", help="Tiny settings for tests and CI (BenchConfig.quick)."),
    threads: int = typer.Option(2, "--threads", help="PyTorch threads."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json."),
) -> None:
    """Fill the accuracy matrix of every method over a task stream; report Avg, Last, BWT,
    Forgetting and deployed bytes; resumable (finished stages are not recomputed)."""
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.methods import parse_methods

    cfg = BenchConfig(seed=seed)
    cfg = cfg.quick() if quick else cfg
    names = parse_methods(methods, cfg)
    main, sweep = parse_budgets(budget, budgets, cfg.sweep_fractions)
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    import torch

    from edgekv.bench.runner import run_bench
    from edgekv.data.stream import load_stream

    torch.set_num_threads(threads)
    the_stream = load_stream(stream, seed=seed)
    backbone = load_model(model)
    parts = ["edgekv", "bench", "--model", model, "--stream", stream, "--budget", budget]
    parts += (["--budgets", budgets] if budgets else []) + ["--methods", methods, "--out", out, "--seed", str(seed)]
    cmd = " ".join(shlex.quote(a) for a in parts + (["--quick"] if quick else []))
    results = run_bench(backbone, the_stream, names, sweep, main, out, cfg, model_name=model, command=cmd,
                        progress=not no_progress)
    emit(results, json_out, _human)
