"""Several benchmark runs, one report: every (stream, seed) of a grid, then intervals over them.

``run_grid`` runs each (stream, seed) exactly as a single ``edgekv bench`` run
(:func:`edgekv.bench.runner.run_bench`, the seed in ``BenchConfig.seed``) into
``OUT/runs/<stream>-s<seed>/``, each resumable stage by stage as a single run is, then writes
``OUT/results.json`` and ``OUT/results.md``: per (method, budget) the metrics of every run,
their mean with a 95 % hierarchical bootstrap interval over runs x test queries, and the
paired differences of every method against InduceKV at the main budget with a verdict
("better", "worse", "cannot tell"), see :mod:`edgekv.bench.stats`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from edgekv.atomic import write_file_atomic
from edgekv.bench import report, stats
from edgekv.bench.config import BenchConfig
from edgekv.bench.runner import run_bench
from edgekv.errors import InputError


def run_label(stream: str, seed: int) -> str:
    """The run's folder name under ``OUT/runs``: ``<stream name or folder name>-s<seed>``."""
    return f"{os.path.basename(os.path.normpath(stream))}-s{seed}"


def grid_runs(streams: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int, str]]:
    """(stream, seed, label) of every run, seed by seed (both orders of a seed come first)."""
    if not streams or not seeds:
        raise InputError("a grid needs at least one stream and one seed")
    if any(s < 0 for s in seeds):
        raise InputError(f"seeds must be non-negative integers, got {','.join(map(str, seeds))}")
    runs = [(stream, seed, run_label(stream, seed)) for seed in seeds for stream in streams]
    labels = [lab for _, _, lab in runs]
    if len(set(labels)) != len(labels):
        raise InputError(f"two runs of the grid would share a folder ({', '.join(labels)}): "
                         f"give distinct streams and seeds")
    return runs


def _run_summary(label: str, seed: int, res: dict) -> dict:
    s = res["stream"]
    ev = s.get("eval_split", "test")
    return {"label": label, "stream": s["name"], "seed": seed, "dir": f"runs/{label}", "tasks": s["tasks"],
            "stream_fingerprint": s["fingerprint"], "eval_split": ev,
            "eval_per_task": s["val_per_task"] if ev == "val" else s["test_per_task"],
            "seconds_total": res["seconds_total"], "ttft": res.get("ttft", {})}


def run_grid(backbone, streams: Sequence[str], seeds: Sequence[int], methods: Sequence[str],
             budgets: Sequence[int], main_budget: int, out_dir: str, cfg: BenchConfig, model_name: str = "",
             command: str = "", progress: bool = True, load: Callable | None = None) -> dict:
    """Run every (stream, seed) into ``out_dir/runs/<label>``; write the aggregate report. -> results

    ``load(stream, seed)`` gives the stream (default :func:`edgekv.data.stream.load_stream`)."""
    if load is None:
        from edgekv.data.stream import load_stream

        def load(stream, seed):
            return load_stream(stream, seed=seed)

    t0 = time.perf_counter()
    plan = grid_runs(streams, seeds)
    results_list, summaries = [], []
    for stream, seed, label in plan:
        res = run_bench(backbone, load(stream, seed), methods, budgets, main_budget,
                        os.path.join(out_dir, "runs", label), replace(cfg, seed=seed), model_name=model_name,
                        command=command, progress=progress)
        results_list.append(res)
        summaries.append(_run_summary(label, seed, res))
    results = {
        "command": command,
        "model": results_list[0]["model"],
        "model_fingerprint": results_list[0]["model_fingerprint"],
        "streams": [os.path.basename(os.path.normpath(s)) for s in streams],
        "seeds": list(seeds),
        "config": {k: v for k, v in results_list[0]["config"].items() if k != "seed"},
        "main_budget": main_budget,
        "budgets": results_list[0]["budgets"],
        "runs": summaries,
        "aggregate": stats.aggregate(results_list, [s["label"] for s in summaries]),
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    write_grid(results, out_dir)
    return results


def write_grid(results: dict, out_dir: str) -> dict[str, str]:
    """``out_dir/results.json`` and ``out_dir/results.md`` (each replaced atomically). -> name -> path"""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md")}
    results["outputs"] = {k: os.path.relpath(v, out_dir) for k, v in paths.items()}
    if results.get("command"):  # no machine path in the report
        results["command"] = report.portable_command(results["command"])
    write_file_atomic(paths["json"], json.dumps(results, indent=1, sort_keys=True))
    write_file_atomic(paths["md"], report.grid_markdown(results))
    return paths
