"""The HNSW index over a memory's effective retrieval keys, and the retriever that uses it.

The index belongs to the memory, not to the model export. Every index file is bound to one
memory state by a JSON description: the memory's model fingerprint, generation and header
CRC32, the sha256 of the slot numbers and effective keys it holds, and the sha256 of the index
file itself (:func:`memory_state`, :func:`bound_to`). Two places hold one:

* ``edgekv export --memory`` ships ``index.hnsw`` + ``index.json`` (:func:`build_index`): a head
  start, used only while the memory is in exactly that state;
* beside the memory, ``MEM.ekv.hnsw`` + ``MEM.ekv.hnsw.json`` (:func:`cached_index`): built on
  the device when missing or stale (seconds for thousands of keys), written atomically, and
  moved along by ``edgekv memory apply`` (:func:`follow_update`: in place or rebuilt).

The :class:`Retriever` uses exact numpy search when asked, below ``IndexConfig.exact_below``
entries, or when hnswlib is missing or crashes on this CPU (probed once per process in a
subprocess, see :func:`hnswlib_status`; then one warning line on stderr says so and how to get
the index, :func:`warn_exact_instead_of_hnsw`); otherwise HNSW over the first index bound to the
memory's current state, building one if there is none. An index bound to another state is never
used. ``Retriever.mode`` / ``reason`` say what was used and why.

hnswlib's own loader trusts every count and offset in its file and never checks neighbour
ids, so hostile bytes would make it read out of bounds. Hashes cannot stop that (whoever
can write the folder can rewrite the JSON and manifest.json too), so
:func:`check_index_file` parses the whole file first: every header field, size, link
count and neighbour id is checked, and its labels and vectors must be exactly the memory's
occupied slots and effective keys. hnswlib only ever loads a file that passed (through the
same open descriptor the hash and the check read); what a hostile graph can still do is lower
recall.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import mmap
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgekv.atomic import publish_file, remove_stale, storage_errors, temp_name, write_file_atomic
from edgekv.configs import Config
from edgekv.errors import (
    CorruptFileError,
    EdgeKVError,
    InputError,
    MismatchError,
    MissingDependencyError,
)
from edgekv.format import Memory
from edgekv.manifest import file_sha256
from edgekv.retrieval import effective_keys, topk_exact

INDEX_FILE = "index.hnsw"
HNSWLIB_MISSING = "hnswlib is not installed"
HNSWLIB_INSTALL = "pip install hnswlib"
HNSWLIB_REBUILD = "HNSWLIB_NO_NATIVE=1 pip install --force-reinstall --no-binary hnswlib hnswlib"
INDEX_META = "index.json"
_MAX_META_BYTES = 1 << 20


@dataclass(frozen=True)
class IndexConfig(Config):
    """hnswlib parameters. Larger M / ef give higher recall for more memory and time."""

    M: int = 32  # graph degree
    ef_construction: int = 200  # build-time candidate list
    ef_search: int = 128  # query-time candidate list (raised to >= k)
    exact_below: int = 2048  # fewer occupied slots than this: exact search is as fast

    def __post_init__(self) -> None:
        for name, low in (("M", 2), ("ef_construction", 1), ("ef_search", 1), ("exact_below", 0)):
            if getattr(self, name) < low:
                raise InputError(f"IndexConfig.{name} must be >= {low}, got {getattr(self, name)}")


def keys_digest(slots: np.ndarray, keys: np.ndarray) -> str:
    """sha256 of slot numbers [n] and effective keys [n, R]: identifies one memory state."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(slots, "<i8").tobytes())
    h.update(np.ascontiguousarray(keys, "<f4").tobytes())
    return h.hexdigest()


def memory_keys(memory: Memory) -> tuple[np.ndarray, np.ndarray]:
    """Occupied slots [n] and their effective (projected, unit) keys [n, R]."""
    slots = memory.occupied()
    raw = memory.read_keys(slots) if len(slots) else np.zeros((0, memory.spec.key_dim), np.float32)
    return slots, effective_keys(raw, memory.projection) if len(slots) else raw


