"""Reading a memory file: :class:`Memory`, a read-only view of one committed state.

Opening validates the header and the slot table (``docs/memory-format.md``, "What readers
validate") and decodes them into copies. The file stays open (a descriptor and a read-only
mapping), but nothing read from it stays mapped: the header and table pages are unmapped
once decoded (``madvise(MADV_DONTNEED)``; the page cache keeps them);
:meth:`Memory.read_keys` copies the key bytes out of the mapping and unmaps the pages it
copied from; :meth:`Memory.read_entry` reads one slot with ``pread`` into a buffer of its
own, without touching the mapping. A reader opened before an update keeps reading the state
it opened (its descriptor and mapping hold the old file after the rename).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import zlib
from collections.abc import Iterable

import numpy as np

from edgekv.errors import CorruptFileError, InputError
from edgekv.format.layout import (
    _LIMITS,
    _MAX_HEADER_BYTES,
    ALIGN,
    FLAG_OCCUPIED,
    HEADER,
    HEADER_FIELDS,
    MAGIC,
    MAX_TASKS,
    PAYLOAD_NAMES,
    POOLING_NAMES,
    READ_VERSIONS,
    TABLE_DTYPE,
    TASK_NAME_BYTES,
    Calibration,
    Entry,
    MemorySpec,
    _decode_name,
    _Header,
    _stored_crc32,
)
from edgekv.quant import unpack_int4
from edgekv.retrieval import KeyProjection
from edgekv.rope import RopeSpec


def _decode_header(buf: bytes | mmap.mmap, actual_size: int, path: str) -> _Header:
    """The header of a file of ``actual_size`` bytes, every field checked before anything is sized
    by it (docs/memory-format.md, "What readers validate", steps 2 to 8)."""
    f, body = _read_fixed(buf, actual_size, path)
    # From here fields are as written by edgekv; still check them before sizing anything.
    _check_fields(f, path)
    spec, calibration, projection, tasks = _decode_arrays(f, body, path)
    top_k = (f["top_k"] or None) if f["version"] >= 2 else None  # version 1 does not record it
    h = _Header(spec, f["budget_bytes"], f["file_bytes"], f["generation"], f["num_slots"], f["next_entry_id"],
                f["table_crc32"], calibration, projection, tasks, top_k, f["version"])
    _check_sizes(h, f, actual_size, path)
    return h


def _read_fixed(buf: bytes | mmap.mmap, actual_size: int, path: str) -> tuple[dict, bytes]:
    """The fixed part's fields by name and the header's bytes before its CRC; checks the magic,
    the version, the header length and the header CRC32."""
    if actual_size < HEADER.size:
        raise CorruptFileError(f"{path}: file is {actual_size} bytes, too small to be an edgekv memory (truncated?)")
    f = dict(zip(HEADER_FIELDS, HEADER.unpack_from(buf, 0), strict=True))
    if f["magic"] != MAGIC:
        raise CorruptFileError(f"{path}: not an edgekv memory file (bad magic {f['magic']!r})")
    if f["version"] not in READ_VERSIONS:
        raise CorruptFileError(
            f"{path}: memory format version {f['version']} is not supported; this edgekv reads versions "
            f"{', '.join(map(str, READ_VERSIONS))} (upgrade edgekv or rebuild the memory)")
    header_bytes = f["header_bytes"]
    if not HEADER.size < header_bytes <= min(actual_size, _MAX_HEADER_BYTES) or header_bytes % ALIGN:
        raise CorruptFileError(f"{path}: header length field {header_bytes} is invalid (corrupt header or truncated file)")
    body = bytes(buf[: header_bytes - 4])
    (stored_crc,) = struct.unpack_from("<I", buf, header_bytes - 4)
    if zlib.crc32(body) != stored_crc:
        raise CorruptFileError(f"{path}: header checksum mismatch (corrupt header)")
    return f, body


def _check_fields(f: dict, path: str) -> None:
    """Codes, counts and the calibration scalars of a checksummed fixed part."""
    if f["payload_code"] not in PAYLOAD_NAMES or f["pooling_code"] not in POOLING_NAMES \
            or f["rope_kind"] not in (0, 1) or f["num_tasks"] > MAX_TASKS or f["proj_num_dirs"] > f["proj_max_dirs"]:
        raise CorruptFileError(f"{path}: header holds invalid field values")
    if f["rope_kind"] and (f["rotary_dim"] == 0 or f["rotary_dim"] % 2):
        raise CorruptFileError(f"{path}: header holds an invalid rotary dim {f['rotary_dim']}")
    if f["num_slots"] < 1:
        raise CorruptFileError(f"{path}: header says the memory has no slots (corrupt header)")
    tau, att_scale = f["tau"], f["attention_scaling"]
    if not (np.isfinite(tau) and tau > 0 and np.isfinite(att_scale)):
        raise CorruptFileError(f"{path}: header holds a non-finite or non-positive tau / RoPE scaling (corrupt header)")
    for name in ("num_layers", "num_kv_heads", "head_dim", "pooled_len", "key_dim", "proj_max_dirs"):
        if not (0 if name == "proj_max_dirs" else 1) <= f[name] <= _LIMITS[name]:
            raise CorruptFileError(f"{path}: header field {name}={f[name]} is out of range")


def _decode_arrays(f: dict, body: bytes, path: str
                   ) -> tuple[MemorySpec, Calibration, KeyProjection, list[str]]:
    """The arrays after the fixed part (gates, inv_freq, projection, task names) and the spec."""
    header_bytes, pos = f["header_bytes"], HEADER.size
    L, R, pmax = f["num_layers"], f["key_dim"], f["proj_max_dirs"]

    def take(n: int) -> np.ndarray:
        nonlocal pos
        if pos + 4 * n > header_bytes - 4:
            raise CorruptFileError(f"{path}: header arrays overrun the header (corrupt header)")
        arr = np.frombuffer(body, "<f4", n, pos).astype(np.float32)
        pos += 4 * n
        if not np.all(np.isfinite(arr)):
            raise CorruptFileError(f"{path}: header arrays hold NaN or inf (corrupt header)")
        return arr

    try:
        gates = take(L)
        inv_freq = take(f["rotary_dim"] // 2) if f["rope_kind"] else None
        mean = take(R)
        dirs = take(pmax * R).reshape(pmax, R)[: f["proj_num_dirs"]]
        names_off = pos
        if names_off + MAX_TASKS * TASK_NAME_BYTES > header_bytes - 4:
            raise CorruptFileError(f"{path}: task table overruns the header (corrupt header)")
        tasks = [_decode_name(body[names_off + i * TASK_NAME_BYTES: names_off + (i + 1) * TASK_NAME_BYTES])
                 for i in range(f["num_tasks"])]
        rope = RopeSpec(tuple(float(x) for x in inv_freq), float(f["attention_scaling"])) if f["rope_kind"] else None
        spec = MemorySpec(L, f["num_kv_heads"], f["head_dim"], f["pooled_len"], R, f["fingerprint"].hex(),
                          PAYLOAD_NAMES[f["payload_code"]], rope, pmax, f["key_layer"], POOLING_NAMES[f["pooling_code"]])
    except InputError as e:
        raise CorruptFileError(f"{path}: header is inconsistent ({e})") from None
    return spec, Calibration(float(f["tau"]), tuple(float(g) for g in gates)), KeyProjection(mean, dirs), tasks


def _check_sizes(h: _Header, f: dict, actual_size: int, path: str) -> None:
    """Sizes and offsets the shapes and the slot count give, the budget, and the file's length."""
    spec, file_bytes, budget = h.spec, f["file_bytes"], f["budget_bytes"]
    if spec.header_bytes != f["header_bytes"] or spec.slot_bytes != f["slot_bytes"]:
        raise CorruptFileError(f"{path}: header sizes disagree with its shapes (corrupt header)")
    if f["table_offset"] != h.table_offset or f["slots_offset"] != h.slots_offset \
            or file_bytes != spec.file_bytes_for(h.num_slots):
        raise CorruptFileError(f"{path}: header offsets disagree with its slot count (corrupt header)")
    if file_bytes > budget:
        raise CorruptFileError(f"{path}: file size {file_bytes} exceeds its budget {budget} (corrupt header)")
    if actual_size != file_bytes:
        what = "truncated" if actual_size < file_bytes else "has trailing bytes"
        raise CorruptFileError(f"{path}: file is {actual_size} bytes but its header says {file_bytes} ({what})")


