"""The edgekv memory file (``.ekv``, format version 1): the only module that touches its bytes.

``docs/memory-format.md`` describes every byte; this module is the reference reader and
writer. Invariants:

* The file is created at its final size from a byte budget and never changes size:
  ``file_bytes = header_bytes + num_slots * (TABLE_ENTRY_BYTES + slot_bytes) <= budget``.
* Every update is atomic: the new state is written to a sibling temporary file, flushed
  and ``fsync``-ed, then renamed over the old one (and the directory fsync-ed). After a
  crash at any point the path holds either the old or the new state, checksums valid.
  Readers that have the old file mapped keep a consistent old view.
* Reading maps the file and touches only the header, the slot table and the slots asked
  for; ``read_keys`` touches only the keys.
* Header and table carry CRC32s, every slot carries a CRC32 of its bytes and one of its
  retrieval key; a mismatch is a :class:`CorruptFileError` that names the part.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import mmap
import os
import shutil
import stat
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgekv.atomic import publish_file
from edgekv.errors import BudgetError, CorruptFileError, EdgeKVError, InputError, MismatchError
from edgekv.quant import quantize_keys, quantize_values
from edgekv.retrieval import KeyProjection
from edgekv.rope import RopeSpec

MAGIC = b"EDGEKVM\x00"
FORMAT_VERSION = 1
ALIGN = 64
MAX_TASKS = 256
TASK_NAME_BYTES = 32
SOURCE_ID_BYTES = 36
PAYLOAD_CODES = {"int8": 1, "fp16": 2}
PAYLOAD_NAMES = {v: k for k, v in PAYLOAD_CODES.items()}
POOLING_CODES = {"mean": 1, "last": 2}
POOLING_NAMES = {v: k for k, v in POOLING_CODES.items()}

# Fixed part of the header. Arrays follow it (see docs/memory-format.md).
HEADER = struct.Struct(
    "<8s I I Q Q Q 32s"  # magic, version, header_bytes, budget, file_bytes, generation, fingerprint
    " I I I I I"  # num_layers, num_kv_heads, head_dim, pooled_len, key_dim
    " B B H I I I"  # payload code, rope kind, num_tasks, rotary_dim, proj_max_dirs, proj_num_dirs
    " f f"  # attention_scaling, tau
    " I I Q Q Q I"  # num_slots, slot_bytes, table_offset, slots_offset, next_entry_id, table_crc32
    " I B 3x"  # key_layer, key pooling code
)
# One slot-table row: flags, reserved, task index, slot crc32, key crc32, entry id,
# insertion sequence, source example id (UTF-8, NUL padded).
TABLE_ENTRY = struct.Struct(f"<B B H I I Q Q {SOURCE_ID_BYTES}s")
TABLE_ENTRY_BYTES = TABLE_ENTRY.size  # 64
TABLE_DTYPE = np.dtype(
    [("flags", "u1"), ("reserved", "u1"), ("task", "<u2"), ("crc32", "<u4"), ("key_crc32", "<u4"),
     ("entry_id", "<u8"), ("insert_seq", "<u8"), ("source_id", f"S{SOURCE_ID_BYTES}")]
)
FLAG_OCCUPIED = 1

# Sanity limits checked before any size derived from a header field is used.
_LIMITS = {"num_layers": 1024, "num_kv_heads": 1024, "head_dim": 4096, "pooled_len": 1 << 16,
           "key_dim": 1 << 16, "proj_max_dirs": 64}
_MAX_HEADER_BYTES = 1 << 26
MAX_SLOTS = 0xFFFFFFFF  # num_slots is a u32


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class MemorySpec:
    """Shapes of one memory: what every slot holds. Fixed at creation."""

    num_layers: int  # L
    num_kv_heads: int  # H
    head_dim: int  # D
    pooled_len: int  # m, KV positions per entry
    key_dim: int  # R, retrieval-key dimension
    model_fingerprint: str  # 64 hex chars: sha256 of the backbone the entries came from
    payload_dtype: str = "int8"  # "int8" (per-channel K, per-token V scales) or "fp16"
    rope: RopeSpec | None = None  # None: keys are stored as computed (model without RoPE)
    proj_max_dirs: int = 8  # capacity of the stored key projection (directions removed)
    key_layer: int = 1  # hidden-state layer the retrieval key pools (0 = embeddings)
    key_pooling: str = "mean"  # how the key pools tokens: mean | last

    def __post_init__(self) -> None:
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            low = 0 if name == "proj_max_dirs" else 1
            if not isinstance(value, (int, np.integer)) or not low <= value <= limit:
                raise InputError(f"MemorySpec.{name} must be an integer in [{low}, {limit}], got {value!r}")
        if not isinstance(self.key_layer, (int, np.integer)) or not 0 <= self.key_layer <= self.num_layers:
            raise InputError(f"MemorySpec.key_layer must be in [0, {self.num_layers}], got {self.key_layer!r}")
        if self.key_pooling not in POOLING_CODES:
            raise InputError(f"MemorySpec.key_pooling must be one of {sorted(POOLING_CODES)}, got {self.key_pooling!r}")
        if self.payload_dtype not in PAYLOAD_CODES:
            raise InputError(f"MemorySpec.payload_dtype must be 'int8' or 'fp16', got {self.payload_dtype!r}")
        try:
            fp = bytes.fromhex(self.model_fingerprint)
        except ValueError:
            fp = b""
        if len(fp) != 32:
            raise InputError("MemorySpec.model_fingerprint must be 64 hex characters (a sha256)")
        if self.rope is not None and not 0 < self.rope.rotary_dim <= self.head_dim:
            raise InputError(f"rotary dim {self.rope.rotary_dim} does not fit head_dim {self.head_dim}")

    # --- slot layout -------------------------------------------------------------
    @property
    def payload_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_kv_heads, self.pooled_len, self.head_dim)

    def slot_layout(self) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
        """name -> (offset in slot, nbytes, dtype, shape), in on-disk order."""
        L, H, m, D = self.payload_shape
        parts: list[tuple[str, str, tuple[int, ...]]] = [("key", "<f4", (self.key_dim,))]
        if self.payload_dtype == "int8":
            parts += [("k", "i1", (L, H, m, D)), ("v", "i1", (L, H, m, D)),
                      ("k_scale", "<f2", (L, H, D)), ("v_scale", "<f2", (L, H, m))]
        else:
            parts += [("k", "<f2", (L, H, m, D)), ("v", "<f2", (L, H, m, D))]
        layout, off = {}, 0
        for name, dt, shape in parts:
            nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
            layout[name] = (off, nbytes, dt, shape)
            off += nbytes
        return layout

    @property
    def slot_bytes(self) -> int:
        last = list(self.slot_layout().values())[-1]
        return _align(last[0] + last[1])

    @property
    def header_bytes(self) -> int:
        rd2 = self.rope.rotary_dim // 2 if self.rope else 0
        arrays = 4 * (self.num_layers + rd2 + self.key_dim + self.proj_max_dirs * self.key_dim)
        return _align(HEADER.size + arrays + MAX_TASKS * TASK_NAME_BYTES + 4)

    def num_slots_for(self, budget_bytes: int) -> int:
        """Slots that fit: floor((budget - header) / (table entry + slot))."""
        return max(0, (budget_bytes - self.header_bytes) // (TABLE_ENTRY_BYTES + self.slot_bytes))

    def file_bytes_for(self, num_slots: int) -> int:
        return self.header_bytes + num_slots * (TABLE_ENTRY_BYTES + self.slot_bytes)


@dataclass(frozen=True)
class Calibration:
    """phi made concrete: tau (retrieval temperature) and lambda_l (value gate per layer)."""

    tau: float
    gates: tuple[float, ...]

    @staticmethod
    def default(num_layers: int, tau: float = 0.05) -> Calibration:
        return Calibration(tau=tau, gates=(1.0,) * num_layers)


@dataclass
class Entry:
    """One memory entry as stored in a slot.

    key: [R] f32 raw pooled hidden state; k, v: [L, H, m, D] int8 (with k_scale [L, H, D],
    v_scale [L, H, m] f16) or float16 (scales None). Keys are position-free.
    """

    key: np.ndarray
    k: np.ndarray
    v: np.ndarray
    k_scale: np.ndarray | None = None
    v_scale: np.ndarray | None = None
    task: str = ""
    source_id: str = ""
    entry_id: int = -1  # assigned at commit when negative
    insert_seq: int = -1  # assigned at commit when negative

    @staticmethod
    def from_float(key: np.ndarray, k: np.ndarray, v: np.ndarray, payload_dtype: str = "int8",
                   task: str = "", source_id: str = "") -> Entry:
        """Quantise float K/V [L, H, m, D] into an entry of the given payload dtype."""
        if payload_dtype not in PAYLOAD_CODES:
            raise InputError(f"payload dtype must be 'int8' or 'fp16', got {payload_dtype!r}")
        if payload_dtype == "int8":
            kq, ks = quantize_keys(k)
            vq, vs = quantize_values(v)
            return Entry(np.asarray(key, np.float32), kq, vq, ks, vs, task, source_id)
        return Entry(np.asarray(key, np.float32), np.asarray(k, np.float16),
                     np.asarray(v, np.float16), None, None, task, source_id)


@dataclass
class _Header:
    spec: MemorySpec
    budget_bytes: int
    file_bytes: int
    generation: int
    num_slots: int
    next_entry_id: int
    table_crc32: int
    calibration: Calibration
    projection: KeyProjection
    tasks: list[str] = field(default_factory=list)

    @property
    def table_offset(self) -> int:
        return self.spec.header_bytes

    @property
    def slots_offset(self) -> int:
        return self.table_offset + self.num_slots * TABLE_ENTRY_BYTES


# ---------------------------------------------------------------------------------
# header encode / decode
# ---------------------------------------------------------------------------------
def _encode_name(text: str, size: int) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > size:
        # keep it unique and readable: prefix + short hash
        digest = zlib.crc32(raw).to_bytes(4, "big").hex()
        raw = raw[: size - 9].decode("utf-8", "ignore").encode("utf-8") + b"~" + digest.encode()
    return raw.ljust(size, b"\x00")


def _decode_name(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "replace")


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
        s.key_layer, POOLING_CODES[s.key_pooling],
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


def _decode_header(buf: bytes | mmap.mmap, actual_size: int, path: str) -> _Header:
    if actual_size < HEADER.size:
        raise CorruptFileError(f"{path}: file is {actual_size} bytes, too small to be an edgekv memory (truncated?)")
    f = HEADER.unpack_from(buf, 0)
    (magic, version, header_bytes, budget, file_bytes, generation, fp, L, H, D, m, R, pcode,
     rope_kind, num_tasks, rotary_dim, pmax, pn, att_scale, tau, num_slots, slot_bytes,
     table_off, slots_off, next_id, table_crc, key_layer, pool_code) = f
    if magic != MAGIC:
        raise CorruptFileError(f"{path}: not an edgekv memory file (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise CorruptFileError(
            f"{path}: memory format version {version} is not supported; this edgekv reads version "
            f"{FORMAT_VERSION} (upgrade edgekv or rebuild the memory)")
    if not HEADER.size < header_bytes <= min(actual_size, _MAX_HEADER_BYTES) or header_bytes % ALIGN:
        raise CorruptFileError(f"{path}: header length field {header_bytes} is invalid (corrupt header or truncated file)")
    body = bytes(buf[: header_bytes - 4])
    (stored_crc,) = struct.unpack_from("<I", buf, header_bytes - 4)
    if zlib.crc32(body) != stored_crc:
        raise CorruptFileError(f"{path}: header checksum mismatch (corrupt header)")
    # From here fields are as written by edgekv; still check them before sizing anything.
    if pcode not in PAYLOAD_NAMES or pool_code not in POOLING_NAMES or rope_kind not in (0, 1) or num_tasks > MAX_TASKS or pn > pmax:
        raise CorruptFileError(f"{path}: header holds invalid field values")
    if rope_kind and (rotary_dim == 0 or rotary_dim % 2):
        raise CorruptFileError(f"{path}: header holds an invalid rotary dim {rotary_dim}")
    if num_slots < 1:
        raise CorruptFileError(f"{path}: header says the memory has no slots (corrupt header)")
    if not (np.isfinite(tau) and tau > 0 and np.isfinite(att_scale)):
        raise CorruptFileError(f"{path}: header holds a non-finite or non-positive tau / RoPE scaling (corrupt header)")
    pos = HEADER.size

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
        for name, value in (("num_layers", L), ("num_kv_heads", H), ("head_dim", D),
                            ("pooled_len", m), ("key_dim", R), ("proj_max_dirs", pmax)):
            if not (0 if name == "proj_max_dirs" else 1) <= value <= _LIMITS[name]:
                raise CorruptFileError(f"{path}: header field {name}={value} is out of range")
        gates = take(L)
        inv_freq = take(rotary_dim // 2) if rope_kind else None
        mean = take(R)
        dirs = take(pmax * R).reshape(pmax, R)[:pn]
        names_off = pos
        if names_off + MAX_TASKS * TASK_NAME_BYTES > header_bytes - 4:
            raise CorruptFileError(f"{path}: task table overruns the header (corrupt header)")
        tasks = [_decode_name(body[names_off + i * TASK_NAME_BYTES: names_off + (i + 1) * TASK_NAME_BYTES])
                 for i in range(num_tasks)]
        rope = RopeSpec(tuple(float(x) for x in inv_freq), float(att_scale)) if rope_kind else None
        spec = MemorySpec(L, H, D, m, R, fp.hex(), PAYLOAD_NAMES[pcode], rope, pmax, key_layer,
                          POOLING_NAMES[pool_code])
    except InputError as e:
        raise CorruptFileError(f"{path}: header is inconsistent ({e})") from None
    h = _Header(spec, budget, file_bytes, generation, num_slots, next_id, table_crc,
                Calibration(float(tau), tuple(float(g) for g in gates)), KeyProjection(mean, dirs), tasks)
    if spec.header_bytes != header_bytes or spec.slot_bytes != slot_bytes:
        raise CorruptFileError(f"{path}: header sizes disagree with its shapes (corrupt header)")
    if table_off != h.table_offset or slots_off != h.slots_offset or file_bytes != spec.file_bytes_for(num_slots):
        raise CorruptFileError(f"{path}: header offsets disagree with its slot count (corrupt header)")
    if file_bytes > budget:
        raise CorruptFileError(f"{path}: file size {file_bytes} exceeds its budget {budget} (corrupt header)")
    if actual_size != file_bytes:
        what = "truncated" if actual_size < file_bytes else "has trailing bytes"
        raise CorruptFileError(f"{path}: file is {actual_size} bytes but its header says {file_bytes} ({what})")
    return h


# ---------------------------------------------------------------------------------
# the memory, read side
# ---------------------------------------------------------------------------------
RELEASE_ALIGN = 2 << 20  # Memory._release unmaps whole 2 MiB windows (the largest page-cache folio on x86-64)


class Memory:
    """A read-only, memory-mapped view of one committed state of a ``.ekv`` file.

    Use as a context manager or call :meth:`close`. Arrays returned are copies, so they
    stay valid after close.
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

    @property
    def header_crc32(self) -> int:
        """The header's CRC32: identifies this committed state (generation, table, calibration, ...)."""
        return struct.unpack_from("<I", self._mm, self.spec.header_bytes - 4)[0]

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

        Touches only the key bytes of each slot (and checks their CRC32).
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
        info = self.slot_info(slot)
        return Entry(parts["key"], parts["k"], parts["v"], parts.get("k_scale"), parts.get("v_scale"),
                     info["task"], info["source_id"], info["entry_id"], info["insert_seq"])

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


