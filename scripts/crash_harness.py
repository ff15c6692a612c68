"""Crash harness: SIGKILL ``edgekv adapt`` and ``commit_update`` at random moments; after every
kill the memory must open, pass ``verify()``, and equal the previous or the next committed
state, byte for byte.

Two parts, both seeded:

* ``commit_update``: a child process commits updates to a ~4 MB memory in a loop (the state
  after generation g is a pure function of g) and logs each committed generation (fsync-ed).
  The parent kills it either after a random delay or right after the child's temporary copy
  appears (so the kill lands inside a commit's write). The parent computes the sha256 of
  every state by applying the same updates to a reference file; after a kill the file's
  sha256 must be that of generation G (the last logged) or G + 1 (renamed, not yet logged).
* ``adapt``: the real CLI (``edgekv.cli.main`` with ``adapt`` arguments) on a tiny Llama,
  three tasks in a chain. Each trial restores the state before step i (memory file and its
  anchors file), runs step i in a child and kills it after a random delay, or right after
  its temporary copy appears. The reference chain (the states after create, task 1, 2, 3)
  is computed first by the same children unkilled; adapt is deterministic (one thread,
  seeded), so the memory after a kill must be byte-identical to the state before step i
  (or, in step 1, absent or freshly created) or to the state after it. Every fourth trial
  that left the old state is re-run to completion and must reach exactly the next state
  (a crash leaves nothing that changes a retry: stale temp file, lock).

Children are forked from this process after it has imported torch and edgekv but before it
runs any torch op, so each trial costs the adapt work, not the interpreter start. Results go
to ``benchmarks/results/crash_harness.json``.

    python scripts/crash_harness.py                          # full: 120 adapt + 240 commit kills
    python scripts/crash_harness.py --adapt-kills 10 --commit-kills 0 --out /tmp/x.json   # quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def sha256_file(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def temps_of(folder: str, name: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(f".{name}.tmp-"))


def fork_child(fn, *args, quiet: bool = True) -> int:
    """Run ``fn(*args)`` in a forked child; return its pid. The child exits with fn's code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if quiet:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
            result = fn(*args)
            code = result if isinstance(result, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, timeout: float) -> int:
    """Exit status of ``pid`` (negative: the signal); kills it when ``timeout`` passes."""
    t_end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > t_end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child {pid} ran past {timeout} s")
        time.sleep(0.002)


def kill_at(pid: int, folder: str, name: str, mode: str, delay: float, give_up: float) -> bool:
    """SIGKILL ``pid``. mode 'random': after ``delay`` s. mode 'mid-write': once its temporary
    copy of an existing memory exists (an update, not the creation), after ``delay`` s more.
    Returns False when the child exited first."""
    t_end = time.monotonic() + give_up
    if mode == "mid-write":
        tmp, final = os.path.join(folder, f".{name}.tmp-{pid}"), os.path.join(folder, name)
        while not (os.path.exists(tmp) and os.path.exists(final)):
            if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > t_end:
                return False
            time.sleep(0.0002)
    t_kill = time.monotonic() + delay
    while time.monotonic() < t_kill:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
        time.sleep(min(0.001, max(t_kill - time.monotonic(), 0)))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# ---------------------------------------------------------------------------------
# part 1: commit_update in a loop
# ---------------------------------------------------------------------------------
def _commit_spec():
    from edgekv.format import MemorySpec

    return MemorySpec(num_layers=4, num_kv_heads=2, head_dim=32, pooled_len=16, key_dim=64,
                      model_fingerprint="c3" * 32, payload_dtype="int8")


def _entry_for(spec, g: int):
    import numpy as np

    from edgekv.format import Entry

    rng = np.random.default_rng(g)
    shape = spec.payload_shape
    return Entry.from_float(rng.normal(size=spec.key_dim), rng.normal(size=shape), rng.normal(size=shape),
                            "int8", f"task-{g % 3}", f"gen-{g}")


def _update_for(spec, num_slots: int, g: int):
    """Generation g writes slot 5g mod n, clears another every 4th time, sets tau and gates."""
    from edgekv.format import Calibration

    put = (g * 5) % num_slots
    clear = [s for s in ([(g * 11 + 3) % num_slots] if g % 4 == 0 else []) if s != put]
    cal = Calibration(0.01 * g, tuple(1.0 / (1 + g + layer) for layer in range(spec.num_layers)))
    return put, clear, cal


def _commit(path: str, spec, num_slots: int, g: int) -> int:
    from edgekv.format import commit_update

    put, clear, cal = _update_for(spec, num_slots, g)
    return commit_update(path, put={put: _entry_for(spec, g)}, clear=clear, calibration=cal)


