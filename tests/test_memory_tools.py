"""``edgekv memory ls`` / ``edgekv memory rm``: list a memory's entries, remove a task's or some entries.

* ``ls`` lists exactly the occupied slots (slot, entry id, task, source id, insertion order), as
  JSON and as a table with a one-line summary;
* ``rm --task`` / ``rm --entry`` clear exactly those slots in one commit: same size, generation + 1,
  every other slot and table row byte-identical, the memory opens and verifies;
* an unknown task or id, a task without entries, both or neither option: refused, the file
  byte-identical; a signed memory is refused without ``--sign`` (and re-signed with it);
* an error before the rename and a SIGKILL at every syscall boundary of an ``rm`` (the crash
  harness's fault injection, scripts/crash_harness.py) leave the old state or the new one;
* the HNSW index cached beside the memory is rebuilt for the new state; one bound to the old state
  is never used; the host's anchors file drops the removed task's anchors in the same commit, and
  ``edgekv adapt`` goes on from the state ``rm`` left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.data import Example
from edgekv.errors import InputError
from edgekv.format import TABLE_ENTRY_BYTES, Entry, Memory, MemorySpec, commit_update, create_memory
from edgekv.index import Retriever, cache_paths
from edgekv.induce.anchors import anchors_path, commit_with_anchors, read_anchor_sets, read_anchors
from edgekv.rope import RopeSpec
from edgekv.updates import list_entries, remove_entries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runner = CliRunner()
SPEC = MemorySpec(2, 2, 8, 4, 16, "e7" * 32, "int8", RopeSpec((1.0, 0.3), 1.0), proj_max_dirs=2)
NUM_SLOTS = 12
BIRDS, CAPITALS = (0, 1, 2, 5), (3, 4, 7)  # the slots of the two tasks; 6, 8..11 empty


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _entry(rng, task: str, source: str) -> Entry:
    shape = SPEC.payload_shape
    return Entry.from_float(rng.normal(size=SPEC.key_dim), rng.normal(size=shape), rng.normal(size=shape),
                            "int8", task, source)


def _anchors(task: str, n: int) -> list:
    return [(task, Example(f"{task}-a{i}", f"prompt {task} {i}", f"answer {i}")) for i in range(n)]


def _make(path: str, anchors: bool = False) -> str:
    """A memory of 12 slots: birds in 0, 1, 2, 5 (committed first), capitals in 3, 4, 7; with
    ``anchors``, committed as adapt commits (two anchors per task beside the memory)."""
    rng = np.random.default_rng(3)
    create_memory(path, SPEC, SPEC.file_bytes_for(NUM_SLOTS)).close()
    for task, slots, have in (("birds", BIRDS, []), ("capitals", CAPITALS, _anchors("birds", 2))):
        put = {s: _entry(rng, task, f"{task}-src{s}") for s in slots}
        if anchors:
            with Memory(path) as m:
                gen, crc = m.generation, m.header_crc32
            commit_with_anchors(path, have + _anchors(task, 2), have, gen, crc, put=put)
        else:
            commit_update(path, put)
    return path


@pytest.fixture()
def mem(tmp_path) -> str:
    return _make(str(tmp_path / "mem.ekv"))


def _expected() -> list[dict]:
    """What ``ls`` must list for ``_make``'s memory: ids and insertion order follow the commits."""
    order = [("birds", s) for s in BIRDS] + [("capitals", s) for s in CAPITALS]
    rows = [{"slot": s, "entry_id": i, "task": t, "source_id": f"{t}-src{s}", "insert_seq": i + 1}
            for i, (t, s) in enumerate(order)]
    return sorted(rows, key=lambda r: r["slot"])


def _layout(path: str) -> tuple[int, int, int]:
    """(table offset, slots offset, slot bytes) of the memory."""
    with Memory(path) as m:
        return m._h.table_offset, m._h.slots_offset, m.spec.slot_bytes


