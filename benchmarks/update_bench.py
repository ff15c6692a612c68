"""Memory updates on a task stream: each task's update (``edgekv memory diff``) against the full
memory file, and the time to apply it on the device path (``edgekv memory apply``, no torch).

The memory is adapted task after task with the demo's settings (``edgekv.demo.DemoConfig``: k = 4,
m = 16, 12 selection steps, 16 MiB, seed 0); state 0 is the empty memory as ``adapt`` creates it.
For every task i the update from state i-1 to state i is written, then applied ``--repeats``
times to fresh copies of state i-1 in a separate Python process that never imports torch (the
library call, timed inside; and the real CLI, timed from outside, interpreter start included),
with and without an HNSW index cached beside the memory; every result must be byte-identical to
state i.

    python benchmarks/update_bench.py                       # the demo: tiny-vlm on edge6 (6 tasks), 16 MiB
    python benchmarks/update_bench.py --model smollm2-135m --tasks glorp-words,date-house,home-city

Resumable: every state (memory + anchors file) is cached under ``--work`` (default
``$EDGEKV_CACHE/update-bench/<model>-<budget>-s<seed>``); a rerun adapts only the missing ones.
Writes ``benchmarks/results/update.json`` and ``update.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine  # noqa: E402

from edgekv.manifest import file_sha256  # noqa: E402

# Runs in a fresh interpreter: apply the update to copies of the old state, time it, check the bytes.
DEVICE = r"""
import json, os, shutil, sys, time
from edgekv.format import Memory
from edgekv.index import Retriever
from edgekv.manifest import file_sha256
from edgekv.updates import apply_memory_update
old, upd, want, work, repeats, with_index = sys.argv[1:7]
rows = []
for r in range(int(repeats)):
    path = os.path.join(work, f"dev-{r}.ekv")
    for p in os.listdir(work):
        os.remove(os.path.join(work, p))
    shutil.copy(old, path)
    if with_index == "1":
        with Memory(path) as m:
            Retriever(m, force="hnsw")  # the board's index of the old state, cached beside it
    t = time.perf_counter()
    s = apply_memory_update(path, upd)
    total = time.perf_counter() - t
    ok = file_sha256(path) == want
    rows.append({"seconds": total, "apply": s["seconds"]["apply"], "index": s["seconds"]["index"],
                 "index_result": s["index"]["index"], "identical": ok})
