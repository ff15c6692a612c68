"""Hostile files give edgekv errors only: a quick, seeded subset of ``scripts/fuzz.py``.

The full run (>= 10,000 cases, each target in its own process so a crash in C code is seen)
is ``python scripts/fuzz.py``. Here every target runs a few hundred hypothesis cases in
process, and the fuzzer must reach both sides (files accepted and refused). Directed
regressions pin what the fuzzer and review found: hnswlib reading out of bounds on a
hostile but self-consistent index (shown by a control in a subprocess), an index file named
outside its folder, a manifest sizing the runtime by a huge field, JSON nesting and giant
integers in task data, non-finite calibration in a checksummed header.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from edgekv.errors import CorruptFileError, InputError, MismatchError
from edgekv.format import Entry, Memory, MemorySpec, commit_update, create_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import fuzz  # noqa: E402

QUICK = {"memory": 300, "index": 200, "data": 300, "manifest": 80, "tokenizer": 150, "update": 300}


@pytest.mark.parametrize("target", sorted(QUICK))
def test_fuzz_quick(target, exported, tmp_path):
    export = exported("llama") if target in ("manifest", "tokenizer") else None
    res = fuzz.run_target(target, QUICK[target], seed=0, work=str(tmp_path), export_dir=export)
    assert res["findings"] == [], json.dumps(res["findings"], indent=1)
    assert res["cases"] == QUICK[target]
    outcomes = res["outcomes"]
    refused = sum(n for k, n in outcomes.items() if k.startswith("refused"))
    accepted = res["cases"] - refused
    assert refused > 0 and accepted > 0, outcomes  # the cases reach both sides of the checks
    if target == "index":
        assert outcomes.get("hnsw", 0) > 0, outcomes  # some hostile files passed the checks into hnswlib
    if target == "update":  # damaged updates, other bases and valid ones (applied, or a no-op) all occur
        for kind in ("accepted", "no-op", "refused: CorruptFileError", "refused: MismatchError"):
            assert outcomes.get(kind, 0) > 0, outcomes


# --- memory updates: checksums alone forge nothing -------------------------------------
def test_update_with_every_checksum_recomputed_is_refused_by_the_result_hash(tmp_path):
    """A written slot changed in an update and every CRC32 made valid again (slot row, table,
    embedded header, fixed part, body): the update parses, but the result's sha256 is not the
    one it promises, so nothing is published. And a size field pointing far past the file is
    refused before anything is sized by it."""
    import hashlib
    import shutil

    from edgekv.format import apply_update, write_update

    spec = MemorySpec(1, 1, 4, 2, 8, "6b" * 32, "fp16", None, proj_max_dirs=0)
    old, new, upd = str(tmp_path / "old.ekv"), str(tmp_path / "new.ekv"), str(tmp_path / "u.ekvu")
    create_memory(old, spec, spec.file_bytes_for(4)).close()
    rng = np.random.default_rng(2)
    zeros = np.zeros(spec.payload_shape, np.float16)
    commit_update(old, {0: Entry(rng.normal(size=8), zeros, zeros, task="t")})
    shutil.copy(old, new)
    commit_update(new, {1: Entry(rng.normal(size=8), zeros, zeros, task="t")})
    write_update(old, new, upd)
    b = bytearray(open(upd, "rb").read())
    hb, n, sb = struct.unpack_from("<III", b, 80)
    b[-sb] ^= 0x01  # the written slot's first key byte
    row = 140 + hb + 64 * 1  # slot 1's table row
    struct.pack_into("<II", b, row + 4, zlib.crc32(bytes(b[-sb:])), zlib.crc32(bytes(b[-sb: len(b) - sb + 32])))
    struct.pack_into("<I", b, 140 + 148, zlib.crc32(bytes(b[140 + hb: 140 + hb + 64 * n])))
    struct.pack_into("<I", b, 140 + hb - 4, zlib.crc32(bytes(b[140: 140 + hb - 4])))
    struct.pack_into("<I", b, 68, struct.unpack_from("<I", b, 140 + hb - 4)[0])
    struct.pack_into("<I", b, 132, zlib.crc32(bytes(b[140:])))
    struct.pack_into("<I", b, 136, zlib.crc32(bytes(b[:136])))
    open(upd, "wb").write(bytes(b))
    before = hashlib.sha256(open(old, "rb").read()).hexdigest()
    with pytest.raises(MismatchError, match=r"sha256 differs"):
        apply_update(old, upd)
    assert hashlib.sha256(open(old, "rb").read()).hexdigest() == before
    struct.pack_into("<I", b, 84, 0xFFFFFFFF)  # num_slots: 2^32 - 1 slots of a tiny file
    struct.pack_into("<Q", b, 72, hb + 0xFFFFFFFF * (64 + sb))  # file_bytes to match
    struct.pack_into("<I", b, 136, zlib.crc32(bytes(b[:136])))
    open(upd, "wb").write(bytes(b))
    with pytest.raises(CorruptFileError, match=r"\(truncated\)"):
        apply_update(old, upd)


# --- the HNSW index: hnswlib never sees a file edgekv has not checked -----------------
def _indexed_memory(tmp_path, n: int = 40):
    from edgekv.index import IndexConfig, build_index

    spec = MemorySpec(1, 1, 4, 1, 16, "7c" * 32, "fp16", None)
    mem = str(tmp_path / "m.ekv")
    create_memory(mem, spec, spec.file_bytes_for(n)).close()
    rng = np.random.default_rng(11)
    zeros = np.zeros(spec.payload_shape, np.float16)
    commit_update(mem, {i: Entry(rng.normal(size=16), zeros, zeros, task="t") for i in range(n)})
    folder = str(tmp_path / "idx")
    meta = build_index(mem, folder, IndexConfig(M=4, ef_construction=32))
    return mem, folder, meta


def _hostile_index(folder: str, meta: dict) -> None:
    """Every level-0 list's first neighbour -> an id far out of range; index.json rewritten to
    match the file (sha256), as anyone who can write the folder can do."""
    from edgekv.index import file_sha256

    path = os.path.join(folder, "index.hnsw")
    b = bytearray(open(path, "rb").read())
    count, per_el = struct.unpack_from("<QQ", b, 16)
    for i in range(count):
        rec = 96 + i * per_el
        struct.pack_into("<I", b, rec, max(struct.unpack_from("<I", b, rec)[0], 1))
        struct.pack_into("<I", b, rec + 4, 0x7FFFFFF0)
    open(path, "wb").write(bytes(b))
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(dict(meta, file_sha256=file_sha256(path)), f)


RAW_HNSWLIB = """
import sys, numpy as np, hnswlib
index = hnswlib.Index(space="ip", dim=16)
index.load_index(sys.argv[1], max_elements=40)
for seed in range(20):
    q = np.random.default_rng(seed).normal(size=(1, 16)).astype(np.float32)
    index.knn_query(q, k=5)