def _commit_loop(path: str, log: str) -> int:
    from edgekv.format import Memory

    with Memory(path) as m:
        g, spec, n = m.generation, m.spec, m.num_slots
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    while True:
        g += 1
        if _commit(path, spec, n, g) != g:
            return 3
        os.write(fd, b"%d\n" % g)
        os.fsync(fd)


def _last_logged(log: str) -> int:
    if not os.path.exists(log):
        return 0
    with open(log) as f:
        lines = f.read().split("\n")[:-1]  # one write per line: no partial line
    return int(lines[-1]) if lines else 0


def run_commit_part(work: str, kills: int, rng: random.Random) -> dict:
    from edgekv.format import Memory, create_memory

    spec = _commit_spec()
    folder = os.path.join(work, "commit")
    os.makedirs(folder)
    path, ref, log = (os.path.join(folder, n) for n in ("m.ekv", "ref.ekv", "commits.log"))
    budget = 4 << 20
    create_memory(path, spec, budget).close()
    create_memory(os.path.join(folder, "ref.ekv"), spec, budget).close()
    size = os.path.getsize(path)
    with Memory(path) as m:
        num_slots = m.num_slots
    digests = [sha256_file(ref)]

    def digest_of(gen: int) -> str:
        while len(digests) <= gen:  # the reference chain, extended on demand
            _commit(ref, spec, num_slots, len(digests))
            digests.append(sha256_file(ref))
        return digests[gen]

    t0 = time.monotonic()
    for g in (1, 2, 3):
        _commit(path, spec, num_slots, g)
    commit_s = (time.monotonic() - t0) / 3
    with open(log, "w") as f:
        f.write("1\n2\n3\n")
    out = {"kills": 0, "child_exited_first": 0, "outcomes": {"old": 0, "new": 0}, "landed_mid_write": 0,
           "kill_modes": {"random": 0, "mid-write": 0}, "failures": [], "commit_seconds": round(commit_s, 4)}
    killed: set[int] = set()
    while out["kills"] < kills:
        mode = "mid-write" if rng.random() < 0.5 else "random"
        delay = rng.uniform(0, commit_s) if mode == "mid-write" else rng.uniform(0, 4 * commit_s)
        with Memory(path) as mem:  # a kill after a rename leaves a generation the log never saw
            start_gen = mem.generation
        pid = fork_child(_commit_loop, path, log)
        if not kill_at(pid, folder, "m.ekv", mode, delay, give_up=60):
            out["child_exited_first"] += 1
            wait_child(pid, 5) if _alive(pid) else None
            out["failures"].append(f"commit child {pid} exited before the kill")
            continue
        killed.add(pid)
        out["kills"] += 1
        out["kill_modes"][mode] += 1
        last = max(_last_logged(log), start_gen)  # the last generation known committed
        mid = os.path.exists(os.path.join(folder, f".m.ekv.tmp-{pid}"))
        out["landed_mid_write"] += mid
        try:
            with Memory(path) as mem:
                gen = mem.generation
                mem.verify()
            if os.path.getsize(path) != size:
                raise AssertionError(f"size {os.path.getsize(path)} != {size}")
            if gen not in (last, last + 1):
                raise AssertionError(f"file at generation {gen}, last logged {last}")
            if sha256_file(path) != digest_of(gen):
                raise AssertionError(f"generation {gen}: bytes differ from the committed state")
            stale = set(temps_of(folder, "m.ekv"))
            if not stale <= {f".m.ekv.tmp-{p}" for p in killed} or len(stale) > 1:
                raise AssertionError(f"temporary files {sorted(stale)}")
            out["outcomes"]["old" if gen == last else "new"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported
            out["failures"].append(f"kill {out['kills']} ({mode}, {delay * 1000:.1f} ms): {type(e).__name__}: {e}")
    out["generations_committed"] = _last_logged(log)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        return False


# ---------------------------------------------------------------------------------
# part 2: edgekv adapt (the CLI) on a tiny model
# ---------------------------------------------------------------------------------
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "forest", "silver", "amber",
         "coral"]


def write_tasks(folder: str, num_tasks: int = 3) -> list[str]:
    paths = []
    for t in range(num_tasks):
        path = os.path.join(folder, f"task{t + 1}.jsonl")
        with open(path, "w") as f:
            for i, w in enumerate(WORDS):
                f.write(json.dumps({"id": f"t{t + 1}-{i}", "prompt": f"code for {w} in set {t + 1}?",
                                    "answer": f"K{(i * 7 + t) % 10}"}) + "\n")
        paths.append(path)
    return paths


def _adapt_cli(argv: list[str]) -> int:
    from edgekv.cli import main

    sys.argv = ["edgekv", *argv]
    main()
    return 0


