"""Bytes on disk match docs/memory-format.md.

The file is produced with ``create_memory`` / ``commit_update`` and then decoded here with
only ``struct``, ``zlib`` and ``np.frombuffer``, following the document (offsets, types,
order, checksums). Nothing of edgekv's reader, layout helpers or constants is used, so a
change to the bytes that the document does not describe fails here.

The other way round, a format-version-1 file is written here byte by byte (the layout before
``top_k``) and must open with the reader (``top_k`` None) and be upgraded by a commit.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from edgekv.format import Calibration, Entry, MemorySpec, commit_update, create_memory
from edgekv.retrieval import fit_projection
from edgekv.rope import RopeSpec

FP = bytes(range(32)).hex()
L, H, D, M, R, P = 3, 2, 8, 5, 12, 4
INV_FREQ = np.array([1.0, 0.2, 0.04], np.float32)  # rotary dim 6 of head dim 8
TASKS = ["vqa", "médical", "x" * 40]


def align64(n: int) -> int:
    return -(-n // 64) * 64


def crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def nibbles(raw: bytes, off: int) -> np.ndarray:
    """int4 K or V [L, H, M, D] decoded by the document: byte j holds channel 2j (low nibble) and
    2j+1 (high nibble), each a 4-bit two's-complement code."""
    b = np.frombuffer(raw, "u1", L * H * M * D // 2, off).astype(np.int64)
    lo, hi = b & 0xF, b >> 4
    q = np.stack([lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)], axis=-1)  # [n, 2]: channel 2j, 2j+1
    return q.reshape(L, H, M, D)


def build(tmp_path, payload: str, rope: bool):
    """A file with entries in some slots, one cleared, a calibration and a projection."""
    rng = np.random.default_rng(11)
    spec = MemorySpec(L, H, D, M, R, FP, payload, RopeSpec(tuple(INV_FREQ.tolist()), 0.75) if rope else None,
                      proj_max_dirs=P, key_layer=2, key_pooling="last")
    path = tmp_path / "m.ekv"
    budget = 60_000 if payload == "fp16" else 40_000
    create_memory(path, spec, budget).close()
    floats, entries = {}, {}
    for i, slot in enumerate([0, 2, 3, 5]):
        key = rng.normal(size=R).astype(np.float32)
        k = (rng.normal(size=(L, H, M, D)) * rng.uniform(0.1, 4, size=D)).astype(np.float32)
        v = rng.normal(size=(L, H, M, D)).astype(np.float32)
        floats[slot] = (key, k, v)
        entries[slot] = Entry.from_float(key, k, v, payload, TASKS[i % 3], f"example-{slot}" + "#" * (30 * (slot == 5)))
    commit_update(path, put={0: entries[0], 2: entries[2], 3: entries[3]})
    proj = fit_projection(rng.normal(size=(16, R)), 2)
    cal = Calibration(0.125, (0.5, 0.75, 0.25))
    commit_update(path, put={5: entries[5]}, clear=[2], calibration=cal, projection=proj, top_k=3)
    del entries[2]
    return path, budget, entries, floats, proj, cal


