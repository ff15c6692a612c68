"""The memory file through its API: round trips, a fixed size through random updates, errors.

Byte-level decoding against docs/memory-format.md is in test_format_bytes.py; corrupt
files are in test_corruption.py; crashes during an update in test_crash.py.
"""

from __future__ import annotations

import json
import os
import re
import zlib

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.errors import BudgetError, InputError
from edgekv.format import (
    FORMAT_VERSION,
    TABLE_ENTRY_BYTES,
    Calibration,
    Entry,
    Memory,
    MemorySpec,
    commit_update,
    create_memory,
)
from edgekv.quant import (
    dequantize_keys,
    dequantize_values,
    error_bound,
    pack_int4,
    quantize_keys,
    quantize_values,
)
from edgekv.retrieval import KeyProjection, fit_projection
from edgekv.rope import RopeSpec

FP = "0123456789abcdef" * 4
# float32 values, as a model's inv_freq buffer holds them (the header stores f32)
INV_FREQ = tuple(float(x) for x in (1.0 / 10000.0 ** (np.arange(0, 6, 2) / 6)).astype(np.float32))
LONG_TASK = "a task name that is much longer than thirty-two bytes"


def small_spec(payload: str = "int8", **kw) -> MemorySpec:
    args = dict(num_layers=3, num_kv_heads=2, head_dim=8, pooled_len=5, key_dim=12,
                model_fingerprint=FP, payload_dtype=payload,
                rope=RopeSpec(INV_FREQ, 1.25), proj_max_dirs=3)
    args.update(kw)
    return MemorySpec(**args)


def random_kv(rng: np.random.Generator, spec: MemorySpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """key [R], k, v [L, H, m, D] float32 with an outlier channel in k."""
    shape = spec.payload_shape
    k = rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape[-1])
    k[..., 0] *= 40.0
    v = rng.normal(size=shape)
    return (rng.normal(size=spec.key_dim).astype(np.float32), k.astype(np.float32), v.astype(np.float32))


def random_entry(rng, spec, task="t", source_id="") -> Entry:
    key, k, v = random_kv(rng, spec)
    return Entry.from_float(key, k, v, spec.payload_dtype, task, source_id)


def assert_entry_equal(got: Entry, want: Entry) -> None:
    for name in ("key", "k", "v", "k_scale", "v_scale"):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == np.asarray(b).dtype and a.shape == np.shape(b), name
        assert a.tobytes() == np.asarray(b).tobytes(), name  # bit-exact


def as_stored(cal: Calibration) -> Calibration:
    """The calibration as the header holds it (f32)."""
    return Calibration(float(np.float32(cal.tau)), tuple(float(np.float32(g)) for g in cal.gates))


def cli_json(*args: str) -> dict:
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", ["int8", "fp16"])
def test_create_commit_read_round_trip(tmp_path, payload):
    rng = np.random.default_rng(1)
    spec = small_spec(payload)
    budget = 30_000
    path = tmp_path / "m.ekv"
    with create_memory(path, spec, budget) as mem:
        n = (budget - spec.header_bytes) // (TABLE_ENTRY_BYTES + spec.slot_bytes)
        assert mem.num_slots == n >= 4
        assert mem.num_used == 0 and mem.generation == 0 and mem.tasks == []
        assert mem.file_bytes == spec.header_bytes + n * (64 + spec.slot_bytes) <= budget
        assert mem.calibration == as_stored(Calibration.default(3))
        assert mem.spec == spec
    size = os.path.getsize(path)
    assert size == mem.file_bytes

    floats = [random_kv(rng, spec) for _ in range(3)]
    entries = [Entry.from_float(*f, payload, task, src)
               for f, task, src in zip(floats, ["a", "b", "a"], ["ex-1", "", "ex-3"], strict=True)]
    slots = [0, 3, n - 1]
    gen = commit_update(path, put=dict(zip(slots, entries, strict=True)))
    assert gen == 1 and os.path.getsize(path) == size

    with Memory(path) as mem:
        assert mem.generation == 1 and mem.num_used == 3 and mem.next_entry_id == 3
        assert mem.occupied().tolist() == slots
        assert mem.tasks == ["a", "b"]
        assert mem.per_task_counts() == {"a": 2, "b": 1}
        keys = mem.read_keys()
        assert keys.dtype == np.float32
        assert keys.tobytes() == np.stack([f[0] for f in floats]).tobytes()  # keys exact
        assert mem.read_keys([3]).tobytes() == floats[1][0].tobytes()
        for i, (slot, e, (_, k, v)) in enumerate(zip(slots, entries, floats, strict=True)):
            got = mem.read_entry(slot)
            assert_entry_equal(got, e)
            assert (got.task, got.source_id, got.entry_id, got.insert_seq) == (e.task, e.source_id, i, i + 1)
            assert mem.slot_info(slot) == {"slot": slot, "occupied": True, "entry_id": i, "task": e.task,
                                           "source_id": e.source_id, "insert_seq": i + 1}
            if payload == "int8":  # what was read dequantises to the floats within the bound
                kd, vd = dequantize_keys(got.k, got.k_scale), dequantize_values(got.v, got.v_scale)
                assert np.all(np.abs(kd - k) <= error_bound(got.k_scale)[..., None, :])
                assert np.all(np.abs(vd - v) <= error_bound(got.v_scale)[..., :, None])
            else:
                assert np.array_equal(got.k, k.astype(np.float16))
        assert mem.slot_info(1)["occupied"] is False
        mem.verify()


