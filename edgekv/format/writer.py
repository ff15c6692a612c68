"""Writing a memory file: :func:`create_memory` and :func:`commit_update`, both atomic.

Invariants (``docs/memory-format.md``, "Updates: atomic, fixed size"):

* The file is created at its final size from a byte budget and never changes size:
  ``file_bytes = header_bytes + num_slots * (TABLE_ENTRY_BYTES + slot_bytes) <= budget``.
* Every update is atomic: the new state is written to a sibling temporary file, flushed
  and ``fsync``-ed, then renamed over the old one (and the directory fsync-ed). After a
  crash at any point the path holds either the old or the new state, checksums valid.
  A :class:`~edgekv.format.reader.Memory` opened before the rename keeps reading the old
  state (its descriptor holds the old file).
* One writer at a time (an advisory lock on ``PATH.lock``); readers take no lock.
* The writer always writes format version ``FORMAT_VERSION`` (2): a version-1 file is
  upgraded at its next commit (same sizes; the header gains ``top_k``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from edgekv.atomic import publish_file
from edgekv.errors import BudgetError, CorruptFileError, EdgeKVError, InputError, MismatchError
from edgekv.format.layout import (
    FLAG_OCCUPIED,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MAX_SLOTS,
    MAX_TASKS,
    MAX_TOP_K,
    PAYLOAD_CODES,
    POOLING_CODES,
    SOURCE_ID_BYTES,
    TABLE_ENTRY_BYTES,
    TASK_NAME_BYTES,
    Calibration,
    Entry,
    MemorySpec,
    _decode_name,
    _encode_name,
    _Header,
    _stored_crc32,
    _zeros_crc32,
    denser_hint,
)
from edgekv.format.reader import Memory
from edgekv.quant import QMAX_INT4, pack_int4
from edgekv.retrieval import KeyProjection


def _encode_header(h: _Header) -> bytes:
    s = h.spec
    rope = s.rope
    proj_n = len(h.projection.dirs)
    fixed = HEADER.pack(
        MAGIC, FORMAT_VERSION, s.header_bytes, h.budget_bytes, h.file_bytes, h.generation,
        bytes.fromhex(s.model_fingerprint),
        s.num_layers, s.num_kv_heads, s.head_dim, s.pooled_len, s.key_dim,
        PAYLOAD_CODES[s.payload_dtype], 1 if rope else 0, len(h.tasks),
        rope.rotary_dim if rope else 0, s.proj_max_dirs, proj_n,
        rope.attention_scaling if rope else 1.0, h.calibration.tau,
        h.num_slots, s.slot_bytes, h.table_offset, h.slots_offset, h.next_entry_id, h.table_crc32,
        s.key_layer, POOLING_CODES[s.key_pooling], h.top_k or 0,
    )
    dirs = np.zeros((s.proj_max_dirs, s.key_dim), np.float32)
    dirs[:proj_n] = h.projection.dirs
    parts = [
        fixed,
        np.asarray(h.calibration.gates, "<f4").tobytes(),
        np.asarray(rope.inv_freq if rope else [], "<f4").tobytes(),
        np.asarray(h.projection.mean, "<f4").tobytes(),
        dirs.astype("<f4").tobytes(),
        b"".join(_encode_name(t, TASK_NAME_BYTES) for t in h.tasks).ljust(MAX_TASKS * TASK_NAME_BYTES, b"\x00"),
    ]
    body = b"".join(parts).ljust(s.header_bytes - 4, b"\x00")
    return body + struct.pack("<I", zlib.crc32(body))


def _slot_bytes_of(entry: Entry, spec: MemorySpec) -> bytes:
    layout = spec.slot_layout()
    arrays = {"key": entry.key, "k": entry.k, "v": entry.v, "k_scale": entry.k_scale, "v_scale": entry.v_scale}
    int4 = spec.payload_dtype == "int4"
    buf = bytearray(spec.slot_bytes)
    for name, (off, nbytes, dt, shape) in layout.items():
        arr = arrays[name]
        if arr is None:
            raise InputError(f"entry has no '{name}' but the memory's payload is {spec.payload_dtype}")
        arr = np.asarray(arr)
        payload = name in ("k", "v")
        want = spec.payload_shape if int4 and payload else shape  # int4: the entry holds them unpacked
        if arr.shape != want:
            raise InputError(f"entry '{name}' has shape {arr.shape}, the memory expects {want}")
        if spec.payload_dtype == "int8" and payload and arr.dtype != np.int8:
            raise InputError(f"entry '{name}' must be int8 for an int8 memory (use Entry.from_float)")
        if int4 and payload and (arr.dtype != np.int8 or arr.min() < -QMAX_INT4 or arr.max() > QMAX_INT4):
            got = f"values in [{arr.min()}, {arr.max()}]" if arr.dtype == np.int8 else f"dtype {arr.dtype}"
            raise InputError(f"entry '{name}' must be int8 with values in [-{QMAX_INT4}, {QMAX_INT4}] for an int4 "
                             f"memory, got {got} (use Entry.from_float(..., payload_dtype='int4'))")
        if spec.payload_dtype == "fp16" and payload and arr.dtype == np.int8:
            raise InputError(f"entry '{name}' is int8 but the memory's payload is fp16 "
                             "(use Entry.from_float(..., payload_dtype='fp16'))")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise InputError(f"entry '{name}' contains NaN or inf")
        if int4 and payload:
            arr = pack_int4(arr)  # [L, H, m, D] -> [L, H, m, D//2] u8
        buf[off: off + nbytes] = np.ascontiguousarray(arr, dtype=dt).tobytes()
    return bytes(buf)


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= MAX_TOP_K):
        raise InputError(f"the memory's top_k (the k its calibration is fitted for) must be an integer in "
                         f"[1, {MAX_TOP_K}] or None, got {top_k!r}")


def _check_calibration(calibration: Calibration, num_layers: int) -> None:
    if len(calibration.gates) != num_layers:
        raise InputError(f"calibration has {len(calibration.gates)} gates, the memory has {num_layers} layers")
    if not (np.isfinite(calibration.tau) and calibration.tau > 0 and np.all(np.isfinite(calibration.gates))):
        raise InputError(f"calibration must have a finite tau > 0 and finite gates, got tau {calibration.tau}")


class _WriteLock:
    """One writer at a time per memory file (advisory flock on ``PATH.lock``)."""

    def __init__(self, path: str):
        self.lock_path = path + ".lock"

    def __enter__(self) -> _WriteLock:
        self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _tmp_path(path: str) -> str:
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}")


def _remove_stale_temps(path: str) -> None:
    d, name = os.path.split(os.path.abspath(path))
    for p in glob.glob(os.path.join(glob.escape(d), f".{glob.escape(name)}.tmp-*")):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _publish(tmp: str, path: str) -> None:
    """The rename + folder fsync (the one helper, edgekv.atomic); ``tmp`` is already fsync-ed."""
    publish_file(tmp, path, synced=True)



def create_memory(path: str | os.PathLike, spec: MemorySpec, budget_bytes: int,
                  calibration: Calibration | None = None, overwrite: bool = False,
                  top_k: int | None = None) -> Memory:
    """Create an empty memory at its final size for ``budget_bytes``; returns it opened.

    ``top_k``: the k (entries retrieved per query) ``calibration`` is fitted for, stored in the
    header for the runtime; None: not recorded.
    """
    path = os.fspath(path)
    n = spec.num_slots_for(budget_bytes)
    if n < 1:
        raise BudgetError(
            f"budget {budget_bytes} B is too small for one slot: a slot needs "
            f"{spec.header_bytes + TABLE_ENTRY_BYTES + spec.slot_bytes} B with the header "
            f"(lower EntryConfig.pooled_len{denser_hint(spec.payload_dtype, 'EntryConfig.payload_dtype int4')}, "
            f"or raise the budget)")
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path} already exists; adapt it in place or choose another path")
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder; give a file path for the memory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: folder {folder} does not exist")
    if n > MAX_SLOTS:
        raise BudgetError(f"budget {budget_bytes} B gives {n} slots; a memory holds at most {MAX_SLOTS}")
    file_bytes = spec.file_bytes_for(n)
    free = shutil.disk_usage(folder).free
    if 2 * file_bytes > free:  # the file fills up as slots are written, and each update writes a full copy
        raise BudgetError(f"a memory of budget {budget_bytes} B takes {file_bytes} B, and every update writes a "
                          f"second copy beside it; {folder} has {free} B free: lower the budget or free space")
    calibration = calibration or Calibration.default(spec.num_layers)
    _check_calibration(calibration, spec.num_layers)
    _check_top_k(top_k)
    h = _Header(spec, budget_bytes, file_bytes, 0, n, 0, _zeros_crc32(n * TABLE_ENTRY_BYTES), calibration,
                KeyProjection.identity(spec.key_dim), [], None if top_k is None else int(top_k))
    with _storage_errors(path, "create the memory"), _WriteLock(path):
        _remove_stale_temps(path)
        tmp = _tmp_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(_encode_header(h))
                f.truncate(h.file_bytes)  # table and slots: zeros (sparse where the FS allows)
                f.flush()
                os.fsync(f.fileno())
            _publish(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return Memory(path)


@contextlib.contextmanager
def _storage_errors(path: str, what: str):
    """The file system's refusals (disk full, read-only, permissions) as one-line edgekv errors.
    Raised before the rename, so the memory at ``path`` is unchanged."""
    try:
        yield
    except OSError as e:
        why = e.strerror or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise BudgetError(f"{path}: cannot {what}: {why}; the memory is unchanged (an update needs room "
                              f"for a full copy of the file beside it)") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise InputError(f"{path}: cannot {what}: {why}; the memory is unchanged") from None
        raise EdgeKVError(f"{path}: cannot {what}: {why}; the memory is unchanged") from None



def commit_update(path: str | os.PathLike, put: Mapping[int, Entry] | None = None,
                  clear: Iterable[int] = (), calibration: Calibration | None = None,
                  projection: KeyProjection | None = None, expect_generation: int | None = None,
                  before_publish: Callable[[int, int], None] | None = None,
                  after_publish: Callable[[int, int], None] | None = None,
                  top_k: int | None = None) -> int:
    """Atomically write ``put`` entries into their slots, empty ``clear`` slots, and/or
    replace the calibration and key projection. Returns the new generation.

    The file keeps its exact size. Either the whole update is visible afterwards, or
    (after a crash) none of it. ``expect_generation``: the generation the caller read
    before computing the update (a read-modify-write such as ``adapt``); if another
    writer committed since, nothing is written and a :class:`MismatchError` says so.
    ``top_k``: the k the (new) calibration is fitted for, recorded in the header; None keeps
    what the header records. The new state is written as format version 2 (a version-1 file
    is upgraded).

    ``before_publish(generation, header_crc32)`` / ``after_publish(...)``: called under the
    write lock with the new state's generation and header CRC32 (what
    :attr:`Memory.header_crc32` reads back), just before the new state becomes visible (its
    bytes are written and fsync-ed) and just after. A companion file that must match the
    memory (``adapt``'s anchors) is written there, so no other writer runs in between; if
    ``before_publish`` raises, nothing is published.
    """
    path = os.fspath(path)
    put = dict(put or {})
    clear = [int(c) for c in clear]
    if not os.path.isfile(path):  # say so before leaving a lock file next to nothing
        Memory(path).close()  # raises the reader's error (not found, folder, ...)
    with _storage_errors(path, "write the update"), _WriteLock(path):
        _remove_stale_temps(path)
        with Memory(path) as old:
            _check_update(path, old._h, put, clear, calibration, projection, expect_generation, top_k)
            new_h, table_raw, slot_data = _new_state(old, put, clear, calibration, projection, top_k)
        header_raw = _encode_header(new_h)
        header_crc = _write_copy_and_publish(path, new_h, header_raw, table_raw, slot_data, clear, before_publish)
        if after_publish is not None:
            after_publish(new_h.generation, header_crc)
    return new_h.generation


def _check_update(path: str, h: _Header, put: dict[int, Entry], clear: list[int], calibration: Calibration | None,
                  projection: KeyProjection | None, expect_generation: int | None, top_k: int | None) -> None:
    """Refuse an update that does not fit the memory read under the lock (``h``); entries are
    checked as they are encoded (:func:`_slot_bytes_of`)."""
    spec = h.spec
    for s in list(put) + clear:
        if not 0 <= int(s) < h.num_slots:
            raise InputError(f"slot {s} out of range: memory has {h.num_slots} slots")
    if set(put) & set(clear):
        raise InputError("a slot cannot be written and cleared in one update")
    if expect_generation is not None and h.generation != expect_generation:
        raise MismatchError(
            f"{path} changed while this update was prepared (now generation {h.generation}, the update "
            f"was computed from generation {expect_generation}: another writer committed in between); "
            f"nothing was written, run the update again")
    if calibration is not None:
        _check_calibration(calibration, spec.num_layers)
    if projection is not None:
        if projection.mean.shape != (spec.key_dim,) or projection.dirs.ndim != 2 \
                or projection.dirs.shape[1] != spec.key_dim or len(projection.dirs) > spec.proj_max_dirs:
            raise InputError(f"key projection does not fit: key_dim {spec.key_dim}, at most "
                             f"{spec.proj_max_dirs} directions")
        if not (np.all(np.isfinite(projection.mean)) and np.all(np.isfinite(projection.dirs))):
            raise InputError("key projection contains NaN or inf")
    _check_top_k(top_k)


def _new_state(old: Memory, put: dict[int, Entry], clear: list[int], calibration: Calibration | None,
               projection: KeyProjection | None, top_k: int | None) -> tuple[_Header, bytes, dict[int, bytes]]:
    """The next state: its header, its slot table's bytes, and the bytes of each written slot
    (ids, insertion sequence and task names assigned as docs/memory-format.md says)."""
    h = old._h
    spec = h.spec
    table = old.table.copy()
    tasks = list(h.tasks)
    slot_data = {}
    key_off, key_n, _, _ = spec.slot_layout()["key"]
    next_id, seq = h.next_entry_id, int(table["insert_seq"].max(initial=0))
    for s, e in sorted(put.items()):
        slot_data[s] = _slot_bytes_of(e, spec)
        task = _decode_name(_encode_name(e.task, TASK_NAME_BYTES))  # the name as stored
        if task not in tasks:
            if len(tasks) >= MAX_TASKS:
                raise BudgetError(f"a memory holds at most {MAX_TASKS} task names")
            tasks.append(task)
        seq += 1
        eid = e.entry_id if e.entry_id >= 0 else next_id
        next_id = max(next_id, eid + 1)
        table[s] = (FLAG_OCCUPIED, 0, tasks.index(task), zlib.crc32(slot_data[s]),
                    zlib.crc32(slot_data[s][key_off: key_off + key_n]), eid,
                    e.insert_seq if e.insert_seq >= 0 else seq,
                    _encode_name(e.source_id, SOURCE_ID_BYTES))
    for s in clear:
        table[s] = (0, 0, 0, 0, 0, 0, 0, b"")
    table_raw = table.tobytes()
    new_h = _Header(spec, h.budget_bytes, h.file_bytes, h.generation + 1, h.num_slots, next_id,
                    zlib.crc32(table_raw), calibration or h.calibration, projection or h.projection, tasks,
                    h.top_k if top_k is None else int(top_k))
    return new_h, table_raw, slot_data


def _write_copy_and_publish(path: str, new_h: _Header, header_raw: bytes, table_raw: bytes,
                            slot_data: dict[int, bytes], clear: list[int],
                            before_publish: Callable[[int, int], None] | None) -> int:
    """Copy the file beside itself, write the new state into the copy, fsync, check its size,
    call ``before_publish`` and rename the copy over ``path``. Returns the new header CRC32;
    on any error the copy is removed and ``path`` is untouched."""
    spec = new_h.spec
    tmp = _tmp_path(path)
    try:
        _copy_file(path, tmp)
        with open(tmp, "r+b") as f:
            for s, data in slot_data.items():
                f.seek(new_h.slots_offset + s * spec.slot_bytes)
                f.write(data)
            for s in clear:  # zero cleared slots so nothing stale stays readable
                f.seek(new_h.slots_offset + s * spec.slot_bytes)
                f.write(bytes(spec.slot_bytes))
            f.seek(new_h.table_offset)
            f.write(table_raw)
            f.seek(0)
            f.write(header_raw)
            f.flush()
            os.fsync(f.fileno())
        if os.path.getsize(tmp) != new_h.file_bytes:  # the invariant, checked before publishing
            raise CorruptFileError(f"internal error: update would change {path}'s size")
        header_crc = _stored_crc32(header_raw, len(header_raw))
        if before_publish is not None:
            before_publish(new_h.generation, header_crc)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return header_crc


def _copy_file(src: str, dst: str) -> None:
    """Byte copy, keeping holes cheap where the kernel can (copy_file_range)."""
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        size = os.fstat(fs.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                n = os.copy_file_range(fs.fileno(), fd.fileno(), size - copied)
                if n == 0:
                    break
                copied += n
        except (AttributeError, OSError):
            fs.seek(copied)
            fd.seek(copied)
            while chunk := fs.read(1 << 22):
                fd.write(chunk)
            copied = size
        if copied < size:
            raise CorruptFileError(f"{src}: short read while copying (file changed underneath?)")
