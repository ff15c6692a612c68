"""SIGKILL during the anchors + memory commit: the anchors the loader returns always belong
to the memory's generation.

A quick, seeded subset of ``scripts/crash_harness.py``'s anchors part (the full run: 240
kills, ``python scripts/crash_harness.py --adapt-kills 0 --commit-kills 0``): adapt-like
steps (``edgekv.induce.anchors.commit_with_anchors``, the function ``adapt`` commits with, on
a small synthetic memory) are killed at syscall boundaries of the commit (fault injection:
the child SIGKILLs itself right before its N-th open / fsync / rename / ...) or after a
random delay. After each kill the memory must be a committed state (sha256 of the reference
chain) and ``read_anchors`` must return the anchors of its generation. A control that
commits in the old order (memory first, anchors file after) must be caught by the same check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgekv.data import Example
from edgekv.errors import EdgeKVError, InputError, MismatchError
from edgekv.format import Calibration, Memory, MemorySpec, commit_update, create_memory
from edgekv.induce import anchors as anchors_mod
from edgekv.induce.anchors import (
    anchors_equal,
    commit_with_anchors,
    read_anchor_set,
    read_anchor_sets,
    read_anchors,
    write_anchors,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigkill_during_anchors_and_memory_commit_is_never_observed(tmp_path):
    out = tmp_path / "crash.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "crash_harness.py"), "--adapt-kills", "0",
           "--commit-kills", "0", "--anchor-kills", "10", "--anchor-control-kills", "30", "--apply-kills", "0", "--seed", "3",
           "--out", str(out), "--work", str(tmp_path / "w")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.exists(), res.stderr[-3000:]
    report = json.loads(out.read_text())
    part = report["anchors"]
    assert part["failures"] == [], "\n".join(part["failures"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert part["kills"] == 10 and part["inconsistent_states"] == 0
    assert sum(part["outcomes"].values()) == 10 and part["kill_modes"]["syscall-boundary"] == 5
    assert part["boundaries_per_step"] >= 15  # open, copy, fsync, rename of both files at least
    # the check has teeth: the old order (anchors written after the memory commit) is caught
    assert report["anchors_control"]["inconsistent_states"] > 0


# --- the rules of edgekv.induce.anchors, without kills -------------------------------
def _memory(tmp_path):
    spec = MemorySpec(num_layers=2, num_kv_heads=1, head_dim=8, pooled_len=2, key_dim=8, model_fingerprint="d4" * 32)
    path = str(tmp_path / "m.ekv")
    create_memory(path, spec, spec.file_bytes_for(4)).close()
    return path


def _anchors(tag: str):
    return [("t", Example(f"{tag}-{i}", f"prompt {tag} {i}", "a")) for i in range(2)]


def _state(path):
    with Memory(path) as m:
        return m.generation, m.header_crc32


def test_anchors_are_committed_with_the_memory_and_stamped(tmp_path):
    path = _memory(tmp_path)
    g, crc = _state(path)
    res = commit_with_anchors(path, _anchors("one"), [], g, crc, calibration=Calibration(0.2, (1.0, 1.0)))
    assert res["generation"] == g + 1 == _state(path)[0]
    sets = read_anchor_sets(path)
    assert [(s.generation, s.memory_crc32) for s in sets] == [_state(path)]  # the previous set dropped after
    assert anchors_equal(read_anchors(path), _anchors("one"))
    assert res["bytes"] == os.path.getsize(path + ".anchors.jsonl")
    # a commit refused (another writer committed in between) writes nothing: anchors stay the state's
    g1, crc1 = _state(path)
    commit_update(path, calibration=Calibration(0.3, (1.0, 1.0)))  # no anchors: e.g. a baseline method
    with pytest.raises(MismatchError, match="changed while this update was prepared"):
        commit_with_anchors(path, _anchors("two"), _anchors("one"), g1, crc1, calibration=Calibration(0.4, (1, 1)))
    assert anchors_equal(read_anchors(path), _anchors("one"))  # newest earlier set for the newer memory
    assert [s.generation for s in read_anchor_sets(path)] == [g1]


def test_failed_anchors_write_publishes_nothing(tmp_path, monkeypatch):
    path = _memory(tmp_path)
    g, crc = _state(path)
    before = open(path, "rb").read()

    def full(*a, **k):
        raise EdgeKVError("disk full")

    monkeypatch.setattr(anchors_mod, "write_anchors", full)
    with pytest.raises(EdgeKVError, match="disk full"):
        commit_with_anchors(path, _anchors("x"), [], g, crc, calibration=Calibration(0.2, (1.0, 1.0)))
    assert open(path, "rb").read() == before and _state(path) == (g, crc)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_a_set_one_generation_ahead_is_not_used(tmp_path):
    """What a kill between the anchors write and the memory rename leaves: the loader keeps
    returning the current state's set."""
    path = _memory(tmp_path)
    g, crc = _state(path)
    write_anchors(path, [(g + 1, 12345, _anchors("next")), (g, crc, _anchors("cur"))])
    assert anchors_equal(read_anchors(path), _anchors("cur"))
    assert anchors_equal(read_anchors(path, g + 1, 12345), _anchors("next"))
    write_anchors(path, [(g + 1, 12345, _anchors("next"))])  # and no set for this state at all: none
    assert read_anchors(path) == []


