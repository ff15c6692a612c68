"""Several benchmark runs, one report: every (stream, seed) of a grid, then intervals over them;
and what is done once around the runs: tuning before, the ladder and device TTFT after.

``run_grid`` runs each (stream, seed) exactly as a single ``edgekv bench`` run
(:func:`edgekv.bench.runner.run_bench`, the seed in ``BenchConfig.seed``) into
``OUT/runs/<stream>-s<seed>/``, each resumable stage by stage as a single run is, then writes
``OUT/results.json`` and ``OUT/results.md``: per (method, budget) the metrics of every run,
their mean with a 95 % hierarchical bootstrap interval over runs x test queries, and the
paired differences of every method against InduceKV at the main budget with a verdict
("better", "worse", "cannot tell"), see :mod:`edgekv.bench.stats`. The budget sweep
(``BenchConfig.sweep_methods`` at every budget) runs on the first run only; every other run
has the main budget alone. :func:`run_single` is the same around one run written into ``OUT``.

Around the runs, both on the first run (first stream, first seed):

* :func:`tune` (``BenchConfig.tune``): before the test runs, every tuned method runs the grid
  ``tune_lora_lrs`` x ``tune_lora_epochs`` on the **val** split, each point an ordinary
  resumable run into ``OUT/tuning/<method>/<lr>-<epochs>/``; the best by val Last (ties: Avg,
  then fewer epochs, then grid order) is what every test run of that method uses
  (``run_bench(overrides=...)``, so it is in their stage fingerprints); ``OUT/tuning.json``
  and results.json record the grid and the choice;
* :func:`run_extras`: the accuracy ladder (``BenchConfig.ladder``; ``OUT/ladder/``, the
  memory rung from induce's final state at the main budget; reused while its fingerprint
  holds) and the time to first token on the device runtime (``BenchConfig.device_ttft``:
  an export into ``OUT/artifacts``, each method's final state, :mod:`edgekv.bench.device`;
  text test queries, and image test queries reported apart on a vision-language model),
  ``ttft_device`` in results.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace

from edgekv.atomic import write_file_atomic
from edgekv.bench import report, stats
from edgekv.bench.config import BenchConfig
from edgekv.bench.runner import bench_tasks, run_bench, stage_dir, stream_fingerprint, ttft_examples
from edgekv.errors import EdgeKVError, InputError
from edgekv.format.layout import DEFAULT_PAYLOAD_DTYPE
from edgekv.manifest import file_sha256


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


def run_plan(streams: Sequence[str], seeds: Sequence[int], budgets: Sequence[int], main_budget: int,
             out_dir: str, grid: bool = True) -> list[tuple[str, int, str, str, list[int]]]:
    """(stream, seed, label, run folder, budgets) of every run: the sweep budgets on the first run
    only; the folder ``out_dir/runs/<label>`` in a grid, ``out_dir`` itself for a single run."""
    return [(stream, seed, label, os.path.join(out_dir, "runs", label) if grid else out_dir,
             list(budgets) if k == 0 else [main_budget])
            for k, (stream, seed, label) in enumerate(grid_runs(streams, seeds))]


def _run_summary(label: str, seed: int, res: dict) -> dict:
    s = res["stream"]
    ev = s.get("eval_split", "test")
    return {"label": label, "stream": s["name"], "seed": seed, "dir": f"runs/{label}", "tasks": s["tasks"],
            "stream_fingerprint": s["fingerprint"], "eval_split": ev,
            "eval_per_task": s["val_per_task"] if ev == "val" else s["test_per_task"],
            "seconds_total": res["seconds_total"], "ttft": res.get("ttft", {})}


def _default_load(stream: str, seed: int):
    from edgekv.data.stream import load_stream

    return load_stream(stream, seed=seed)


# ---------------------------------------------------------------------------------
# tuning on val (first run only)
# ---------------------------------------------------------------------------------
TUNING_RULE = "best val Last; ties: val Avg, then fewer epochs (cheaper), then grid order"


def tuning_grid(cfg: BenchConfig) -> list[dict]:
    """The points of a tuned method's grid, ``{"lora_lr", "lora_epochs"}``, epochs then learning rate."""
    return [{"lora_lr": lr, "lora_epochs": ep} for ep in cfg.tune_lora_epochs for lr in cfg.tune_lora_lrs]