def _rows_and_slots(path: str) -> tuple[list[bytes], list[bytes]]:
    """The raw bytes of every table row and every slot."""
    table, slots, sb = _layout(path)
    raw = open(path, "rb").read()
    rows = [raw[table + i * TABLE_ENTRY_BYTES: table + (i + 1) * TABLE_ENTRY_BYTES] for i in range(NUM_SLOTS)]
    return rows, [raw[slots + i * sb: slots + (i + 1) * sb] for i in range(NUM_SLOTS)]


def temps(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


# --- ls ----------------------------------------------------------------------------------------
def test_ls_lists_exactly_the_occupied_slots(mem, tmp_path):
    assert list_entries(mem) == _expected()
    res = runner.invoke(app, ["memory", "ls", mem, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["entries"] == _expected()
    assert (d["num_used"], d["num_slots"], d["generation"]) == (7, NUM_SLOTS, 2)
    assert d["per_task_counts"] == {"birds": 4, "capitals": 3}
    res = runner.invoke(app, ["memory", "ls", mem])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["slot", "entry", "id", "task", "source", "id", "order"]
    assert [line.split() for line in lines[1:-1]] == \
        [[str(e["slot"]), str(e["entry_id"]), e["task"], e["source_id"], str(e["insert_seq"])] for e in _expected()]
    assert lines[-1] == f"7 of 12 slots occupied ({mem}, generation 2)"
    empty = str(tmp_path / "empty.ekv")
    create_memory(empty, SPEC, SPEC.file_bytes_for(4)).close()
    assert list_entries(empty) == []
    res = runner.invoke(app, ["memory", "ls", empty])
    assert res.exit_code == 0 and res.stdout == f"0 of 4 slots occupied ({empty}, generation 0)\n"
    res = runner.invoke(app, ["memory", "ls", str(tmp_path / "nope.ekv")])
    assert res.exit_code == 3 and "memory file not found" in res.stderr


# --- rm ----------------------------------------------------------------------------------------
def _check_removed(path: str, before: tuple, size: int, gen: int, gone: set[int]) -> None:
    """Exactly the slots ``gone`` were cleared (zero row, zero bytes); every other row and slot is
    byte-identical; same size; generation + 1; the memory opens and verifies."""
    rows0, slots0 = before
    rows1, slots1 = _rows_and_slots(path)
    assert os.path.getsize(path) == size
    for s in range(NUM_SLOTS):
        if s in gone:
            assert rows1[s] == bytes(TABLE_ENTRY_BYTES) and slots1[s].count(0) == len(slots1[s]), s
            assert rows0[s] != rows1[s]
        else:
            assert (rows1[s], slots1[s]) == (rows0[s], slots0[s]), s
    with Memory(path) as m:
        assert m.generation == gen + 1 and m.file_bytes == size
        m.verify()
        assert m.tasks == ["birds", "capitals"]  # the format keeps task names (docs/memory-format.md)
    assert list_entries(path) == [e for e in _expected() if e["slot"] not in gone]
    assert temps(os.path.dirname(path)) == []


def test_rm_task_clears_exactly_its_slots(mem):
    before, size = _rows_and_slots(mem), os.path.getsize(mem)
    res = remove_entries(mem, task="birds")
    assert [e["slot"] for e in res["removed"]] == list(BIRDS) and res["slots_cleared"] == 4
    assert (res["generation_before"], res["generation"], res["num_used_before"], res["num_used"]) == (2, 3, 7, 3)
    assert res["tasks_emptied"] == ["birds"] and res["anchors"] is None
    _check_removed(mem, before, size, 2, set(BIRDS))
    with Memory(mem) as m:
        assert m.per_task_counts() == {"birds": 0, "capitals": 3}


def test_rm_several_entry_ids_through_the_cli(mem):
    before, size = _rows_and_slots(mem), os.path.getsize(mem)
    ids = {e["slot"]: e["entry_id"] for e in _expected()}
    gone = {1, 4, 7}
    args = ["memory", "rm", mem, "--json"] + [a for s in sorted(gone) for a in ("--entry", str(ids[s]))]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert sorted(e["slot"] for e in d["removed"]) == sorted(gone)
    assert d["tasks_emptied"] == [] and d["num_used"] == 4
    _check_removed(mem, before, size, 2, gone)
    # the last capitals entry: the task is emptied; human output
    res = runner.invoke(app, ["memory", "rm", mem, "--entry", str(ids[3])])
    assert res.exit_code == 0, res.output
    assert f"removed     1 entry (task capitals; entry ids {ids[3]})" in res.stdout
    assert "generation  3 -> 4" in res.stdout and "slots       3 of 12 occupied (was 4)" in res.stdout
    with Memory(mem) as m:
        assert m.per_task_counts() == {"birds": 3, "capitals": 0}


@pytest.mark.parametrize("args, code, phrases", [
    (["--task", "nope"], 3, ["no task 'nope'", "birds (4), capitals (3)", "nothing was removed"]),
    (["--entry", "999", "--entry", "2"], 3, ["no entry with id 999;", "its entry ids: 0, 1, 2, 3, 4, 5, 6"]),
    ([], 2, ["--task TASK or --entry ID"]),
    (["--task", "birds", "--entry", "1"], 2, ["--task TASK or --entry ID"]),
])
def test_unknown_task_or_id_or_bad_usage_leaves_the_file(mem, args, code, phrases):
    before = sha(mem)
    res = runner.invoke(app, ["memory", "rm", mem, *args])
    assert res.exit_code == code, res.output
    for phrase in phrases:
        assert phrase in " ".join(res.stderr.split()), res.stderr
    if code == 3:
        assert res.stderr.startswith("edgekv: error: ") and res.stderr.count("\n") == 1
    assert sha(mem) == before and temps(os.path.dirname(mem)) == []


def test_removing_nothing_is_an_error(mem, tmp_path):
    remove_entries(mem, task="birds")
    before = sha(mem)
    with pytest.raises(InputError, match="task 'birds' has no entries, nothing to remove; tasks with entries: "
                                         r"capitals \(3\)"):
        remove_entries(mem, task="birds")
    with pytest.raises(InputError, match="give at least one entry id"):
        remove_entries(mem, entry_ids=[])
    with pytest.raises(InputError, match="not both and not neither"):
        remove_entries(mem)
    assert sha(mem) == before
    empty = str(tmp_path / "empty.ekv")
    create_memory(empty, SPEC, SPEC.file_bytes_for(4)).close()
    with pytest.raises(InputError, match=r"no entry with id 0; its entry ids: none \(the memory is empty\)"):
        remove_entries(empty, entry_ids=[0])


def test_a_signed_memory_is_refused_without_sign_and_resigned_with_it(mem, tmp_path):
    from edgekv import signing

    key, pub = signing.generate_keypair(tmp_path / "keys")
    signing.sign_memory(mem, key)
    sig = signing.signature_path(mem)
    before, sig_before = sha(mem), sha(sig)
    res = runner.invoke(app, ["memory", "rm", mem, "--task", "birds"])
    assert res.exit_code == 3 and "is signed (mem.ekv.sig)" in res.stderr and "pass --sign KEY" in res.stderr
    assert (sha(mem), sha(sig)) == (before, sig_before)
    res = runner.invoke(app, ["memory", "rm", mem, "--task", "birds", "--sign", key, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["signature"]["path"] == sig
    with Memory(mem) as m:
        assert signing.verify_memory(m, pub) == signing.key_id(signing.load_public_key(pub))
        assert signing.read_signature(mem)["claims"] == {"generation": m.generation} == {"generation": 3}


# --- crashes ---------------------------------------------------------------------------------------
def test_an_error_before_the_rename_leaves_the_memory(mem, monkeypatch):
    import edgekv.format.writer as fmt_writer  # where commit_update looks _publish up

    before = sha(mem)

    def fail(tmp, path):
        raise RuntimeError("injected before the rename")

    monkeypatch.setattr(fmt_writer, "_publish", fail)
    with pytest.raises(RuntimeError, match="injected"):
        remove_entries(mem, task="birds")
    assert sha(mem) == before and temps(os.path.dirname(mem)) == []
    monkeypatch.undo()
    remove_entries(mem, task="birds")  # nothing left behind changes a retry
    assert list_entries(mem) == [e for e in _expected() if e["task"] == "capitals"]


def _rm_child(path: str, at: int, counter_file: str | None) -> int:
    """A child: ``edgekv memory rm --task birds`` (the library call), killed by itself at syscall
    boundary ``at`` (0: never; the boundaries crossed go to ``counter_file``)."""
    from crash_harness import APPLY_BOUNDARIES, _arm_kill

    count = _arm_kill(at, APPLY_BOUNDARIES)
    remove_entries(path, task="birds")
    crossed = count[0]
    if counter_file:
        with open(counter_file, "w") as f:
            f.write(str(crossed))
    return 0


def test_sigkill_at_every_syscall_boundary_of_rm_leaves_old_or_new(tmp_path):
    """The crash harness's fault injection (scripts/crash_harness.py: the child SIGKILLs itself
    right before its N-th open / pread / fsync / rename / unlink / ..., N over every boundary of one
    rm): the memory is OLD or NEW byte for byte, the anchors loaded are those of its state, a cached
    index is trusted only when bound to its state, and a retry reaches NEW."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from crash_harness import fork_child, wait_child

    from edgekv.index import hnswlib_status, load_cached_index, memory_keys, memory_state

    hnswlib_status()  # probed here, before the children fork
    base = str(tmp_path / "base")
    os.makedirs(base)
    old = _make(os.path.join(base, "m.ekv"), anchors=True)
    with Memory(old) as m:
        Retriever(m, force="hnsw")  # the index of OLD, cached beside it
    files = [old, anchors_path(old), *cache_paths(old)]
    assert all(os.path.isfile(p) for p in files)
    old_anchors = read_anchors(old)

    def restore(folder: str) -> str:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for p in files:
            shutil.copy(p, os.path.join(folder, os.path.basename(p)))
        return os.path.join(folder, "m.ekv")

    ref, counter = restore(str(tmp_path / "ref")), str(tmp_path / "count.txt")
    assert wait_child(fork_child(_rm_child, ref, 0, counter), 120) == 0
    boundaries, new_sha, new_anchors = int(open(counter).read()), sha(ref), read_anchors(ref)
    assert new_anchors == _anchors("capitals", 2) and old_anchors == _anchors("birds", 2) + new_anchors
    assert boundaries > 20  # the injection sees the rm's calls
    outcomes, index_bound = {"old": 0, "new": 0}, 0
    for at in range(1, boundaries + 1):
        path = restore(str(tmp_path / "trial"))
        assert wait_child(fork_child(_rm_child, path, at, None), 120) == -signal.SIGKILL, at
        digest = sha(path)
        assert digest in (sha(old), new_sha), f"boundary {at}: neither OLD nor NEW"
        outcome = "old" if digest == sha(old) else "new"
        outcomes[outcome] += 1
        assert read_anchors(path) == (old_anchors if outcome == "old" else new_anchors), at
        with Memory(path) as m:
            m.verify()
            slots, keys = memory_keys(m)
            state = memory_state(m, slots, keys)
        index, why = load_cached_index(path, slots, keys, state)
        if index is None:
            assert "bound to another memory state" in why or "no index" in why, (at, why)
        index_bound += index is not None
        if outcome == "old":
            remove_entries(path, task="birds")  # a retry reaches NEW
            assert sha(path) == new_sha and read_anchors(path) == new_anchors, at
    assert outcomes["old"] > 0 and outcomes["new"] > 0 and sum(outcomes.values()) == boundaries
    assert index_bound > 0


# --- beside the memory: the cached index and the anchors -----------------------------------------
def _binding(path: str) -> dict:
    return json.load(open(cache_paths(path)[1]))


def test_the_cached_index_is_rebuilt_and_the_old_one_never_used(mem, tmp_path):
    with Memory(mem) as m:
        Retriever(m, force="hnsw")
    old_binding = _binding(mem)
    old_files = [open(p, "rb").read() for p in cache_paths(mem)]
    assert old_binding["memory_generation"] == 2
    res = remove_entries(mem, task="birds")
    assert res["index"] == {"index": "rebuilt", "generation": 3}
    with Memory(mem) as m:
        assert (_binding(mem)["memory_generation"], _binding(mem)["memory_header_crc32"]) == (3, m.header_crc32)
        assert _binding(mem)["num_items"] == 3
        r = Retriever(m, force="hnsw")
        assert r.reason == "the cached index matches the memory"
        q = np.random.default_rng(0).normal(size=16).astype(np.float32)
        assert sorted(r.search(q, 3)[0].tolist()) == list(CAPITALS)  # only what is left
    for p, raw in zip(cache_paths(mem), old_files, strict=True):  # the old state's index put back
        open(p, "wb").write(raw)
    with Memory(mem) as m:
        r = Retriever(m, force="hnsw")
        assert r.reason.startswith("built on the device (the cached index is bound to another memory state "
                                   "(generation 2, memory at 3)")


def test_rm_commits_the_anchors_without_the_removed_task(tmp_path):
    path = _make(str(tmp_path / "mem.ekv"), anchors=True)
    assert read_anchors(path) == _anchors("birds", 2) + _anchors("capitals", 2)
    res = remove_entries(path, task="birds")
    assert res["anchors"] == {"path": anchors_path(path), "kept": 2, "dropped": 2}
    with Memory(path) as m:
        sets = read_anchor_sets(path)
        assert [(s.generation, s.memory_crc32) for s in sets] == [(3, m.header_crc32)]  # stamped, old set dropped
    assert read_anchors(path) == _anchors("capitals", 2)
    ids = {e["slot"]: e["entry_id"] for e in _expected()}
    res = remove_entries(path, entry_ids=[ids[3]])  # capitals keeps entries: its anchors stay
    assert res["anchors"]["dropped"] == 0 and read_anchors(path) == _anchors("capitals", 2)
    res = remove_entries(path, entry_ids=[ids[4], ids[7]])  # its last entries: its anchors go
    assert res["tasks_emptied"] == ["capitals"] and res["anchors"]["dropped"] == 2 and read_anchors(path) == []


def test_adapt_goes_on_after_rm(tiny_model_dir, tmp_path):
    """adapt task1, task2; rm --task task1; adapt task3 on the same memory: it runs on the state rm
    left (no stale anchors of task1 in its retention term), and the memory holds task2 and task3."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from crash_harness import write_tasks

    model = tiny_model_dir("llama")
    t1, t2, t3 = write_tasks(str(tmp_path), 3)
    path = str(tmp_path / "mem.ekv")

    def adapt(data: str, *extra: str) -> dict:
        res = runner.invoke(app, ["adapt", "--model", model, "--data", data, "--memory", path, "--steps", "2",
                                  "--threads", "1", "--no-progress", "--json", *extra])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    adapt(t1, "--budget", "4MiB")  # the crash harness's adapt chain settings
    adapt(t2)
    assert {t for t, _ in read_anchors(path)} == {"task1", "task2"}
    res = runner.invoke(app, ["memory", "rm", path, "--task", "task1", "--json"])
    assert res.exit_code == 0, res.output
    assert {t for t, _ in read_anchors(path)} == {"task2"}
    assert adapt(t3)["anchors"]["count"] == len(read_anchors(path))  # task1 is no earlier task of this one
    with Memory(path) as m:
        m.verify()
        counts = m.per_task_counts()
    assert counts["task1"] == 0 and counts["task2"] > 0 and counts["task3"] > 0
    assert {t for t, _ in read_anchors(path)} == {"task2", "task3"}