def _create_like_adapt(model: str, path: str, budget: int) -> int:
    """The state `adapt` creates before its first commit (created, empty, generation 0)."""
    from edgekv.export.models import load_backbone
    from edgekv.format import Calibration, create_memory
    from edgekv.induce.adapt import AdaptConfig, memory_spec

    bb = load_backbone(model)
    cfg = AdaptConfig(top_k=4, seed=0)
    create_memory(path, memory_spec(bb, cfg), budget,
                  Calibration(cfg.init_tau, (cfg.init_gate,) * bb.shape.num_layers)).close()
    return 0


def adapt_argv(model: str, data: str, memory: str, step: int, budget: int) -> list[str]:
    argv = ["adapt", "--model", model, "--data", data, "--memory", memory, "--task", f"t{step}",
            "--steps", "2", "--threads", "1", "--no-progress", "--json"]
    return argv + (["--budget", str(budget)] if step == 1 else [])


def restore(state: dict | None, folder: str) -> None:
    """Put the memory and anchors files of ``state`` (None: nothing yet) into a fresh ``folder``."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    if state:
        for name, src in state["files"].items():
            shutil.copy(src, os.path.join(folder, name))


def snapshot(folder: str, dest: str) -> dict:
    os.makedirs(dest, exist_ok=True)
    files = {}
    for name in ("m.ekv", "m.ekv.anchors.jsonl"):
        if os.path.exists(os.path.join(folder, name)):
            files[name] = shutil.copy(os.path.join(folder, name), os.path.join(dest, name))
    return {"files": files, "memory": sha256_file(os.path.join(folder, "m.ekv")),
            "anchors": sha256_file(os.path.join(folder, "m.ekv.anchors.jsonl"))}


def run_adapt_part(work: str, kills: int, rng: random.Random, model: str, budget: int, num_tasks: int = 3) -> dict:
    from edgekv.format import Memory

    base = os.path.join(work, "adapt")
    os.makedirs(base)
    tasks = write_tasks(base, num_tasks)
    t0 = time.monotonic()
    # reference chain: created (empty), after task 1, 2, 3 -- by the same forked children
    trial = os.path.join(base, "trial")
    restore(None, trial)
    if wait_child(fork_child(_create_like_adapt, model, os.path.join(trial, "m.ekv"), budget), 300) != 0:
        raise RuntimeError("could not create the reference memory")
    created = snapshot(trial, os.path.join(base, "state-created"))
    states: list[dict | None] = [None]
    durations = []
    restore(None, trial)
    for step, data in enumerate(tasks, start=1):
        t = time.monotonic()
        code = wait_child(fork_child(_adapt_cli, adapt_argv(model, data, os.path.join(trial, "m.ekv"), step,
                                                            budget)), 600)
        durations.append(time.monotonic() - t)
        if code != 0:
            raise RuntimeError(f"reference adapt of task {step} failed (exit code {code})")
        states.append(snapshot(trial, os.path.join(base, f"state-{step}")))
    # determinism: task 1 again from nothing gives the same bytes (else "old or new" means nothing)
    restore(None, trial)
    wait_child(fork_child(_adapt_cli, adapt_argv(model, tasks[0], os.path.join(trial, "m.ekv"), 1, budget)), 600)
    deterministic = sha256_file(os.path.join(trial, "m.ekv")) == states[1]["memory"]
    with Memory(states[1]["files"]["m.ekv"]) as m:
        spec_ok = m.spec == Memory(created["files"]["m.ekv"]).spec
    out = {"kills": 0, "child_exited_first": 0, "deterministic": deterministic, "created_spec_matches": spec_ok,
           "reference_seconds": [round(d, 2) for d in durations],
           "outcomes": {"old": 0, "new": 0, "absent (killed before the memory was created)": 0,
                        "created, first commit not reached": 0},
           "new_with_old_anchors": 0, "landed_mid_write": 0, "kill_modes": {"random": 0, "mid-write": 0},
           "retries": 0, "retries_reached_next_state": 0,
           "per_step_kills": {str(i): 0 for i in range(1, num_tasks + 1)},
           "failures": []}
    if not deterministic:
        out["failures"].append("adapt is not deterministic here: a re-run of task 1 gave other bytes")
    while out["kills"] < kills:
        step = rng.randint(1, num_tasks)
        mode = "mid-write" if rng.random() < 0.35 else "random"
        delay = rng.uniform(0, 0.015) if mode == "mid-write" else rng.uniform(0, durations[step - 1] * 1.05)
        prev, nxt = states[step - 1], states[step]
        restore(prev, trial)
        mem_path = os.path.join(trial, "m.ekv")
        pid = fork_child(_adapt_cli, adapt_argv(model, tasks[step - 1], mem_path, step, budget))
        if not kill_at(pid, trial, "m.ekv", mode, delay, give_up=durations[step - 1] * 3 + 30):
            out["child_exited_first"] += 1
            continue
        out["kills"] += 1
        out["kill_modes"][mode] += 1
        out["per_step_kills"][str(step)] += 1
        mid = os.path.exists(os.path.join(trial, f".m.ekv.tmp-{pid}"))
        out["landed_mid_write"] += mid
        where = f"kill {out['kills']} (task {step}, {mode}, {delay:.3f} s)"
        try:
            digest = sha256_file(mem_path)
            if digest is None:
                if step != 1:
                    raise AssertionError("the memory file is gone")
                out["outcomes"]["absent (killed before the memory was created)"] += 1
                outcome = "old"
            else:
                with Memory(mem_path) as mem:
                    mem.verify()
                anchors = sha256_file(mem_path + ".anchors.jsonl")
                if digest == nxt["memory"]:
                    outcome = "new"
                    out["outcomes"]["new"] += 1
                    if anchors == (prev or {}).get("anchors") and anchors != nxt["anchors"]:
                        out["new_with_old_anchors"] += 1  # killed between the commit and the anchors file
                    elif anchors != nxt["anchors"]:
                        raise AssertionError("anchors file is neither the old nor the new one")
                elif step == 1 and digest == created["memory"]:
                    outcome = "old"
                    out["outcomes"]["created, first commit not reached"] += 1
                elif prev is not None and digest == prev["memory"]:
                    outcome = "old"
                    out["outcomes"]["old"] += 1
                    if anchors != prev["anchors"]:
                        raise AssertionError("memory is old but the anchors file changed")
                else:
                    raise AssertionError("the memory is neither the state before nor the state after the step")
            if outcome == "old" and out["kills"] % 4 == 0:  # a retry after the crash reaches the next state
                out["retries"] += 1
                code = wait_child(fork_child(_adapt_cli, adapt_argv(model, tasks[step - 1], mem_path, step, budget)),
                                  600)
                if code == 0 and sha256_file(mem_path) == nxt["memory"] and not temps_of(trial, "m.ekv"):
                    out["retries_reached_next_state"] += 1
                else:
                    raise AssertionError(f"retry after the crash: exit {code}, memory is not the next state "
                                         f"or a temporary file stayed")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            out["failures"].append(f"{where}: {type(e).__name__}: {e}")
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def tiny_model(work: str) -> str:
    """The tiny Llama of the tests (random weights, trained tokenizer), built in a child."""
    cache = os.path.join(ROOT, ".cache", "edgekv", "crash-harness", "llama")
    if not os.path.isfile(os.path.join(cache, "config.json")):
        from tiny_models import make_tiny_model

        if wait_child(fork_child(make_tiny_model, "llama", cache), 600) != 0:
            raise RuntimeError("could not build the tiny model")
    return cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapt-kills", type=int, default=120)
    p.add_argument("--commit-kills", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=4 << 20,
                   help="memory budget in bytes for the adapt part (4 MiB: a commit's write takes long enough "
                        "for kills to land inside it)")
    p.add_argument("--tasks", type=int, default=3, choices=(1, 2, 3), help="length of the adapt chain")
    p.add_argument("--model", help="model folder for the adapt part (default: the tests' tiny Llama)")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--out", default=os.path.join(RESULTS, "crash_harness.json"))
    args = p.parse_args()
    # imported here, before any fork; no torch op runs in this process (OpenMP and fork do not mix)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import edgekv.cli  # noqa: F401
    import edgekv.commands.adapt  # noqa: F401
    import edgekv.export.models  # noqa: F401
    import edgekv.format  # noqa: F401
    import edgekv.induce.adapt  # noqa: F401

    work = args.work or tempfile.mkdtemp(prefix="edgekv-crash-")
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    report = {"seed": args.seed, "command": "python scripts/crash_harness.py " + " ".join(sys.argv[1:])}
    try:
        if args.commit_kills:
            print(f"[crash] commit_update: {args.commit_kills} kills ...", flush=True)
            report["commit_update"] = run_commit_part(work, args.commit_kills, rng)
            print(f"[crash] commit_update: {json.dumps(report['commit_update'])[:400]}", flush=True)
        if args.adapt_kills:
            model = args.model or tiny_model(work)
            print(f"[crash] adapt: {args.adapt_kills} kills ...", flush=True)
            report["adapt"] = run_adapt_part(work, args.adapt_kills, rng, model, args.budget, args.tasks)
            print(f"[crash] adapt: {json.dumps(report['adapt'])[:600]}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    parts = [report[k] for k in ("commit_update", "adapt") if k in report]
    report["total_kills"] = sum(p["kills"] for p in parts)
    report["total_failures"] = sum(len(p["failures"]) for p in parts)
    report["seconds"] = round(time.monotonic() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"[crash] {report['total_kills']} kills, {report['total_failures']} failures in {report['seconds']} s "
          f"-> {args.out}")
    sys.exit(1 if report["total_failures"] else 0)


if __name__ == "__main__":
    main()