def tuning_point(name: str, point: dict, cfg: BenchConfig) -> tuple[str, BenchConfig]:
    """A tuning point's folder relative to OUT and the config it runs with (val split)."""
    rel = os.path.join("tuning", name, f"{point['lora_lr']:g}-{point['lora_epochs']}")
    return rel, replace(cfg, eval_split="val", **point)


def _num(x: float | None) -> float:
    return float("-inf") if x is None else float(x)


def pick_best(points: Sequence[dict]) -> dict:
    """The grid point with the best val Last (``metrics``); ties: Avg, then fewer epochs, then the first."""
    return max(points, key=lambda p: (_num(p["metrics"].get("last")), _num(p["metrics"].get("avg")),
                                      -p["lora_epochs"]))  # max keeps the first of equal keys


def tune(backbone, stream, methods: Sequence[str], main_budget: int, out_dir: str, cfg: BenchConfig,
         model_name: str = "", progress: bool = True) -> tuple[dict[str, dict], dict | None]:
    """Tune every method of ``cfg.tune`` on the val split of ``stream`` at the main budget.

    Each grid point is an ordinary (resumable) run into ``out_dir/tuning/<method>/<lr>-<epochs>/``.
    -> (per method the chosen BenchConfig fields, the record also written to ``out_dir/tuning.json``;
    None when nothing is tuned)"""
    missing = [n for n in cfg.tune if n not in methods]
    if missing:
        raise InputError(f"--tune {','.join(missing)}: not among the methods run ({', '.join(methods)})")
    if not cfg.tune:
        return {}, None
    record = {"split": "val", "stream": str(getattr(stream, "name", "")), "seed": cfg.seed, "budget": main_budget,
              "rule": TUNING_RULE, "methods": {}}
    overrides: dict[str, dict] = {}
    for name in cfg.tune:
        points = []
        for point in tuning_grid(cfg):
            rel, pcfg = tuning_point(name, point, cfg)
            res = run_bench(backbone, stream, [name], [main_budget], main_budget, os.path.join(out_dir, rel),
                            pcfg, model_name=model_name, progress=progress)
            run = res["runs"][0]
            points.append({**point, "dir": rel, "metrics": run["metrics"], "seconds": run["seconds"]})
        best = pick_best(points)
        overrides[name] = {k: best[k] for k in ("lora_lr", "lora_epochs")}
        record["methods"][name] = {"grid": points, "chosen": overrides[name]}
    os.makedirs(out_dir, exist_ok=True)
    write_file_atomic(os.path.join(out_dir, "tuning.json"), json.dumps(record, indent=1, sort_keys=True))
    return overrides, record


