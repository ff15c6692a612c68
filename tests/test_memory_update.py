"""Memory updates on the device: ``edgekv memory diff`` / ``apply``, and the index that follows the memory.

* round trip: for consecutive states a -> b -> c, ``apply(diff(a, b), a)`` is byte-identical to b
  (synthetic chains and a real ``adapt`` chain on the tiny Llama, where the runtime's answers with
  the applied memory equal those with b);
* the update's bytes follow docs/memory-format.md ("Update files"), decoded with ``struct`` only;
* every other base is refused (replayed / older / other model / edited since), applying twice is a
  no-op, a damaged update is refused, a full disk or a refused write leave the memory as it was;
* the HNSW index belongs to the memory: built on the device and cached beside it, bound to its
  state, moved along by ``apply`` (in place or rebuilt), and a stale or tampered one is rebuilt,
  never trusted; the README's adapt -> export -> run -> adapt -> run needs no host step in between;
* applying imports no torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.errors import BudgetError, CorruptFileError, InputError, MismatchError
from edgekv.format import Calibration, Entry, Memory, MemorySpec, commit_update, create_memory
from edgekv.format.update import apply_update, write_update
from edgekv.index import Retriever, cache_paths
from edgekv.retrieval import fit_projection
from edgekv.rope import RopeSpec
from edgekv.updates import apply_memory_update

runner = CliRunner()
SPEC = MemorySpec(2, 2, 8, 4, 16, "e7" * 32, "int8", RopeSpec((1.0, 0.3), 1.0), proj_max_dirs=2)


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _entry(rng, task: str = "t") -> Entry:
    shape = SPEC.payload_shape
    return Entry.from_float(rng.normal(size=SPEC.key_dim), rng.normal(size=shape), rng.normal(size=shape),
                            "int8", task, f"src-{rng.integers(1000)}")


@pytest.fixture()
def chain(tmp_path):
    """States a -> b -> c of one memory (paths): b writes slots 2, 3, 7 (same projection); c clears
    slot 1, writes slot 9 and refits the projection and the calibration."""
    rng = np.random.default_rng(4)
    a, b, c = (str(tmp_path / f"{n}.ekv") for n in "abc")
    create_memory(a, SPEC, SPEC.file_bytes_for(12)).close()
    commit_update(a, {s: _entry(rng, "one") for s in range(6)},
                  projection=fit_projection(rng.normal(size=(8, 16)), 1), top_k=2)
    shutil.copy(a, b)
    commit_update(b, {s: _entry(rng, "two") for s in (2, 3, 7)})
    shutil.copy(b, c)
    commit_update(c, {9: _entry(rng, "three")}, clear=[1], calibration=Calibration(0.2, (0.5, 0.9)),
                  projection=fit_projection(rng.normal(size=(8, 16)), 2))
    return a, b, c


def temps(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


# --- round trip --------------------------------------------------------------------------
def test_apply_of_the_diff_gives_the_new_state_byte_for_byte(chain, tmp_path):
    a, b, c = chain
    ab, bc = str(tmp_path / "ab.ekvu"), str(tmp_path / "bc.ekvu")
    s = write_update(a, b, ab)
    assert (s["slots_written"], s["slots_zeroed"], s["base_generation"], s["new_generation"]) == (3, 0, 1, 2)
    assert s["update_bytes"] == os.path.getsize(ab) < s["file_bytes"]
    s = write_update(b, c, bc)
    assert (s["slots_written"], s["slots_zeroed"]) == (1, 1)  # slot 9 written, slot 1 zeroed (cleared)
    dev = str(tmp_path / "dev.ekv")
    shutil.copy(a, dev)
    for upd, want in ((ab, b), (bc, c)):
        res = apply_update(dev, upd)
        assert res["applied"] and sha(dev) == sha(want)
        with Memory(dev) as m:
            m.verify()
    assert temps(tmp_path) == []
    # and each step alone, on a fresh copy of its base
    shutil.copy(b, dev)
    apply_update(dev, bc)
    assert sha(dev) == sha(c)


def test_update_bytes_follow_the_documented_layout(chain, tmp_path):
    """Decoded with struct / zlib / hashlib only, following docs/memory-format.md."""
    a, b, _ = chain
    upd = str(tmp_path / "ab.ekvu")
    write_update(a, b, upd)
    raw, old, new = (open(p, "rb").read() for p in (upd, a, b))
    f = struct.unpack_from("<8sII32sQQIIQIIIII32sII", raw, 0)
    (magic, version, flags, fp, base_gen, new_gen, base_crc, new_crc, file_bytes, hb, n, sb, nw, nz, new_sha,
     body_crc, fixed_crc) = f
    assert (magic, version, flags) == (b"EDGEKVU\x00", 1, 0) and fp.hex() == SPEC.model_fingerprint
    assert fixed_crc == zlib.crc32(raw[:136]) and body_crc == zlib.crc32(raw[140:])
    assert (base_gen, new_gen) == (struct.unpack_from("<Q", old, 32)[0], struct.unpack_from("<Q", new, 32)[0])
    hb_mem = struct.unpack_from("<I", new, 12)[0]
    assert (base_crc, new_crc) == (struct.unpack_from("<I", old, hb_mem - 4)[0], struct.unpack_from("<I", new, hb_mem - 4)[0])
    assert (file_bytes, hb, n, sb) == (len(new), hb_mem, struct.unpack_from("<I", new, 116)[0],
                                       struct.unpack_from("<I", new, 120)[0])
    assert new_sha == hashlib.sha256(new).digest()
    assert len(raw) == 140 + hb + 64 * n + 4 * (nw + nz) + sb * nw
    pos = 140
    assert raw[pos: pos + hb + 64 * n] == new[: hb + 64 * n]  # NEW's header and table
    pos += hb + 64 * n
    written = struct.unpack_from(f"<{nw}I", raw, pos)
    zeroed = struct.unpack_from(f"<{nz}I", raw, pos + 4 * nw)
    pos += 4 * (nw + nz)
    slots_off = hb + 64 * n
    changed = [s for s in range(n) if old[slots_off + s * sb: slots_off + (s + 1) * sb]
               != new[slots_off + s * sb: slots_off + (s + 1) * sb]]
    assert list(written) == [2, 3, 7] == changed and zeroed == ()
    for i, s in enumerate(written):
        assert raw[pos + i * sb: pos + (i + 1) * sb] == new[slots_off + s * sb: slots_off + (s + 1) * sb]


# --- refusals ------------------------------------------------------------------------------
def _rewrite_header(path: str, offset: int, fmt: str, value) -> None:
    """Set a header field and make the header CRC valid again (a file edited by hand)."""
    b = bytearray(open(path, "rb").read())
    hb = struct.unpack_from("<I", b, 12)[0]
    struct.pack_into(fmt, b, offset, value)
    struct.pack_into("<I", b, hb - 4, zlib.crc32(bytes(b[: hb - 4])))
    open(path, "wb").write(bytes(b))


def test_other_bases_are_refused_and_nothing_is_written(chain, tmp_path):
    a, b, c = chain
    ab, bc = str(tmp_path / "ab.ekvu"), str(tmp_path / "bc.ekvu")
    write_update(a, b, ab)
    write_update(b, c, bc)
    dev = str(tmp_path / "dev.ekv")
    cases = [
        (c, ab, "is at generation 3, the update applies to generation 1 (newer than the update's base"),  # replayed
        (a, bc, "is at generation 1, the update applies to generation 2 (older than the update's base"),
    ]
    for base, upd, phrase in cases:
        shutil.copy(base, dev)
        before = sha(dev)
        with pytest.raises(MismatchError, match=r"nothing was written") as e:
            apply_update(dev, upd)
        assert phrase in str(e.value) and "\n" not in str(e.value) and sha(dev) == before
    # another model, same layout
    shutil.copy(a, dev)
    _rewrite_header(dev, 40, "32s", bytes.fromhex("ab" * 32))
    with pytest.raises(MismatchError, match="belongs to another model than the update"):
        apply_update(dev, ab)
    # edited since (same generation, another header): tau changed by hand
    shutil.copy(a, dev)
    _rewrite_header(dev, 112, "<f", 0.5)
    with pytest.raises(MismatchError, match="is not the state the update was made from"):
        apply_update(dev, ab)
    # bytes no checksum covers (inside an empty slot): the result's sha256 refuses it
    shutil.copy(a, dev)
    with Memory(dev) as m:
        off = m._h.slots_offset + 11 * m.spec.slot_bytes
    raw = bytearray(open(dev, "rb").read())
    raw[off + 5] ^= 0xFF
    open(dev, "wb").write(bytes(raw))
    before = sha(dev)
    with pytest.raises(MismatchError, match=r"does not give the update's result \(sha256 differs\)"):
        apply_update(dev, ab)
    assert sha(dev) == before and temps(tmp_path) == []


def test_applying_twice_is_a_no_op(chain, tmp_path):
    a, b, _ = chain
    upd, dev = str(tmp_path / "ab.ekvu"), str(tmp_path / "dev.ekv")
    write_update(a, b, upd)
    shutil.copy(a, dev)
    assert apply_update(dev, upd)["applied"]
    st = os.stat(dev)
    again = apply_update(dev, upd)
    assert not again["applied"] and again["already_applied"] and sha(dev) == sha(b)
    assert os.stat(dev).st_ino == st.st_ino  # not rewritten


def test_diff_refuses_states_of_different_memories(chain, tmp_path):
    a, b, _ = chain
    with pytest.raises(InputError, match="is not newer than"):
        write_update(b, a, str(tmp_path / "x.ekvu"))
    other = str(tmp_path / "other.ekv")
    spec = MemorySpec(2, 2, 8, 4, 16, "99" * 32, "int8", RopeSpec((1.0, 0.3), 1.0), proj_max_dirs=2)
    create_memory(other, spec, spec.file_bytes_for(12)).close()
    commit_update(other, clear=[0])
    commit_update(other, clear=[0])
    with pytest.raises(MismatchError, match="belong to different models"):
        write_update(a, other, str(tmp_path / "x.ekvu"))
    assert not os.path.exists(tmp_path / "x.ekvu")
    before = sha(b)
    with pytest.raises(InputError, match="would replace one of the memories"):
        write_update(a, b, b)
    assert sha(b) == before


def test_damaged_updates_are_refused_and_the_memory_is_unchanged(chain, tmp_path):
    a, b, _ = chain
    upd, dev = str(tmp_path / "ab.ekvu"), str(tmp_path / "dev.ekv")
    write_update(a, b, upd)
    good = open(upd, "rb").read()
    shutil.copy(a, dev)
    before = sha(dev)
    bad = str(tmp_path / "bad.ekvu")
    n = len(good)
    variants = [good[:cut] for cut in (0, 10, 139, 140, 1000, n // 2, n - 1)] + [good + b"\0"]
    variants += [good[:i] + bytes([good[i] ^ 0x10]) + good[i + 1:] for i in (0, 9, 20, 50, 90, 120, 137, 200, n // 2, n - 1)]
    for data in variants:
        open(bad, "wb").write(data)
        with pytest.raises(CorruptFileError) as e:
            apply_update(dev, bad)
        assert "\n" not in str(e.value)
        assert sha(dev) == before
    # a written slot changed and the body CRC recomputed: the slot's own checksum refuses it
    b2 = bytearray(good)
    b2[-5] ^= 0x01
    struct.pack_into("<I", b2, 132, zlib.crc32(bytes(b2[140:])))
    struct.pack_into("<I", b2, 136, zlib.crc32(bytes(b2[:136])))
    open(bad, "wb").write(bytes(b2))
    with pytest.raises(CorruptFileError, match="slot 7 fails its checksum"):
        apply_update(dev, bad)
    assert sha(dev) == before and temps(tmp_path) == []
    with pytest.raises(InputError, match="update file not found"):
        apply_update(dev, str(tmp_path / "missing.ekvu"))


@pytest.mark.parametrize("err, cls, code", [(errno.ENOSPC, BudgetError, 6), (errno.EACCES, InputError, 3)])
def test_disk_full_and_refused_writes_leave_the_memory(chain, tmp_path, monkeypatch, err, cls, code):
    import edgekv.format.writer as fmt_writer  # where apply_update looks _copy_file up

    a, b, _ = chain
    upd, dev = str(tmp_path / "ab.ekvu"), str(tmp_path / "dev.ekv")
    write_update(a, b, upd)
    shutil.copy(a, dev)
    before = sha(dev)

    def refuse(src, dst):
        open(dst, "wb").write(b"partial")
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(fmt_writer, "_copy_file", refuse)
    with pytest.raises(cls) as e:
        apply_update(dev, upd)
    msg = str(e.value)
    assert "\n" not in msg and "cannot apply the update" in msg and "the memory is unchanged" in msg
    assert sha(dev) == before and temps(tmp_path) == []
    res = runner.invoke(app, ["memory", "apply", dev, upd])
    assert res.exit_code == code and res.stderr.count("\n") == 1 and "Traceback" not in res.output


# --- CLI -------------------------------------------------------------------------------------
def test_cli_diff_and_apply(chain, tmp_path):
    a, b, c = chain
    upd, dev = str(tmp_path / "ab.ekvu"), str(tmp_path / "dev.ekv")
    res = runner.invoke(app, ["memory", "diff", a, b, "-o", upd, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["update_bytes"] == os.path.getsize(upd) and d["slots_written"] == 3 and 0 < d["ratio"] < 1
    shutil.copy(a, dev)
    res = runner.invoke(app, ["memory", "apply", dev, upd, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["applied"] and (d["generation_before"], d["generation"]) == (1, 2) and sha(dev) == sha(b)
    assert d["index"]["index"] == "none" and set(d["seconds"]) == {"apply", "index"}
    res = runner.invoke(app, ["memory", "apply", dev, upd])
    assert res.exit_code == 0 and "already at generation 2: nothing to do" in res.stdout
    shutil.copy(c, dev)
    for args, code, phrase in (
        (["memory", "apply", dev, upd], 5, "the update applies to generation 1"),
        (["memory", "apply", dev, str(tmp_path / "nope.ekvu")], 3, "update file not found"),
        (["memory", "apply", str(tmp_path / "nope.ekv"), upd], 3, "memory file not found"),
        (["memory", "diff", b, a, "-o", str(tmp_path / "x.ekvu")], 3, "is not newer than"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == code, res.output
        assert res.stderr.startswith("edgekv: error: ") and res.stderr.count("\n") == 1 and phrase in res.stderr
    open(tmp_path / "short.ekvu", "wb").write(open(upd, "rb").read()[:500])
    res = runner.invoke(app, ["memory", "apply", dev, str(tmp_path / "short.ekvu")])
    assert res.exit_code == 4 and "(truncated)" in res.stderr
    assert not os.path.exists(tmp_path / "nope.ekv.lock")


# --- the index belongs to the memory ---------------------------------------------------------
def _exact_equal(path: str, rng) -> None:
    """HNSW (forced) returns what exact search returns, on this small memory."""
    with Memory(path) as m:
        ann, exact = Retriever(m, force="hnsw"), Retriever(m, force="exact")
        assert ann.mode == "hnsw" and exact.mode == "exact"
        for _ in range(5):
            q = rng.normal(size=16).astype(np.float32)
            q /= np.linalg.norm(q)
            assert ann.search(q, 3)[0].tolist() == exact.search(q, 3)[0].tolist()


def _binding(path: str) -> dict:
    return json.load(open(cache_paths(path)[1]))


def test_the_cached_index_follows_apply(chain, tmp_path):
    a, b, c = chain
    rng = np.random.default_rng(0)
    ab, bc, dev = str(tmp_path / "ab.ekvu"), str(tmp_path / "bc.ekvu"), str(tmp_path / "dev.ekv")
    write_update(a, b, ab)
    write_update(b, c, bc)
    shutil.copy(a, dev)
    with Memory(dev) as m:
        r = Retriever(m, force="hnsw")
        assert r.reason.startswith("built on the device (no index cached beside the memory)")
    assert _binding(dev)["memory_generation"] == 1
    res = apply_memory_update(dev, ab)  # same projection, no entry left: updated in place
    assert res["index"] == {"index": "updated", "generation": 2}
    assert _binding(dev)["memory_generation"] == 2
    with Memory(dev) as m:
        assert Retriever(m, force="hnsw").reason == "the cached index matches the memory"
        assert _binding(dev)["memory_header_crc32"] == m.header_crc32
    _exact_equal(dev, rng)
    res = apply_memory_update(dev, bc)  # an entry left and the projection changed: rebuilt
    assert res["index"] == {"index": "rebuilt", "generation": 3}
    with Memory(dev) as m:
        assert Retriever(m, force="hnsw").reason == "the cached index matches the memory"
    _exact_equal(dev, rng)
    assert apply_memory_update(dev, bc)["index"]["index"] == "none"  # already applied: nothing moves


def test_a_stale_or_tampered_cached_index_is_rebuilt_never_trusted(chain, tmp_path):
    """Binding pointing at another generation; an older index re-bound to the current state by
    hand (hashes recomputed, what whoever can write the folder can do); flipped index bytes."""
    from edgekv.index import file_sha256

    a, b, _ = chain
    rng = np.random.default_rng(1)
    old_dev, dev = str(tmp_path / "old.ekv"), str(tmp_path / "dev.ekv")
    shutil.copy(a, old_dev)
    shutil.copy(b, dev)
    for p in (old_dev, dev):
        with Memory(p) as m:
            Retriever(m, force="hnsw")
    index_path, meta_path = cache_paths(dev)
    good = _binding(dev)

    def reason() -> str:
        with Memory(dev) as m:
            return Retriever(m, force="hnsw").reason

    json.dump(dict(good, memory_generation=1), open(meta_path, "w"))
    assert reason().startswith("built on the device (the cached index is bound to another memory state")
    shutil.copy(cache_paths(old_dev)[0], index_path)  # a's index, bound by hand to b's state
    json.dump(dict(good, file_sha256=file_sha256(index_path), num_items=_binding(old_dev)["num_items"]),
              open(meta_path, "w"))
    assert "the cached index failed its checks" in reason()
    assert _binding(dev) == good and reason() == "the cached index matches the memory"
    raw = bytearray(open(index_path, "rb").read())
    raw[96 + 4 + 4 * 64 + 1] ^= 0x40  # inside the first vector (header 96 B, M=32: 64 level-0 links)
    open(index_path, "wb").write(bytes(raw))
    json.dump(dict(good, file_sha256=file_sha256(index_path)), open(meta_path, "w"))
    assert "the cached index failed its checks" in reason()
    _exact_equal(dev, rng)


def test_exact_below_still_decides_without_force(chain, tmp_path):
    _, b, _ = chain
    with Memory(b) as m:
        r = Retriever(m)
        assert r.mode == "exact" and "exact search is as fast" in r.reason
    assert not os.path.exists(cache_paths(b)[0])  # small memories need no index at all


def test_apply_runs_without_torch(chain, tmp_path):
    a, b, _ = chain
    upd, dev = str(tmp_path / "ab.ekvu"), str(tmp_path / "dev.ekv")
    write_update(a, b, upd)
    shutil.copy(a, dev)
    with Memory(dev) as m:
        Retriever(m, force="hnsw")  # a cached index, so that apply moves it too
    script = ("import sys, json\nfrom edgekv.cli import main\n"
              f"sys.argv = ['edgekv', 'memory', 'apply', {dev!r}, {upd!r}, '--json']\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == []
    assert json.loads("\n".join(lines[:-1]))["index"]["index"] == "updated" and sha(dev) == sha(b)


# --- the README's sequence on the tiny model: no host step between adapt and run -----------
def _adapt(model: str, data: str, mem: str, *extra: str):
    args = ["adapt", "--model", model, "--data", data, "--memory", mem, "--pooled-len", "4", "--steps", "2",
            "-k", "2", "--threads", "1", "--no-progress", "--json", *extra]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _run(art: str, mem: str, *extra: str) -> dict:
    res = runner.invoke(app, ["run", art, "--memory", mem, "--prompt", "code for river in set 2?", "-n", "4",
                              "--threads", "1", "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_adapt_export_run_adapt_run_then_the_update_path(tiny_model_dir, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from crash_harness import write_tasks

    model = tiny_model_dir("llama")
    t1, t2 = write_tasks(str(tmp_path), 2)
    mem, art = str(tmp_path / "mem.ekv"), str(tmp_path / "artifacts")
    _adapt(model, t1, mem, "--budget", "40KB")
    res = runner.invoke(app, ["export", "--model", model, "--out", art, "--memory", mem, "--json"])
    assert res.exit_code == 0, res.output
    first = _run(art, mem)
    board, host_old = str(tmp_path / "board.ekv"), str(tmp_path / "host-old.ekv")
    shutil.copy(mem, board)  # what the board holds
    shutil.copy(mem, host_old)
    _adapt(model, t2, mem)  # the second task, into the same memory: no export after it
    out = _run(art, mem)
    assert out["retrieval_mode"] == "exact" and len(out["retrieved"]) == 2
    assert _run(art, mem, "--retrieval", "exact")["retrieval_mode"] == "exact"
    hnsw = _run(art, mem, "--retrieval", "hnsw")
    assert hnsw["retrieval_mode"] == "hnsw" and hnsw["retrieval_reason"].startswith("built on the device")
    assert "the export's index is for another memory state (not used)" in hnsw["retrieval_reason"]
    again = _run(art, mem, "--retrieval", "hnsw")
    assert again["retrieval_reason"].startswith("the cached index matches the memory") and again["text"] == hnsw["text"]
    assert first["retrieval_mode"] == "exact"
    # tamper the cached index's binding: rebuilt, not trusted
    meta_path = cache_paths(mem)[1]
    json.dump(dict(_binding(mem), memory_generation=_binding(mem)["memory_generation"] - 1), open(meta_path, "w"))
    assert _run(art, mem, "--retrieval", "hnsw")["retrieval_reason"].startswith("built on the device")
    # the update path: host diffs its two states, the board applies; answers equal those with the new state
    upd = str(tmp_path / "task2.ekvu")
    res = runner.invoke(app, ["memory", "diff", host_old, mem, "-o", upd, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["update_bytes"] < os.path.getsize(mem)
    assert _run(art, board, "--retrieval", "hnsw")["retrieval_reason"] == "the export's index matches the memory"
    res = runner.invoke(app, ["memory", "apply", board, upd, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["index"]["index"] == "none" and sha(board) == sha(mem)  # nothing cached yet
    for extra in ((), ("--retrieval", "hnsw")):
        on_board, on_host = _run(art, board, *extra), _run(art, mem, *extra)
        for key in ("text", "token_ids", "retrieval_mode"):
            assert on_board[key] == on_host[key]
        assert [(r["slot"], r["alpha"]) for r in on_board["retrieved"]] == \
            [(r["slot"], r["alpha"]) for r in on_host["retrieved"]]
    assert _run(art, board, "--retrieval", "hnsw")["retrieval_reason"].startswith("the cached index matches the memory")
