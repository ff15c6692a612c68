"""Crash harness: SIGKILL ``edgekv adapt`` and ``commit_update`` at random moments; after every
kill the memory must open, pass ``verify()``, and equal the previous or the next committed
state, byte for byte.

Four parts, all seeded:

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
  (a crash leaves nothing that changes a retry: stale temp file, lock). The anchors the
  loader returns after the kill must be those of the state the memory holds.
* ``anchors``: adapt-like steps through ``edgekv.induce.anchors.commit_with_anchors`` (the
  function ``adapt`` commits its memory and anchors with) on a small synthetic memory; the
  update and the anchors of generation g are pure functions of g. Half of the kills are
  fault injection: the child counts its file-system calls (open, fsync, rename, unlink,
  copy, close, ...) and SIGKILLs itself right before call N, N sweeping every boundary of a
  step; the other half kill a looping child after a random delay. After each kill the memory
  must be a committed state (sha256) and ``read_anchors`` must return the anchors of its
  generation (``inconsistent_states`` counts the others). A control that commits in the old
  order (memory, then anchors file) must show inconsistent states.
* ``apply``: ``edgekv memory apply`` (``edgekv.updates.apply_memory_update``: the update, then
  the HNSW index cached beside the memory) of two updates to a ~4 MB memory whose index is
  cached: one the index follows in place, one that makes it rebuild. Each trial restores OLD and
  its index; half of the kills at each syscall boundary of an apply in turn (as ``anchors``, plus
  ``pread``), half after a random delay. After each kill the memory must be OLD or NEW byte for
  byte, a cached index whose binding names the memory's state must pass every check, and HNSW
  search (rebuilding a stale index) must equal exact search; every fourth kill that left OLD is
  retried and must give NEW.

Children are forked from this process after it has imported torch and edgekv but before it
runs any torch op, so each trial costs the adapt work, not the interpreter start. Results go
to ``benchmarks/results/crash_harness.json``.

    python scripts/crash_harness.py                          # full: 120 adapt + 240 commit + 240 anchors + 400 apply kills
    python scripts/crash_harness.py --adapt-kills 10 --commit-kills 0 --anchor-kills 0 --out out/x.json  # quick
    python scripts/crash_harness.py --adapt-kills 0 --commit-kills 0 --merge   # the anchors part alone, merged
    python scripts/crash_harness.py --adapt-kills 0 --commit-kills 0 --anchor-kills 0 --anchor-control-kills 0 --merge  # apply alone
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
    from edgekv.format import Calibration, create_memory
    from edgekv.host.models import load_backbone
    from edgekv.induce.adapt import AdaptConfig, memory_spec

    bb = load_backbone(model)
    cfg = AdaptConfig(top_k=4, seed=0)
    create_memory(path, memory_spec(bb, cfg), budget,
                  Calibration(cfg.init_tau, (cfg.init_gate,) * bb.shape.num_layers), top_k=cfg.top_k).close()
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
            "anchors": sha256_file(os.path.join(folder, "m.ekv.anchors.jsonl")),
            "loaded_anchors": loaded_anchors(os.path.join(folder, "m.ekv"))}


def loaded_anchors(mem_path: str) -> list[dict]:
    """The anchors the next adapt uses for the memory at ``mem_path`` (edgekv.induce.anchors)."""
    from edgekv.induce.anchors import read_anchors

    return [{"task": t, **ex.__dict__} for t, ex in read_anchors(mem_path)] if os.path.exists(mem_path) else []


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
           "inconsistent_anchors": 0, "anchors_ahead_of_memory": 0, "landed_mid_write": 0, "kill_modes": {"random": 0, "mid-write": 0},
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
                # the anchors the next adapt would use must be those of the state the memory holds
                anchors = loaded_anchors(mem_path)
                if digest == nxt["memory"]:
                    outcome, want = "new", nxt["loaded_anchors"]
                    out["outcomes"]["new"] += 1
                elif step == 1 and digest == created["memory"]:
                    outcome, want = "old", created["loaded_anchors"]
                    out["outcomes"]["created, first commit not reached"] += 1
                elif prev is not None and digest == prev["memory"]:
                    outcome, want = "old", prev["loaded_anchors"]
                    out["outcomes"]["old"] += 1
                else:
                    raise AssertionError("the memory is neither the state before nor the state after the step")
                if outcome == "old" and os.path.exists(mem_path + ".anchors.jsonl") and \
                        sha256_file(mem_path + ".anchors.jsonl") != (prev or created)["anchors"]:
                    out["anchors_ahead_of_memory"] += 1  # killed after the anchors write, before the commit
                if anchors != want:
                    out["inconsistent_anchors"] += 1
                    raise AssertionError(f"the memory is the {outcome} state but the anchors the loader returns "
                                         f"are not that state's")
            if outcome == "old" and out["kills"] % 4 == 0:  # a retry after the crash reaches the next state
                out["retries"] += 1
                code = wait_child(fork_child(_adapt_cli, adapt_argv(model, tasks[step - 1], mem_path, step, budget)),
                                  600)
                if code == 0 and sha256_file(mem_path) == nxt["memory"] and not temps_of(trial, "m.ekv") and \
                        sha256_file(mem_path + ".anchors.jsonl") == nxt["anchors"]:
                    out["retries_reached_next_state"] += 1
                else:
                    raise AssertionError(f"retry after the crash: exit {code}, memory or anchors file is not the "
                                         f"next state, or a temporary file stayed")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            out["failures"].append(f"{where}: {type(e).__name__}: {e}")
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


# ---------------------------------------------------------------------------------
# part 3: anchors + memory committed together (edgekv.induce.anchors.commit_with_anchors)
# ---------------------------------------------------------------------------------
BOUNDARIES = ("open", "fsync", "replace", "rename", "unlink", "copy_file_range", "ftruncate", "close")


def _anchors_for(g: int) -> list:
    """The anchors of generation g: a pure function of g (none before the first commit)."""
    from edgekv.data import Example

    if g == 0:
        return []
    return [(f"task-{g % 3}", Example(f"a{g}-{i}", f"prompt {g} {i} ☃", f"answer {g % 7}")) for i in range(2 + g % 3)]


def _arm_kill(at: int, names: tuple[str, ...] = BOUNDARIES) -> list[int]:
    """From now on, count calls of the file-system functions in ``names`` (and builtin open) and
    SIGKILL this process right before call number ``at`` (a kill at that syscall boundary)."""
    import builtins

    count = [0]

    def wrap(mod, name: str) -> None:
        real = getattr(mod, name)

        def boundary(*a, **k):
            count[0] += 1
            if count[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)

        setattr(mod, name, boundary)

    for name in names:
        if hasattr(os, name):
            wrap(os, name)
    wrap(builtins, "open")
    return count


def _anchor_commit(path: str, spec, num_slots: int, control: bool) -> int:
    """One adapt-like step from the memory's current state G: the update of G + 1 and the
    anchors of G + 1 through the real commit path (``control``: the old order, memory first and
    the anchors file after it, which the check must catch)."""
    from edgekv.format import Memory, commit_update
    from edgekv.induce.anchors import commit_with_anchors, read_anchors, write_anchors

    with Memory(path) as m:
        g, crc = m.generation, m.header_crc32
    current = read_anchors(path, g, crc)
    put, clear, cal = _update_for(spec, num_slots, g + 1)
    update = {"put": {put: _entry_for(spec, g + 1)}, "clear": clear, "calibration": cal}
    if control:
        new = commit_update(path, expect_generation=g, **update)
        with Memory(path) as m:
            write_anchors(path, [(new, m.header_crc32, _anchors_for(g + 1))])
        return new
    return commit_with_anchors(path, _anchors_for(g + 1), current, g, crc, **update)["generation"]


def _anchor_step(path: str, spec, num_slots: int, at: int, control: bool, counter_file: str | None) -> int:
    """A child: one step, killed by itself at syscall boundary ``at`` (0: never; the number of
    boundaries the step crossed goes to ``counter_file``)."""
    count = _arm_kill(at)
    _anchor_commit(path, spec, num_slots, control)
    crossed = count[0]
    if counter_file:
        with open(counter_file, "w") as f:
            f.write(str(crossed))
    return 0


def _anchor_loop(path: str, spec, num_slots: int, log: str) -> int:
    """A child: adapt-like steps in a loop, each committed generation logged (fsync-ed)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    while True:
        g = _anchor_commit(path, spec, num_slots, control=False)
        os.write(fd, b"%d\n" % g)
        os.fsync(fd)


