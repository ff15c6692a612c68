"""Run the benchmark: every method learns the tasks in order and is evaluated on every task.

For a method at a budget, stage i = learn task i, then answer the test split of every
task j (row i of A; j <= i only when ``BenchConfig.full_matrix`` is off). Each finished
stage writes ``OUT/stages/<method>/<budget>/task<i>/stage.json`` (its A row, the
deployed and host bytes, timings, facts) and the method's state after task i
(``state/``: memory file + anchors, adapter, replay buffer, stored texts). A rerun
skips every stage whose fingerprint (sha256 of the bench config, the method's
settings, a KV memory method's full ``AdaptConfig`` for that task (so a changed library
default such as ``init_tau`` recomputes it), the budget, the stream, the model and the task
index) matches, and resumes
from the last finished stage's state; only the last finished stage keeps its state (the
earlier ones keep their stage.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from edgekv.atomic import write_file_atomic
from edgekv.bench import metrics, stats
from edgekv.bench.base import Context, Method
from edgekv.bench.config import RUN_FIELDS, BenchConfig
from edgekv.bench.evaluate import accuracy, is_correct
from edgekv.bench.methods import check_budget, registry
from edgekv.data import Example
from edgekv.data.stream import normalise_answer
from edgekv.errors import InputError


@dataclass(frozen=True)
class BenchTask:
    """One task as the benchmark uses it: a seeded sample of train; test and val (whole, or a
    subset balanced over the task's concepts, ``BenchConfig.max_test_per_task``)."""

    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    val: tuple[Example, ...] = ()

    def split(self, name: str) -> tuple[Example, ...]:
        """The examples of split ``name`` ("val" or "test": what ``BenchConfig.eval_split`` evaluates)."""
        if name not in ("val", "test"):
            raise InputError(f"BenchConfig.eval_split must be 'val' or 'test', got {name!r}")
        return self.val if name == "val" else self.test


def balanced_subset(examples: Sequence[Example], n: int) -> list[Example]:
    """At most ``n`` examples balanced over concepts; all of them when ``n`` is 0 or covers them.

    ``Example`` carries no concept, so the concept is the normalised answer (it identifies the
    concept of every built-in task; home-city's answer is the city, shared by two people;
    date-house has one concept anyway). Round robin over the concepts in order of first
    appearance, each concept's examples in split order; the chosen ones keep split order.
    """
    if n <= 0 or n >= len(examples):
        return list(examples)
    groups: dict[str, list[int]] = {}
    for k, ex in enumerate(examples):
        groups.setdefault(normalise_answer(ex.answer), []).append(k)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        chosen += [g[depth] for g in groups.values() if depth < len(g)][: n - len(chosen)]
        depth += 1
    return [examples[k] for k in sorted(chosen)]


def bench_tasks(stream, cfg: BenchConfig) -> list[BenchTask]:
    """Tasks of a stream (anything with ``.tasks`` of objects with name/train/test[/val], or a list of them)."""
    tasks = getattr(stream, "tasks", stream)
    out = []
    for i, t in enumerate(tasks):
        train, test, val = list(t.train), list(t.test), list(getattr(t, "val", ()))
        if not train or not test:
            raise InputError(f"task {t.name!r} needs train and test examples (has {len(train)} / {len(test)})")
        if cfg.eval_split == "val" and not val:
            raise InputError(f"task {t.name!r} has no val examples: BenchConfig.eval_split='val' needs them")
        n = cfg.max_train_per_task
        rows = sorted(np.random.default_rng(cfg.seed + 7919 * i).choice(len(train), size=n, replace=False).tolist()) \
            if len(train) > n else list(range(len(train)))
        out.append(BenchTask(t.name, tuple(train[r] for r in rows),
                             tuple(balanced_subset(test, cfg.max_test_per_task)),
                             tuple(balanced_subset(val, cfg.max_test_per_task))))
    if not out:
        raise InputError("the stream has no tasks")
    if len({t.name for t in out}) != len(out):
        raise InputError("task names in the stream must be unique")
    return out


def answer_tokens(tokenizer, tasks: Sequence[BenchTask], split: str = "test") -> int:
    """Tokens of the longest answer of the evaluated split (greedy decoding must be able to produce it)."""
    return max(len(tokenizer(ex.answer, add_special_tokens=False).input_ids) for t in tasks
               for ex in t.split(split))


def stream_fingerprint(tasks: Sequence[BenchTask], split: str = "test") -> str:
    """sha256 of the train examples and the evaluated split's examples of every task."""
    h = hashlib.sha256()
    for t in tasks:
        h.update(json.dumps([t.name, [ex.__dict__ for ex in t.train], [ex.__dict__ for ex in t.split(split)]],
                            sort_keys=True).encode())
    return h.hexdigest()


def stage_fingerprint(cfg: BenchConfig, method: Method, budget: int, stream_fp: str, model_fp: str,
                      task_index: int) -> str:
    budget = budget if method.budget_dependent else None  # zero-shot does not depend on it
    bench = {k: v for k, v in cfg.to_dict().items() if k not in RUN_FIELDS}  # what organises runs: not a stage's
    d = {"bench": bench, "method": method.name, "params": method.params(), "budget": budget,
         "stream": stream_fp, "model": model_fp, "task_index": task_index}
    adapt_config = getattr(method, "adapt_config", None)
    if adapt_config is not None:  # a KV memory method: the library's adapt defaults (init_tau, ...) count too
        d["adapt"] = adapt_config(task_index).to_dict()
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:32]


