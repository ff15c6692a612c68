"""Memory updates (``.ekvu``): what turns one committed state of a memory into the next one on the
device, without the host and without torch.

An update holds NEW's header, NEW's slot table and only the slots whose bytes differ between OLD
and NEW (slots that became all zeros are listed, not carried). It is bound to OLD's model
fingerprint, generation and header CRC32 (the base it applies to) and to the sha256 of the whole
NEW file (what applying it must give). ``docs/memory-format.md`` ("Update files") describes every
byte.

* :func:`write_update` (``edgekv memory diff OLD NEW -o UPDATE``): compares two states of one
  memory slot by slot and writes the update atomically (:mod:`edgekv.atomic`).
* :class:`Update`: the validating parser. Every size is range-checked and the file's exact length
  is checked against them before anything is sized by a field; the fixed part and the body carry
  CRC32s; NEW's header is decoded by the memory reader's own checks.
* :func:`apply_update` (``edgekv memory apply MEM UPDATE``): under the memory's write lock, checks
  the base (model, generation, header CRC32), copies the file beside itself, patches header, table
  and the listed slots into the copy, fsyncs it, checks its sha256 against the update's and only
  then renames it over the memory (the machinery of :func:`edgekv.format.commit_update`). A memory
  already at the update's state is left alone (a no-op); any other base is refused.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from edgekv.atomic import atomic_file
from edgekv.errors import CorruptFileError, InputError, MismatchError
from edgekv.format import writer
from edgekv.format.layout import (
    _MAX_HEADER_BYTES,
    ALIGN,
    FLAG_OCCUPIED,
    HEADER,
    MAX_SLOTS,
    TABLE_DTYPE,
    TABLE_ENTRY_BYTES,
    _Header,
    _stored_crc32,
)
from edgekv.format.reader import Memory, _decode_header

UPDATE_MAGIC = b"EDGEKVU\x00"
UPDATE_VERSION = 1
# The fixed part (140 bytes): magic, version, flags, model fingerprint, base generation, new
# generation, base header CRC32, new header CRC32, file_bytes, header_bytes, num_slots, slot_bytes,
# slots written, slots zeroed, sha256 of the whole NEW file, body CRC32, CRC32 of bytes [0, 136).
UPDATE_FIXED = struct.Struct("<8s I I 32s Q Q I I Q I I I I I 32s I I")
UPDATE_FIELDS = ("magic", "version", "flags", "fingerprint", "base_generation", "new_generation",
                 "base_header_crc32", "new_header_crc32", "file_bytes", "header_bytes", "num_slots",
                 "slot_bytes", "num_written", "num_zeroed", "new_sha256", "body_crc32", "fixed_crc32")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class UpdateInfo:
    """The fixed part of an update, decoded and range-checked."""

    fingerprint: str  # 64 hex chars: the model both states belong to
    base_generation: int  # OLD's generation: the only state the update applies to
    new_generation: int  # NEW's generation (> base_generation)
    base_header_crc32: int  # OLD's header CRC32
    new_header_crc32: int  # NEW's header CRC32
    file_bytes: int  # both files' exact length
    header_bytes: int
    num_slots: int
    slot_bytes: int
    num_written: int  # slots carried (their bytes follow)
    num_zeroed: int  # slots NEW holds as zeros (listed only)
    new_sha256: str  # 64 hex chars: sha256 of the whole NEW file
    body_crc32: int

    @property
    def slots_offset(self) -> int:
        return self.header_bytes + self.num_slots * TABLE_ENTRY_BYTES

    @property
    def update_bytes(self) -> int:
        """The exact length of an update with these sizes."""
        return (UPDATE_FIXED.size + self.slots_offset + 4 * (self.num_written + self.num_zeroed)
                + self.num_written * self.slot_bytes)


# ---------------------------------------------------------------------------------
# reading (validating) an update
# ---------------------------------------------------------------------------------
def _corrupt(path: str, why: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: {why} (corrupt or truncated update; make it again with `edgekv memory diff`)")


def _decode_fixed(raw: bytes, actual_size: int, path: str) -> UpdateInfo:
    """The fixed part's fields, each checked before anything is sized by it, and the file's length."""
    if actual_size < UPDATE_FIXED.size:
        raise _corrupt(path, f"file is {actual_size} bytes, too small to be an edgekv update")
    f = dict(zip(UPDATE_FIELDS, UPDATE_FIXED.unpack_from(raw, 0), strict=True))
    if f["magic"] != UPDATE_MAGIC:
        raise CorruptFileError(f"{path}: not an edgekv memory update (bad magic {f['magic']!r})")
    if f["version"] != UPDATE_VERSION:
        raise CorruptFileError(f"{path}: update format version {f['version']} is not supported (this edgekv reads "
                               f"version {UPDATE_VERSION}); update edgekv or make the update with this one")
    if zlib.crc32(raw[: UPDATE_FIXED.size - 4]) != f["fixed_crc32"]:
        raise _corrupt(path, "fixed part fails its checksum")
    hb, n, sb = f["header_bytes"], f["num_slots"], f["slot_bytes"]
    if f["flags"] or not HEADER.size < hb <= _MAX_HEADER_BYTES or hb % ALIGN or not 1 <= n <= MAX_SLOTS \
            or not sb or sb % ALIGN or f["file_bytes"] != hb + n * (TABLE_ENTRY_BYTES + sb):
        raise _corrupt(path, "sizes in its fixed part are out of range or disagree")
    if f["num_written"] + f["num_zeroed"] > n or f["new_generation"] <= f["base_generation"]:
        raise _corrupt(path, "slot counts or generations in its fixed part are out of range")
    info = UpdateInfo(f["fingerprint"].hex(), f["base_generation"], f["new_generation"], f["base_header_crc32"],
                      f["new_header_crc32"], f["file_bytes"], hb, n, sb, f["num_written"], f["num_zeroed"],
                      f["new_sha256"].hex(), f["body_crc32"])
    if actual_size != info.update_bytes:
        what = "truncated" if actual_size < info.update_bytes else "has trailing bytes"
        raise _corrupt(path, f"file is {actual_size} bytes but its sizes say {info.update_bytes} ({what})")
    return info


class Update:
    """A validated update file, held open: :attr:`info`, NEW's header (:attr:`header`,
    :attr:`header_raw`) and table (:attr:`table_raw`), the written and zeroed slot numbers; the
    written slots' bytes are read on demand (:meth:`slot_data`), so memory stays bounded by one slot.

    Opening checks everything but the slot bytes' own CRC32s against NEW's table (checked as
    they are read): magic, version, the fixed part's CRC, sizes and the exact length, the body's
    CRC32, NEW's header (the memory reader's checks, and agreement with the fixed part), the
    table's CRC32, and the slot lists (ascending, in range, disjoint).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fd = _open_regular(self.path)
        try:
            size = os.fstat(self._fd).st_size
            self.info = _decode_fixed(self._pread(0, min(size, UPDATE_FIXED.size)), size, self.path)
            self._check_body_crc(size)
            self.header_raw = self._pread(UPDATE_FIXED.size, self.info.header_bytes)
            self.header = _decode_new_header(self.header_raw, self.info, self.path)
            self.table_raw = self._pread(UPDATE_FIXED.size + self.info.header_bytes,
                                         self.info.num_slots * TABLE_ENTRY_BYTES)
            self.table = _decode_table(self.table_raw, self.header, self.path)
            self.written, self.zeroed = self._read_lists()
        except BaseException:
            self.close()
            raise

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            raw = os.pread(self._fd, length, offset)
        except OSError as e:
            raise CorruptFileError(f"{self.path}: cannot read the update ({e.strerror})") from None
        if len(raw) != length:
            raise _corrupt(self.path, "file ends early (changed while it was read?)")
        return raw

    def _check_body_crc(self, size: int) -> None:
        crc, pos = 0, UPDATE_FIXED.size
        while pos < size:
            chunk = self._pread(pos, min(_CHUNK, size - pos))
            crc, pos = zlib.crc32(chunk, crc), pos + len(chunk)
        if crc != self.info.body_crc32:
            raise _corrupt(self.path, "body fails its checksum")

    def _read_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """Written and zeroed slot numbers [nw], [nz] int64: ascending, < num_slots, disjoint."""
        i = self.info
        raw = self._pread(UPDATE_FIXED.size + i.slots_offset, 4 * (i.num_written + i.num_zeroed))
        both = np.frombuffer(raw, "<u4").astype(np.int64)
        written, zeroed = both[: i.num_written], both[i.num_written:]
        for lst in (written, zeroed):
            if len(lst) and (np.any(np.diff(lst) <= 0) or lst[-1] >= i.num_slots):
                raise _corrupt(self.path, "its slot lists are not ascending slot numbers of the memory")
        if len(np.intersect1d(written, zeroed)):
            raise _corrupt(self.path, "a slot is both written and zeroed")
        return written, zeroed

    @property
    def data_offset(self) -> int:
        i = self.info
        return UPDATE_FIXED.size + i.slots_offset + 4 * (i.num_written + i.num_zeroed)

    def slot_data(self, k: int) -> bytes:
        """The bytes of the k-th written slot (slot ``written[k]``), checked against NEW's table
        when NEW holds an entry there."""
        slot, sb = int(self.written[k]), self.info.slot_bytes
        raw = self._pread(self.data_offset + k * sb, sb)
        row = self.table[slot]
        if row["flags"] & FLAG_OCCUPIED and zlib.crc32(raw) != int(row["crc32"]):
            raise _corrupt(self.path, f"slot {slot} fails its checksum")
        return raw

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Update:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_regular(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise InputError(f"{path}: update file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot open the update ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path}: not a regular file, cannot be an update")
    return fd


def _decode_new_header(raw: bytes, info: UpdateInfo, path: str) -> _Header:
    """NEW's header (the memory reader's checks) and its agreement with the fixed part."""
    where = f"{path} (the new memory header inside the update)"
    if struct.unpack_from("<I", raw, 12)[0] != info.header_bytes:
        raise _corrupt(path, "the new header's length disagrees with the fixed part")
    h = _decode_header(raw, info.file_bytes, where)
    if (h.generation, h.spec.model_fingerprint, _stored_crc32(raw, info.header_bytes)) != \
            (info.new_generation, info.fingerprint, info.new_header_crc32) \
            or (h.num_slots, h.spec.slot_bytes) != (info.num_slots, info.slot_bytes):
        raise _corrupt(path, "the new header disagrees with the fixed part (generation, model, checksum or sizes)")
    return h


def _decode_table(raw: bytes, h: _Header, path: str) -> np.ndarray:
    """NEW's slot table [num_slots] (TABLE_DTYPE), its CRC32 and task indices checked."""
    if zlib.crc32(raw) != h.table_crc32:
        raise _corrupt(path, "the new slot table fails its checksum")
    table = np.frombuffer(raw, TABLE_DTYPE)
    occ = table["flags"] & FLAG_OCCUPIED != 0
    if np.any(table["task"][occ] >= len(h.tasks)):
        raise _corrupt(path, "the new slot table names a task that does not exist")
    return table


def read_update(path: str | os.PathLike) -> dict:
    """What an update holds (``edgekv memory apply --json`` reports it too), validated."""
    with Update(path) as u:
        i = u.info
        return {"update": u.path, "model_fingerprint": i.fingerprint, "base_generation": i.base_generation,
                "new_generation": i.new_generation, "file_bytes": i.file_bytes, "update_bytes": i.update_bytes,
                "num_slots": i.num_slots, "slots_written": i.num_written, "slots_zeroed": i.num_zeroed,
                "new_sha256": i.new_sha256}


# ---------------------------------------------------------------------------------
# writing an update: edgekv memory diff OLD NEW -o UPDATE
# ---------------------------------------------------------------------------------
def _check_diffable(a: Memory, b: Memory) -> None:
    """OLD ``a`` and NEW ``b`` are two states of one memory, NEW the later one."""
    if a.spec.model_fingerprint != b.spec.model_fingerprint:
        raise MismatchError(f"{a.path} and {b.path} belong to different models (fingerprints "
                            f"{a.spec.model_fingerprint[:12]}… and {b.spec.model_fingerprint[:12]}…); an update "
                            f"goes between two states of one memory")
    if (a.file_bytes, a.spec.header_bytes, a.num_slots, a.spec.slot_bytes) != \
            (b.file_bytes, b.spec.header_bytes, b.num_slots, b.spec.slot_bytes):
        raise MismatchError(f"{a.path} and {b.path} have different layouts (size, header, slots): they are not two "
                            f"states of one memory")
    if b.generation <= a.generation:
        raise InputError(f"{b.path} (generation {b.generation}) is not newer than {a.path} (generation "
                         f"{a.generation}); give the older state first: edgekv memory diff OLD NEW -o UPDATE")


def _changed_slots(a: Memory, b: Memory) -> tuple[list[int], list[int]]:
    """Slots whose bytes differ: (written: NEW holds other bytes, zeroed: NEW holds zeros)."""
    written, zeroed = [], []
    sb, off = b.spec.slot_bytes, b._h.slots_offset
    for s in range(b.num_slots):
        old, new = a._read_bytes(off + s * sb, sb), b._read_bytes(off + s * sb, sb)
        if old != new:
            (zeroed if new.count(0) == sb else written).append(s)
    for s in written:  # a corrupt slot in NEW is refused here, not carried to the device
        if b.table["flags"][s] & FLAG_OCCUPIED:
            b.read_entry(s)
    return written, zeroed


def _sha256_fd(read: Callable[[int, int], bytes], size: int) -> str:
    """sha256 of ``size`` bytes read in chunks with ``read(offset, length)``."""
    h, pos = hashlib.sha256(), 0
    while pos < size:
        chunk = read(pos, min(_CHUNK, size - pos))
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def _body(b: Memory, written: list[int], zeroed: list[int]) -> Iterator[bytes]:
    """The update's body, in order: NEW's header and table, the slot lists, the written slots."""
    yield bytes(b._read_bytes(0, b._h.slots_offset))
    yield np.asarray(written + zeroed, "<u4").tobytes()
    sb, off = b.spec.slot_bytes, b._h.slots_offset
    for s in written:
        yield bytes(b._read_bytes(off + s * sb, sb))


def write_update(old: str | os.PathLike, new: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the update that turns memory state ``old`` into ``new`` to ``out`` (atomically).
    Returns what it holds: generations, slots written / zeroed, bytes of the update and the file."""
    t0 = time.perf_counter()
    out = os.fspath(out)
    if os.path.realpath(out) in (os.path.realpath(old), os.path.realpath(new)):
        raise InputError(f"{out}: the update would replace one of the memories it is made from; give another path")
    with Memory(old) as a, Memory(new) as b:
        _check_diffable(a, b)
        written, zeroed = _changed_slots(a, b)
        sha = _sha256_fd(b._read_bytes, b.file_bytes)
        fixed = [UPDATE_MAGIC, UPDATE_VERSION, 0, bytes.fromhex(b.spec.model_fingerprint), a.generation,
                 b.generation, a.header_crc32, b.header_crc32, b.file_bytes, b.spec.header_bytes, b.num_slots,
                 b.spec.slot_bytes, len(written), len(zeroed), bytes.fromhex(sha)]
        with atomic_file(out, "wb") as f:
            f.write(bytes(UPDATE_FIXED.size))  # the fixed part goes last: it holds the body's CRC32
            crc = 0
            for piece in _body(b, written, zeroed):
                f.write(piece)
                crc = zlib.crc32(piece, crc)
            head = UPDATE_FIXED.pack(*fixed, crc, 0)[:-4]
            f.seek(0)
            f.write(head + struct.pack("<I", zlib.crc32(head)))
        summary = {"update": out, "old": a.path, "new": b.path, "model_fingerprint": b.spec.model_fingerprint,
                   "base_generation": a.generation, "new_generation": b.generation, "num_slots": b.num_slots,
                   "slots_written": len(written), "slots_zeroed": len(zeroed), "file_bytes": b.file_bytes}
    summary["update_bytes"] = os.path.getsize(out)
    summary["ratio"] = summary["update_bytes"] / summary["file_bytes"]
    summary["seconds"] = round(time.perf_counter() - t0, 4)
    return summary


# ---------------------------------------------------------------------------------
# applying an update: edgekv memory apply MEM UPDATE
# ---------------------------------------------------------------------------------
def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return _sha256_fd(lambda pos, n: os.pread(f.fileno(), n, pos), os.fstat(f.fileno()).st_size)


def _check_base(path: str, cur: Memory, i: UpdateInfo) -> bool:
    """True when ``cur`` is the update's base; False when it already is the update's result (a
    no-op); any other state is refused (:class:`MismatchError`, nothing written)."""
    if cur.spec.model_fingerprint != i.fingerprint:
        raise MismatchError(f"{path} belongs to another model than the update (fingerprints "
                            f"{cur.spec.model_fingerprint[:12]}… and {i.fingerprint[:12]}…); nothing was written")
    if (cur.generation, cur.header_crc32) == (i.new_generation, i.new_header_crc32):
        if _file_sha256(path) == i.new_sha256:
            return False
        raise MismatchError(f"{path} is at the update's generation {i.new_generation} but its bytes differ from the "
                            f"update's result; nothing was written")
    if cur.generation != i.base_generation:
        why = ("newer than the update's base: this update (or an older one) was applied already, or the memory "
               "moved on; make an update from its current state" if cur.generation > i.base_generation else
               "older than the update's base: apply the updates in between first, or make one from this state")
        raise MismatchError(f"{path} is at generation {cur.generation}, the update applies to generation "
                            f"{i.base_generation} ({why}); nothing was written")
    if cur.header_crc32 != i.base_header_crc32 or cur.file_bytes != i.file_bytes \
            or (cur.num_slots, cur.spec.slot_bytes) != (i.num_slots, i.slot_bytes):
        raise MismatchError(f"{path} at generation {cur.generation} is not the state the update was made from (its "
                            f"header checksum differs: changed since?); nothing was written")
    return True


def _patch(f, u: Update) -> None:
    """Write NEW's header and table, the written slots and zeros for the zeroed ones into ``f``."""
    i = u.info
    f.seek(0)
    f.write(u.header_raw)
    f.write(u.table_raw)
    for k, s in enumerate(u.written):
        f.seek(i.slots_offset + int(s) * i.slot_bytes)
        f.write(u.slot_data(k))
    zeros = bytes(i.slot_bytes) if len(u.zeroed) else b""
    for s in u.zeroed:
        f.seek(i.slots_offset + int(s) * i.slot_bytes)
        f.write(zeros)


def _patch_copy_and_publish(path: str, u: Update, before_publish: Callable[[int, int], None] | None) -> None:
    """Copy ``path`` beside itself, patch the copy, fsync it, check its size and sha256 against the
    update's, call ``before_publish(generation, header_crc32)`` and rename it over ``path``. On any
    error the copy is removed and ``path`` is untouched."""
    tmp = writer._tmp_path(path)
    try:
        writer._copy_file(path, tmp)
        with open(tmp, "r+b") as f:
            _patch(f, u)
            f.flush()
            os.fsync(f.fileno())
        if os.path.getsize(tmp) != u.info.file_bytes:
            raise CorruptFileError(f"internal error: applying the update would change {path}'s size")
        if _file_sha256(tmp) != u.info.new_sha256:
            raise MismatchError(f"applying {u.path} to {path} does not give the update's result (sha256 differs): the "
                                f"memory differs from the update's base in bytes its checksums do not cover; nothing "
                                f"was written")
        if before_publish is not None:
            before_publish(u.info.new_generation, u.info.new_header_crc32)
        writer._publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def apply_update(path: str | os.PathLike, update: str | os.PathLike,
                 before_publish: Callable[[int, int], None] | None = None,
                 after_publish: Callable[[int, int], None] | None = None) -> dict:
    """Apply the update file ``update`` to the memory at ``path``, atomically: afterwards the file
    is byte-identical to the update's NEW state, or (refused, failed, killed) unchanged.

    A memory already at the update's state is left as it is (``applied`` False). Another base
    (other model, generation or header CRC32) is a :class:`MismatchError`; a damaged update a
    :class:`CorruptFileError`; the file system's refusals are one-line edgekv errors, memory unchanged.
    ``before_publish`` / ``after_publish(generation, header_crc32)``: as in ``commit_update``.
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    with Update(update) as u:
        if not os.path.isfile(path):  # the reader's error, before leaving a lock file next to nothing
            Memory(path).close()
        with writer._storage_errors(path, "apply the update"), writer._WriteLock(path):
            writer._remove_stale_temps(path)
            with Memory(path) as cur:
                before = cur.generation
                todo = _check_base(path, cur, u.info)
            if todo:
                _patch_copy_and_publish(path, u, before_publish)
        if todo and after_publish is not None:
            after_publish(u.info.new_generation, u.info.new_header_crc32)
        return {"memory": path, "update": u.path, "applied": todo, "already_applied": not todo,
                "generation_before": before, "generation": u.info.new_generation,
                "slots_written": u.info.num_written, "slots_zeroed": u.info.num_zeroed,
                "changed_slots": sorted(int(s) for s in np.concatenate([u.written, u.zeroed])),
                "file_bytes": u.info.file_bytes, "update_bytes": u.info.update_bytes,
                "seconds": round(time.perf_counter() - t0, 4)}
