"""The benchmark grid on a Ray cluster (``edgekv bench --ray [ADDRESS]``).

A *cell* is one method at one budget over one (stream, seed) run: exactly what
:func:`edgekv.bench.runner.run_method` computes, stage by stage, into the run's folder. With
``--ray`` every cell of the grid (tuning points first, then the runs with the tuned values) is
a Ray task; each writes its stages into the same resumable layout a local run writes (so
``OUT`` must be on a file system every node sees: on one machine it is). Then the local code
runs as always: it finds every stage finished (same fingerprints) and only reads them, writes
the report, the ladder and device TTFT. The report is therefore the local one, number for
number.

A task whose worker dies is retried by Ray (``RayConfig.max_retries``); a cell that still fails
is reported by name with its error, and the command fails without writing the report: nothing
is silently missing, and a rerun resumes (finished stages are kept). Progress: cells done /
running / failed. Without ``--ray`` none of this is imported, nor is Ray.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from edgekv.bench.config import BenchConfig
from edgekv.errors import EdgeKVError
from edgekv.scale import RayConfig, start_ray


@dataclass(frozen=True)
class Cell:
    """One method at one budget over one run; ``cfg`` the BenchConfig it runs with (tuned values in)."""

    stream: str  # name or folder, as load_stream takes it
    seed: int
    out_dir: str  # the run's folder (OUT, OUT/runs/<label> or a tuning point's)
    method: str
    budget: int
    cfg: dict

    @property
    def label(self) -> str:
        return f"{os.path.basename(os.path.normpath(self.stream))}-s{self.seed} {self.method} @ {self.budget} B " \
               f"({self.cfg.get('eval_split', 'test')})"


def run_cell(backbone, cell: Cell, load: Callable | None = None) -> dict:
    """Compute ``cell``'s stages (skipping finished ones) exactly as the local run would. -> summary"""
    from edgekv.bench.grid import _default_load
    from edgekv.bench.runner import prepare_run, run_method

    cfg = BenchConfig.from_dict(cell.cfg)
    stream = (load or _default_load)(cell.stream, cell.seed)
    tasks, run_cfg, sfp = prepare_run(backbone, stream, replace(cfg, seed=cell.seed))
    t0 = time.perf_counter()
    rec = run_method(backbone, tasks, cell.method, cell.budget, cell.out_dir, run_cfg, sfp, progress=False)
    return {"label": cell.label, "last": rec["metrics"]["last"], "seconds": round(time.perf_counter() - t0, 1),
            "pid": os.getpid()}


def tuning_cells(stream: str, seed: int, methods: Sequence[str], main_budget: int, out_dir: str,
                 cfg: BenchConfig) -> list[Cell]:
    """The points :func:`edgekv.bench.grid.tune` runs (val split, main budget, first run)."""
    from edgekv.bench.grid import tuning_grid, tuning_point

    cells = []
    for name in cfg.tune:
        if name not in methods:
            continue
        for point in tuning_grid(cfg):
            rel, pcfg = tuning_point(name, point, replace(cfg, seed=seed))
            cells.append(Cell(stream, seed, os.path.join(out_dir, rel), name, main_budget, pcfg.to_dict()))
    return cells


def run_cells(streams: Sequence[str], seeds: Sequence[int], methods: Sequence[str], budgets: Sequence[int],
              main_budget: int, out_dir: str, cfg: BenchConfig, overrides: dict[str, dict] | None,
              grid: bool) -> list[Cell]:
    """The cells of the runs, as :func:`~edgekv.bench.grid.run_grid` (``grid``) or
    :func:`~edgekv.bench.grid.run_single` plan them: the sweep on the first run only."""
    from edgekv.bench.grid import run_plan
    from edgekv.bench.runner import method_configs, plan

    cells = []
    for stream, seed, _, run_dir, run_budgets in run_plan(streams, seeds, budgets, main_budget, out_dir, grid):
        rcfg = replace(cfg, seed=seed)
        mcfg = method_configs(rcfg, methods, overrides)
        for name, b in plan(methods, run_budgets, main_budget, rcfg):
            cells.append(Cell(stream, seed, run_dir, name, b, mcfg[name].to_dict()))
    return cells


# --- Ray ------------------------------------------------------------------------------
_BACKBONES: dict = {}  # per worker process: model -> Backbone, loaded once


def _remote_cell(model: str, threads: int, cell: dict) -> dict:
    """The body of a cell's Ray task (runs in a worker process)."""
    import torch

    from edgekv.host.models import load_backbone

    torch.set_num_threads(threads)
    if model not in _BACKBONES:
        _BACKBONES[model] = load_backbone(model)
    return run_cell(_BACKBONES[model], Cell(**cell))


def run_on_ray(cells: Sequence[Cell], model: str, rcfg: RayConfig, say: Callable[[str], None] | None = None
               ) -> list[dict]:
    """Run ``cells`` as Ray tasks; -> their summaries in order. Raises :class:`EdgeKVError`
    naming every cell that failed after Ray's retries (finished stages stay for a rerun)."""
    if not cells:
        return []
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    ray = start_ray(rcfg)
    task = ray.remote(num_cpus=rcfg.cpus_per_cell, max_retries=rcfg.max_retries)(_remote_cell)
    pending = {task.remote(model, rcfg.cpus_per_cell, asdict(c)): i for i, c in enumerate(cells)}
    out: list[dict | None] = [None] * len(cells)
    failed: list[str] = []
    t0 = time.perf_counter()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            try:
                out[i] = ray.get(ref)
            except Exception as e:  # the task raised, or its worker died more often than max_retries
                cause = getattr(e, "cause", None) or e
                failed.append(f"{cells[i].label}: {type(cause).__name__}: {str(cause).splitlines()[-1][:200]}")
        done = sum(r is not None for r in out)
        say(f"ray: cells {done} done, {len(pending)} running or queued, {len(failed)} failed "
            f"({time.perf_counter() - t0:.0f} s)")
    if failed:
        raise EdgeKVError(f"{len(failed)} of {len(cells)} benchmark cells failed on Ray: " + "; ".join(failed)
                          + " (finished stages are kept: rerun to resume)")
    return [r for r in out if r is not None]