def ttft_examples(tasks: Sequence[BenchTask], num: int, images: bool = False) -> list[Example]:
    """The first ``num`` text test examples, last task first (the host TTFT times text queries);
    ``images``: the first ``num`` test examples with an image instead (the device TTFT's image
    queries on a vision-language model)."""
    out = [ex for t in reversed(tasks) for ex in t.test if (ex.image is not None) == images]
    return out[:num]


def budget_tag(budget: int | None) -> str:
    return "none" if budget is None else f"{budget}B"


def plan(methods: Sequence[str], budgets: Sequence[int], main_budget: int, cfg: BenchConfig
         ) -> list[tuple[str, int]]:
    """(method, budget) runs: sweep methods at every budget, the others at the main budget."""
    reg = registry(cfg)
    runs = []
    for name in methods:
        if not reg[name].budget_dependent:
            runs.append((name, main_budget))
        elif name in cfg.sweep_methods:
            runs += [(name, b) for b in sorted(set(budgets) | {main_budget})]
        else:
            runs.append((name, main_budget))
    return runs


def _write_json(path: str, obj: dict) -> None:
    write_file_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _read_stage(path: str, fp: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return d if d.get("fingerprint") == fp else None


def score_row(tasks: Sequence[BenchTask], cols: Sequence[int], split: str, preds: Sequence[str]
              ) -> tuple[list[float | None], dict[str, list[str]], dict[str, list[int]]]:
    """Row of A (None where not evaluated), answers and per-query correctness (0/1, the same
    ``is_correct`` as ``accuracy``) per task name, from the answers to the columns' queries in order."""
    row: list[float | None] = [None] * len(tasks)
    answers, correct = {}, {}
    k = 0
    for j in cols:
        exs = tasks[j].split(split)
        row[j] = accuracy(preds[k: k + len(exs)], exs)
        answers[tasks[j].name] = list(preds[k: k + len(exs)])
        correct[tasks[j].name] = [int(is_correct(p, ex.answer)) for p, ex in zip(answers[tasks[j].name], exs,
                                                                                 strict=True)]
        k += len(exs)
    return row, answers, correct


def run_method(backbone, tasks: Sequence[BenchTask], name: str, budget: int, out_dir: str, cfg: BenchConfig,
               stream_fp: str, progress: bool = True) -> dict:
    """All stages of one method at one budget (skipping finished ones). -> the run's record"""
    from tqdm.auto import tqdm

    T = len(tasks)
    reg = registry(cfg)
    bdir = budget_tag(budget if reg[name].budget_dependent else None)
    work = os.path.join(out_dir, "work", name, bdir)
    shutil.rmtree(work, ignore_errors=True)  # the live state is rebuilt from the last finished stage
    method = reg[name](Context(backbone, cfg, budget, work))
    stage_dirs = [os.path.join(out_dir, "stages", name, bdir, f"task{i:02d}") for i in range(T)]
    fps = [stage_fingerprint(cfg, method, budget, stream_fp, backbone.fingerprint, i) for i in range(T)]
    stages: list[dict | None] = [_read_stage(os.path.join(d, "stage.json"), fp) for d, fp in zip(stage_dirs, fps,
                                                                                                   strict=True)]
    done = next((i for i, s in enumerate(stages) if s is None), T)
    if 0 < done < T and not os.path.isdir(os.path.join(stage_dirs[done - 1], "state")):
        done = 0  # no state to resume from: recompute the whole run
    if 0 < done < T:
        method.load(os.path.join(stage_dirs[done - 1], "state"))
    bar = tqdm(range(done, T), desc=f"{name} @ {bdir}", unit="task", leave=False, disable=not progress)
    for i in bar:
        task = tasks[i]
        t0, c0 = time.perf_counter(), time.process_time()
        learn_info = method.learn(i, task.name, task.train)
        t1, c1 = time.perf_counter(), time.process_time()
        cols = list(range(T)) if cfg.full_matrix else list(range(i + 1))
        examples = [ex for j in cols for ex in tasks[j].split(cfg.eval_split)]
        preds = method.answer(examples)
        t2, c2 = time.perf_counter(), time.process_time()
        row, answers, correct = score_row(tasks, cols, cfg.eval_split, preds)
        stage = {"fingerprint": fps[i], "method": name, "budget": budget if reg[name].budget_dependent else None,
                 "task_index": i, "task": task.name, "row": row, "deployed_bytes": method.deployed_bytes(),
                 "host_bytes": method.host_bytes(), "info": method.info(), "learn": learn_info,
                 "seconds": {"learn": round(t1 - t0, 3), "evaluate": round(t2 - t1, 3)},
                 "cpu_seconds": {"learn": round(c1 - c0, 3), "evaluate": round(c2 - c1, 3)}, "answers": answers,
                 "correct": correct}
        os.makedirs(stage_dirs[i], exist_ok=True)
        state = os.path.join(stage_dirs[i], "state")
        shutil.rmtree(state, ignore_errors=True)
        os.makedirs(state)  # present even for a method with no state (zero-shot): the run can resume
        method.save(state)
        _write_json(os.path.join(stage_dirs[i], "stage.json"), stage)  # written last: the stage is complete
        if i > 0:
            shutil.rmtree(os.path.join(stage_dirs[i - 1], "state"), ignore_errors=True)
        stages[i] = stage
        bar.set_postfix(acc=f"{np.nanmean([x for x in row if x is not None]):.2f}")
    bar.close()
    shutil.rmtree(work, ignore_errors=True)
    return run_record(name, budget if reg[name].budget_dependent else None, stages, T)


def run_record(name: str, budget: int | None, stages: Sequence[dict], T: int) -> dict:
    """The report's view of one run: A, metrics, per-query correctness, bytes after every task, timings.

    ``correct[i][j]``: the 0/1 list of task j's evaluated queries after task i (None where not
    evaluated), what the bootstrap intervals (:mod:`edgekv.bench.stats`) resample."""
    A = np.array([[np.nan if x is None else x for x in s["row"]] for s in stages], np.float64)  # [T, T]
    deployed = [s["deployed_bytes"] for s in stages]
    names = [s["task"] for s in stages]
    return {
        "method": name,
        "budget": budget,
        "tasks": names,
        "A": [[None if np.isnan(x) else float(x) for x in r] for r in A],
        "correct": [[s.get("correct", {}).get(t) for t in names] for s in stages],
        "metrics": metrics.summary(A),
        "deployed_bytes": deployed,
        "bytes_constant": len(set(deployed)) == 1,
        "host_bytes": [s["host_bytes"] for s in stages],
        "info": [s["info"] for s in stages],
        "learn": [s["learn"] for s in stages],
        "seconds": {"learn": round(sum(s["seconds"]["learn"] for s in stages), 2),
                    "evaluate": round(sum(s["seconds"]["evaluate"] for s in stages), 2)},
        "cpu_seconds": {"learn": round(sum(s.get("cpu_seconds", {}).get("learn", 0) for s in stages), 2),
                        "evaluate": round(sum(s.get("cpu_seconds", {}).get("evaluate", 0) for s in stages), 2)},
    }


def stage_dir(out_dir: str, name: str, budget: int | None, task_index: int) -> str:
    return os.path.join(out_dir, "stages", name, budget_tag(budget), f"task{task_index:02d}")


def measure_ttft(backbone, tasks: Sequence[BenchTask], names: Sequence[str], main_budget: int, out_dir: str,
                 cfg: BenchConfig) -> dict:
    """Time to first token of every method at the main budget that has one, from its state
    after the last task, timed interleaved on the same text queries. -> {"<name>_s": s, ...}"""
    examples = ttft_examples(tasks, cfg.ttft_queries)
    if not examples:
        return {}
    reg = registry(cfg)
    fns = {}
    for name in names:
        cls = reg[name]
        state = os.path.join(stage_dir(out_dir, name, main_budget if cls.budget_dependent else None, len(tasks) - 1),
                             "state")
        work = os.path.join(out_dir, "work", "ttft", name)
        shutil.rmtree(work, ignore_errors=True)
        method = cls(Context(backbone, cfg, main_budget, work))
        if os.path.isdir(state):
            method.load(state)
        fn = method.first_token() if os.path.isdir(state) or not cls.budget_dependent else None
        if fn is not None:
            fns[name] = fn
    from edgekv.bench.evaluate import time_to_first_token

    times = time_to_first_token(fns, examples)
    for name in names:
        shutil.rmtree(os.path.join(out_dir, "work", "ttft", name), ignore_errors=True)
    return {f"{k}_s": v for k, v in times.items()}


def remove_empty_dirs(root: str) -> None:
    """Remove ``root`` and its sub-folders where they are empty (bottom-up); keep anything with files."""
    for d, _, _ in sorted(os.walk(root), key=lambda t: -len(t[0])):
        try:
            os.rmdir(d)
        except OSError:
            pass


def prepare_run(backbone, stream, cfg: BenchConfig) -> tuple[list[BenchTask], BenchConfig, str]:
    """A run's tasks, its config with the decode length resolved (``max_new_tokens`` 0: the
    longest evaluated answer + 2) and the stream's fingerprint: what every stage's fingerprint
    is made of, computed the same way wherever a stage runs (here or on a Ray worker)."""
    tasks = bench_tasks(stream, cfg)
    if cfg.max_new_tokens == 0:
        cfg = replace(cfg, max_new_tokens=answer_tokens(backbone.tokenizer, tasks, cfg.eval_split) + 2)
    return tasks, cfg, stream_fingerprint(tasks, cfg.eval_split)


def method_configs(cfg: BenchConfig, methods: Sequence[str], overrides: dict[str, dict] | None) -> dict:
    """Per method the BenchConfig it runs with: ``cfg`` with its tuned ``overrides``."""
    overrides = {k: dict(v) for k, v in (overrides or {}).items() if v}
    return {name: replace(cfg, **overrides.get(name, {})) for name in methods}


def run_bench(backbone, stream, methods: Sequence[str], budgets: Sequence[int], main_budget: int, out_dir: str,
              cfg: BenchConfig, model_name: str = "", command: str = "", progress: bool = True,
              overrides: dict[str, dict] | None = None, write: bool = True) -> dict:
    """Run every (method, budget) of the plan; write results.json, results.md and plots. -> results

    ``overrides``: per method, BenchConfig fields that method runs with instead (the values
    tuning chose, e.g. ``{"lora": {"lora_lr": 3e-3, "lora_epochs": 6}}``; part of its stages'
    fingerprints). ``write`` False: return the results without writing them (the caller adds
    to them and writes once)."""
    from tqdm.auto import tqdm

    from edgekv.bench import report

    t0 = time.perf_counter()
    tasks, cfg, sfp = prepare_run(backbone, stream, cfg)
    runs = plan(methods, budgets, main_budget, cfg)
    reg = registry(cfg)
    image_tasks = [t.name for t in tasks if any(ex.image is not None for ex in t.train + t.split(cfg.eval_split))]
    text_only = [n for n in methods if not reg[n].supports_images]
    if image_tasks and text_only:
        raise InputError(f"{', '.join(text_only)} cannot learn image examples yet (image tasks: "
                         f"{', '.join(image_tasks)}): leave them out of the methods, or use a text stream")
    overrides = {k: dict(v) for k, v in (overrides or {}).items() if v}
    mcfg = method_configs(cfg, methods, overrides)
    for name, b in runs:  # every budget check before any work
        check_budget(reg[name](Context(backbone, mcfg[name], b, os.path.join(out_dir, "work", "_check"))), b)
    shutil.rmtree(os.path.join(out_dir, "work", "_check"), ignore_errors=True)
    records = []
    for name, b in tqdm(runs, desc="bench", unit="run", disable=not progress):
        records.append(run_method(backbone, tasks, name, b, out_dir, mcfg[name], sfp, progress=progress))
    ttft = measure_ttft(backbone, tasks, methods, main_budget, out_dir, cfg)
    remove_empty_dirs(os.path.join(out_dir, "work"))  # other runs may share out_dir: keep their live state
    results = {
        "command": command,
        "model": model_name or getattr(backbone, "source", ""),
        "model_fingerprint": backbone.fingerprint,
        "stream": {"name": getattr(stream, "name", ""), "tasks": [t.name for t in tasks], "fingerprint": sfp,
                   "train_per_task": [len(t.train) for t in tasks], "test_per_task": [len(t.test) for t in tasks],
                   "val_per_task": [len(t.val) for t in tasks], "eval_split": cfg.eval_split},
        "config": cfg.to_dict(),
        "overrides": overrides,
        "main_budget": main_budget,
        "budgets": sorted(set(budgets) | {main_budget}),
        "runs": records,
        "ttft": report.ttft_summary(ttft),
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    label = f"{os.path.basename(os.path.normpath(str(results['stream']['name'] or 'stream')))}-s{cfg.seed}"
    results["aggregate"] = stats.aggregate([results], [label])  # intervals over the test queries of this run
    if write:
        report.write_all(results, out_dir)
    return results