print("survived")
"""


def test_hostile_self_consistent_index_is_refused_before_hnswlib(tmp_path):
    from edgekv.index import Retriever

    mem, folder, meta = _indexed_memory(tmp_path)
    _hostile_index(folder, meta)
    # control: hnswlib itself, given this file, reads out of bounds and dies
    raw = subprocess.run([sys.executable, "-c", RAW_HNSWLIB, os.path.join(folder, "index.hnsw")],
                         capture_output=True, text=True, timeout=120)
    assert raw.returncode != 0 and "survived" not in raw.stdout, (raw.returncode, raw.stdout, raw.stderr[-300:])
    # edgekv: hashes all agree (index.json was rewritten), the structural check refuses it
    with Memory(mem) as m, pytest.raises(CorruptFileError, match="level-0 link list is out of range"):
        Retriever(m, folder, force="hnsw")


def test_index_checks_bind_labels_and_vectors_to_the_memory(tmp_path):
    from edgekv.index import Retriever, file_sha256

    mem, folder, meta = _indexed_memory(tmp_path)
    with Memory(mem) as m:
        r = Retriever(m, folder, force="hnsw")
        assert r.mode == "hnsw"
        exact = Retriever(m, folder, force="exact")
        q = exact.keys[3]
        assert r.search(q, 5)[0].tolist() == exact.search(q, 5)[0].tolist()
    path = os.path.join(folder, "index.hnsw")
    good = open(path, "rb").read()
    per_el = struct.unpack_from("<Q", good, 24)[0]
    for offset, what in ((96 + per_el - 8, "labels are not the memory's occupied slots"),
                         (96 + 4 + 4 * 8 + 4, "vectors are not the memory's effective keys")):
        b = bytearray(good)
        b[offset] ^= 0x01
        open(path, "wb").write(bytes(b))
        json.dump(dict(meta, file_sha256=file_sha256(path)), open(os.path.join(folder, "index.json"), "w"))
        with Memory(mem) as m, pytest.raises(CorruptFileError, match=what):
            Retriever(m, folder, force="hnsw")


def test_index_json_cannot_name_a_file_outside_its_folder(tmp_path):
    from edgekv.index import Retriever

    mem, folder, meta = _indexed_memory(tmp_path)
    for name in ("../m.ekv", "/etc/passwd", "..", ""):
        json.dump(dict(meta, file=name), open(os.path.join(folder, "index.json"), "w"))
        with Memory(mem) as m, pytest.raises(CorruptFileError, match="not a valid index description"):
            Retriever(m, folder, force="hnsw")


# --- manifests, task data, memory headers ----------------------------------------------
@pytest.mark.parametrize("field, value, match", [
    ("num_layers", 2**40, "'num_layers' = 1099511627776 is outside"),
    ("num_kv_heads", 0, "'num_kv_heads' = 0 is outside"),
    ("head_dim", -1, "'head_dim' = -1 is outside"),
])
def test_manifest_fields_that_size_the_runtime_are_range_checked(exported, tmp_path, field, value, match):
    import shutil

    from edgekv.manifest import read_manifest

    art = str(tmp_path / "art")
    shutil.copytree(exported("llama"), art)
    data = json.load(open(os.path.join(art, "manifest.json")))
    data[field] = value
    json.dump(data, open(os.path.join(art, "manifest.json"), "w"))
    with pytest.raises(CorruptFileError, match=match):
        read_manifest(art)


@pytest.mark.parametrize("text, ext, match", [
    ("[" * 100_000, ".jsonl", "nested too deeply"),
    ("[" * 100_000, ".json", "nested too deeply"),
    ('{"id": ' + "9" * 5000 + ', "prompt": "a", "answer": "b"}', ".jsonl", "Exceeds the limit"),
    ('[{"id": ' + "9" * 5000 + ', "prompt": "a", "answer": "b"}]', ".json", "Exceeds the limit"),
    ('{"id": "x", "prompt": "\\ud800", "answer": "b"}', ".jsonl", "lone surrogate"),
])
def test_task_data_parser_limits_are_input_errors(tmp_path, text, ext, match):
    from edgekv.data import read_examples

    path = tmp_path / f"task{ext}"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_examples(str(path))


def test_task_data_line_separators_inside_strings_are_data(tmp_path):
    """A JSONL record may hold U+2028 (json.dumps(ensure_ascii=False) writes it raw)."""
    from edgekv.data import read_examples

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p\u2028q", "answer": "x"}, ensure_ascii=False) + "\r\n"
                    + json.dumps({"id": "b", "prompt": "r", "answer": "y"}) + "\n")
    assert [e.prompt for e in read_examples(str(path))] == ["p\u2028q", "r"]


def test_large_json_task_file_reads_in_linear_time(tmp_path):
    import time

    from edgekv.data import read_examples

    recs = [{"id": i, "prompt": f"question {i}", "answer": "a"} for i in range(20_000)]
    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]")
    t0 = time.monotonic()
    assert len(read_examples(str(path))) == 20_000
    assert time.monotonic() - t0 < 5  # line numbers were counted from the start for every record before


@pytest.mark.parametrize("offset, fmt, value", [(112, "<f", float("nan")), (112, "<f", 0.0), (108, "<f", float("inf")),
                                                (160, "<f", float("nan")), (116, "<I", 0)])
def test_checksummed_header_with_non_finite_calibration_is_refused(tmp_path, offset, fmt, value):
    spec = MemorySpec(2, 1, 4, 2, 8, "ee" * 32, "int8", None)
    path = str(tmp_path / "m.ekv")
    create_memory(path, spec, spec.file_bytes_for(3)).close()
    b = bytearray(open(path, "rb").read())
    struct.pack_into(fmt, b, offset, value)
    hb = spec.header_bytes
    struct.pack_into("<I", b, hb - 4, zlib.crc32(bytes(b[: hb - 4])))
    open(path, "wb").write(bytes(b))
    with pytest.raises(CorruptFileError):
        Memory(path)


def test_calibration_that_cannot_be_read_back_is_not_written(tmp_path):
    from edgekv.format import Calibration

    spec = MemorySpec(2, 1, 4, 2, 8, "ee" * 32, "int8", None)
    path = str(tmp_path / "m.ekv")
    create_memory(path, spec, spec.file_bytes_for(3)).close()
    for cal in (Calibration(float("nan"), (1.0, 1.0)), Calibration(0.0, (1.0, 1.0)),
                Calibration(0.1, (1.0, float("inf")))):
        with pytest.raises(InputError, match="finite tau"):
            commit_update(path, calibration=cal)
    with Memory(path) as m:
        assert m.generation == 0


def test_concurrent_writer_is_detected_by_expect_generation(tmp_path):
    spec = MemorySpec(1, 1, 4, 2, 8, "ee" * 32, "fp16", None)
    path = str(tmp_path / "m.ekv")
    create_memory(path, spec, spec.file_bytes_for(3)).close()
    zeros = np.zeros(spec.payload_shape, np.float16)
    e = Entry(np.ones(8, np.float32), zeros, zeros, task="t")
    assert commit_update(path, {0: e}, expect_generation=0) == 1
    with pytest.raises(MismatchError, match="changed while this update was prepared"):
        commit_update(path, {1: e}, expect_generation=0)
    with Memory(path) as m:
        assert m.generation == 1 and m.occupied().tolist() == [0]


def test_hostile_index_through_the_cli(exported, tmp_path):
    """End to end: with the manifest intact, a tampered index is a hash mismatch (exit 5);
    with the manifest rewritten to match it too, the structural check refuses it (exit 4)."""
    import shutil

    from test_mismatch import _add_index, memory_for
    from typer.testing import CliRunner

    from edgekv.cli import app
    from edgekv.manifest import file_hashes, read_manifest, write_manifest

    art = str(tmp_path / "art")
    shutil.copytree(exported("llama"), art)
    mem = memory_for(art, str(tmp_path / "m.ekv"), n=6)
    _add_index(art, mem)
    meta = json.load(open(os.path.join(art, "index.json")))
    _hostile_index(art, meta)
    args = ["run", art, "--memory", mem, "--prompt", "hi", "-k", "2", "-n", "2", "--retrieval", "hnsw"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 5 and "does not match manifest.json (hash differs)" in res.stderr, res.output
    data = read_manifest(art, verify_hashes=False)
    data["files"].update(file_hashes(art, ["index.hnsw", "index.json"]))  # what an attacker would do
    write_manifest(art, data)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 4, res.output
    assert "not a valid HNSW index for this memory (a level-0 link list is out of range)" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