def test_old_anchors_files_without_a_stamp_are_still_read(tmp_path):
    path = _memory(tmp_path)
    with open(path + ".anchors.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"task": "t", "id": "x1", "prompt": "p", "answer": "a"}) + "\n\n")
        f.write(json.dumps({"task": "u", "id": "x2", "prompt": "q", "answer": "b", "image": "/i.png"}) + "\n")
    got = read_anchors(path)
    assert [(t, e.id, e.image) for t, e in got] == [("t", "x1", None), ("u", "x2", "/i.png")]
    assert read_anchors(path, 7, 1) == got  # any state


def test_a_truncated_set_is_refused(tmp_path):
    path = _memory(tmp_path)
    g, crc = _state(path)
    write_anchors(path, [(g, crc, _anchors("cur"))])
    lines = open(path + ".anchors.jsonl").read().splitlines()
    open(path + ".anchors.jsonl", "w").write("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match="holds 1 records, its header says 2"):
        read_anchors(path)


def test_the_phrasing_sketch_travels_with_its_set(tmp_path):
    path = _memory(tmp_path)
    g, crc = _state(path)
    sketch = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    commit_with_anchors(path, _anchors("one"), [], g, crc, calibration=Calibration(0.2, (1.0, 1.0)),
                        phrasing=sketch)
    chosen = read_anchor_set(path)
    assert anchors_equal(list(chosen.anchors), _anchors("one"))
    np.testing.assert_array_equal(chosen.phrasing, sketch)  # bit-exact float32 round trip
    # a version 1 set (written before the sketch existed) reads as a set without one
    g1, crc1 = _state(path)
    with open(path + ".anchors.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"edgekv_anchors": 1, "generation": g1, "memory_crc32": crc1, "count": 1}) + "\n")
        f.write(json.dumps({"task": "t", "id": "x", "prompt": "p", "answer": "a"}) + "\n")
    assert read_anchor_set(path).phrasing is None and len(read_anchors(path)) == 1


def test_a_damaged_phrasing_sketch_is_refused(tmp_path):
    path = _memory(tmp_path)
    g, crc = _state(path)
    write_anchors(path, [(g, crc, _anchors("cur"), np.ones((2, 8), np.float32))])
    lines = open(path + ".anchors.jsonl").read().splitlines()
    head = json.loads(lines[0])
    head["phrasing"] = [3, 8]  # the header now disagrees with the bytes
    open(path + ".anchors.jsonl", "w").write("\n".join([json.dumps(head)] + lines[1:]) + "\n")
    with pytest.raises(InputError, match=r"line 2 is not an anchor record .*phrasing sketch holds 64 bytes"):
        read_anchors(path)