def memory_state(memory: Memory, slots: np.ndarray, keys: np.ndarray) -> dict:
    """What an index is bound to: one committed state of one memory (model, generation, header
    CRC32) and the digest of the slots [n] and effective keys [n, R] it holds."""
    return {"memory_fingerprint": memory.spec.model_fingerprint, "memory_generation": int(memory.generation),
            "memory_header_crc32": int(memory.header_crc32), "keys_sha256": keys_digest(slots, keys)}


def bound_to(meta: dict, state: dict, legacy: bool = False) -> bool:
    """Whether the index description ``meta`` is bound to exactly ``state`` (:func:`memory_state`);
    values must be equal and of the same type. ``legacy``: an export's ``index.json`` written before
    it recorded the header CRC32 may lack that field (its generation and keys digest must still match)."""
    for name, value in state.items():
        if legacy and name == "memory_header_crc32" and name not in meta:
            continue
        if type(meta.get(name)) is not type(value) or meta.get(name) != value:
            return False
    return True


def _hnswlib():
    """The hnswlib module; :class:`MissingDependencyError` (one line, how to install it) without it."""
    try:
        import hnswlib
    except ImportError:
        raise MissingDependencyError(f"the HNSW index needs hnswlib: {HNSWLIB_INSTALL}") from None
    return hnswlib


def _new_index(slots: np.ndarray, keys: np.ndarray, config: IndexConfig):
    """A fresh hnswlib index of keys [n, R] labelled by slots [n] (seeded, one thread: reproducible)."""
    index = _hnswlib().Index(space="ip", dim=keys.shape[1])
    index.init_index(max_elements=max(len(slots), 1), ef_construction=config.ef_construction,
                     M=config.M, random_seed=0)
    if len(slots):
        index.add_items(keys, slots, num_threads=1)
    return index


def _save_index(index, path: str) -> None:
    """hnswlib writes a path: save beside ``path``, then publish the file whole (edgekv.atomic)."""
    tmp = temp_name(path)
    try:
        with storage_errors(path):
            index.save_index(tmp)
            publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_meta(index_path: str, meta_path: str, slots: np.ndarray, keys: np.ndarray, state: dict,
                config: IndexConfig) -> dict:
    """The description binding ``index_path`` (already written) to the memory ``state``."""
    meta = {"file": os.path.basename(index_path), "file_sha256": file_sha256(index_path),
            "num_items": int(len(slots)), "dim": int(keys.shape[1]), "M": config.M,
            "ef_construction": config.ef_construction, **state}
    write_file_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True))
    return meta


def build_index(memory_path: str, out_dir: str, config: IndexConfig = IndexConfig()) -> dict:
    """Build ``out_dir/index.hnsw`` + ``index.json`` for the memory (what ``edgekv export --memory``
    ships: a head start the runtime uses only while the memory is in exactly this state); return
    the metadata."""
    with Memory(memory_path) as mem:
        slots, keys = memory_keys(mem)
        state = memory_state(mem, slots, keys)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, INDEX_FILE)
    _save_index(_new_index(slots, keys, config), path)
    return _write_meta(path, os.path.join(out_dir, INDEX_META), slots, keys, state, config)


def _read_meta(path: str) -> dict:
    """An index description (JSON) with its required fields checked; :class:`CorruptFileError` otherwise."""
    if os.path.getsize(path) > _MAX_META_BYTES:
        raise CorruptFileError(f"{path}: too large to be an index description")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        for key, typ in (("file", str), ("file_sha256", str), ("keys_sha256", str), ("num_items", int),
                         ("dim", int)):
            if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
                raise ValueError(f"field {key!r} missing or not {typ.__name__}")
        name = meta["file"]
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise ValueError(f"field 'file' {name[:80]!r} is not a plain file name inside the folder")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise CorruptFileError(f"{path}: not a valid index description ({str(e)[:200]})") from None
    return meta


