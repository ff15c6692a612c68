"""Concurrency: one Runtime serves several threads; readers never see a half-applied update.

1. ``generate`` from 4 threads at once (greedy and seeded sampling, exact and HNSW
   retrieval) returns exactly what serial calls return: text, token ids, retrieved slots and
   alphas. The Runtime keeps no per-call state on itself (onnxruntime's ``run``, hnswlib's
   ``knn_query`` and the memory map are safe to share).
2. A reader that keeps opening the memory, verifying every checksum and comparing the
   content with the state its generation must hold, while another *process* commits
   updates in a loop, never sees anything but a whole committed state; a control writer
   that updates the file in place (no temp file + rename) is caught by the same reader.
3. The same reader during a real ``adapt`` sees only the state before or the state after.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from textwrap import dedent

import numpy as np
import pytest
from test_mismatch import _add_index, memory_for

from edgekv.errors import CorruptFileError
from edgekv.format import Memory, MemorySpec, create_memory

PROMPTS = ["code for river?", "what colour is the triangle?", "how many dots are there?", "hello world",
           "the quick brown fox", "code for apple?", "a red circle sits left of", "edge devices keep"]


def _key(res) -> tuple:
    return (res.text, tuple(res.token_ids), tuple((r.slot, round(r.alpha, 6)) for r in res.retrieved),
            res.stop_reason)


@pytest.mark.parametrize("retrieval", ["exact", "hnsw"])
def test_generate_from_four_threads_equals_serial(exported, tmp_path, retrieval):
    import shutil

    from edgekv.runtime import Runtime

    art = str(tmp_path / "art")
    shutil.copytree(exported("llama"), art)
    mem = memory_for(art, str(tmp_path / "m.ekv"), n=12)
    if retrieval == "hnsw":
        _add_index(art, mem)
    calls = [(p, 0.0, None) for p in PROMPTS] + [(p, 0.9, 1000 + i) for i, p in enumerate(PROMPTS)]
    with Runtime.load(art, memory=mem, k=3, threads=1, retrieval=retrieval) as rt:
        assert rt.retriever.mode == retrieval

        def one(call):
            prompt, temperature, seed = call
            return _key(rt.generate(prompt, max_new_tokens=8, temperature=temperature, seed=seed))

        serial = [one(c) for c in calls]
        assert len({s[0] for s in serial}) > 4  # the prompts really differ in output
        for _ in range(2):
            with ThreadPoolExecutor(max_workers=4) as pool:
                parallel = list(pool.map(one, calls * 2))
            assert parallel == serial * 2


# --- readers vs a writer process ----------------------------------------------------------
SPEC = MemorySpec(num_layers=2, num_kv_heads=2, head_dim=16, pooled_len=8, key_dim=32,
                  model_fingerprint="d4" * 32, payload_dtype="int8")

STATE_SRC = dedent('''
    import numpy as np
    from edgekv.format import Calibration, Entry

    def entry_for(spec, g):
        rng = np.random.default_rng(g)
        shape = spec.payload_shape
        return Entry.from_float(rng.normal(size=spec.key_dim), rng.normal(size=shape), rng.normal(size=shape),
                                "int8", f"task-{g % 3}", f"gen-{g}")

    def update_for(spec, num_slots, g):
        """generation g: slot g % n gets entry g, every 3rd generation clears another, tau = 0.01 g."""
        put = (g * 7) % num_slots
        clear = [(g * 5 + 1) % num_slots] if g % 3 == 0 else []
        return put, [s for s in clear if s != put], Calibration(0.01 * g, (1.0,) * spec.num_layers)

    def expected(spec, num_slots, gen):
        slots, tau = {}, 0.05
        for g in range(1, gen + 1):
            put, clear, cal = update_for(spec, num_slots, g)
            slots[put] = g
            for s in clear:
                slots.pop(s, None)
            tau = cal.tau
        return slots, tau
''')

WRITER_SRC = STATE_SRC + dedent('''
    import os, sys, time
    from edgekv.format import Memory, MemorySpec, commit_update, TABLE_ENTRY_BYTES
    from edgekv.format.writer import _encode_header

    def atomic(path, gens):
        with Memory(path) as m:
            spec, n = m.spec, m.num_slots
        for g in range(1, gens + 1):
            put, clear, cal = update_for(spec, n, g)
            commit_update(path, put={put: entry_for(spec, g)}, clear=clear, calibration=cal)

    def in_place(path, gens):
        """The control: the same states, written into the live file (what commit_update avoids)."""
        import zlib
        from edgekv.format import FLAG_OCCUPIED
        from edgekv.format.writer import _slot_bytes_of
        for g in range(1, gens + 1):
            with Memory(path) as m:
                spec, n, h, table = m.spec, m.num_slots, m._h, m.table.copy()
            put, clear, cal = update_for(spec, n, g)
            data = _slot_bytes_of(entry_for(spec, g), spec)
            with open(path, "r+b") as f:
                f.seek(h.slots_offset + put * spec.slot_bytes)
                f.write(data)
                f.flush()
                time.sleep(0.002)
                table[put] = (FLAG_OCCUPIED, 0, 0, zlib.crc32(data), zlib.crc32(data[:4 * spec.key_dim]), g, g,
                              f"gen-{g}".encode())
                f.seek(h.table_offset)
                f.write(table.tobytes())
                f.flush()
                time.sleep(0.002)
                h.generation, h.table_crc32, h.calibration = g, zlib.crc32(table.tobytes()), cal
                h.tasks = ["task-0"]
                f.seek(0)
                f.write(_encode_header(h))

    if __name__ == "__main__":
        {"atomic": atomic, "in_place": in_place}[sys.argv[1]](sys.argv[2], int(sys.argv[3]))
''')


def read_state(ns: dict, path: str) -> tuple[int, str]:
    """Open, verify, and compare with the state of the file's generation; -> (gen, sha256)."""
    with Memory(path) as mem:
        gen = mem.generation
        mem.verify()
        slots, tau = ns["expected"](SPEC, mem.num_slots, gen)
        if mem.occupied().tolist() != sorted(slots) or mem.calibration.tau != float(np.float32(tau)):
            raise AssertionError(f"generation {gen}: slots {mem.occupied().tolist()} / tau {mem.calibration.tau}, "
                                 f"expected {sorted(slots)} / {tau}")
        for s, g in slots.items():
            got, want = mem.read_entry(s), ns["entry_for"](SPEC, g)
            if got.source_id != f"gen-{g}" or not np.array_equal(got.k, want.k) or not np.array_equal(got.v, want.v):
                raise AssertionError(f"generation {gen}: slot {s} does not hold entry {g}")
        return gen, hashlib.sha256(mem._mm[:]).hexdigest()