def run_anchors_part(work: str, kills: int, rng: random.Random, control: bool = False) -> dict:
    """Kill adapt-like steps (``commit_with_anchors`` on a small synthetic memory) at every syscall
    boundary of the anchors + memory commit (fault injection, half of the kills) or after a random
    delay; after each kill the memory must be a committed state (sha256 of the reference chain)
    and the anchors the loader returns must be those of the memory's generation."""
    from edgekv.format import Memory, MemorySpec, create_memory
    from edgekv.induce.anchors import anchors_equal, read_anchor_sets, read_anchors

    spec = MemorySpec(num_layers=2, num_kv_heads=2, head_dim=16, pooled_len=4, key_dim=32,
                      model_fingerprint="a7" * 32, payload_dtype="int8")
    folder = os.path.join(work, "anchors-control" if control else "anchors")
    os.makedirs(folder)
    path, ref, log = (os.path.join(folder, n) for n in ("m.ekv", "ref.ekv", "steps.log"))
    budget = 256 << 10
    create_memory(path, spec, budget).close()
    create_memory(ref, spec, budget).close()
    with Memory(path) as m:
        num_slots = m.num_slots
    digests = [sha256_file(ref)]

    def digest_of(gen: int) -> str:
        while len(digests) <= gen:
            _commit(ref, spec, num_slots, len(digests))
            digests.append(sha256_file(ref))
        return digests[gen]

    # boundaries one step crosses, and its time: two steps never killed (the second one, like
    # every later step, also reads an anchors file)
    counter = os.path.join(work, f"boundaries-{int(control)}.txt")
    for _ in range(2):
        t = time.monotonic()
        if wait_child(fork_child(_anchor_step, path, spec, num_slots, 0, control, counter), 60) != 0:
            raise RuntimeError("an adapt-like step failed")
        step_s = time.monotonic() - t
    with open(counter) as f:
        boundaries = int(f.read())
    t0 = time.monotonic()
    out = {"kills": 0, "child_exited_first": 0, "boundaries_per_step": boundaries, "step_seconds": round(step_s, 4),
           "kill_modes": {"syscall-boundary": 0, "random": 0}, "boundaries_hit": [],
           "outcomes": {"old": 0, "new": 0}, "anchors_ahead_of_memory": 0, "two_sets_in_file": 0,
           "inconsistent_states": 0, "failures": []}
    hit: set[int] = set()
    sweep: list[int] = []
    killed: set[int] = set()
    while out["kills"] < kills:
        with Memory(path) as mem:
            start = mem.generation
        if out["kills"] % 2 == 0:  # every boundary of a step, in a shuffled sweep, then again
            if not sweep:
                sweep = list(range(1, boundaries + 1))
                rng.shuffle(sweep)
            at = sweep.pop()
            mode, where = "syscall-boundary", f"boundary {at}"
            pid = fork_child(_anchor_step, path, spec, num_slots, at, control, None)
            code = wait_child(pid, 60)
            if code != -signal.SIGKILL:
                out["child_exited_first"] += 1  # fewer boundaries this time (no stale file to remove)
                if code != 0:
                    out["failures"].append(f"step child exited with {code}")
                continue
            hit.add(at)
        else:
            mode = "random"
            delay = rng.uniform(0, 3 * step_s)
            where = f"{delay * 1000:.1f} ms"
            open(log, "w").close()
            pid = fork_child(_anchor_loop, path, spec, num_slots, log)
            if not kill_at(pid, folder, "m.ekv", "random", delay, give_up=60):
                out["child_exited_first"] += 1
                out["failures"].append(f"loop child {pid} exited before the kill")
                continue
        killed.add(pid)
        out["kills"] += 1
        out["kill_modes"][mode] += 1
        last = max(start, _last_logged(log)) if mode == "random" else start
        try:
            with Memory(path) as mem:
                gen = mem.generation
                mem.verify()
            if gen not in (last, last + 1):
                raise AssertionError(f"memory at generation {gen}, last committed {last}")
            if sha256_file(path) != digest_of(gen):
                raise AssertionError(f"generation {gen}: bytes differ from the committed state")
            out["outcomes"]["old" if gen == last else "new"] += 1
            sets = read_anchor_sets(path)
            out["anchors_ahead_of_memory"] += any(s.generation == gen + 1 for s in sets)
            out["two_sets_in_file"] += len(sets) == 2
            if not anchors_equal(read_anchors(path), _anchors_for(gen)):
                out["inconsistent_states"] += 1
                raise AssertionError(f"the anchors the loader returns are not those of generation {gen} "
                                     f"(sets in the file: {[s.generation for s in sets]})")
            stale = set(temps_of(folder, "m.ekv")) | set(temps_of(folder, "m.ekv.anchors.jsonl"))
            if any(int(n.split("tmp-")[1].split("-")[0]) not in killed for n in stale):
                raise AssertionError(f"temporary files of a live writer {sorted(stale)}")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            out["failures"].append(f"kill {out['kills']} ({mode}, {where}): {type(e).__name__}: {e}")
    with Memory(path) as mem:
        out["generations_committed"] = mem.generation
    out["boundaries_hit"] = sorted(hit)
    out["every_boundary_hit"] = hit >= set(range(1, boundaries + 1))
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