def test_int4_memory_round_trip(tmp_path):
    """int4: codes in [-7, 7] read back exactly (unpacked to int8), packed two per byte in the
    file (payload code 3), dequantised within the bound; out-of-range entries are refused."""
    rng = np.random.default_rng(8)
    spec = small_spec("int4")
    path = tmp_path / "m.ekv"
    create_memory(path, spec, 30_000).close()
    floats = [random_kv(rng, spec) for _ in range(3)]
    entries = [Entry.from_float(*f, "int4", "t", f"ex-{i}") for i, f in enumerate(floats)]
    for e, (_, k, v) in zip(entries, floats, strict=True):  # from_float quantises with qmax = 7
        assert e.k.dtype == e.v.dtype == np.int8 and e.k.shape == e.v.shape == spec.payload_shape
        assert np.abs(e.k).max() == 7 and np.abs(e.v).max() == 7
        for a, b in zip((e.k, e.k_scale, e.v, e.v_scale), quantize_keys(k, qmax=7) + quantize_values(v, qmax=7),
                        strict=True):
            assert a.tobytes() == b.tobytes()
    commit_update(path, put={0: entries[0], 2: entries[1], 3: entries[2]})
    buf = path.read_bytes()
    assert buf[92] == 3  # payload code
    with Memory(path) as mem:
        assert mem.spec == spec and mem.spec.payload_dtype == "int4"
        for slot, e, (_, k, v) in zip((0, 2, 3), entries, floats, strict=True):
            got = mem.read_entry(slot)
            assert_entry_equal(got, e)  # k, v: int8 [L, H, m, D], bit-exact
            kd, vd = dequantize_keys(got.k, got.k_scale), dequantize_values(got.v, got.v_scale)
            assert np.all(np.abs(kd - k) <= error_bound(got.k_scale)[..., None, :])
            assert np.all(np.abs(vd - v) <= error_bound(got.v_scale)[..., :, None])
            # control: 4-bit, not 8-bit, codes (errors beyond what int8's scales allow)
            assert np.any(np.abs(kd - k) > error_bound(quantize_keys(k)[1])[..., None, :])
            # the slot holds the packed codes where slot_layout says
            start, _ = mem._slot_range(slot)
            for name in ("k", "v"):
                off, nbytes, _, shape = spec.slot_layout()[name]
                assert shape == spec.payload_shape[:3] + (spec.head_dim // 2,) and nbytes == np.prod(shape)
                assert buf[start + off: start + off + nbytes] == pack_int4(getattr(e, name)).tobytes()
        mem.verify()
    # entries that are not int4 codes are refused; the file does not change
    good = entries[0]
    wide = Entry(good.key, good.k.copy(), good.v, good.k_scale, good.v_scale)
    wide.k[1, 0, 2, 3] = 100  # an int8-range code
    as_int8 = Entry.from_float(*floats[0], "int8")
    as_fp16 = Entry.from_float(*floats[0], "fp16")
    for bad, msg in [(wide, "entry 'k' must be int8 with values in [-7, 7] for an int4 memory, got values in "),
                     (as_int8, "entry 'k' must be int8 with values in [-7, 7]"),
                     (as_fp16, "got dtype float16 (use Entry.from_float(..., payload_dtype='int4'))"),
                     (Entry(good.key, good.k[..., :4], good.v, good.k_scale, good.v_scale),
                      "entry 'k' has shape (3, 2, 5, 4), the memory expects (3, 2, 5, 8)")]:
        with pytest.raises(InputError, match=re.escape(msg)):
            commit_update(path, put={1: bad})
    assert path.read_bytes() == buf


def test_int4_slot_is_under_06_of_int8():
    """SmolLM2-135M's shape at m = 16: int4 halves K and V and keeps the scales."""
    def spec(payload):
        return MemorySpec(30, 3, 64, 16, 576, FP, payload)

    i8, i4 = spec("int8"), spec("int4")
    assert i8.slot_bytes == 201_024 and i4.slot_bytes == 108_864
    assert i4.slot_bytes < 0.6 * i8.slot_bytes
    parts = {name: nbytes for name, (_, nbytes, _, _) in i4.slot_layout().items()}
    assert parts == {"key": 4 * 576, "k": 30 * 3 * 16 * 32, "v": 30 * 3 * 16 * 32,
                     "k_scale": 2 * 30 * 3 * 64, "v_scale": 2 * 30 * 3 * 16}
    assert i4.num_slots_for(8 << 20) >= 1.8 * i8.num_slots_for(8 << 20)


def test_calibration_and_projection_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    spec = small_spec()
    path = tmp_path / "m.ekv"
    create_memory(path, spec, 30_000, calibration=Calibration(0.2, (0.5, 0.25, 1.0))).close()
    with Memory(path) as mem:
        assert mem.calibration == Calibration(float(np.float32(0.2)), (0.5, 0.25, 1.0))  # stored as f32
        assert mem.projection.dirs.shape == (0, 12) and not mem.projection.mean.any()
    proj = fit_projection(rng.normal(size=(20, 12)), 2)
    cal = Calibration(0.0731, (0.1, 0.9, 0.333))
    assert commit_update(path, calibration=cal, projection=proj) == 1
    with Memory(path) as mem:
        assert mem.calibration == as_stored(cal)
        assert np.array_equal(mem.projection.mean, proj.mean)
        assert np.array_equal(mem.projection.dirs, proj.dirs)
        assert mem.num_used == 0


# --------------------------------------------------------------------------------------
# 100 random update rounds: exact size, exact content
# --------------------------------------------------------------------------------------
class Model:
    """What the file should hold, kept in python (the rules of docs/memory-format.md)."""

    def __init__(self, spec: MemorySpec, num_slots: int):
        self.spec, self.num_slots = spec, num_slots
        self.slots: dict[int, Entry] = {}
        self.tasks: list[str] = []
        self.generation = 0
        self.next_id = 0
        self.calibration = as_stored(Calibration.default(spec.num_layers))
        self.projection = KeyProjection.identity(spec.key_dim)

    def commit(self, put: dict[int, Entry], clear: list[int], calibration, projection) -> None:
        seq = max((e.insert_seq for e in self.slots.values()), default=0)
        for s in sorted(put):
            e = put[s]
            raw = e.task.encode()
            stored_task = e.task
            if len(raw) > 32:  # long names are kept as a 23-byte prefix + '~' + crc32 (hex)
                stored_task = raw[:23].decode("utf-8", "ignore") + "~" + f"{zlib.crc32(raw):08x}"
            if stored_task not in self.tasks:
                self.tasks.append(stored_task)
            seq += 1
            eid = e.entry_id if e.entry_id >= 0 else self.next_id
            self.next_id = max(self.next_id, eid + 1)
            self.slots[s] = Entry(e.key, e.k, e.v, e.k_scale, e.v_scale, stored_task, e.source_id, eid,
                                  e.insert_seq if e.insert_seq >= 0 else seq)
        for s in clear:
            self.slots.pop(s, None)
        if calibration is not None:
            self.calibration = as_stored(calibration)
        if projection is not None:
            self.projection = projection
        self.generation += 1

    def check(self, path, size: int) -> None:
        assert os.path.getsize(path) == size
        with Memory(path) as mem:
            assert mem.generation == self.generation
            assert mem.file_bytes == size and mem.num_slots == self.num_slots
            assert mem.occupied().tolist() == sorted(self.slots)
            assert mem.tasks == self.tasks
            assert mem.next_entry_id == self.next_id
            assert mem.calibration == self.calibration
            assert np.array_equal(mem.projection.mean, self.projection.mean.astype(np.float32))
            assert np.array_equal(mem.projection.dirs, self.projection.dirs.astype(np.float32))
            for s, want in self.slots.items():
                got = mem.read_entry(s)
                assert_entry_equal(got, want)
                assert (got.task, got.source_id, got.entry_id, got.insert_seq) == \
                    (want.task, want.source_id, want.entry_id, want.insert_seq)
            if self.slots:
                assert np.array_equal(mem.read_keys(), np.stack([self.slots[s].key for s in sorted(self.slots)]))
            mem.verify()
        # empty slots hold zeros (cleared slots are zeroed)
        raw = np.fromfile(path, np.uint8)
        spec = self.spec
        base = spec.header_bytes + self.num_slots * TABLE_ENTRY_BYTES
        for s in set(range(self.num_slots)) - set(self.slots):
            assert not raw[base + s * spec.slot_bytes: base + (s + 1) * spec.slot_bytes].any()


@pytest.mark.parametrize("payload", ["int8", "fp16", "int4"])
def test_file_keeps_its_size_through_100_random_update_rounds(tmp_path, payload):
    rng = np.random.default_rng({"int8": 100, "fp16": 101, "int4": 102}[payload])
    spec = small_spec(payload)
    budget = 27_000 + 123
    path = tmp_path / "m.ekv"
    create_memory(path, spec, budget).close()
    size = os.path.getsize(path)
    num_slots = spec.num_slots_for(budget)
    assert size == spec.file_bytes_for(num_slots) <= budget and num_slots >= 6
    model = Model(spec, num_slots)
    task_pool = ["vqa", "captions", "médical", LONG_TASK, LONG_TASK + " (other)", ""]
    for round_ in range(100):
        free = rng.permutation(num_slots)
        n_put = int(rng.integers(0, 4))
        put = {}
        for s in free[:n_put]:
            e = random_entry(rng, spec, task_pool[rng.integers(len(task_pool))], f"src-{round_}-{s}")
            if rng.random() < 0.1:
                e.entry_id = int(rng.integers(0, 1000))  # explicit ids are kept
            put[int(s)] = e
        occupied = [s for s in model.slots if s not in put]
        n_clear = int(rng.integers(0, 3)) if occupied else 0
        clear = [int(s) for s in rng.permutation(occupied)[:n_clear]]
        if rng.random() < 0.2 and num_slots - len(put) > 0:  # clearing an empty slot is allowed
            empty = [s for s in range(num_slots) if s not in model.slots and s not in put]
            clear += [int(rng.choice(empty))] if empty else []
        cal = None
        if rng.random() < 0.3:
            cal = Calibration(float(rng.uniform(0.01, 1.0)), tuple(rng.uniform(0, 1, spec.num_layers).tolist()))
        proj = None
        if rng.random() < 0.3:
            proj = fit_projection(rng.normal(size=(10, spec.key_dim)), int(rng.integers(0, spec.proj_max_dirs + 1)))
        gen = commit_update(path, put=put, clear=clear, calibration=cal, projection=proj)
        model.commit(put, clear, cal, proj)
        assert gen == model.generation
        model.check(path, size)
    assert len(model.tasks) == len(task_pool)  # long names map to one stored name each time
    info = cli_json("inspect", str(path))
    assert info["file_bytes"] == size <= info["budget_bytes"] == budget
    assert info["num_used"] == len(model.slots) and info["generation"] == 100
    assert sorted(os.listdir(tmp_path)) == ["m.ekv", "m.ekv.lock"]


# --------------------------------------------------------------------------------------
# top_k: the k the calibration is fitted for (format version 2)
# --------------------------------------------------------------------------------------
def test_top_k_round_trip_and_kept_by_commits_without_one(tmp_path):
    rng = np.random.default_rng(4)
    spec = small_spec()
    path = tmp_path / "m.ekv"
    with create_memory(path, spec, 40_000, top_k=4) as mem:
        assert mem.top_k == 4 and mem.format_version == FORMAT_VERSION == 2
    commit_update(path, put={0: random_entry(rng, spec)})  # no top_k: the header keeps its k
    with Memory(path) as mem:
        assert mem.top_k == 4
    commit_update(path, calibration=Calibration(0.2, (1.0, 1.0, 1.0)), top_k=2)
    with Memory(path) as mem:
        assert mem.top_k == 2 and mem.generation == 2
    create_memory(tmp_path / "n.ekv", spec, 40_000).close()  # none recorded
    with Memory(tmp_path / "n.ekv") as mem:
        assert mem.top_k is None and mem.format_version == 2


@pytest.mark.parametrize("bad", [0, -1, 1 << 16, 2.0, True, "4"])
def test_top_k_out_of_range_is_refused(tmp_path, bad):
    spec = small_spec()
    path = tmp_path / "m.ekv"
    with pytest.raises(InputError, match=r"top_k .* must be an integer in \[1, 65535\]"):
        create_memory(path, spec, 40_000, top_k=bad)
    assert not path.exists()
    create_memory(path, spec, 40_000, top_k=3).close()
    before = path.read_bytes()
    with pytest.raises(InputError, match="top_k"):
        commit_update(path, top_k=bad)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------------
# inspect --json
# --------------------------------------------------------------------------------------
def test_inspect_json_reports_required_keys(tmp_path):
    rng = np.random.default_rng(3)
    spec = small_spec()
    path = tmp_path / "m.ekv"
    create_memory(path, spec, 40_000).close()
    commit_update(path, put={1: random_entry(rng, spec, "a"), 2: random_entry(rng, spec, "b"),
                             4: random_entry(rng, spec, "a")}, top_k=3)
    info = cli_json("inspect", str(path))
    required = {"format_version", "num_slots", "num_used", "slot_bytes", "file_bytes", "budget_bytes",
                "pooled_len", "payload_dtype", "model_fingerprint", "top_k"}
    assert required <= set(info)
    assert info["file_bytes"] <= info["budget_bytes"]
    assert info["format_version"] == 2 and info["top_k"] == 3
    human = CliRunner().invoke(app, ["inspect", str(path)])
    assert human.exit_code == 0 and "k (calibrated for)  3" in human.stdout, human.output
    assert info["num_slots"] == spec.num_slots_for(40_000)
    assert info["num_used"] == 3
    assert info["slot_bytes"] == spec.slot_bytes
    assert info["file_bytes"] == os.path.getsize(path) == info["file_bytes_on_disk"]
    assert info["budget_bytes"] == 40_000
    assert info["pooled_len"] == 5 and info["payload_dtype"] == "int8"
    assert info["model_fingerprint"] == FP
    assert info["per_task_counts"] == {"a": 2, "b": 1}
    assert "verified" not in info
    assert cli_json("inspect", str(path), "--verify")["verified"] is True


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
def test_budget_too_small_for_one_slot(tmp_path):
    spec = small_spec()
    one = spec.header_bytes + TABLE_ENTRY_BYTES + spec.slot_bytes
    with pytest.raises(BudgetError, match=f"budget {one - 1} B is too small for one slot: a slot needs {one} B"):
        create_memory(tmp_path / "m.ekv", spec, one - 1)
    assert not os.path.exists(tmp_path / "m.ekv")
    with pytest.raises(BudgetError):
        create_memory(tmp_path / "m.ekv", spec, 100)
    with create_memory(tmp_path / "m.ekv", spec, one) as mem:
        assert mem.num_slots == 1 and mem.file_bytes == one


def test_overwrite_refused_unless_asked(tmp_path):
    rng = np.random.default_rng(4)
    spec = small_spec()
    path = tmp_path / "m.ekv"
    create_memory(path, spec, 30_000).close()
    commit_update(path, put={0: random_entry(rng, spec)})
    before = path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        create_memory(path, spec, 30_000)
    assert path.read_bytes() == before
    with create_memory(path, small_spec("fp16"), 60_000, overwrite=True) as mem:
        assert mem.num_used == 0 and mem.generation == 0 and mem.spec.payload_dtype == "fp16"
        assert mem.num_slots == small_spec("fp16").num_slots_for(60_000)


def test_bad_create_paths(tmp_path):
    spec = small_spec()
    with pytest.raises(InputError, match="does not exist"):
        create_memory(tmp_path / "no" / "such" / "m.ekv", spec, 30_000)
    with pytest.raises(InputError, match="is a folder"):
        create_memory(tmp_path, spec, 30_000, overwrite=True)
    with pytest.raises(InputError, match="memory file not found"):
        commit_update(tmp_path / "missing.ekv", clear=[0])
    with pytest.raises(InputError, match="not a regular file"):
        commit_update(tmp_path, clear=[0])
    assert os.listdir(tmp_path) == []


def test_slot_index_out_of_range(tmp_path):
    rng = np.random.default_rng(5)
    spec = small_spec()
    path = tmp_path / "m.ekv"
    create_memory(path, spec, 30_000).close()
    commit_update(path, put={0: random_entry(rng, spec)})
    n = spec.num_slots_for(30_000)
    before = path.read_bytes()
    msg = f"out of range: memory has {n} slots"
    for bad in (n, -1, 10**6):
        with pytest.raises(InputError, match=f"slot {bad} {msg}"):
            commit_update(path, put={bad: random_entry(rng, spec)})
        with pytest.raises(InputError, match=msg):
            commit_update(path, clear=[bad])
    with Memory(path) as mem:
        for bad in (n, -1):
            with pytest.raises(InputError, match=f"slot {bad} {msg}"):
                mem.read_entry(bad)
            with pytest.raises(InputError, match=msg):
                mem.read_keys([bad])
            with pytest.raises(InputError, match=msg):
                mem.slot_info(bad)
        with pytest.raises(InputError, match="slot 1 is empty"):
            mem.read_entry(1)
        with pytest.raises(InputError, match="slot 1 is empty"):
            mem.read_keys([0, 1])
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.ekv", "m.ekv.lock"]  # no temp files left


def _bad_entries(rng, spec):
    good = random_entry(rng, spec)
    L, H, m, D = spec.payload_shape
    fp16 = Entry.from_float(*random_kv(rng, spec), "fp16")
    nan_key = random_entry(rng, spec)
    nan_key.key = nan_key.key.copy()
    nan_key.key[3] = np.nan
    return [
        ("'key' has shape (11,)", Entry(good.key[:11], good.k, good.v, good.k_scale, good.v_scale)),
        ("'k' has shape (3, 2, 4, 8)", Entry(good.key, good.k[:, :, :4], good.v, good.k_scale, good.v_scale)),
        ("'v' has shape (3, 2, 5, 7)", Entry(good.key, good.k, good.v[..., :7], good.k_scale, good.v_scale)),
        ("'k_scale' has shape (3, 2, 5)", Entry(good.key, good.k, good.v, good.v_scale, good.v_scale)),
        ("'v_scale' has shape", Entry(good.key, good.k, good.v, good.k_scale, good.v_scale[None])),
        ("no 'k_scale'", Entry(good.key, good.k, good.v, None, good.v_scale)),
        ("must be int8", Entry(good.key, fp16.k, fp16.v, good.k_scale, good.v_scale)),
        ("NaN or inf", nan_key),
        ("'k_scale' contains NaN", Entry(good.key, good.k, good.v, np.full((L, H, D), np.inf, np.float16),
                                         good.v_scale)),
    ]


def test_shape_and_dtype_mismatch_errors(tmp_path):
    rng = np.random.default_rng(6)
    spec = small_spec()
    path = tmp_path / "m.ekv"
    create_memory(path, spec, 30_000).close()
    before = path.read_bytes()
    for msg, entry in _bad_entries(rng, spec):
        with pytest.raises(InputError, match=re.escape(msg)):
            commit_update(path, put={0: entry})
    with pytest.raises(InputError, match="calibration has 2 gates, the memory has 3 layers"):
        commit_update(path, calibration=Calibration(0.1, (1.0, 1.0)))
    for proj in (KeyProjection(np.zeros(11, np.float32), np.zeros((0, 12), np.float32)),
                 KeyProjection(np.zeros(12, np.float32), np.zeros((2, 11), np.float32)),
                 KeyProjection(np.zeros(12, np.float32), np.eye(12, dtype=np.float32)[:4])):
        with pytest.raises(InputError, match="key projection does not fit: key_dim 12, at most 3 directions"):
            commit_update(path, projection=proj)
    e = random_entry(rng, spec)
    with pytest.raises(InputError, match="written and cleared"):
        commit_update(path, put={2: e}, clear=[2])
    assert path.read_bytes() == before  # nothing of a refused update lands
    with pytest.raises(InputError, match="calibration has 4 gates"):
        create_memory(tmp_path / "n.ekv", spec, 30_000, calibration=Calibration(0.1, (1.0,) * 4))
    # an int8 entry cannot go into an fp16 memory (its bytes would be read as halves)
    path16 = tmp_path / "h.ekv"
    create_memory(path16, small_spec("fp16"), 60_000).close()
    with pytest.raises(InputError, match="'k' is int8 but the memory's payload is fp16"):
        commit_update(path16, put={0: e})
    with pytest.raises(InputError, match="payload dtype must be 'int8', 'int4' or 'fp16'"):
        Entry.from_float(*random_kv(rng, spec), "int2")


@pytest.mark.parametrize("change, msg", [
    (dict(model_fingerprint="abc"), "64 hex characters"),
    (dict(model_fingerprint="zz" * 32), "64 hex characters"),
    (dict(payload_dtype="int2"), "payload_dtype must be 'int8', 'int4' or 'fp16'"),
    (dict(payload_dtype="int4", head_dim=7, rope=None), "'int4' packs two channels per byte and needs an even "
                                                         "head_dim, got 7"),
    (dict(num_layers=0), r"num_layers must be an integer in \[1, 1024\]"),
    (dict(head_dim=8.0), "head_dim must be an integer"),
    (dict(proj_max_dirs=65), "proj_max_dirs"),
    (dict(key_layer=4), r"key_layer must be in \[0, 3\]"),
    (dict(key_pooling="max"), "key_pooling must be one of"),
    (dict(rope=RopeSpec((1.0,) * 5)), "rotary dim 10 does not fit head_dim 8"),
])
def test_spec_validation(change, msg):
    with pytest.raises(InputError, match=msg):
        small_spec(**change)


def test_long_task_name_is_one_task(tmp_path):
    rng = np.random.default_rng(7)
    spec = small_spec()
    path = tmp_path / "m.ekv"
    create_memory(path, spec, 30_000).close()
    for s in range(3):
        commit_update(path, put={s: random_entry(rng, spec, LONG_TASK, "x" * 50)})
    with Memory(path) as mem:
        assert len(mem.tasks) == 1 and len(mem.tasks[0].encode()) == 32
        assert mem.tasks[0].startswith(LONG_TASK[:23] + "~")
        assert mem.per_task_counts() == {mem.tasks[0]: 3}
        assert mem.read_entry(2).task == mem.tasks[0]
        assert len(mem.read_entry(2).source_id.encode()) == 36


def test_open_reader_keeps_old_state_and_stale_temps_are_removed(tmp_path):
    rng = np.random.default_rng(8)
    spec = small_spec()
    path = tmp_path / "m.ekv"
    create_memory(path, spec, 30_000).close()
    old, new = random_entry(rng, spec, "a"), random_entry(rng, spec, "b")
    commit_update(path, put={0: old})
    stale = tmp_path / ".m.ekv.tmp-999999"
    stale.write_bytes(b"half-written")
    with Memory(path) as reader:
        commit_update(path, put={0: new}, clear=[])
        assert not stale.exists()
        assert_entry_equal(reader.read_entry(0), old)  # the mapped old state stays consistent
        assert reader.generation == 1
    with Memory(path) as mem:
        assert_entry_equal(mem.read_entry(0), new)
        assert mem.generation == 2 and mem.tasks == ["a", "b"]


def _mapped_rss_kb(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_read_slots_do_not_stay_resident(tmp_path):
    """A reader copies a slot out and unmaps its pages: reading every entry of a 24 MB memory
    leaves at most a few pages of it resident in this process (it was the whole file)."""
    rng = np.random.default_rng(0)
    spec = small_spec(num_layers=8, num_kv_heads=4, head_dim=64, pooled_len=64)  # ~260 KB per slot
    path = tmp_path / "big.ekv"
    create_memory(path, spec, 24 << 20).close()
    with Memory(path) as mem:
        n = mem.num_slots
    commit_update(path, {s: random_entry(rng, spec) for s in range(n)})
    with Memory(path) as mem:
        got = [mem.read_entry(s) for s in range(n)]
        keys = mem.read_keys()
        resident = _mapped_rss_kb(path)
        assert len(got) == n >= 80 and keys.shape == (n, spec.key_dim)
        assert resident * 1024 < 4 * spec.slot_bytes, (resident, spec.slot_bytes)
        again = mem.read_entry(n // 2)  # pages fault back in on a later read
        assert_entry_equal(again, got[n // 2])