# ---------------------------------------------------------------------------------
# the memory, write side (atomic)
# ---------------------------------------------------------------------------------
def _slot_bytes_of(entry: Entry, spec: MemorySpec) -> bytes:
    layout = spec.slot_layout()
    arrays = {"key": entry.key, "k": entry.k, "v": entry.v, "k_scale": entry.k_scale, "v_scale": entry.v_scale}
    buf = bytearray(spec.slot_bytes)
    for name, (off, nbytes, dt, shape) in layout.items():
        arr = arrays[name]
        if arr is None:
            raise InputError(f"entry has no '{name}' but the memory's payload is {spec.payload_dtype}")
        arr = np.asarray(arr)
        if arr.shape != shape:
            raise InputError(f"entry '{name}' has shape {arr.shape}, the memory expects {shape}")
        if spec.payload_dtype == "int8" and name in ("k", "v") and arr.dtype != np.int8:
            raise InputError(f"entry '{name}' must be int8 for an int8 memory (use Entry.from_float)")
        if spec.payload_dtype == "fp16" and name in ("k", "v") and arr.dtype == np.int8:
            raise InputError(f"entry '{name}' is int8 but the memory's payload is fp16 "
                             "(use Entry.from_float(..., payload_dtype='fp16'))")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise InputError(f"entry '{name}' contains NaN or inf")
        buf[off: off + nbytes] = np.ascontiguousarray(arr, dtype=dt).tobytes()
    return bytes(buf)


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
                  calibration: Calibration | None = None, overwrite: bool = False) -> Memory:
    """Create an empty memory at its final size for ``budget_bytes``; returns it opened."""
    path = os.fspath(path)
    n = spec.num_slots_for(budget_bytes)
    if n < 1:
        raise BudgetError(
            f"budget {budget_bytes} B is too small for one slot: a slot needs "
            f"{spec.header_bytes + TABLE_ENTRY_BYTES + spec.slot_bytes} B with the header "
            f"(lower --pooled-len, use int8 payloads, or raise the budget)")
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
    h = _Header(spec, budget_bytes, file_bytes, 0, n, 0, _zeros_crc32(n * TABLE_ENTRY_BYTES), calibration,
                KeyProjection.identity(spec.key_dim), [])
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