# ---------------------------------------------------------------------------------
# part 4: edgekv memory apply (edgekv.updates.apply_memory_update: the update and the cached index)
# ---------------------------------------------------------------------------------
APPLY_BOUNDARIES = BOUNDARIES + ("pread", "preadv")  # the update and the memory are read with these


def _apply_states(folder: str) -> dict:
    """OLD (300 of ~450 slots of a 4 MB memory, its HNSW index cached beside it) and two updates:
    ``inplace`` (40 slots written, same key projection: the index is updated in place) and
    ``rebuild`` (30 written, 20 cleared, a new projection and calibration: the index is rebuilt)."""
    import numpy as np

    from edgekv.format import Calibration, Memory, commit_update, create_memory, write_update
    from edgekv.index import Retriever, cache_paths
    from edgekv.retrieval import fit_projection

    spec, rng = _commit_spec(), np.random.default_rng(7)
    old = os.path.join(folder, "old", "m.ekv")
    os.makedirs(os.path.dirname(old))
    create_memory(old, spec, 4 << 20).close()
    commit_update(old, {s: _entry_for(spec, s) for s in range(300)}, projection=fit_projection(
        rng.normal(size=(32, spec.key_dim)), 2), top_k=4)
    with Memory(old) as m:
        Retriever(m, force="hnsw")  # the index of OLD, cached beside it (m.ekv.hnsw + .json)
    news = {"inplace": ({s: _entry_for(spec, 1000 + s) for s in range(280, 320)}, [], None, None),
            "rebuild": ({s: _entry_for(spec, 2000 + s) for s in range(320, 350)}, list(range(0, 40, 2)),
                        Calibration(0.07, (0.9,) * spec.num_layers), fit_projection(rng.normal(size=(32, 64)), 2))}
    out = {"old": old, "old_sha": sha256_file(old), "old_index": [sha256_file(p) for p in cache_paths(old)]}
    for name, (put, clear, cal, proj) in news.items():
        new = os.path.join(folder, name, "m.ekv")
        os.makedirs(os.path.dirname(new))
        shutil.copy(old, new)
        commit_update(new, put, clear=clear, calibration=cal, projection=proj)
        upd = os.path.join(folder, f"{name}.ekvu")
        out[name] = {"update": upd, "new_sha": sha256_file(new), **write_update(old, new, upd)}
    return out