torch = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"rows": rows, "host_modules": torch}))
"""


def demo_settings() -> str:
    from edgekv.demo import DemoConfig

    d = DemoConfig()
    return f"edgekv.demo.DemoConfig (k={d.top_k}, m={d.pooled_len}, {d.selection_steps} selection steps)"


def parse_args() -> argparse.Namespace:
    from edgekv.demo import DemoConfig

    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model)
    p.add_argument("--stream", default=d.stream)
    p.add_argument("--tasks", help="comma-separated task names of the stream, in order (default: all)")
    p.add_argument("--budget", default=d.budget)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads for adapt")
    p.add_argument("--repeats", type=int, default=5, help="applies per task (fresh copies)")
    p.add_argument("--work", help="where the states are cached")
    p.add_argument("--out", default=os.path.join(RESULTS, "update.json"))
    return p.parse_args()


def state_paths(work: str, i: int) -> tuple[str, str, str]:
    """(memory, anchors file, summary) of state i (0: created, empty)."""
    base = os.path.join(work, f"state-{i}.ekv")
    return base, base + ".anchors.jsonl", base + ".json"


def create_state0(bb, work: str, budget: int, acfg) -> None:
    """The empty memory ``adapt`` creates before its first commit."""
    from edgekv.format import Calibration, create_memory
    from edgekv.induce.adapt import memory_spec

    mem, _, summary = state_paths(work, 0)
    if os.path.exists(summary):
        return
    if os.path.exists(mem):
        os.remove(mem)
    create_memory(mem, memory_spec(bb, acfg), budget,
                  Calibration(acfg.init_tau, (acfg.init_gate,) * bb.shape.num_layers), top_k=acfg.top_k).close()
    with open(summary, "w") as f:
        json.dump({"task": None, "adapt_seconds": 0.0}, f)


def adapt_states(args, stream_tasks, work: str) -> list[dict]:
    """States 0..n (cached): each task adapted into a copy of the previous state."""
    from edgekv.demo import DemoConfig, adapt_config
    from edgekv.host.models import load_backbone
    from edgekv.induce.adapt import adapt
    from edgekv.units import parse_size

    cfg = DemoConfig(model=args.model, stream=args.stream, budget=args.budget, seed=args.seed)
    acfg, budget = adapt_config(cfg), parse_size(args.budget)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    bb = load_backbone(args.model)
    create_state0(bb, work, budget, acfg)
    for i, task in enumerate(stream_tasks, start=1):
        mem, anchors, summary = state_paths(work, i)
        if os.path.exists(summary):
            continue
        prev_mem, prev_anchors, _ = state_paths(work, i - 1)
        cur = os.path.join(work, "current.ekv")
        shutil.copy(prev_mem, cur)
        if os.path.exists(prev_anchors):
            shutil.copy(prev_anchors, cur + ".anchors.jsonl")
        elif os.path.exists(cur + ".anchors.jsonl"):
            os.remove(cur + ".anchors.jsonl")
        t = time.perf_counter()
        s = adapt(bb, task.train, cur, None, task.name, acfg)
        print(f"[update-bench] adapted {task.name} in {time.perf_counter() - t:.0f} s", flush=True)
        shutil.copy(cur, mem)
        shutil.copy(cur + ".anchors.jsonl", anchors)
        with open(summary, "w") as f:  # written last: the state is complete
            json.dump({"task": task.name, "adapt_seconds": round(time.perf_counter() - t, 1),
                       "num_used": s["num_used"], "num_slots": s["num_slots"]}, f)
    return [json.load(open(state_paths(work, i)[2])) for i in range(len(stream_tasks) + 1)]


def device_apply(old: str, upd: str, want: str, repeats: int, with_index: bool) -> dict:
    """The DEVICE script in a fresh interpreter: per-apply seconds (library call) and checks."""
    scratch = tempfile.mkdtemp(prefix="edgekv-update-bench-")
    try:
        out = subprocess.run([sys.executable, "-c", DEVICE, old, upd, want, scratch, str(repeats),
                              "1" if with_index else "0"], capture_output=True, text=True, timeout=1800)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(f"device apply failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli_apply_seconds(old: str, upd: str, repeats: int) -> float:
    """Median wall time of ``edgekv memory apply`` (a new process each time: interpreter start,
    imports, apply, exit)."""
    exe = os.path.join(os.path.dirname(sys.executable), "edgekv")
    times = []
    with tempfile.TemporaryDirectory(prefix="edgekv-update-cli-") as scratch:
        for r in range(repeats):
            path = os.path.join(scratch, f"cli-{r}.ekv")
            shutil.copy(old, path)
            t = time.perf_counter()
            subprocess.run([exe, "memory", "apply", path, upd], check=True, capture_output=True, timeout=600)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_task(work: str, i: int, name: str, repeats: int) -> dict:
    """Update i-1 -> i: its size against the file's and its apply times on the device path."""
    from edgekv.updates import diff_memories

    old, new = state_paths(work, i - 1)[0], state_paths(work, i)[0]
    upd = os.path.join(work, f"update-{i}.ekvu")
    d = diff_memories(old, new, upd)
    want = file_sha256(new)
    plain = device_apply(old, upd, want, repeats, with_index=False)
    indexed = device_apply(old, upd, want, repeats, with_index=True)
    rows = plain["rows"] + indexed["rows"]
    return {"task": name, "generations": [d["base_generation"], d["new_generation"]],
            "slots_written": d["slots_written"], "slots_zeroed": d["slots_zeroed"], "num_slots": d["num_slots"],
            "update_bytes": d["update_bytes"], "file_bytes": d["file_bytes"], "ratio": round(d["ratio"], 4),
            "diff_seconds": d["seconds"],
            "apply_ms": round(1000 * statistics.median(r["seconds"] for r in plain["rows"]), 2),
            "apply_with_index_ms": round(1000 * statistics.median(r["seconds"] for r in indexed["rows"]), 2),
            "index_follow_ms": round(1000 * statistics.median(r["index"] for r in indexed["rows"]), 2),
            "index_result": sorted({r["index_result"] for r in indexed["rows"]}),
            "cli_apply_s": round(cli_apply_seconds(old, upd, max(1, repeats // 2)), 3),
            "byte_identical": all(r["identical"] for r in rows),
            "device_imported_torch": bool(plain["host_modules"] or indexed["host_modules"])}


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["tasks"]
    names = [t["task"] for t in tasks]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [t["update_bytes"] / 2**20 for t in tasks], color="tab:blue", label="update")
    a.axhline(tasks[0]["file_bytes"] / 2**20, color="tab:red", ls="--", label="full memory file")
    a.set_ylabel("MiB")
    a.set_title("update per task vs the memory file")
    a.legend()
    b.bar(names, [t["apply_ms"] for t in tasks], color="tab:green", label="apply")
    b.bar(names, [t["index_follow_ms"] for t in tasks], bottom=[t["apply_ms"] for t in tasks], color="tab:olive",
          label="+ cached HNSW index follows")
    b.set_ylabel("ms (median, library call)")
    b.set_title("apply on the device path (no torch)")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{data['config']['model']}, {data['config']['stream']}, {data['config']['budget']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from edgekv.data.stream import load_stream
    from edgekv.units import format_size

    args = parse_args()
    stream = load_stream(args.stream, seed=args.seed)
    names = [t.strip() for t in args.tasks.split(",")] if args.tasks else stream.order
    by_name = {t.name: t for t in stream.tasks}
    missing = [n for n in names if n not in by_name]
    if missing:
        sys.exit(f"tasks not in {args.stream}: {', '.join(missing)} (it has {', '.join(stream.order)})")
    from edgekv.host.models import cache_dir

    work = args.work or os.path.join(cache_dir(), "update-bench",
                                      f"{args.model.replace('/', '_')}-{args.budget}-s{args.seed}-{'+'.join(names)}")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    states = adapt_states(args, [by_name[n] for n in names], work)
    tasks = []
    for i, name in enumerate(names, start=1):
        tasks.append(measure_task(work, i, name, args.repeats) | {"adapt_seconds": states[i]["adapt_seconds"],
                                                                   "num_used": states[i]["num_used"]})
        t = tasks[-1]
        print(f"[update-bench] {name}: update {format_size(t['update_bytes'])} = {t['ratio']:.1%} of "
              f"{format_size(t['file_bytes'])}, apply {t['apply_ms']:.1f} ms", flush=True)
    data = {"config": {"model": args.model, "stream": args.stream, "tasks": names, "budget": args.budget,
                       "seed": args.seed, "repeats": args.repeats, "settings": demo_settings()},
            "machine": machine(), "tasks": tasks, "seconds": round(time.perf_counter() - t0, 1),
            "command": "python benchmarks/update_bench.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    plot(data, os.path.splitext(args.out)[0] + ".png")
    print(f"[update-bench] -> {args.out}")


if __name__ == "__main__":
    main()
