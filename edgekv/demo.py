"""``edgekv demo``: the main job end to end on the built-in defaults.

1. the default continual stream (``edge6``: image+text and text tasks made offline) is
   written under ``$EDGEKV_CACHE/streams`` on first use;
2. the built-in ``tiny-vlm`` (frozen MobileNetV2 + trained projector + SmolLM2-135M) is
   exported once for the device (ONNX, tokenizer, manifest);
3. the torch-free runtime answers every task's held-out queries without memory (zero-shot);
4. task after task, ``edgekv adapt`` updates one memory file at a fixed byte budget, and the
   runtime answers the held-out queries of every task seen so far with that memory;
5. a table: per task accuracy zero-shot, right after learning it and after the whole
   stream, the memory file's size after every task (constant) and the budget breakdown.

Every step is a library call the CLI also offers (``edgekv stream``, ``adapt``, ``export``,
``run``, ``profile``); this module only strings them together and reports.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from edgekv.configs import Config, knob
from edgekv.errors import InputError
from edgekv.induce.config import DEFAULT_POOLED_LEN
from edgekv.units import parse_size


@dataclass(frozen=True)
class DemoConfig(Config):
    """What the demo runs on; the defaults finish in about 10-15 minutes on 2 CPU cores."""

    model: str = knob("tiny-vlm", "Built-in name or model folder (adapt and export take the same).")
    stream: str = knob("edge6", "Built-in stream name or a stream folder (see docs/stream.md).")
    budget: str = knob("16MiB", "Memory file budget, e.g. 16MiB: the file has exactly this footprint after "
                                "every task.")
    seed: int = knob(0, "Seed of the stream's instances and of adapt's sampling.")
    num_test: int = knob(12, "Held-out queries per task answered by the runtime (0: all).")
    top_k: int = 4  # entries retrieved per query (adapt and runtime use the same k)
    # m: KV positions per entry, adapt's default. On edge6's val split (tiny-vlm, 8 MiB, int4, seed 0)
    # m 16 reached Last 38.1 against 31.7 at m 8 (docs/method.md, departure 6).
    pooled_len: int = DEFAULT_POOLED_LEN
    max_new_tokens: int = 8
    selection_steps: int = 12  # bilevel selection steps per task
    work_dir: str | None = knob(None, "Where artifacts and memory go (default: $EDGEKV_CACHE/demo).")
    threads: int | None = knob(None, "Threads for torch and onnxruntime (default: the libraries decide).")

    def __post_init__(self) -> None:
        try:
            parse_size(self.budget)
        except InputError as e:
            raise InputError(f"DemoConfig.budget: {e}") from None
        for name, low in (("num_test", 0), ("top_k", 1), ("pooled_len", 1), ("max_new_tokens", 1),
                          ("selection_steps", 0)):
            if getattr(self, name) < low:
                raise InputError(f"DemoConfig.{name} must be >= {low}, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"DemoConfig.threads must be >= 1, got {self.threads}")


@dataclass
class DemoResult:
    config: dict
    tasks: list[dict]  # name, kind, num_test, zero_shot, just_learned, final
    matrix: list[list[float | None]]  # A[i][j]: accuracy on task j after learning task i (j <= i)
    file_bytes: list[int]  # memory file size after every task
    budget: dict  # the memory's budget breakdown (edgekv profile arithmetic)
    artifacts: str
    memory: str
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def accuracy(runtime, examples: Sequence, max_new_tokens: int, progress: bool, desc: str) -> float:
    """Fraction of ``examples`` the runtime answers right (the stream's answer normalisation)."""
    from tqdm.auto import tqdm

    from edgekv.data.stream import is_correct

    right = 0
    for ex in tqdm(examples, desc=desc, unit="q", disable=not progress, leave=False):
        out = runtime.generate(ex.prompt, max_new_tokens=max_new_tokens, image=ex.image)
        right += is_correct(out.text, ex.answer)
    return right / max(1, len(examples))


def _artifacts_current(artifacts: str, fingerprint: str) -> bool:
    try:
        with open(os.path.join(artifacts, "manifest.json"), encoding="utf-8") as f:
            return json.load(f).get("model_fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def adapt_config(cfg: DemoConfig):
    from dataclasses import replace

    from edgekv.induce.adapt import AdaptConfig

    base = AdaptConfig(top_k=cfg.top_k, seed=cfg.seed)
    return replace(base, entry=replace(base.entry, pooled_len=cfg.pooled_len),
                   selection=replace(base.selection, steps=cfg.selection_steps))


def run_demo(cfg: DemoConfig, say: Say = _quiet, progress: bool = False) -> DemoResult:
    """The demo; ``say`` receives one line per step (what is being done and why)."""
    from edgekv.budget import BudgetConfig, budget_report
    from edgekv.data.stream import load_stream
    from edgekv.export.pipeline import export_model
    from edgekv.format import Memory
    from edgekv.host.models import cache_dir, load_backbone
    from edgekv.induce.adapt import adapt
    from edgekv.runtime import Runtime

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    work = cfg.work_dir or os.path.join(cache_dir(), "demo")
    os.makedirs(work, exist_ok=True)
    budget = parse_size(cfg.budget)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)

    say(f"[1/5] task stream {cfg.stream!r} (seed {cfg.seed}): generated offline on first use")
    stream = load_stream(cfg.stream, seed=cfg.seed)
    tests = [t.test[: cfg.num_test] if cfg.num_test else t.test for t in stream.tasks]
    for t, q in zip(stream.tasks, tests, strict=True):
        say(f"      {t.name:<12} {t.kind:<5} {len(t.train)} train / {len(q)} held-out queries: {t.description}")

    say(f"[2/5] backbone {cfg.model!r} (frozen; built from shipped weights on first use)")
    bb = load_backbone(cfg.model)
    artifacts = os.path.join(work, "artifacts")
    if _artifacts_current(artifacts, bb.fingerprint):
        say(f"      device export up to date: {artifacts}")
    else:
        say(f"      exporting for the device (ONNX graphs, tokenizer, manifest) -> {artifacts}")
        export_model(cfg.model, artifacts, progress=progress, force=True)
    seconds["setup"] = round(time.perf_counter() - t0, 1)

    say("[3/5] zero-shot: the on-device runtime (onnxruntime, no torch) without memory")
    t1 = time.perf_counter()
    with Runtime.load(artifacts, threads=cfg.threads) as rt:
        zero = [accuracy(rt, q, cfg.max_new_tokens, progress, f"zero-shot {t.name}")
                for t, q in zip(stream.tasks, tests, strict=True)]
    seconds["zero_shot"] = round(time.perf_counter() - t1, 1)

    memory = os.path.join(work, "memory.ekv")
    for path in (memory, memory + ".anchors.jsonl"):
        if os.path.exists(path):
            os.remove(path)
    say(f"[4/5] continual adaptation: one memory file of {cfg.budget}, task after task ({memory})")
    matrix: list[list[float | None]] = []
    sizes: list[int] = []
    acfg = adapt_config(cfg)
    t2 = time.perf_counter()
    for i, task in enumerate(stream.tasks):
        ta = time.perf_counter()
        summary = adapt(bb, task.train, memory, budget, task.name, acfg, progress=progress)
        sizes.append(os.path.getsize(memory))
        row: list[float | None] = [None] * len(stream.tasks)
        with Runtime.load(artifacts, memory=memory, k=cfg.top_k, threads=cfg.threads) as rt:
            for j in range(i + 1):
                row[j] = accuracy(rt, tests[j], cfg.max_new_tokens, progress, f"after {task.name}: {stream.tasks[j].name}")
        matrix.append(row)
        say(f"      {i + 1}/{len(stream.tasks)} {task.name:<12} kept {summary['num_used']}/{summary['num_slots']} slots, "
            f"file {sizes[-1]:,} B, accuracy on it {row[i]:.0%}, on all seen "
            f"{sum(row[: i + 1]) / (i + 1):.0%} ({time.perf_counter() - ta:.0f} s)")
    seconds["adapt_and_eval"] = round(time.perf_counter() - t2, 1)

    say("[5/5] budget breakdown of the memory file (edgekv profile)")
    with Memory(memory) as mem:
        spec = mem.spec
    report = budget_report(bb.shape, budget, BudgetConfig(pooled_len=spec.pooled_len, payload_dtype=spec.payload_dtype,
                                                          top_k=cfg.top_k), rope=bb.rope)
    tasks = [{"name": t.name, "kind": t.kind, "num_test": len(q), "zero_shot": z, "just_learned": matrix[i][i],
              "final": matrix[-1][i]}
             for i, (t, q, z) in enumerate(zip(stream.tasks, tests, zero, strict=True))]
    seconds["total"] = round(time.perf_counter() - t0, 1)
    return DemoResult(asdict(cfg), tasks, matrix, sizes, report, artifacts, memory, seconds)


def render(res: DemoResult) -> str:
    """The closing table: per task accuracy, footprint after every task, budget breakdown."""
    from edgekv.units import format_size

    lines = ["", "Per task accuracy on held-out queries (on-device runtime, exact match):", ""]
    lines.append(f"  {'task':<14}{'kind':<7}{'queries':>8}{'zero-shot':>11}{'just learned':>14}{'after all':>11}")
    for t in res.tasks:
        lines.append(f"  {t['name']:<14}{t['kind']:<7}{t['num_test']:>8}{t['zero_shot']:>11.0%}"
                     f"{t['just_learned']:>14.0%}{t['final']:>11.0%}")
    n = len(res.tasks)
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    lines.append(f"  {'mean':<14}{'':<7}{'':>8}{mean([t['zero_shot'] for t in res.tasks]):>11.0%}"
                 f"{mean([t['just_learned'] for t in res.tasks]):>14.0%}{mean([t['final'] for t in res.tasks]):>11.0%}")
    lines += ["", "Memory footprint after each task (the deployed state; it never grows):", ""]
    for i, (t, b) in enumerate(zip(res.tasks, res.file_bytes, strict=True)):
        lines.append(f"  after {i + 1}/{n} {t['name']:<14}{b:>14,} B")
    same = len(set(res.file_bytes)) == 1
    lines.append(f"  {'identical after every task' if same else 'SIZE CHANGED (a bug: please report it)'}")
    b = res.budget
    lines += ["", f"Budget breakdown ({format_size(b['budget_bytes'])}, {b['payload_dtype']} payloads, "
                  f"m = {b['pooled_len']} positions per entry):", ""]
    rows = [("slots", f"{b['num_slots']} x {format_size(b['slot_bytes'])}"),
            ("  retrieval key", format_size(b["key_bytes_per_slot"])),
            ("  K payload", format_size(b["k_payload_bytes_per_slot"])),
            ("  V payload", format_size(b["v_payload_bytes_per_slot"])),
            ("  scales", format_size(b["scale_bytes_per_slot"])),
            ("  padding + table", format_size(b["padding_bytes_per_slot"] + b["table_bytes_per_slot"])),
            ("fixed overhead", format_size(b["overhead_bytes"])),
            ("file", f"{format_size(b['file_bytes'])} ({b['file_bytes']:,} B)")]
    w = max(len(k) for k, _ in rows)
    lines += [f"  {k.ljust(w)}  {v}" for k, v in rows]
    s = res.seconds
    lines += ["", f"Artifacts: {res.artifacts}", f"Memory:    {res.memory}",
              f"Time: {s.get('total', 0):.0f} s (setup {s.get('setup', 0):.0f} s, zero-shot {s.get('zero_shot', 0):.0f} s, "
              f"adapt + evaluation {s.get('adapt_and_eval', 0):.0f} s)"]
    return "\n".join(lines)