def _zeros_crc32(nbytes: int) -> int:
    """CRC32 of ``nbytes`` zero bytes, without allocating them."""
    chunk, crc = bytes(min(nbytes, 1 << 20)), 0
    while nbytes > 0:
        crc = zlib.crc32(chunk[: min(nbytes, len(chunk))], crc)
        nbytes -= len(chunk)
    return crc


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
                  after_publish: Callable[[int, int], None] | None = None) -> int:
    """Atomically write ``put`` entries into their slots, empty ``clear`` slots, and/or
    replace the calibration and key projection. Returns the new generation.

    The file keeps its exact size. Either the whole update is visible afterwards, or
    (after a crash) none of it. ``expect_generation``: the generation the caller read
    before computing the update (a read-modify-write such as ``adapt``); if another
    writer committed since, nothing is written and a :class:`MismatchError` says so.

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
            h = old._h
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
            table = old.table.copy()
            tasks = list(h.tasks)
            slot_data = {}
            next_id, seq = h.next_entry_id, int(table["insert_seq"].max(initial=0))
            for s, e in sorted(put.items()):
                slot_data[s] = _slot_bytes_of(e, spec)
                task = _decode_name(_encode_name(e.task, TASK_NAME_BYTES))  # the name as stored
                if task not in tasks:
                    if len(tasks) >= MAX_TASKS:
                        raise BudgetError(f"a memory holds at most {MAX_TASKS} task names")
                    tasks.append(task)
                key_off, key_n, _, _ = spec.slot_layout()["key"]
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
                            zlib.crc32(table_raw), calibration or h.calibration, projection or h.projection, tasks)
            header_raw = _encode_header(new_h)
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
            header_crc = struct.unpack_from("<I", header_raw, len(header_raw) - 4)[0]
            if before_publish is not None:
                before_publish(new_h.generation, header_crc)
            _publish(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        if after_publish is not None:
            after_publish(new_h.generation, header_crc)
    return new_h.generation


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