def read_index_meta(index_dir: str) -> dict | None:
    """index.json from ``index_dir``, or None when there is no index."""
    path = os.path.join(index_dir, INDEX_META)
    return _read_meta(path) if os.path.isfile(path) else None


# --- hnswlib's file, parsed before hnswlib sees it ------------------------------------
# hnswlib 0.8 ``saveIndex``: this header, then per element one level-0 record
# [links count u32 | maxM0 neighbour ids u32 | vector f32 x dim | label u64], then per
# element a u32 byte count and its upper-level link lists (level l: count u32 | maxM ids).
HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData, maxlevel (i32), enterpoint (u32), maxM, maxM0, M,
# mult (f64), ef_construction
_MAX_M = 1024
_MAX_LEVEL = 64


def check_index_file(path: str, slots: np.ndarray, keys: np.ndarray, shown: str | None = None) -> None:
    """Parse hnswlib's ``index.hnsw`` completely; refuse anything hnswlib could mis-read.

    slots: [n] occupied slots, keys: [n, R] their effective keys. After this passes, every
    count, offset and neighbour id hnswlib uses is in range (so loading and searching stay
    inside its buffers), and its labels and vectors are exactly ``slots`` and ``keys``.
    ``shown``: the name errors give the file (default ``path``).
    """
    n, dim = len(slots), keys.shape[1]

    def bad(why: str) -> CorruptFileError:
        return CorruptFileError(f"{shown or path}: not a valid HNSW index for this memory ({why}); restore the file or "
                                f"re-export (a memory needs no shipped index: the runtime builds one beside it)")

    size = os.path.getsize(path)
    if size < HNSW_HEADER.size:
        raise bad(f"{size} bytes is shorter than its header")
    with open(path, "rb") as f:
        head = f.read(HNSW_HEADER.size)
    (off0, max_el, count, per_el, label_off, data_off, max_level, enter, max_m, max_m0, m, mult,
     ef_c) = HNSW_HEADER.unpack(head)
    if count != n:
        raise bad(f"it holds {count} entries, the memory {n}")
    if not (2 <= m <= _MAX_M and max_m == m and max_m0 == 2 * m and math.isfinite(mult) and 1 <= ef_c <= 1 << 20):
        raise bad("graph parameters out of range")
    links0, links = 4 + 4 * max_m0, 4 + 4 * max_m  # bytes of one level-0 / upper-level link list
    if (off0, data_off, label_off, per_el) != (0, links0, links0 + 4 * dim, links0 + 4 * dim + 8) or max_el < n:
        raise bad("record layout does not match the memory's key dimension")
    if n == 0:
        if (max_level, enter, size) != (-1, 0xFFFFFFFF, HNSW_HEADER.size):
            raise bad("an empty index with a graph")
        return
    if not 0 <= max_level <= _MAX_LEVEL or enter >= n:
        raise bad("entry point or top level out of range")
    if not n * (per_el + 4) <= size - HNSW_HEADER.size <= n * (per_el + 4 + max_level * links):
        raise bad(f"{size} bytes does not fit {n} entries")  # checked before reading the file
    with open(path, "rb") as f:  # mapped, not read: the check adds no copy of a large index to the heap
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        _check_index_bytes(data, size, n, slots, keys, per_el, links0, links, data_off, label_off, max_m0, max_m,
                           max_level, enter, bad)
    finally:
        try:
            data.close()
        except BufferError:  # arrays over it are still referenced by an error's traceback; GC closes it
            pass