# ---------------------------------------------------------------------------------
# after the runs (first run only): the ladder, device TTFT
# ---------------------------------------------------------------------------------
def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def bench_ladder(backbone, stream, tasks, run_dir: str, out_dir: str, methods: Sequence[str], main_budget: int,
                 cfg: BenchConfig, progress: bool = True) -> dict:
    """:func:`edgekv.bench.ladder.run_ladder` on the run's tasks (its train sample, its evaluated split),
    the memory rung from induce's final state at the main budget; ``out_dir/ladder/``, reused while
    its fingerprint (ladder config, tasks, model, memory file) holds. -> summary for results.json"""
    from edgekv.bench.ladder import LadderConfig, run_ladder, write_ladder

    mem = os.path.join(stage_dir(run_dir, "induce", main_budget, len(tasks) - 1), "state", "memory.ekv")
    mem = mem if "induce" in methods and os.path.isfile(mem) else None
    lcfg = LadderConfig(top_k=cfg.top_k, pooled_len=cfg.pooled_len, seed=cfg.seed, split=cfg.eval_split,
                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                        payload_dtype=DEFAULT_PAYLOAD_DTYPE)  # what induce's memory stores
    fp = hashlib.sha256(json.dumps({"ladder": lcfg.to_dict(), "tasks": stream_fingerprint(tasks, cfg.eval_split),
                                    "model": backbone.fingerprint, "memory": mem and file_sha256(mem)},
                                   sort_keys=True).encode()).hexdigest()[:32]
    folder = os.path.join(out_dir, "ladder")
    result = _read_json(os.path.join(folder, "ladder.json"))
    if result is None or result.get("fingerprint") != fp or not os.path.isfile(os.path.join(folder, "ladder.png")):
        view = SimpleNamespace(tasks=list(tasks), name=getattr(stream, "name", ""), path=getattr(stream, "path", None))
        result = run_ladder(backbone, view, lcfg, mem, progress)
        result.update(fingerprint=fp, memory=None if mem is None else os.path.relpath(mem, out_dir))
        write_ladder(result, folder)
    return {"dir": "ladder", "fingerprint": fp, "rungs": result["rungs"], "all": result["all"],
            "memory": result["memory"], "seconds": result["seconds"]}


def bench_device_ttft(backbone, tasks, run_dir: str, out_dir: str, methods: Sequence[str], main_budget: int,
                      cfg: BenchConfig, model_name: str = "") -> dict:
    """Time to first token of every method's final state at the main budget on the device runtime
    (:mod:`edgekv.bench.device`; the export cached in ``out_dir/artifacts``). -> its result, or
    ``{"error": why}`` when there is none (no export or runtime here: the runs stand)."""
    from edgekv.bench import device

    queries = ttft_examples(tasks, cfg.ttft_queries)
    # a vision-language model: image queries too (reported apart), as many as text ones
    images = ttft_examples(tasks, cfg.ttft_queries, images=True) if getattr(backbone, "vision", None) is not None \
        else []
    if not queries and not images:
        with_images = any(ex.image is not None for t in tasks for ex in t.test)
        return {"error": "no text test query to time" + (" (image queries are timed on a vision-language model only)"
                                                         if with_images else "")}
    try:
        art = device.export_for_bench(model_name or str(getattr(backbone, "source", "")), out_dir,
                                      fingerprint=backbone.fingerprint)
        states = device.method_states_from_bench(run_dir, methods, main_budget, len(tasks), cfg)
        res = device.measure_device_ttft(art, states, queries + images, cfg)
    except (EdgeKVError, ImportError) as e:
        print(f"edgekv bench: no device time to first token: {e}", file=sys.stderr)
        return {"error": str(e)}
    res["artifacts"] = os.path.relpath(art, out_dir)
    return res


def run_extras(backbone, stream, res: dict, run_dir: str, out_dir: str, methods: Sequence[str], main_budget: int,
               model_name: str = "", progress: bool = True) -> dict:
    """The ladder (``BenchConfig.ladder``) and device TTFT (``device_ttft``) of one finished run
    (``res``, in ``run_dir``), with the config it ran with. -> {"ladder": ..., "ttft_device": ...}"""
    cfg = BenchConfig.from_dict(res["config"])  # max_new_tokens as resolved by the run
    tasks = bench_tasks(stream, cfg)
    out: dict = {}
    if cfg.ladder:
        out["ladder"] = bench_ladder(backbone, stream, tasks, run_dir, out_dir, methods, main_budget, cfg, progress)
    if cfg.device_ttft:
        out["ttft_device"] = bench_device_ttft(backbone, tasks, run_dir, out_dir, methods, main_budget, cfg,
                                               model_name)
    return out


