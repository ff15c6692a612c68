"""``edgekv bench``: the continual benchmark, InduceKV against baselines at matched byte budgets."""

from __future__ import annotations

import os
import shlex
from dataclasses import replace

import typer

from edgekv.bench.config import BenchConfig
from edgekv.cli import command, emit, field_option, table
from edgekv.errors import InputError
from edgekv.scale import RayConfig
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


def parse_tune(text: str | None) -> tuple[str, ...]:
    """--tune: comma-separated tunable methods (BenchConfig.tune checks them)."""
    return tuple(dict.fromkeys(t.strip() for t in (text or "").split(",") if t.strip()))


def command_line(**o) -> str:
    """The ``edgekv bench`` line that reproduces these options (recorded in results.json)."""
    parts = ["edgekv", "bench", "--model", o["model"]]
    parts += ["--streams", o["streams"]] if o["streams"] else ["--stream", o["stream"]]
    parts += ["--budget", o["budget"]] + (["--budgets", o["budgets"]] if o["budgets"] else [])
    parts += ["--methods", o["methods"], "--out", o["out"]]
    parts += ["--seeds", o["seeds"]] if o["seeds"] else ["--seed", str(o["seed"])]
    parts += (["--tune", o["tune"]] if o["tune"] else []) + (["--ladder"] if o["ladder"] else [])
    parts += ["--split", o["split"]] if o.get("split", "test") != "test" else []
    parts += [] if o["device_ttft"] is None else ["--device-ttft" if o["device_ttft"] else "--no-device-ttft"]
    return " ".join(shlex.quote(a) for a in parts + (["--quick"] if o["quick"] else []))


def _precompute_on_ray(backbone, model: str, streams: list[str], seeds: list[int], names: list[str],
                       sweep: list[int], main: int, out: str, cfg, rcfg, grid: bool, progress: bool) -> None:
    """Every stage of the grid computed by Ray tasks (tuning points first, then the runs with the
    values tuning chose); the local run that follows finds them finished and only reads them."""
    from edgekv.bench.distributed import run_cells, run_on_ray, tuning_cells
    from edgekv.bench.grid import _default_load, tune

    say = (lambda line: typer.echo(line, err=True)) if progress else (lambda line: None)
    out = os.path.abspath(out)  # workers may start elsewhere
    run_on_ray(tuning_cells(streams[0], seeds[0], names, main, out, cfg), model, rcfg, say)
    overrides, _ = tune(backbone, _default_load(streams[0], seeds[0]), names, main, out, replace(cfg, seed=seeds[0]),
                        model, progress=False)  # reads the finished points
    run_on_ray(run_cells(streams, seeds, names, sweep, main, out, cfg, overrides, grid), model, rcfg, say)


def load_model(model: str):
    from edgekv.host.models import load_backbone

    return load_backbone(model)


def grid_options(stream: str | None, streams: str | None, seed: int, seeds: str | None
                 ) -> tuple[list[str], list[int]]:
    """(streams, seeds) of the runs: --stream/--seed (one run) or --streams/--seeds (a grid)."""
    if stream and streams:
        raise InputError("give --stream (one run) or --streams (a grid of runs), not both")
    if not stream and not streams:
        raise InputError("--stream or --streams is required (a built-in stream such as edge6, or a folder)")
    if seeds is not None and seed != 0:
        raise InputError("give --seed (one run) or --seeds (a grid of runs), not both")
    names = [s.strip() for s in streams.split(",") if s.strip()] if streams else [stream]
    try:
        nums = [int(x) for x in seeds.split(",") if x.strip()] if seeds is not None else [seed]
    except ValueError:
        raise InputError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if not names or not nums or any(n < 0 for n in nums):
        raise InputError(f"--streams / --seeds: need at least one stream and non-negative seeds, got "
                         f"{streams!r} / {seeds!r}")
    return names, nums


def _device_ttft_cell(r: dict) -> str:
    """A method's median device TTFT: text queries, and image queries when they were timed."""
    img = r.get("image") or {}
    parts = [f"{r['median_ms']:.1f} ms" + (" text" if img else "")] if r.get("median_ms") is not None else []
    if img.get("median_ms") is not None:
        parts.append(f"{img['median_ms']:.1f} ms image")
    return ", ".join(parts) or "-"


def _extra_rows(d: dict) -> list[tuple[str, str]]:
    """Rows for the tuning choice, the device TTFT and the ladder (when they ran)."""
    rows = [(f"tuned {n}", f"lr {c['chosen']['lora_lr']:g}, {c['chosen']['lora_epochs']} epochs (val)")
            for n, c in (d.get("tuning") or {}).get("methods", {}).items()]
    dev = d.get("ttft_device")
    if dev:
        rows += [("device TTFT", f"not measured: {dev['error']}")] if dev.get("error") else [
            (f"device TTFT {n}", _device_ttft_cell(r)) for n, r in dev.get("methods", {}).items()]
    if d.get("ladder"):
        rows.append(("ladder", f"{d['ladder']['dir']}/ladder.md"))
    return rows