def _check_index_bytes(data, size, n, slots, keys, per_el, links0, links, data_off, label_off, max_m0, max_m,
                       max_level, enter, bad) -> None:
    if len(data) != size:
        raise bad("the file changed while it was read")
    rec = np.frombuffer(data, np.uint8, n * per_el, HNSW_HEADER.size).reshape(n, per_el)
    slots = np.asarray(slots, np.int64)
    row_of_slot = {int(s): i for i, s in enumerate(slots)}
    seen = np.zeros(n, bool)
    for lo in range(0, n, 4096):  # in chunks: a few MB of copies at a time
        chunk = rec[lo: lo + 4096]
        # level 0: the whole u32 count word (its third byte is hnswlib's "deleted" mark) <= maxM0, ids < n
        count0 = chunk[:, :4].copy().view("<u4")[:, 0]
        ids0 = chunk[:, 4:links0].copy().view("<u4")
        if np.any(count0 > max_m0) or np.any(ids0[np.arange(max_m0)[None, :] < count0[:, None]] >= n):
            raise bad("a level-0 link list is out of range")
        labels = chunk[:, label_off:label_off + 8].copy().view("<u8")[:, 0]
        rows = np.array([row_of_slot.get(int(x), -1) if x < 1 << 62 else -1 for x in labels], np.int64)
        if np.any(rows < 0) or np.any(seen[rows]) or len(set(rows.tolist())) != len(rows):
            raise bad("its labels are not the memory's occupied slots")
        seen[rows] = True
        vectors = chunk[:, data_off:label_off].copy().view("<u4")  # compared bit for bit
        if not np.array_equal(vectors, np.ascontiguousarray(keys[rows], "<f4").view("<u4")):
            raise bad("its vectors are not the memory's effective keys")
    # upper levels: sizes, then per level count <= maxM and neighbours that exist on that level
    pos, lists = HNSW_HEADER.size + n * per_el, []
    levels = np.zeros(n, np.int64)
    for i in range(n):
        if pos + 4 > size:
            raise bad("truncated link lists")
        (nbytes,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if nbytes % links or nbytes // links > max_level or pos + nbytes > size:
            raise bad(f"link lists of entry {i} are out of range")
        levels[i] = nbytes // links
        if nbytes:
            lists.append((i, pos))
        pos += nbytes
    if pos != size:
        raise bad("trailing bytes after the link lists")
    if levels[enter] != max_level:
        raise bad("the entry point is not on the top level")
    for i, start in lists:
        block = np.frombuffer(data, "<u4", levels[i] * (1 + max_m), start).reshape(levels[i], 1 + max_m)
        for lev in range(1, levels[i] + 1):
            c = int(block[lev - 1, 0])
            ids = block[lev - 1, 1:1 + c] if c <= max_m else None
            if ids is None or np.any(ids >= n) or np.any(levels[ids.astype(np.int64)] < lev):
                raise bad(f"link list of entry {i} on level {lev} is out of range")


# Builds and queries small indices in every distance-kernel shape hnswlib dispatches on
# (dim % 16, % 4, residuals; ip and l2), so code compiled for another CPU runs here.
_PROBE = """
import numpy as np, hnswlib
for dim in (4, 16, 19, 20, 32, 35):
    x = np.random.default_rng(0).normal(size=(64, dim)).astype(np.float32)
    for space in ("ip", "l2"):
        index = hnswlib.Index(space=space, dim=dim)
        index.init_index(max_elements=64, M=8, ef_construction=32, random_seed=0)
        index.add_items(x, np.arange(64), num_threads=1)
        index.knn_query(x[:4], k=4, num_threads=1)
print("hnswlib ok")
"""


@functools.lru_cache(maxsize=1)
def hnswlib_status() -> tuple[bool, str]:
    """(usable, why): whether hnswlib imports *and runs* on this CPU.

    Probed once per process in a subprocess: a build for another CPU (``-march=native``
    on a different machine) dies with SIGILL in the process that runs it, which no
    ``except`` can catch.
    """
    if importlib.util.find_spec("hnswlib") is None:
        return False, HNSWLIB_MISSING
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"the hnswlib probe did not finish ({type(e).__name__})"
    if out.returncode == 0 and out.stdout.strip().endswith("hnswlib ok"):
        return True, "hnswlib works on this CPU"
    if out.returncode < 0:
        name = signal.Signals(-out.returncode).name if -out.returncode in signal.valid_signals() else "a signal"
        return False, f"hnswlib crashes on this CPU ({name}; a build for another CPU?)"
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return False, f"hnswlib does not load on this machine ({tail})"


def hnswlib_available() -> bool:
    return hnswlib_status()[0]


@functools.lru_cache(maxsize=None)
def warn_exact_instead_of_hnsw(why: str) -> None:
    """One line on stderr, once per process and reason: an HNSW index was due but hnswlib is
    unusable (``why``, :func:`hnswlib_status`), so search is exact; and how to get the index."""
    fix = HNSWLIB_INSTALL if why == HNSWLIB_MISSING else f"reinstall it for this CPU: {HNSWLIB_REBUILD}"
    print(f"edgekv: warning: {why}: exact search over the memory's keys instead of its HNSW index (the same "
          f"entries, slower on large memories); for the index, {fix}", file=sys.stderr)


@contextlib.contextmanager
def _pinned(path: str) -> Iterator[str]:
    """Open ``path`` once and yield a name for exactly that file (Linux: ``/proc/self/fd/N``), so
    its hash, the structural check and hnswlib's loader read the same bytes even if ``path`` is
    replaced meanwhile (elsewhere: ``path`` itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        alias = f"/proc/self/fd/{fd}"
        yield alias if os.path.exists(alias) else path
    finally:
        os.close(fd)


def _load_checked(path: str, meta: dict, slots: np.ndarray, keys: np.ndarray, capacity: int = 0):
    """hnswlib's index from ``path`` after its hash (``meta``), shape and whole structure are
    checked against slots [n] and keys [n, R]; ``capacity``: room for that many items."""
    hnswlib = _hnswlib()
    try:
        with _pinned(path) as alias:
            if file_sha256(alias) != meta["file_sha256"]:
                raise MismatchError(f"{path} does not match its index description (hash differs)")
            if meta["dim"] != keys.shape[1] or meta["num_items"] != len(slots):
                raise MismatchError(f"{path}: index shape does not match the memory")
            check_index_file(alias, slots, keys, shown=path)  # hnswlib sees nothing this has not checked
            index = hnswlib.Index(space="ip", dim=meta["dim"])
            index.load_index(alias, max_elements=max(meta["num_items"], capacity, 1))
            return index
    except FileNotFoundError:
        raise InputError(f"{path} is missing: its index description names it") from None


# --- the index beside the memory: MEM.ekv.hnsw + MEM.ekv.hnsw.json ------------------------
CACHE_SUFFIX = ".hnsw"  # MEM.ekv.hnsw: the index of the memory's current state, built on the device
CACHE_META_SUFFIX = ".hnsw.json"  # MEM.ekv.hnsw.json: binds it to one state (generation, header CRC32, keys)


def cache_paths(memory_path: str) -> tuple[str, str]:
    """(index file, its binding) cached beside the memory at ``memory_path``."""
    return memory_path + CACHE_SUFFIX, memory_path + CACHE_META_SUFFIX


def load_cached_index(memory_path: str, slots: np.ndarray, keys: np.ndarray, state: dict,
                      capacity: int = 0) -> tuple[object | None, str]:
    """(index, why): the cached index when its binding names exactly ``state`` and the file passes
    every check against slots [n] and keys [n, R]; else (None, why not). Never raises for a bad
    cache: it is rebuilt, never trusted."""
    index_path, meta_path = cache_paths(memory_path)
    if not os.path.isfile(meta_path):
        return None, "no index cached beside the memory"
    try:
        meta = _read_meta(meta_path)
        if meta["file"] != os.path.basename(index_path):
            return None, "the cached index's binding names another file"
        if not bound_to(meta, state):
            gen = meta.get("memory_generation")
            return None, f"the cached index is bound to another memory state (generation {gen!r}, memory at " \
                         f"{state['memory_generation']})"
        return _load_checked(index_path, meta, slots, keys, capacity), "the cached index matches the memory"
    except (EdgeKVError, OSError, RuntimeError) as e:  # hnswlib's loader raises RuntimeError
        return None, f"the cached index failed its checks ({str(e)[:160]})"


def save_cached_index(index, memory_path: str, slots: np.ndarray, keys: np.ndarray, state: dict,
                      config: IndexConfig) -> str | None:
    """Write ``index`` beside the memory, bound to ``state``: the index file first, then its binding
    (each atomic, edgekv.atomic; a crash in between leaves a binding whose hash does not match, so
    the pair is rebuilt). Returns None, or why it could not be written (the index is still usable)."""
    index_path, meta_path = cache_paths(memory_path)
    try:
        remove_stale(index_path)
        remove_stale(meta_path)
        _save_index(index, index_path)
        _write_meta(index_path, meta_path, slots, keys, state, config)
    except (EdgeKVError, RuntimeError) as e:
        return str(e)
    return None


def cached_index(memory_path: str, slots: np.ndarray, keys: np.ndarray, state: dict,
                 config: IndexConfig = IndexConfig()) -> tuple[object, str]:
    """(index, how) for the memory's current state: the cached one if it is bound to ``state`` and
    passes its checks; else built now (seconds for thousands of keys) and cached beside the memory."""
    index, why = load_cached_index(memory_path, slots, keys, state)
    if index is not None:
        return index, why
    index = _new_index(slots, keys, config)
    failed = save_cached_index(index, memory_path, slots, keys, state, config)
    where = "cached beside the memory" if failed is None else f"not cached: {failed}"
    return index, f"built on the device ({why}); {where}"


def index_before_update(memory_path: str) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(slots [n], keys [n, R], state) of the memory's current state when an index cached beside it
    is bound to that state (what :func:`follow_update` can update in place); else None."""
    _, meta_path = cache_paths(memory_path)
    if not os.path.isfile(meta_path) or not os.path.isfile(memory_path):
        return None
    try:
        meta = _read_meta(meta_path)
        with Memory(memory_path) as mem:
            if (meta.get("memory_generation"), meta.get("memory_header_crc32")) != \
                    (mem.generation, mem.header_crc32):
                return None
            slots, keys = memory_keys(mem)
            return slots, keys, memory_state(mem, slots, keys)
    except EdgeKVError:
        return None


def _updated_in_place(memory_path: str, before: tuple | None, slots: np.ndarray, keys: np.ndarray,
                      changed: set[int]):
    """The cached index of the state before the update, with the changed slots' keys written in
    place (``add_items`` replaces an existing label's vector): possible when no entry left and the
    other slots' effective keys are bit-identical (same key projection). Else None (rebuild)."""
    if before is None:
        return None
    old_slots, old_keys, old_state = before
    row_old = {int(s): i for i, s in enumerate(old_slots)}
    if not set(row_old) <= set(slots.tolist()):
        return None  # an entry left: hnswlib would keep it as a deleted mark, which the checks refuse
    keep = [i for i, s in enumerate(slots.tolist()) if s in row_old and s not in changed]
    old_rows = [row_old[int(slots[i])] for i in keep]
    if not np.array_equal(keys[keep].view(np.uint32), old_keys[old_rows].view(np.uint32)):
        return None  # the projection changed: every effective key moved
    index, _ = load_cached_index(memory_path, old_slots, old_keys, old_state, capacity=len(slots))
    if index is None:
        return None
    rows = [i for i, s in enumerate(slots.tolist()) if s not in row_old or s in changed]
    if rows:
        index.add_items(keys[rows], slots[rows], num_threads=1)
    return index


def follow_update(memory_path: str, before: tuple | None, changed, config: IndexConfig = IndexConfig()) -> dict:
    """Bring the index cached beside the memory to its new state after an update (``changed``: the
    slots it wrote or zeroed; ``before``: :func:`index_before_update` of the state it applied to).
    In place when :func:`_updated_in_place` can, else rebuilt; its binding moves to the new state.
    Without a cached index nothing is done (the runtime builds one when it needs it)."""
    index_path, meta_path = cache_paths(memory_path)
    if not (os.path.exists(index_path) or os.path.exists(meta_path)):
        return {"index": "none", "reason": "no index cached beside the memory (the runtime builds one when needed)"}
    if not hnswlib_available():
        return {"index": "none", "reason": hnswlib_status()[1]}
    with Memory(memory_path) as mem:
        slots, keys = memory_keys(mem)
        state = memory_state(mem, slots, keys)
    index, how = _updated_in_place(memory_path, before, slots, keys, {int(c) for c in changed}), "updated"
    if index is None:
        index, how = _new_index(slots, keys, config), "rebuilt"
    failed = save_cached_index(index, memory_path, slots, keys, state, config)
    if failed is not None:
        return {"index": "failed", "reason": f"{failed} (the runtime rebuilds it)"}
    return {"index": how, "generation": state["memory_generation"]}


class Retriever:
    """Top-k by inner product over a memory's effective keys (HNSW or exact numpy).

    Exact search when asked (``force="exact"``), for memories below ``config.exact_below`` entries,
    or when hnswlib is missing or crashes on this CPU (with one warning line). Otherwise HNSW over, in this order: the
    export's index (``index_dir``) if it is bound to exactly this memory state; the index cached
    beside the memory (``MEM.ekv.hnsw``) if bound to this state; else one built now and cached there
    (``cache=False``: no cache, exact search). An index bound to another state is never used.
    """

    def __init__(self, memory: Memory, index_dir: str | None = None, config: IndexConfig = IndexConfig(),
                 force: str | None = None, cache: bool = True):
        self.slots, self.keys = memory_keys(memory)
        self.config = config
        self.index = None
        self.mode = "exact"
        self.reason = self._exact_reason(force)
        if self.reason is None:
            self._open(memory, index_dir, cache)
        if force == "hnsw" and self.index is None:
            self.reason = f"hnsw requested but unavailable ({self.reason})"

    def _exact_reason(self, force: str | None) -> str | None:
        """Why exact search is used without looking for an index, or None."""
        n = len(self.slots)
        if force == "exact":
            return "exact search requested"
        if n == 0:
            return "the memory is empty"
        if force is None and n < self.config.exact_below:
            return f"{n} entries < {self.config.exact_below}: exact search is as fast"
        if not hnswlib_available():
            warn_exact_instead_of_hnsw(hnswlib_status()[1])
            return hnswlib_status()[1]
        return None

    def _open(self, memory: Memory, index_dir: str | None, cache: bool) -> None:
        state = memory_state(memory, self.slots, self.keys)
        meta = read_index_meta(index_dir) if index_dir else None
        if meta is not None and bound_to(meta, state, legacy=True):  # the export's head start
            path = os.path.join(index_dir, meta["file"])
            self._use(_load_checked(path, meta, self.slots, self.keys), "the export's index matches the memory")
            return
        why = "the export's index is for another memory state (not used)" if meta is not None else "no index"
        if not cache:
            self.reason = why
            return
        index, how = cached_index(memory.path, self.slots, self.keys, state, self.config)
        self._use(index, how if meta is None else f"{how}; {why}")

    def _use(self, index, reason: str) -> None:
        self.index = index
        self.mode = "hnsw"
        self.reason = reason
        self._row_of = {int(s): i for i, s in enumerate(self.slots)}

    def __len__(self) -> int:
        return len(self.slots)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """query: [R] effective key -> (slots [k'], sims [k']) best first, k' = min(k, n)."""
        k = min(k, len(self.slots))
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.index is None:
            rows, sims = topk_exact(query, self.keys, k)
            return self.slots[rows], sims
        self.index.set_ef(max(self.config.ef_search, k))
        try:
            labels, _ = self.index.knn_query(query[None, :].astype(np.float32), k=k, num_threads=1)
        except RuntimeError:  # the graph did not reach k entries (only a damaged graph does that)
            rows, sims = topk_exact(query, self.keys, k)
            return self.slots[rows], sims
        slots = labels[0].astype(np.int64)
        sims = self.keys[[self._row_of[int(s)] for s in slots]] @ query  # exact sims for weights
        order = np.argsort(-sims, kind="stable")
        return slots[order], sims[order].astype(np.float32)