# ---------------------------------------------------------------------------------
# one run, several runs
# ---------------------------------------------------------------------------------
def run_single(backbone, stream, methods: Sequence[str], budgets: Sequence[int], main_budget: int, out_dir: str,
               cfg: BenchConfig, model_name: str = "", command: str = "", progress: bool = True) -> dict:
    """One run into ``out_dir`` (:func:`run_bench`), with tuning before and the extras after. -> results"""
    t0 = time.perf_counter()
    overrides, tuning = tune(backbone, stream, methods, main_budget, out_dir, cfg, model_name, progress)
    res = run_bench(backbone, stream, methods, budgets, main_budget, out_dir, cfg, model_name=model_name,
                    command=command, progress=progress, overrides=overrides, write=False)
    if tuning:
        res["tuning"] = tuning
    res.update(run_extras(backbone, stream, res, out_dir, out_dir, methods, main_budget, model_name, progress))
    res["seconds_total"] = round(time.perf_counter() - t0, 1)
    report.write_all(res, out_dir)
    return res


def run_grid(backbone, streams: Sequence[str], seeds: Sequence[int], methods: Sequence[str],
             budgets: Sequence[int], main_budget: int, out_dir: str, cfg: BenchConfig, model_name: str = "",
             command: str = "", progress: bool = True, load: Callable | None = None) -> dict:
    """Run every (stream, seed) into ``out_dir/runs/<label>``; write the aggregate report. -> results

    The sweep budgets run on the first run only; tuning and the extras on the first run.
    ``load(stream, seed)`` gives the stream (default :func:`edgekv.data.stream.load_stream`)."""
    load = load or _default_load
    t0 = time.perf_counter()
    plan = run_plan(streams, seeds, budgets, main_budget, out_dir)
    first = load(plan[0][0], plan[0][1])
    overrides, tuning = tune(backbone, first, methods, main_budget, out_dir, replace(cfg, seed=plan[0][1]),
                             model_name, progress)
    results_list, summaries = [], []
    for k, (stream, seed, label, run_dir, run_budgets) in enumerate(plan):
        res = run_bench(backbone, first if k == 0 else load(stream, seed), methods, run_budgets, main_budget,
                        run_dir, replace(cfg, seed=seed), model_name=model_name, command=command, progress=progress,
                        overrides=overrides)
        results_list.append(res)
        summaries.append(_run_summary(label, seed, res))
    results = {
        "command": command,
        "model": results_list[0]["model"],
        "model_fingerprint": results_list[0]["model_fingerprint"],
        "streams": [os.path.basename(os.path.normpath(s)) for s in streams],
        "seeds": list(seeds),
        "config": {k: v for k, v in results_list[0]["config"].items() if k != "seed"},
        "overrides": results_list[0]["overrides"],
        "main_budget": main_budget,
        "budgets": results_list[0]["budgets"],
        "sweep_run": plan[0][2],
        "runs": summaries,
        "aggregate": stats.aggregate(results_list, [s["label"] for s in summaries]),
    }
    if tuning:
        results["tuning"] = tuning
    results.update(run_extras(backbone, first, results_list[0], plan[0][3], out_dir,
                              methods, main_budget, model_name, progress))
    results["seconds_total"] = round(time.perf_counter() - t0, 1)
    write_grid(results, out_dir)
    return results


def write_grid(results: dict, out_dir: str) -> dict[str, str]:
    """``out_dir/results.json``, ``out_dir/results.md`` (each replaced atomically) and the summary
    plots in ``out_dir/plots`` (:func:`edgekv.bench.report.summary_plots`). -> name -> path"""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md")}
    paths.update(report.summary_plots(results, os.path.join(out_dir, "plots")))
    results["outputs"] = {k: os.path.relpath(v, out_dir) for k, v in paths.items()}
    if results.get("command"):  # no machine path in the report
        results["command"] = report.portable_command(results["command"])
    write_file_atomic(paths["json"], json.dumps(results, indent=1, sort_keys=True))
    write_file_atomic(paths["md"], report.grid_markdown(results))
    return paths