def _apply_child(path: str, update: str, at: int, counter_file: str | None) -> int:
    """A child: apply ``update`` to ``path`` (the CLI's library call), killed by itself at syscall
    boundary ``at`` (0: never; the boundaries crossed go to ``counter_file``)."""
    from edgekv.updates import apply_memory_update

    count = _arm_kill(at, APPLY_BOUNDARIES) if at >= 0 else [0]
    apply_memory_update(path, update)
    crossed = count[0]  # before the open below, which is no boundary of the apply
    if counter_file:
        with open(counter_file, "w") as f:
            f.write(str(crossed))
    return 0


def _restore_old(states: dict, trial: str) -> str:
    """A fresh trial folder holding OLD and its cached index; returns the memory's path."""
    from edgekv.index import cache_paths

    shutil.rmtree(trial, ignore_errors=True)
    os.makedirs(trial)
    path = os.path.join(trial, "m.ekv")
    for src, dst in zip([states["old"], *cache_paths(states["old"])], [path, *cache_paths(path)], strict=True):
        shutil.copy(src, dst)
    return path


def _check_applied(path: str, states: dict, name: str, killed: set[int]) -> tuple[str, str]:
    """After a kill: the memory is OLD or NEW byte for byte (verified); a cached index whose binding
    names the memory's state passes every check; HNSW search (rebuilding a stale index) equals
    exact search. Returns (memory outcome, index outcome)."""
    import numpy as np

    from edgekv.format import Memory
    from edgekv.index import Retriever, load_cached_index, memory_keys, memory_state

    digest = sha256_file(path)
    outcome = "old" if digest == states["old_sha"] else "new" if digest == states[name]["new_sha"] else None
    if outcome is None:
        raise AssertionError("the memory is neither OLD nor NEW byte for byte")
    with Memory(path) as mem:
        mem.verify()
        slots, keys = memory_keys(mem)
        state = memory_state(mem, slots, keys)
        index, why = load_cached_index(path, slots, keys, state)
        bound = index is not None or "bound to another memory state" not in why and "no index" not in why
        if index is None and bound:
            raise AssertionError(f"the cached index names the memory's state but fails its checks: {why}")
        ann, exact = Retriever(mem, force="hnsw"), Retriever(mem, force="exact")
        q = np.random.default_rng(len(slots)).normal(size=(4, keys.shape[1])).astype(np.float32)
        for row in q / np.linalg.norm(q, axis=1, keepdims=True):
            if ann.mode != "hnsw" or ann.search(row, 4)[0].tolist() != exact.search(row, 4)[0].tolist():
                raise AssertionError(f"HNSW after the kill differs from exact search ({ann.reason})")
    stale = [n for n in os.listdir(os.path.dirname(path)) if ".tmp-" in n]
    if any(int(n.split("tmp-")[1].split("-")[0]) not in killed for n in stale):
        raise AssertionError(f"temporary files of a live writer {sorted(stale)}")
    return outcome, "bound to the memory's state" if index is not None else "stale or missing: rebuilt"