def _human_grid(d: dict) -> str:
    from edgekv.bench.report import ci_cell

    rows = []
    for m in d["aggregate"]["methods"]:
        budget = "-" if m["budget"] is None else format_size(m["budget"])
        rows.append((f"{m['method']} @ {budget}", f"Last {ci_cell(m['metrics']['last'])}  Avg "
                     f"{ci_cell(m['metrics']['avg'])}  ({len(m['runs'])} runs)"))
    for p in d["aggregate"]["paired"]["methods"]:
        v = p["metrics"]["last"]
        rows.append((f"{d['aggregate']['paired']['reference']} vs {p['method']}",
                     f"Last {ci_cell(v, signed=True)}: {v['verdict']}"))
    rows += _extra_rows(d)
    rows.append(("results", d["outputs"]["md"]))
    rows.append(("time", f"{d['seconds_total']} s"))
    return table(rows)


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
    rows += _extra_rows(d)
    rows.append(("results", d["outputs"]["md"]))
    rows.append(("time", f"{d['seconds_total']} s"))
    return table(rows)


@command("bench")
def bench_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face model folder, .gguf, or built-in name."),
    stream: str = typer.Option(None, "--stream", help="Task stream: a built-in name (edge6) or a stream folder."),
    budget: str = typer.Option(..., "--budget", help="Main byte budget (16MiB): every method runs at it."),
    budgets: str = typer.Option(None, "--budgets", help="Comma-separated budgets of the sweep "
                                "(default: 1/4 and 1/2 of --budget, plus --budget)."),
    methods: str = typer.Option("all", "--methods", help="Comma-separated methods (default: all)."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (results, plots, resumable stages)."),
    seed: int = field_option(BenchConfig, "seed", "--seed"),
    streams: str = typer.Option(None, "--streams", help="Comma-separated streams of a grid of runs "
                                "(edge6,edge6-rev): each (stream, seed) runs into OUT/runs/<stream>-s<seed>; "
                                "OUT/results.md aggregates them with intervals. Instead of --stream."),
    seeds: str = typer.Option(None, "--seeds", help="Comma-separated seeds of a grid of runs (0,1). "
                              "Instead of --seed."),
    tune: str = field_option(BenchConfig, "tune", "--tune", default=None),
    ladder: bool = field_option(BenchConfig, "ladder", "--ladder"),
    split: str = field_option(BenchConfig, "eval_split", "--split"),
    device_ttft: bool = field_option(BenchConfig, "device_ttft", "--device-ttft/--no-device-ttft", default=None),
    quick: bool = typer.Option(False, "--quick", help="Tiny settings for tests and CI (BenchConfig.quick)."),
    threads: int = typer.Option(None, "--threads", "-t", help="PyTorch threads (default: PyTorch decides)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json."),
    ray: bool = typer.Option(False, "--ray", help="Run every cell (method x budget x run) as a Ray task; OUT "
                             "must be on a file system every node sees. Needs the [scale] extra."),
    ray_address: str = field_option(RayConfig, "address", "--ray-address"),
    ray_cpus: int = field_option(RayConfig, "cpus_per_cell", "--ray-cpus-per-cell"),
) -> None:
    """Fill the accuracy matrix of every method over a task stream; report Avg, Last, BWT,
    Forgetting and deployed bytes; resumable (finished stages are not recomputed)."""
    from edgekv.bench.methods import parse_methods

    stream_list, seed_list = grid_options(stream, streams, seed, seeds)
    cfg = BenchConfig(seed=seed_list[0])
    cfg = cfg.quick() if quick else cfg
    cfg = replace(cfg, tune=parse_tune(tune), ladder=ladder, eval_split=split,
                  device_ttft=cfg.device_ttft if device_ttft is None else device_ttft)
    names = parse_methods(methods, cfg)
    if [t for t in cfg.tune if t not in names]:
        raise InputError(f"--tune {tune}: tune only methods that run (--methods {methods})")
    main, sweep = parse_budgets(budget, budgets, cfg.sweep_fractions)
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    import torch

    from edgekv.bench.grid import run_grid, run_single
    from edgekv.data.stream import load_stream

    if threads is not None:
        torch.set_num_threads(threads)
    the_stream = None if streams or seeds else load_stream(stream, seed=seed)
    backbone = load_model(model)
    cmd = command_line(model=model, stream=stream, streams=streams, budget=budget, budgets=budgets, methods=methods,
                       out=out, seed=seed, seeds=seeds, tune=tune, ladder=ladder, split=split, device_ttft=device_ttft, quick=quick)
    if ray or ray_address:
        _precompute_on_ray(backbone, model, stream_list, seed_list, names, sweep, main, out, cfg,
                           RayConfig(address=ray_address, cpus_per_cell=ray_cpus), grid=the_stream is None,
                           progress=not no_progress)
    if the_stream is None:  # a grid of runs, one report
        results = run_grid(backbone, stream_list, seed_list, names, sweep, main, out, cfg, model_name=model,
                           command=cmd, progress=not no_progress)
        emit(results, json_out, _human_grid)
        return
    results = run_single(backbone, the_stream, names, sweep, main, out, cfg, model_name=model, command=cmd,
                         progress=not no_progress)
    emit(results, json_out, _human)
