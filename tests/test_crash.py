"""A crash during an update leaves the old or the new state, never anything else.

A child process commits updates to a ~4 MB memory in a loop; the state after generation g
is a pure function of g (``update_for``). The child appends each generation it committed
to a log (fsync-ed). The parent SIGKILLs it at random (seeded) moments, 25 times, and after
each kill checks that the file opens, ``verify()`` passes, its size is the creation size,
and its content equals the state of generation G where G is the last logged generation
(the kill came before the next rename) or G + 1 (after the rename, before the log line).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from textwrap import dedent

import numpy as np

from edgekv.format import Memory, MemorySpec, commit_update, create_memory

CHILD_SRC = dedent('''
    import os, sys
    import numpy as np
    from edgekv.format import Calibration, Entry, Memory, commit_update

    def entry_for(spec, g):
        rng = np.random.default_rng(g)
        shape = spec.payload_shape
        return Entry.from_float(rng.normal(size=spec.key_dim), rng.normal(size=shape),
                                rng.normal(size=shape), "int8", f"task-{g % 3}", f"gen-{g}")

    def update_for(spec, num_slots, g):
        """generation g writes slot g % n, clears another slot every 4th time, sets tau."""
        put_slot = (g * 5) % num_slots
        clear = [(g * 11 + 3) % num_slots] if g % 4 == 0 else []
        clear = [s for s in clear if s != put_slot]
        cal = Calibration(0.01 * g, tuple(1.0 / (1 + g + l) for l in range(spec.num_layers)))
        return put_slot, clear, cal

    def main(path, log):
        with Memory(path) as m:
            g, spec, n = m.generation, m.spec, m.num_slots
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"start %d\\n" % g)
        os.fsync(fd)
        while True:
            g += 1
            put_slot, clear, cal = update_for(spec, n, g)
            got = commit_update(path, put={put_slot: entry_for(spec, g)}, clear=clear, calibration=cal)
            assert got == g, (got, g)
            os.write(fd, b"%d\\n" % g)
            os.fsync(fd)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
''')

SPEC = MemorySpec(num_layers=4, num_kv_heads=2, head_dim=32, pooled_len=16, key_dim=64,
                  model_fingerprint="c3" * 32, payload_dtype="int8")
BUDGET = 4 << 20
KILLS = 25


def expected_state(ns: dict, num_slots: int, gen: int) -> tuple[dict[int, int], float]:
    """slot -> generation whose entry it holds, and tau, after ``gen`` commits."""
    slots: dict[int, int] = {}
    tau = 0.05
    for g in range(1, gen + 1):
        put_slot, clear, cal = ns["update_for"](SPEC, num_slots, g)
        slots[put_slot] = g
        for s in clear:
            slots.pop(s, None)
        tau = cal.tau
    return slots, tau


def check_state(ns: dict, path: str, size: int, gen: int) -> None:
    assert os.path.getsize(path) == size
    with Memory(path) as mem:
        assert mem.generation == gen
        mem.verify()
        slots, tau = expected_state(ns, mem.num_slots, gen)
        assert mem.occupied().tolist() == sorted(slots)
        assert mem.calibration.tau == float(np.float32(tau))
        for s, g in slots.items():
            want = ns["entry_for"](SPEC, g)
            got = mem.read_entry(s)
            assert got.source_id == f"gen-{g}"
            for name in ("key", "k", "v", "k_scale", "v_scale"):
                assert np.array_equal(getattr(got, name), getattr(want, name)), (s, g, name)


def logged(log: str) -> tuple[int, int]:
    """(number of child starts, last committed generation) from the child's log."""
    if not os.path.exists(log):
        return 0, 0
    with open(log) as f:
        lines = f.read().split("\n")[:-1]  # a partial last line cannot exist: one write per line
    starts = sum(1 for x in lines if x.startswith("start"))
    # a child starts from the file's generation, which may be one the killed child before it
    # renamed into place but never logged: that counts as committed too
    gens = [int(x.split()[-1]) for x in lines]
    return starts, max(gens, default=0)


def test_sigkill_during_updates_leaves_old_or_new_state(tmp_path):
    ns: dict = {}
    exec(CHILD_SRC, ns)  # the same update_for / entry_for the child uses
    script = tmp_path / "child.py"
    script.write_text(CHILD_SRC)
    path, log = str(tmp_path / "m.ekv"), str(tmp_path / "commits.log")
    create_memory(path, SPEC, BUDGET).close()
    size = os.path.getsize(path)
    assert 3 << 20 < size <= BUDGET

    # a few commits here (the same deterministic generations) to time one commit on this disk
    t0 = time.monotonic()
    with Memory(path) as mem:
        num_slots = mem.num_slots
    for g in (1, 2, 3):
        put_slot, clear, cal = ns["update_for"](SPEC, num_slots, g)
        commit_update(path, put={put_slot: ns["entry_for"](SPEC, g)}, clear=clear, calibration=cal)
    window = 4 * (time.monotonic() - t0) / 3 + 0.05  # kill within ~4 commits of the child starting
    check_state(ns, path, size, 3)

    rng = random.Random(20260)
    t_start = time.monotonic()
    outcomes = {"old": 0, "new": 0}
    stale_seen = 0
    killed: set[int] = set()
    for run in range(1, KILLS + 1):
        child = subprocess.Popen([sys.executable, str(script), path, log], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while logged(log)[0] < run:  # wait until it has opened the memory and starts committing
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "child did not start"
            time.sleep(0.002)
        t0 = time.monotonic()
        time.sleep(rng.uniform(0.0, window))
        assert child.poll() is None, child.stderr.read().decode()
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed.add(child.pid)
        child.stderr.close()
        ran_s = time.monotonic() - t0

        last = max(logged(log)[1], 3)  # the parent committed generations 1..3
        with Memory(path) as mem:
            gen = mem.generation
        assert gen in (last, last + 1), f"file at generation {gen}, log says {last} (ran {ran_s:.3f} s)"
        outcomes["old" if gen == last else "new"] += 1
        check_state(ns, path, size, gen)
        temps = [f for f in os.listdir(tmp_path) if f.startswith(".m.ekv.tmp-")]
        # only killed writers leave temp files, and the next writer's commit removes them
        assert {f".m.ekv.tmp-{pid}" for pid in killed} >= set(temps) and len(temps) <= 1, temps
        stale_seen += f".m.ekv.tmp-{child.pid}" in temps

    _, last = logged(log)
    assert last >= 10, f"only {last} commits in {KILLS} runs"
    assert stale_seen >= 1, "no kill landed inside a commit (no temp file was ever left behind)"
    assert time.monotonic() - t_start < 60
    print(f"crash test: {KILLS} kills, window {window:.3f} s, {last} commits, outcomes {outcomes}, {stale_seen} kills inside a "
          f"commit's write, {time.monotonic() - t_start:.1f} s")
