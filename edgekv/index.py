"""The HNSW index over a memory's effective retrieval keys, and the retriever that uses it.

``build_index`` writes ``index.hnsw`` (hnswlib, inner-product space, labels = slot
numbers) and ``index.json`` binding it to one memory state: the sha256 of the slot
numbers and effective keys it was built from, and of the index file itself. The
:class:`Retriever` uses the index only when it exists, matches the memory, and the memory
is large enough for it to pay off; otherwise (or when hnswlib is missing or crashes on this
CPU: probed once per process in a subprocess, see :func:`hnswlib_status`) it falls back to
exact numpy search and says so in ``Retriever.mode``.

hnswlib's own loader trusts every count and offset in its file and never checks neighbour
ids, so hostile bytes would make it read out of bounds. Hashes cannot stop that (whoever
can write the folder can rewrite index.json and manifest.json too), so
:func:`check_index_file` parses the whole file first: every header field, size, link
count and neighbour id is checked, and its labels and vectors must be exactly the memory's
occupied slots and effective keys. hnswlib only ever loads a file that passed; what a
hostile graph can still do is lower recall.
"""

from __future__ import annotations

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
from dataclasses import dataclass

import numpy as np

from edgekv.atomic import publish_file, storage_errors, temp_name, write_file_atomic
from edgekv.configs import Config
from edgekv.errors import CorruptFileError, InputError, MismatchError
from edgekv.format import Memory
from edgekv.manifest import file_sha256
from edgekv.retrieval import effective_keys, topk_exact

INDEX_FILE = "index.hnsw"
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


def build_index(memory_path: str, out_dir: str, config: IndexConfig = IndexConfig()) -> dict:
    """Build ``out_dir/index.hnsw`` + ``index.json`` for the memory; return the metadata."""
    import hnswlib

    with Memory(memory_path) as mem:
        slots, keys = memory_keys(mem)
        fingerprint = mem.spec.model_fingerprint
        generation = mem.generation
    os.makedirs(out_dir, exist_ok=True)
    index = hnswlib.Index(space="ip", dim=keys.shape[1])
    index.init_index(max_elements=max(len(slots), 1), ef_construction=config.ef_construction,
                     M=config.M, random_seed=0)
    if len(slots):
        index.add_items(keys, slots, num_threads=1)
    path = os.path.join(out_dir, INDEX_FILE)
    tmp = temp_name(path)  # hnswlib writes a path: save beside it, then publish it whole (edgekv.atomic)
    try:
        with storage_errors(path):
            index.save_index(tmp)
            publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {
        "file": INDEX_FILE,
        "file_sha256": file_sha256(path),
        "keys_sha256": keys_digest(slots, keys),
        "num_items": int(len(slots)),
        "dim": int(keys.shape[1]),
        "M": config.M,
        "ef_construction": config.ef_construction,
        "memory_fingerprint": fingerprint,
        "memory_generation": int(generation),
    }
    write_file_atomic(os.path.join(out_dir, INDEX_META), json.dumps(meta, indent=2, sort_keys=True))
    return meta


def read_index_meta(index_dir: str) -> dict | None:
    """index.json from ``index_dir``, or None when there is no index."""
    path = os.path.join(index_dir, INDEX_META)
    if not os.path.isfile(path):
        return None
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


# --- hnswlib's file, parsed before hnswlib sees it ------------------------------------
# hnswlib 0.8 ``saveIndex``: this header, then per element one level-0 record
# [links count u32 | maxM0 neighbour ids u32 | vector f32 x dim | label u64], then per
# element a u32 byte count and its upper-level link lists (level l: count u32 | maxM ids).
HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData, maxlevel (i32), enterpoint (u32), maxM, maxM0, M,
# mult (f64), ef_construction
_MAX_M = 1024
_MAX_LEVEL = 64


def check_index_file(path: str, slots: np.ndarray, keys: np.ndarray) -> None:
    """Parse hnswlib's ``index.hnsw`` completely; refuse anything hnswlib could mis-read.

    slots: [n] occupied slots, keys: [n, R] their effective keys. After this passes, every
    count, offset and neighbour id hnswlib uses is in range (so loading and searching stay
    inside its buffers), and its labels and vectors are exactly ``slots`` and ``keys``.
    """
    n, dim = len(slots), keys.shape[1]

    def bad(why: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: not a valid HNSW index for this memory ({why}); rebuild it with "
                                f"`edgekv export MODEL --out DIR --memory MEM.ekv` or delete index.hnsw/index.json")

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
        return False, "hnswlib is not installed"
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


class Retriever:
    """Top-k by inner product over a memory's effective keys (HNSW or exact numpy)."""

    def __init__(self, memory: Memory, index_dir: str | None = None, config: IndexConfig = IndexConfig(),
                 force: str | None = None):
        self.slots, self.keys = memory_keys(memory)
        self.config = config
        self.index = None
        self.mode = "exact"
        self.reason = "no index"
        meta = read_index_meta(index_dir) if index_dir else None
        if meta is not None:
            if meta["keys_sha256"] != keys_digest(self.slots, self.keys):
                raise MismatchError(
                    f"the HNSW index in {index_dir} was built for another memory state; rebuild it: "
                    f"edgekv export MODEL --out DIR --memory MEM.ekv (or run without the index)")
            use = force == "hnsw" or (force is None and len(self.slots) >= config.exact_below)
            if not use:
                self.reason = f"{len(self.slots)} entries < {config.exact_below}: exact search is as fast"
            elif not hnswlib_available():
                self.reason = hnswlib_status()[1]
            else:
                self._load(os.path.join(index_dir, meta["file"]), meta)
        if force == "hnsw" and self.index is None and meta is not None:
            self.reason = f"hnsw requested but unavailable ({self.reason})"

    def _load(self, path: str, meta: dict) -> None:
        import hnswlib

        if not os.path.isfile(path):
            raise InputError(f"{path} is missing: index.json names it; rebuild the index or delete index.json")
        if file_sha256(path) != meta["file_sha256"]:
            raise MismatchError(f"{path} does not match its index.json (hash differs); rebuild the index")
        if meta["dim"] != self.keys.shape[1] or meta["num_items"] != len(self.slots):
            raise MismatchError(f"{path}: index shape does not match the memory; rebuild the index")
        check_index_file(path, self.slots, self.keys)  # hnswlib sees nothing this has not checked
        index = hnswlib.Index(space="ip", dim=meta["dim"])
        index.load_index(path, max_elements=max(meta["num_items"], 1))
        self.index = index
        self.mode = "hnsw"
        self.reason = "index matches memory"
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