def _apply_trial(states: dict, trial: str, name: str, mode: str, at: int, delay: float, apply_s: float) -> int | None:
    """Restore OLD, run one apply of update ``name`` in a child and kill it (at syscall boundary
    ``at`` or after ``delay`` s). Returns the killed child's pid, or None when it finished first."""
    path = _restore_old(states, trial)
    upd = states[name]["update"]
    if mode == "syscall-boundary":
        pid = fork_child(_apply_child, path, upd, at, None)
        return pid if wait_child(pid, 60) == -signal.SIGKILL else None
    pid = fork_child(_apply_child, path, upd, -1, None)
    return pid if kill_at(pid, trial, "m.ekv", "random", delay, give_up=10 * apply_s + 30) else None


def _apply_boundaries(states: dict, work: str) -> tuple[dict, float]:
    """Boundaries each apply crosses and its time (unkilled runs; the result checked)."""
    trial, counts, took = os.path.join(work, "apply-count"), {}, []
    for name in ("inplace", "rebuild"):
        path = _restore_old(states, trial)
        counter = os.path.join(work, f"apply-{name}.txt")
        t = time.monotonic()
        if wait_child(fork_child(_apply_child, path, states[name]["update"], 0, counter), 120) != 0 \
                or sha256_file(path) != states[name]["new_sha"]:
            raise RuntimeError(f"an unkilled apply of {name} failed")
        took.append(time.monotonic() - t)
        counts[name] = int(open(counter).read())
    return counts, max(took)