# ---------------------------------------------------------------------------------
# the memory, read side
# ---------------------------------------------------------------------------------
RELEASE_ALIGN = 2 << 20  # Memory._release unmaps whole 2 MiB windows (the largest page-cache folio on x86-64)


class Memory:
    """A read-only view of one committed state of a ``.ekv`` file.

    Opening checks the header and the slot table and decodes them into copies; the file is
    then kept open as a descriptor and a read-only mapping, and the pages of the header and
    table are unmapped (:meth:`_release`). :meth:`read_keys` copies the key bytes out of the
    mapping and unmaps the pages it copied from; :meth:`read_entry` reads a slot with
    ``pread`` into a buffer of its own (where ``os.preadv`` is missing: a copy out of the
    mapping, whose pages are then unmapped). So resident memory does not grow with the slots
    read, and everything returned owns its memory, valid after :meth:`close`.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise InputError(f"{self.path}: memory file not found") from None
        except OSError as e:
            raise InputError(f"{self.path}: cannot open memory file ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{self.path}: not a regular file, cannot be a memory file")
            size = st.st_size
            if size == 0:
                raise CorruptFileError(f"{self.path}: file is empty, not an edgekv memory")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd  # slots are read with pread: no mapping left behind to grow resident memory
        try:
            self._h = _decode_header(self._mm, size, self.path)
            table_raw = self._mm[self._h.table_offset: self._h.slots_offset]
            if zlib.crc32(table_raw) != self._h.table_crc32:
                raise CorruptFileError(f"{self.path}: slot table checksum mismatch (corrupt table)")
            self.table = np.frombuffer(table_raw, TABLE_DTYPE).copy()
            occ = self.table["flags"] & FLAG_OCCUPIED != 0
            if np.any(self.table["task"][occ] >= len(self._h.tasks)):
                raise CorruptFileError(f"{self.path}: slot table names a task that does not exist")
            self._header_crc32 = _stored_crc32(self._mm, self._h.spec.header_bytes)
            self._release(0, self._h.slots_offset)  # header and table are decoded into copies
        except BaseException:
            self.close()
            raise

    # --- header views -------------------------------------------------------------
    spec = property(lambda self: self._h.spec)
    num_slots = property(lambda self: self._h.num_slots)
    budget_bytes = property(lambda self: self._h.budget_bytes)
    file_bytes = property(lambda self: self._h.file_bytes)
    generation = property(lambda self: self._h.generation)
    calibration = property(lambda self: self._h.calibration)
    projection = property(lambda self: self._h.projection)
    tasks = property(lambda self: list(self._h.tasks))
    next_entry_id = property(lambda self: self._h.next_entry_id)
    format_version = property(lambda self: self._h.format_version)
    top_k = property(lambda self: self._h.top_k,
                     doc="The k (entries retrieved per query) the calibration was fitted for; None when the "
                         "file does not record it (format version 1, or written without one).")

    @property
    def header_crc32(self) -> int:
        """The header's CRC32: identifies this committed state (generation, table, calibration, ...)."""
        return self._header_crc32

    def occupied(self) -> np.ndarray:
        """Indices of occupied slots, ascending. [n] int64"""
        return np.flatnonzero(self.table["flags"] & FLAG_OCCUPIED).astype(np.int64)

    @property
    def num_used(self) -> int:
        return int(np.count_nonzero(self.table["flags"] & FLAG_OCCUPIED))

    def per_task_counts(self) -> dict[str, int]:
        occ = self.occupied()
        counts = {t: 0 for t in self._h.tasks}
        for i in self.table["task"][occ]:
            counts[self._h.tasks[i]] += 1
        return counts

    def slot_info(self, slot: int) -> dict:
        self._check_range(slot)
        row = self.table[slot]
        occ = bool(row["flags"] & FLAG_OCCUPIED)
        return {"slot": int(slot), "occupied": occ, "entry_id": int(row["entry_id"]),
                "task": self._h.tasks[row["task"]] if occ else None,
                "source_id": _decode_name(bytes(row["source_id"])), "insert_seq": int(row["insert_seq"])}

    # --- slot reads ---------------------------------------------------------------
    def _check_range(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise InputError(f"slot {slot} out of range: memory has {self.num_slots} slots")

    def _slot_range(self, slot: int) -> tuple[int, int]:
        self._check_range(slot)
        start = self._h.slots_offset + slot * self.spec.slot_bytes
        return start, start + self.spec.slot_bytes

    def _check_occupied(self, slot: int) -> None:
        self._check_range(slot)
        if not self.table["flags"][slot] & FLAG_OCCUPIED:
            raise InputError(f"slot {slot} is empty")

    def read_keys(self, slots: Iterable[int] | None = None, verify: bool = True) -> np.ndarray:
        """Raw retrieval keys of ``slots`` (default: all occupied). -> [n, R] f32.

        Reads only the key bytes of each slot (and checks their CRC32), copied out of the
        mapping; the pages they were copied from are then unmapped.
        """
        slots = self.occupied() if slots is None else np.asarray(list(slots), np.int64)
        off, nbytes, _, _ = self.spec.slot_layout()["key"]
        out = np.empty((len(slots), self.spec.key_dim), np.float32)
        for i, s in enumerate(slots):
            self._check_occupied(int(s))
            start, _ = self._slot_range(int(s))
            raw = self._mm[start + off: start + off + nbytes]
            if verify and zlib.crc32(raw) != int(self.table["key_crc32"][s]):
                raise CorruptFileError(f"{self.path}: retrieval key of slot {s} fails its checksum (corrupt slot)")
            out[i] = np.frombuffer(raw, "<f4")
        if len(slots):  # one unmapping over the span the keys were copied from, not one per key
            lo = self._slot_range(int(slots.min()))[0] + off
            self._release(lo, self._slot_range(int(slots.max()))[0] + off + nbytes - lo)
        return out

    def _read_bytes(self, offset: int, length: int) -> bytearray:
        """``length`` bytes of the file at ``offset``, read with pread into a new buffer (one copy,
        nothing mapped; a file cut short under the reader is an error, not a SIGBUS)."""
        if not hasattr(os, "preadv"):  # no positional read: the mapping, then release its pages
            raw = bytearray(self._mm[offset: offset + length])
            self._release(offset, length)
            return raw
        raw = bytearray(length)
        try:
            got = os.preadv(self._fd, [raw], offset)
        except OSError as e:
            raise CorruptFileError(f"{self.path}: cannot read a slot ({e.strerror})") from None
        if got != length:
            raise CorruptFileError(f"{self.path}: file ends inside a slot (truncated while open?)")
        return raw

    def _release(self, offset: int, length: int) -> None:
        """Unmap the pages of file bytes [offset, offset+length) once they have been copied out, so
        a long-running reader's resident memory does not grow with the slots it has read (the page
        cache keeps them; a later read faults them back in). Best effort: a no-op where madvise is
        missing."""
        if not hasattr(mmap, "MADV_DONTNEED") or length <= 0:
            return
        # a fault maps the whole page-cache folio around the bytes read (up to 2 MiB): unmap that too
        lo = offset - offset % RELEASE_ALIGN
        hi = min(-(-(offset + length) // RELEASE_ALIGN) * RELEASE_ALIGN, len(self._mm))
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass

    def read_entry(self, slot: int, verify: bool = True) -> Entry:
        """The full entry in ``slot`` (checks the slot CRC32)."""
        slot = int(slot)
        self._check_occupied(slot)
        start, end = self._slot_range(slot)
        raw = self._read_bytes(start, end - start)
        if verify and zlib.crc32(raw) != int(self.table["crc32"][slot]):
            raise CorruptFileError(f"{self.path}: slot {slot} fails its checksum (corrupt slot)")
        parts = {name: np.frombuffer(raw, dt, int(np.prod(shape)), off).reshape(shape)  # views of raw (owned)
                 for name, (off, _, dt, shape) in self.spec.slot_layout().items()}
        if self.spec.payload_dtype == "int4":  # [L, H, m, D//2] u8 -> [L, H, m, D] i8 in [-7, 7]
            parts["k"], parts["v"] = unpack_int4(parts["k"]), unpack_int4(parts["v"])
        info = self.slot_info(slot)
        return Entry(parts["key"], parts["k"], parts["v"], parts.get("k_scale"), parts.get("v_scale"),
                     info["task"], info["source_id"], info["entry_id"], info["insert_seq"])

    def fileno(self) -> int:
        """The descriptor this reader reads through (for hashing exactly these bytes: edgekv.signing)."""
        return self._fd

    def verify(self) -> None:
        """Check every occupied slot's checksums (reads the whole file)."""
        for s in self.occupied():
            self.read_entry(int(s))
            self.read_keys([int(s)])

    def close(self) -> None:
        self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # a reader dropped without close() must not leak its descriptor
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_memory(path: str | os.PathLike) -> Memory:
    return Memory(path)
