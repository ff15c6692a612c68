"""Corrupt memory files give a clear edgekv error naming what is wrong, never a crash.

Library: flipped bytes in the header, table and slots; truncation; trailing bytes; wrong
magic; wrong version; inconsistent (but checksummed) fields; empty file; directory; missing
file. CLI: exit code 4 (3 for a missing file) and one line ``edgekv: error: ...``.
Hypothesis: random flips anywhere give an edgekv error, or, where a flip lands in an
unoccupied slot, a file whose content is still exactly right.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.errors import CorruptFileError, EdgeKVError, InputError
from edgekv.format import Entry, Memory, MemorySpec, commit_update, create_memory
from edgekv.retrieval import fit_projection
from edgekv.rope import RopeSpec

FP = "5a" * 32
SPEC = MemorySpec(2, 2, 8, 4, 16, FP, "int8", RopeSpec((1.0, 0.25)), proj_max_dirs=2)
BUDGET = 12_000
OCCUPIED = (0, 2)
HB, SB = SPEC.header_bytes, SPEC.slot_bytes
NUM_SLOTS = SPEC.num_slots_for(BUDGET)
TABLE = HB
SLOTS = HB + 64 * NUM_SLOTS


def slot_start(s: int) -> int:
    return SLOTS + s * SB


def _entries() -> dict[int, Entry]:
    rng = np.random.default_rng(21)
    shape = SPEC.payload_shape
    return {s: Entry.from_float(rng.normal(size=16), rng.normal(size=shape), rng.normal(size=shape), "int8",
                                f"task-{s}", f"src-{s}") for s in OCCUPIED}


ENTRIES = _entries()


def make_good(dir_) -> tuple[str, bytes]:
    path = os.path.join(dir_, "good.ekv")
    create_memory(path, SPEC, BUDGET).close()
    commit_update(path, put=ENTRIES, projection=fit_projection(np.random.default_rng(1).normal(size=(8, 16)), 2),
                  top_k=2)
    with open(path, "rb") as f:
        return path, f.read()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    _, data = make_good(tmp_path_factory.mktemp("good"))
    assert NUM_SLOTS >= 4 and len(data) == HB + NUM_SLOTS * (64 + SB)
    return data


def write(tmp_path, data: bytes, name: str = "bad.ekv") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def flipped(data: bytes, pos: int, mask: int = 0x04) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


def recrc_header(data: bytes) -> bytes:
    """Make the header checksum valid again after an edit (so later checks are what fire)."""
    b = bytearray(data)
    struct.pack_into("<I", b, HB - 4, zlib.crc32(bytes(b[: HB - 4])))
    return bytes(b)


def set_field(data: bytes, fmt: str, offset: int, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return recrc_header(bytes(b))


def assert_content_intact(mem: Memory) -> None:
    assert mem.occupied().tolist() == list(OCCUPIED)
    for s, e in ENTRIES.items():
        got = mem.read_entry(s)
        for name in ("key", "k", "v", "k_scale", "v_scale"):
            assert np.array_equal(getattr(got, name), getattr(e, name))
        assert got.task == e.task and got.source_id == e.source_id


# --------------------------------------------------------------------------------------
# flipped bytes, by region
# --------------------------------------------------------------------------------------
HEADER_POSITIONS = {
    "generation": 32, "fingerprint": 50, "num_layers": 72, "tau": 113, "num_slots": 116,
    "table_crc": 149, "reserved": 157, "top_k": 158, "gates": 162, "inv_freq": 160 + 4 * 2, "projection": 200, "task names": 160 + 4 * 52 + 5,
    "padding": HB - 20, "header crc": HB - 2,
}


@pytest.mark.parametrize("where", sorted(HEADER_POSITIONS))
def test_flip_in_header(tmp_path, good, where):
    path = write(tmp_path, flipped(good, HEADER_POSITIONS[where]))
    with pytest.raises(CorruptFileError, match=r"header checksum mismatch \(corrupt header\)"):
        Memory(path)


@pytest.mark.parametrize("pos, msg", [
    (3, "not an edgekv memory file"), (8, "memory format version 6 is not supported"),
    (12, "header length field"), (14, "header length field"),
])
def test_flip_in_header_prefix(tmp_path, good, pos, msg):
    with pytest.raises(CorruptFileError, match=msg):
        Memory(write(tmp_path, flipped(good, pos)))


@pytest.mark.parametrize("row, byte", [(0, 0), (0, 5), (0, 30), (2, 13), (1, 0), (NUM_SLOTS - 1, 63)])
def test_flip_in_table(tmp_path, good, row, byte):
    path = write(tmp_path, flipped(good, TABLE + 64 * row + byte))
    with pytest.raises(CorruptFileError, match=r"slot table checksum mismatch \(corrupt table\)"):
        Memory(path)


@pytest.mark.parametrize("slot", OCCUPIED)
@pytest.mark.parametrize("part", ["key", "k", "v", "k_scale", "v_scale", "padding"])
def test_flip_in_occupied_slot(tmp_path, good, slot, part):
    layout = SPEC.slot_layout()
    off = SB - 1 if part == "padding" else layout[part][0] + layout[part][1] // 2
    if part == "padding":
        last = list(layout.values())[-1]
        assert last[0] + last[1] < SB, "this spec must leave slot padding"
    path = write(tmp_path, flipped(good, slot_start(slot) + off))
    with Memory(path) as mem:  # header and table are intact: it opens
        other = [s for s in OCCUPIED if s != slot][0]
        mem.read_entry(other)  # and the other slot reads fine
        with pytest.raises(CorruptFileError, match=rf"slot {slot} fails its checksum \(corrupt slot\)"):
            mem.read_entry(slot)
        with pytest.raises(CorruptFileError, match=f"slot {slot}"):
            mem.verify()
        if part == "key":
            with pytest.raises(CorruptFileError, match=f"retrieval key of slot {slot} fails its checksum"):
                mem.read_keys()
        else:  # read_keys touches only the keys: a damaged payload does not stop search
            assert np.array_equal(mem.read_keys([slot])[0], ENTRIES[slot].key)
        assert mem.read_entry(slot, verify=False).k.shape == SPEC.payload_shape
    assert f"slot {slot} fails its checksum" in run_cli_error(["inspect", path, "--verify"], 4)


def test_flip_in_unoccupied_slot_is_harmless(tmp_path, good):
    path = write(tmp_path, flipped(good, slot_start(1) + 10))
    with Memory(path) as mem:
        mem.verify()
        assert_content_intact(mem)
    # the next writer overwrites the whole slot
    commit_update(path, put={1: ENTRIES[0]})
    with Memory(path) as mem:
        mem.verify()


# --------------------------------------------------------------------------------------
# truncation, trailing bytes, magic, version, inconsistent fields
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, msg", [
    (1, "too small to be an edgekv memory"), (159, "too small to be an edgekv memory"),
    (160, "header length field"), (HB - 1, "header length field"),
    (HB, "but its header says"), (HB + 64, "(truncated)"), (-1, "(truncated)"),
])
def test_truncated(tmp_path, good, length, msg):
    path = write(tmp_path, good[:length])
    with pytest.raises(CorruptFileError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        Memory(path)


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 4096])
def test_trailing_bytes(tmp_path, good, extra):
    with pytest.raises(CorruptFileError, match=rf"is {len(good) + len(extra)} bytes but its header says "
                                               rf"{len(good)} \(has trailing bytes\)"):
        Memory(write(tmp_path, good + extra))


def test_wrong_magic(tmp_path, good):
    with pytest.raises(CorruptFileError, match=r"not an edgekv memory file \(bad magic b'GGUF"):
        Memory(write(tmp_path, b"GGUF" + good[4:]))
    with pytest.raises(CorruptFileError, match="not an edgekv memory file"):
        Memory(write(tmp_path, np.random.default_rng(0).bytes(len(good))))


@pytest.mark.parametrize("version", [0, 3, 1 << 31])
def test_wrong_version(tmp_path, good, version):
    data = set_field(good, "<I", 8, version)  # re-CRC'd: the version check itself must fire
    with pytest.raises(CorruptFileError, match=rf"memory format version {version} is not supported; this edgekv "
                                               r"reads versions 1, 2 \(upgrade edgekv or rebuild the memory\)"):
        Memory(write(tmp_path, data))


def test_checksummed_top_k_and_reserved_byte(tmp_path, good):
    """top_k is a count with no size derived from it: any u16 reads back (0: not recorded); the
    reserved byte is not read. Version 1 ignores bytes 157..159 whatever they hold."""
    with Memory(write(tmp_path, good)) as mem:
        assert mem.top_k == 2 and mem.format_version == 2
    for value, want in ((0, None), (1, 1), (0xFFFF, 0xFFFF)):
        with Memory(write(tmp_path, set_field(good, "<H", 158, value))) as mem:
            assert mem.top_k == want
    with Memory(write(tmp_path, set_field(good, "<B", 157, 0xAB))) as mem:
        assert mem.top_k == 2
    v1 = set_field(set_field(good, "<I", 8, 1), "<H", 158, 9)
    with Memory(write(tmp_path, v1)) as mem:
        assert mem.format_version == 1 and mem.top_k is None
        assert_content_intact(mem)


@pytest.mark.parametrize("fmt, offset, value, msg", [
    ("<I", 116, NUM_SLOTS + 1, "header offsets disagree with its slot count"),
    ("<Q", 16, 1000, "exceeds its budget 1000"),
    ("<B", 92, 7, "header holds invalid field values"),
    ("<B", 93, 2, "header holds invalid field values"),
    ("<I", 96, 3, "invalid rotary dim 3"),
    ("<I", 104, 3, "header holds invalid field values"),  # more directions than the capacity
    ("<I", 72, 1 << 20, "num_layers=1048576 is out of range"),
    ("<I", 88, 1 << 15, "header arrays overrun the header"),
    ("<I", 120, SB + 64, "header sizes disagree with its shapes"),
    ("<I", 152, 9, "header is inconsistent"),
])
def test_checksummed_but_inconsistent_header(tmp_path, good, fmt, offset, value, msg):
    with pytest.raises(CorruptFileError, match=msg):
        Memory(write(tmp_path, set_field(good, fmt, offset, value)))


def test_table_naming_a_missing_task(tmp_path, good):
    b = bytearray(good)
    struct.pack_into("<H", b, TABLE + 2, 7)  # slot 0 -> task 7 (2 tasks exist)
    b[148:152] = struct.pack("<I", zlib.crc32(bytes(b[TABLE:SLOTS])))
    with pytest.raises(CorruptFileError, match="names a task that does not exist"):
        Memory(write(tmp_path, recrc_header(bytes(b))))


def test_empty_directory_and_missing(tmp_path):
    with pytest.raises(CorruptFileError, match="file is empty, not an edgekv memory"):
        Memory(write(tmp_path, b""))
    with pytest.raises(InputError, match="not a regular file"):
        Memory(tmp_path)
    with pytest.raises(InputError, match="memory file not found"):
        Memory(tmp_path / "missing.ekv")


def test_update_of_a_corrupt_file_is_refused_and_leaves_it(tmp_path, good):
    data = flipped(good, TABLE + 3)
    path = write(tmp_path, data)
    with pytest.raises(CorruptFileError, match="corrupt table"):
        commit_update(path, put={1: ENTRIES[0]})
    with open(path, "rb") as f:
        assert f.read() == data
    assert sorted(os.listdir(tmp_path)) == ["bad.ekv", "bad.ekv.lock"]


# --------------------------------------------------------------------------------------
# the CLI: exit code and one line, no traceback
# --------------------------------------------------------------------------------------
def run_cli_error(args: list[str], code: int) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == code, (res.exit_code, res.output)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekv: error: "), res.stderr
    assert "Traceback" not in res.output
    assert not isinstance(res.exception, EdgeKVError)  # handled, not escaped
    return lines[0]


def test_cli_reports_corruption_in_one_line(tmp_path, good):
    cases = [
        (flipped(good, 120), 4, "header checksum mismatch"),
        (flipped(good, TABLE + 1), 4, "corrupt table"),
        (good[:-10], 4, "truncated"),
        (b"\x7fELF" + good[4:], 4, "not an edgekv memory file"),
        (set_field(good, "<I", 8, 9), 4, "memory format version 9 is not supported"),
        (b"", 4, "file is empty"),
    ]
    for i, (data, code, msg) in enumerate(cases):
        path = write(tmp_path, data, f"c{i}.ekv")
        for extra in ([], ["--json"]):
            line = run_cli_error(["inspect", path, *extra], code)
            assert msg in line and path in line
    line = run_cli_error(["inspect", str(tmp_path / "nope.ekv")], 3)
    assert "memory file not found" in line
    assert "not a regular file" in run_cli_error(["inspect", str(tmp_path)], 3)
    path = write(tmp_path, flipped(good, slot_start(2) + 100), "slot.ekv")
    assert "slot 2 fails its checksum" in run_cli_error(["inspect", path, "--verify"], 4)


# --------------------------------------------------------------------------------------
# random flips anywhere
# --------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, HB + NUM_SLOTS * (64 + SB) - 1), st.integers(1, 255)),
                      min_size=1, max_size=3))
def test_random_flips_give_edgekv_errors_or_correct_content(tmp_path, good, flips):
    b = bytearray(good)
    for pos, mask in flips:
        b[pos] ^= mask
    path = write(tmp_path, bytes(b), "fuzz.ekv")
    changed = [p for p in range(len(good)) if b[p] != good[p]]
    harmless = all(slot_start(0) <= p and (p - SLOTS) // SB not in OCCUPIED for p in changed)
    try:
        with Memory(path) as mem:
            mem.verify()
            keys = mem.read_keys()
            assert_content_intact(mem)
            assert np.array_equal(keys, np.stack([ENTRIES[s].key for s in OCCUPIED]))
    except CorruptFileError as e:
        assert not harmless, f"a flip in an unoccupied slot was reported: {e}"
        return
    assert harmless, f"flips at {changed} went undetected"