@pytest.mark.parametrize("payload, rope", [("int8", True), ("fp16", True), ("int8", False), ("int4", True)])
def test_file_decodes_by_the_document(tmp_path, payload, rope):
    path, budget, entries, floats, proj, cal = build(tmp_path, payload, rope)
    buf = path.read_bytes()

    # ---- fixed header part: 160 bytes -------------------------------------------------
    assert buf[0:8] == b"EDGEKVM\x00"
    u32 = lambda off: struct.unpack_from("<I", buf, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from("<Q", buf, off)[0]  # noqa: E731
    f32 = lambda off: struct.unpack_from("<f", buf, off)[0]  # noqa: E731
    assert u32(8) == 2  # format version
    header_bytes = u32(12)
    assert u64(16) == budget
    file_bytes = u64(24)
    assert file_bytes == len(buf) <= budget
    assert u64(32) == 2  # generation: two commits
    assert buf[40:72].hex() == FP
    assert (u32(72), u32(76), u32(80), u32(84), u32(88)) == (L, H, D, M, R)
    assert buf[92] == {"int8": 1, "fp16": 2, "int4": 3}[payload]
    assert buf[93] == (1 if rope else 0)
    assert struct.unpack_from("<H", buf, 94)[0] == 3  # num_tasks
    rd = 2 * len(INV_FREQ) if rope else 0
    assert u32(96) == rd
    assert u32(100) == P and u32(104) == 2  # projection capacity, directions in use
    assert f32(108) == (0.75 if rope else 1.0)
    assert f32(112) == 0.125  # tau
    num_slots, slot_bytes = u32(116), u32(120)
    table_offset, slots_offset, next_entry_id, table_crc = u64(124), u64(132), u64(140), u32(148)
    assert u32(152) == 2 and buf[156] == 2  # key layer, pooling "last"
    assert buf[157] == 0  # reserved
    assert struct.unpack_from("<H", buf, 158)[0] == 3  # top_k

    # ---- sizes from the document's formulas ------------------------------------------
    parts = [4 * R] + {"int8": [L * H * M * D, L * H * M * D, 2 * L * H * D, 2 * L * H * M],
                       "int4": [L * H * M * D // 2, L * H * M * D // 2, 2 * L * H * D, 2 * L * H * M],
                       "fp16": [2 * L * H * M * D, 2 * L * H * M * D]}[payload]
    assert slot_bytes == align64(sum(parts))
    assert header_bytes == align64(160 + 4 * (L + rd // 2 + R + P * R) + 256 * 32 + 4)
    assert num_slots == (budget - header_bytes) // (64 + slot_bytes)
    assert num_slots >= 6
    assert table_offset == header_bytes
    assert slots_offset == header_bytes + 64 * num_slots
    assert file_bytes == header_bytes + num_slots * (64 + slot_bytes)
    assert next_entry_id == 4

    # ---- header arrays, padding and CRC ----------------------------------------------
    pos = 160

    def f32s(n: int) -> np.ndarray:
        nonlocal pos
        a = np.frombuffer(buf, "<f4", n, pos)
        pos += 4 * n
        return a

    assert f32s(L).tolist() == [0.5, 0.75, 0.25]  # value gates
    if rope:
        assert np.array_equal(f32s(rd // 2), INV_FREQ)
    assert np.array_equal(f32s(R), proj.mean)
    dirs = f32s(P * R).reshape(P, R)
    assert np.array_equal(dirs[:2], proj.dirs) and not dirs[2:].any()
    names = [buf[pos + 32 * i: pos + 32 * (i + 1)] for i in range(256)]
    pos += 256 * 32
    assert names[0] == b"vqa".ljust(32, b"\x00")
    assert names[1] == "médical".encode().ljust(32, b"\x00")
    long = ("x" * 40).encode()
    assert names[2] == b"x" * 23 + b"~" + f"{crc(long):08x}".encode()
    assert all(n == bytes(32) for n in names[3:])
    assert not any(buf[pos: header_bytes - 4])  # zero padding
    assert u32(header_bytes - 4) == crc(buf[: header_bytes - 4])

    # ---- slot table ------------------------------------------------------------------
    table = buf[table_offset: slots_offset]
    assert table_crc == crc(table)
    task_of = {0: 0, 3: 2, 5: 0}  # slot -> task index: slot 3 got TASKS[2], slot 5 TASKS[0]
    ids = {0: 0, 3: 2, 5: 3}  # ids in write order: 0, 2, 3 at commit 1 (slot 2 got 1), 5 at commit 2
    seqs = {0: 1, 3: 3, 5: 4}
    slot_region = lambda s: buf[slots_offset + s * slot_bytes: slots_offset + (s + 1) * slot_bytes]  # noqa: E731
    for s in range(num_slots):
        row = table[64 * s: 64 * (s + 1)]
        flags, reserved, task, scrc, kcrc, eid, seq, src = struct.unpack("<BBHIIQQ36s", row)
        if s not in entries:
            assert row == bytes(64), f"row {s}"
            assert slot_region(s) == bytes(slot_bytes), f"slot {s} should be zeros"
            continue
        assert (flags, reserved, task, eid, seq) == (1, 0, task_of[s], ids[s], seqs[s])
        want_src = f"example-{s}".encode()
        if s == 5:  # 39 bytes: shortened to 27 + '~' + crc
            full = (f"example-{s}" + "#" * 30).encode()
            want_src = full[:27] + b"~" + f"{crc(full):08x}".encode()
        assert src == want_src.ljust(36, b"\x00")
        raw = slot_region(s)
        assert scrc == crc(raw) and kcrc == crc(raw[: 4 * R])

        # ---- slot contents ----------------------------------------------------------
        e, (key, k, v) = entries[s], floats[s]
        assert np.frombuffer(raw, "<f4", R, 0).tobytes() == key.tobytes()
        off = 4 * R
        if payload in ("int8", "int4"):
            if payload == "int8":
                kq = np.frombuffer(raw, "i1", L * H * M * D, off).reshape(L, H, M, D)
                off += L * H * M * D
                vq = np.frombuffer(raw, "i1", L * H * M * D, off).reshape(L, H, M, D)
                off += L * H * M * D
            else:  # byte j: channel 2j in the low nibble, 2j+1 in the high one, two's complement
                kq, off = nibbles(raw, off), off + L * H * M * D // 2
                vq, off = nibbles(raw, off), off + L * H * M * D // 2
                assert np.abs(kq).max() == 7 and np.abs(vq).max() == 7
            ks = np.frombuffer(raw, "<f2", L * H * D, off).reshape(L, H, D)
            off += 2 * L * H * D
            vs = np.frombuffer(raw, "<f2", L * H * M, off).reshape(L, H, M)
            off += 2 * L * H * M
            assert np.array_equal(kq, e.k) and np.array_equal(vq, e.v)
            assert np.array_equal(ks, e.k_scale) and np.array_equal(vs, e.v_scale)
            # and they mean what the document says: per-channel / per-token scales, levels [-Q, Q]
            Q = 127 if payload == "int8" else 7
            for scale, amax in ((ks, np.abs(k.astype(np.float64)).max(axis=2)),
                                (vs, np.abs(v.astype(np.float64)).max(axis=3))):
                s64 = scale.astype(np.float64)  # up16(amax / Q): at most one float16 step above
                assert np.all(s64 >= amax / Q) and np.all(s64 <= amax / Q * (1 + 2 ** -10))
            kd = kq.astype(np.float64) * ks.astype(np.float64)[:, :, None, :]
            vd = vq.astype(np.float64) * vs.astype(np.float64)[:, :, :, None]
            assert np.all(np.abs(kd - k) <= ks.astype(np.float64)[:, :, None, :] / 2 + 1e-12)
            assert np.all(np.abs(vd - v) <= vs.astype(np.float64)[:, :, :, None] / 2 + 1e-12)
        else:
            k16 = np.frombuffer(raw, "<f2", L * H * M * D, off).reshape(L, H, M, D)
            off += 2 * L * H * M * D
            v16 = np.frombuffer(raw, "<f2", L * H * M * D, off).reshape(L, H, M, D)
            off += 2 * L * H * M * D
            assert np.array_equal(k16, k.astype(np.float16)) and np.array_equal(v16, v.astype(np.float16))
        assert off == sum(parts)
        assert not any(raw[off:])  # padding to a multiple of 64


# ---- format version 1 --------------------------------------------------------------------
def v1_file(path, with_padding: bytes = b"\x00\x00\x00") -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """A version-1 memory written byte by byte as the document describes it (int8, RoPE, one
    entry in slot 1 of task "old"): the layout of edgekv before format version 2."""
    rng = np.random.default_rng(3)
    rd, n = 2 * len(INV_FREQ), 3
    header_bytes = align64(160 + 4 * (L + rd // 2 + R + P * R) + 256 * 32 + 4)
    slot_raw = 4 * R + 2 * L * H * M * D + 2 * L * H * D + 2 * L * H * M
    slot_bytes = align64(slot_raw)
    file_bytes = header_bytes + n * (64 + slot_bytes)
    key = rng.normal(size=R).astype(np.float32)
    kq = rng.integers(-127, 128, size=(L, H, M, D)).astype(np.int8)
    vq = rng.integers(-127, 128, size=(L, H, M, D)).astype(np.int8)
    ks = rng.uniform(0.01, 1, size=(L, H, D)).astype(np.float16)
    vs = rng.uniform(0.01, 1, size=(L, H, M)).astype(np.float16)
    slot = (key.astype("<f4").tobytes() + kq.tobytes() + vq.tobytes() + ks.astype("<f2").tobytes()
            + vs.astype("<f2").tobytes()).ljust(slot_bytes, b"\x00")
    row = struct.pack("<BBHIIQQ36s", 1, 0, 0, crc(slot), crc(slot[: 4 * R]), 7, 1, b"src-1")
    table = bytes(64) + row + bytes(64)
    fixed = struct.pack("<8sIIQQQ32sIIIIIBBHIIIffIIQQQIIB", b"EDGEKVM\x00", 1, header_bytes, file_bytes + 100,
                        file_bytes, 5, bytes.fromhex(FP), L, H, D, M, R, 1, 1, 1, rd, P, 0, 0.75, 0.25,
                        n, slot_bytes, header_bytes, header_bytes + 64 * n, 8, crc(table), 2, 1) + with_padding
    assert len(fixed) == 160
    arrays = (np.array([0.5, 0.75, 0.25], "<f4").tobytes() + INV_FREQ.astype("<f4").tobytes()
              + bytes(4 * R) + bytes(4 * P * R) + b"old".ljust(32, b"\x00") + bytes(255 * 32))
    body = (fixed + arrays).ljust(header_bytes - 4, b"\x00")
    data = body + struct.pack("<I", crc(body)) + table + bytes(slot_bytes) + slot + bytes(slot_bytes)
    assert len(data) == file_bytes
    path.write_bytes(data)
    return data, key, kq, vq


@pytest.mark.parametrize("padding", [b"\x00\x00\x00", b"\x00\x07\x00"])
def test_version_1_file_opens_without_top_k(tmp_path, padding):
    from edgekv.format import Memory

    path = tmp_path / "v1.ekv"
    v1_file(path, padding)  # version 1's padding means nothing, whatever it holds
    with Memory(path) as mem:
        assert mem.format_version == 1 and mem.top_k is None
        assert mem.generation == 5 and mem.tasks == ["old"] and mem.occupied().tolist() == [1]
        assert mem.calibration == Calibration(0.25, (0.5, 0.75, 0.25))
        assert mem.spec.key_layer == 2 and mem.spec.key_pooling == "mean"
        e = mem.read_entry(1)
        assert e.entry_id == 7 and e.source_id == "src-1"
        mem.verify()


def test_commit_upgrades_a_version_1_file(tmp_path):
    from edgekv.format import Memory

    path = tmp_path / "v1.ekv"
    old, key, kq, vq = v1_file(path)
    commit_update(path, calibration=Calibration(0.5, (1.0, 1.0, 1.0)), top_k=2)
    new = path.read_bytes()
    assert len(new) == len(old)
    assert struct.unpack_from("<I", new, 8)[0] == 2 and new[157] == 0 and struct.unpack_from("<H", new, 158)[0] == 2
    header_bytes = struct.unpack_from("<I", old, 12)[0]
    assert new[header_bytes:] == old[header_bytes:]  # table and slots as they were
    with Memory(path) as mem:
        assert mem.format_version == 2 and mem.top_k == 2 and mem.generation == 6
        e = mem.read_entry(1)
        assert np.array_equal(e.key, key) and np.array_equal(e.k, kq) and np.array_equal(e.v, vq)
    path2 = tmp_path / "v1b.ekv"
    v1_file(path2)
    commit_update(path2, clear=[2])  # a commit without a k: version 2, k still not recorded
    raw = path2.read_bytes()
    assert struct.unpack_from("<I", raw, 8)[0] == 2 and raw[157:160] == b"\x00\x00\x00"
    with Memory(path2) as mem:
        assert mem.format_version == 2 and mem.top_k is None