def _after_apply_kill(path: str, states: dict, name: str, killed: set[int], out: dict) -> None:
    """Check the state a kill left and count it; every fourth kill that left OLD is retried to the
    end and must give NEW."""
    outcome, index = _check_applied(path, states, name, killed)
    out["outcomes"][outcome] += 1
    out["index_after_kill"][index] += 1
    if outcome == "old" and out["kills"] % 4 == 0:
        out["retries"] += 1
        code = wait_child(fork_child(_apply_child, path, states[name]["update"], -1, None), 120)
        if code != 0 or sha256_file(path) != states[name]["new_sha"]:
            raise AssertionError(f"retry after the kill: exit {code}, memory is not NEW")
        out["retries_reached_new"] += 1


def run_apply_part(work: str, kills: int, rng: random.Random) -> dict:
    """Kill ``edgekv memory apply`` (the library call, with the cached index following) half at each
    syscall boundary in turn, half after a random delay; after each kill the memory must be OLD or
    NEW byte for byte and a cached index must be trusted only when it is right. Every fourth kill
    that left OLD is retried to completion and must give NEW."""
    import edgekv.index

    edgekv.index.hnswlib_status()  # probed once here, before the children fork
    folder = os.path.join(work, "apply")
    os.makedirs(folder)
    states = _apply_states(folder)
    boundaries, apply_s = _apply_boundaries(states, work)
    out = {"kills": 0, "child_exited_first": 0, "child_exited_first_by_mode": {"syscall-boundary": 0, "random": 0},
           "boundaries_per_apply": boundaries, "apply_seconds": round(apply_s, 4),
           "updates": {n: {k: states[n][k] for k in ("slots_written", "slots_zeroed", "update_bytes", "file_bytes")}
                       for n in boundaries},
           "kill_modes": {"syscall-boundary": 0, "random": 0}, "outcomes": {"old": 0, "new": 0},
           "index_after_kill": {"bound to the memory's state": 0, "stale or missing: rebuilt": 0},
           "landed_mid_write": 0, "inconsistent_states": 0, "retries": 0, "retries_reached_new": 0, "failures": []}
    sweeps, hit = {n: [] for n in boundaries}, {n: set() for n in boundaries}
    killed: set[int] = set()
    t0, trial = time.monotonic(), os.path.join(folder, "trial")
    while out["kills"] < kills:
        name = ("inplace", "rebuild")[out["kills"] // 2 % 2]
        mode = "syscall-boundary" if out["kills"] % 2 == 0 else "random"
        if mode == "syscall-boundary" and not sweeps[name]:
            sweeps[name] = list(range(1, boundaries[name] + 1))
            rng.shuffle(sweeps[name])
        at = sweeps[name].pop() if mode == "syscall-boundary" else 0
        delay = rng.uniform(0, 1.2 * apply_s)
        pid = _apply_trial(states, trial, name, mode, at, delay, apply_s)
        if pid is None:  # the apply finished first (a random delay past its end, or fewer calls this time)
            out["child_exited_first"] += 1
            out["child_exited_first_by_mode"][mode] += 1
            continue
        killed.add(pid)
        out["kills"] += 1
        out["kill_modes"][mode] += 1
        out["landed_mid_write"] += os.path.exists(os.path.join(trial, f".m.ekv.tmp-{pid}"))
        hit[name] |= {at} if at else set()
        where = f"kill {out['kills']} ({name}, {mode}, {f'boundary {at}' if at else f'{delay * 1000:.1f} ms'})"
        try:
            _after_apply_kill(os.path.join(trial, "m.ekv"), states, name, killed, out)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            out["inconsistent_states"] += "neither OLD nor NEW" in str(e) or "fails its checks" in str(e)
            out["failures"].append(f"{where}: {type(e).__name__}: {e}")
    out["boundaries_hit"] = {n: len(hit[n]) for n in boundaries}
    out["every_boundary_hit"] = all(hit[n] >= set(range(1, boundaries[n] + 1)) for n in boundaries)
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
    p.add_argument("--anchor-kills", type=int, default=240,
                   help="kills of adapt-like steps during the anchors + memory commit (half at each syscall "
                        "boundary of the commit in turn, half after a random delay)")
    p.add_argument("--anchor-control-kills", type=int, default=40,
                   help="the same kills of a control that commits in the old order (memory, then anchors file): "
                        "it must show inconsistent states, or the check has no teeth")
    p.add_argument("--apply-kills", type=int, default=400,
                   help="kills of `edgekv memory apply` of two updates (half at each syscall boundary of an apply in "
                        "turn, half after a random delay; 400 reach every boundary of both)")
    p.add_argument("--merge", action="store_true",
                   help="keep the parts of --out that this run does not redo (totals are recomputed)")
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
    import edgekv.format  # noqa: F401
    import edgekv.induce.anchors  # noqa: F401
    import edgekv.updates  # noqa: F401

    if args.adapt_kills:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import edgekv.cli  # noqa: F401
        import edgekv.commands.adapt  # noqa: F401
        import edgekv.host.models  # noqa: F401
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
        arng = random.Random(f"{args.seed}-anchors")  # its own stream: the parts above replay as before
        if args.anchor_kills:
            print(f"[crash] anchors + memory commit: {args.anchor_kills} kills ...", flush=True)
            report["anchors"] = run_anchors_part(work, args.anchor_kills, arng)
            report["anchors"].update(seed=args.seed, command=report["command"])
            print(f"[crash] anchors: {json.dumps(report['anchors'])[:600]}", flush=True)
        if args.anchor_control_kills:
            print(f"[crash] control, old order (memory, then anchors): {args.anchor_control_kills} kills ...",
                  flush=True)
            control = run_anchors_part(work, args.anchor_control_kills, arng, control=True)
            control["failures"] = control["failures"][:5]  # expected: the inconsistent states it found
            report["anchors_control"] = control
            print(f"[crash] control: {control['inconsistent_states']} inconsistent states", flush=True)
            if "anchors" in report:
                report["anchors"]["control_inconsistent_states"] = control["inconsistent_states"]
                if control["inconsistent_states"] == 0:
                    report["anchors"]["failures"].append(
                        "the control (memory committed before the anchors file) showed no inconsistent state: "
                        "the check cannot tell the two orders apart")
        if args.apply_kills:
            print(f"[crash] memory apply: {args.apply_kills} kills ...", flush=True)
            report["apply"] = run_apply_part(work, args.apply_kills, random.Random(f"{args.seed}-apply"))
            report["apply"].update(seed=args.seed, command=report["command"])
            print(f"[crash] apply: {json.dumps(report['apply'])[:600]}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - t0, 1)
    if args.merge and os.path.exists(args.out):  # earlier parts stay, with their own command and totals
        with open(args.out) as f:
            merged = json.load(f)
        for key in ("commit_update", "adapt", "anchors", "anchors_control", "apply"):
            if key in report:
                merged[key] = report[key]
        report = merged
    parts = [report[k] for k in ("commit_update", "adapt", "anchors", "apply") if k in report]
    report["total_kills"] = sum(p["kills"] for p in parts)
    report["total_failures"] = sum(len(p["failures"]) for p in parts)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"[crash] {report['total_kills']} kills, {report['total_failures']} failures in {report['seconds']} s "
          f"-> {args.out}")
    sys.exit(1 if report["total_failures"] else 0)


if __name__ == "__main__":
    main()