def _reader_vs_writer(tmp_path, mode: str, gens: int, seconds: float):
    ns: dict = {}
    exec(STATE_SRC, ns)
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SRC)
    path = str(tmp_path / "m.ekv")
    create_memory(path, SPEC, SPEC.file_bytes_for(12)).close()
    writer = subprocess.Popen([sys.executable, str(script), mode, path, str(gens)], stderr=subprocess.PIPE)
    seen: dict[int, str] = {}
    failures = []
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end and (writer.poll() is None or len(seen) < 2):
            try:
                gen, digest = read_state(ns, path)
                if seen.setdefault(gen, digest) != digest:
                    raise AssertionError(f"two different files claim generation {gen}")
            except (CorruptFileError, AssertionError) as e:
                failures.append(str(e))
                if mode == "in_place":
                    break
                continue
            if writer.poll() is not None and gen == gens:
                break
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
    return seen, failures, writer


def test_reader_never_sees_a_half_applied_update(tmp_path):
    seen, failures, writer = _reader_vs_writer(tmp_path, "atomic", gens=150, seconds=60)
    assert writer.returncode == 0, writer.stderr.read().decode()[-2000:]
    assert failures == [], failures[:3]
    assert len(seen) >= 10, f"the reader saw only generations {sorted(seen)}"  # it really raced the writer
    assert max(seen) == 150


def test_control_in_place_writer_is_caught_by_the_same_reader(tmp_path):
    _, failures, _ = _reader_vs_writer(tmp_path, "in_place", gens=5000, seconds=30)
    assert failures, "the reader never caught the in-place writer mid-update: the check has no teeth"
    assert any(k in failures[0] for k in ("checksum", "does not hold", "expected", "two different files")), failures[0]


@pytest.fixture()
def one_torch_thread():
    """adapt on one thread: on a shared, loaded machine OpenMP's spinning threads can make it 30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_reader_during_adapt_sees_before_or_after(backbone, tmp_path, one_torch_thread):
    from edgekv.data import Example
    from edgekv.induce.adapt import AdaptConfig, adapt
    from edgekv.induce.select import SelectionConfig

    bb = backbone("llama")
    path = str(tmp_path / "m.ekv")
    cfg = AdaptConfig(selection=SelectionConfig(steps=2))
    first = [Example(f"a{i}", f"code for item {i}?", f"K{i}") for i in range(10)]
    adapt(bb, first, path, 48 << 10, "t1", cfg)
    with Memory(path) as m:
        g0, before = m.generation, hashlib.sha256(m._mm[:]).hexdigest()
    second = [Example(f"b{i}", f"colour of shape {i}?", f"C{i}") for i in range(10)]
    done = threading.Event()
    errors = []

    def writer():
        try:
            adapt(bb, second, path, None, "t2", cfg)
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    while not done.is_set() or not seen:
        with Memory(path) as m:
            m.verify()
            seen.append((m.generation, hashlib.sha256(m._mm[:]).hexdigest()))
        time.sleep(0.001)
    thread.join()
    assert errors == []
    with Memory(path) as m:
        after = (m.generation, hashlib.sha256(m._mm[:]).hexdigest())
    assert after[0] == g0 + 1
    assert set(seen) <= {(g0, before), after}, set(seen) - {(g0, before), after}


def test_second_adapt_that_raced_a_commit_is_refused(backbone, tmp_path, monkeypatch, one_torch_thread):
    """adapt reads the memory, computes, commits: a commit by another writer in between is
    not silently overwritten (the update was computed from the older state)."""
    import edgekv.induce.adapt as adapt_module
    from edgekv.data import Example
    from edgekv.errors import MismatchError
    from edgekv.format import commit_update
    from edgekv.induce.adapt import AdaptConfig, adapt
    from edgekv.induce.select import SelectionConfig

    bb = backbone("llama")
    path = str(tmp_path / "m.ekv")
    cfg = AdaptConfig(selection=SelectionConfig(steps=1))
    adapt(bb, [Example(f"a{i}", f"code for item {i}?", f"K{i}") for i in range(6)], path, 48 << 10, "t1", cfg)
    real_select = adapt_module.select

    def select_while_another_writer_commits(*args, **kwargs):
        commit_update(path, clear=[0])  # the other writer
        return real_select(*args, **kwargs)

    monkeypatch.setattr(adapt_module, "select", select_while_another_writer_commits)
    with Memory(path) as m:
        g0 = m.generation
    with pytest.raises(MismatchError, match="changed while this update was prepared"):
        adapt(bb, [Example(f"b{i}", f"colour {i}?", f"C{i}") for i in range(6)], path, None, "t2", cfg)
    with Memory(path) as m:
        assert m.generation == g0 + 1 and 0 not in m.occupied().tolist()  # the other writer's state, intact
