"""Anchors: a few examples per task kept beside the memory (``MEM.ekv.anchors.jsonl``, host only).

The memory and its anchors are two files, committed so that a crash between the two writes
cannot be observed: every set of anchors is stamped with the memory state it belongs to
(generation and header CRC32), and :func:`commit_with_anchors` writes the file holding the
anchors of the *next* state and those of the current one **before** the memory commit
publishes the next state (both under the memory's write lock), then drops the old set once
the memory is published. :func:`read_anchors` returns the set stamped with the memory's
state. So after a kill at any point the loader returns the anchors of the state the memory
holds: before the anchors write, the file only knows the current state; between the two
writes, the memory is still the current state and the file holds its set too; after the
commit, the file holds the new state's set.

File format (JSON lines): a set starts with a header line
``{"edgekv_anchors": 1, "generation": G, "memory_crc32": C, "count": N}`` followed by its N
records ``{"task", "id", "prompt", "answer"[, "image"]}``. A file without header lines (written
before the stamp existed) is one unstamped set, used for whatever state the memory holds.
Version 2 adds the state's *phrasing sketch* (:func:`edgekv.retrieval.update_sketch`, the
low-rank sum of every learnt task's phrasing scatter the key projection is fitted with): the
header then carries ``"phrasing": [S, R]`` and the next line ``{"phrasing": base64}`` holds the
[S, R] little-endian float32 rows. Version 1 files (no sketch) are read as sets without one.

Which set :func:`read_anchors` returns for a memory at generation G with header CRC C: the
set stamped (G, C); else an unstamped set; else the newest set stamped with a generation
below G (the memory was committed by something that keeps no anchors, or a commit that
wrote its anchors was never published and another writer committed G since); else none.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgekv.atomic import remove_stale, write_file_atomic
from edgekv.data import Example
from edgekv.errors import EdgeKVError, InputError

ANCHORS_VERSION = 2
READ_ANCHORS_VERSIONS = (1, 2)  # version 1: no phrasing sketch
Anchors = list[tuple[str, Example]]


@dataclass(frozen=True)
class AnchorSet:
    """One stamped set of anchors: the memory state (generation, header CRC32) it belongs to."""

    generation: int | None  # None: an unstamped (old) file
    memory_crc32: int | None
    anchors: tuple[tuple[str, Example], ...]
    phrasing: np.ndarray | None = None  # [S, R] float32 phrasing sketch of the state; None: none kept


def anchors_path(memory_path: str | os.PathLike) -> str:
    return os.fspath(memory_path) + ".anchors.jsonl"


def _record(task: str, ex: Example) -> dict:
    rec = {"task": task, "id": ex.id, "prompt": ex.prompt, "answer": ex.answer}
    if ex.image is not None:
        rec["image"] = ex.image
    return rec


def read_anchor_sets(memory_path: str | os.PathLike) -> list[AnchorSet]:
    """Every set in the anchors file, in file order; [] when there is no file."""
    path = anchors_path(memory_path)
    if not os.path.isfile(path):
        return []
    sets: list[AnchorSet] = []
    head: dict | None = None
    recs: list[tuple[str, Example]] = []
    sketch: np.ndarray | None = None

    def close(n: int) -> None:
        if head is None and not recs:
            return
        if head is not None and head["count"] != len(recs):
            raise InputError(f"{path}: anchor set of generation {head['generation']} holds {len(recs)} records, its "
                             f"header says {head['count']} (line {n}); delete the file to drop the anchors "
                             f"(retention then goes unmeasured)")
        sets.append(AnchorSet(None if head is None else head["generation"],
                              None if head is None else head["memory_crc32"], tuple(recs), sketch))

    with open(path, encoding="utf-8") as f:
        n = 0
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if isinstance(r, dict) and "edgekv_anchors" in r:
                    if r["edgekv_anchors"] not in READ_ANCHORS_VERSIONS:
                        raise ValueError(f"anchors format version {r['edgekv_anchors']!r} is not supported")
                    close(n)
                    head = {"generation": int(r["generation"]), "memory_crc32": int(r["memory_crc32"]),
                            "count": int(r["count"]), "phrasing": r.get("phrasing")}
                    recs, sketch = [], None
                    continue
                if isinstance(r, dict) and "phrasing" in r and head is not None and head["phrasing"] is not None \
                        and sketch is None and not recs:
                    sketch = _decode_sketch(r["phrasing"], head["phrasing"])
                    continue
                recs.append((r["task"], Example(r["id"], r["prompt"], r["answer"], r.get("image"))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise InputError(f"{path}: line {n} is not an anchor record ({e}); delete the file to "
                                 f"drop the anchors (retention then goes unmeasured)") from None
        close(n + 1)
    return sets


def _encode_sketch(sketch: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(sketch, "<f4").tobytes()).decode("ascii")


def _decode_sketch(text: str, shape) -> np.ndarray:
    """base64 of [S, R] little-endian float32 -> [S, R] float32 (ValueError when it is not that)."""
    rows, dim = (int(x) for x in shape)
    data = base64.b64decode(text.encode("ascii"), validate=True)
    if rows < 0 or dim < 1 or len(data) != 4 * rows * dim:
        raise ValueError(f"phrasing sketch holds {len(data)} bytes, its header says [{rows}, {dim}] float32")
    arr = np.frombuffer(data, "<f4").reshape(rows, dim).astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("phrasing sketch holds non-finite values")
    return arr


def select_set(sets: Sequence[AnchorSet], generation: int | None, memory_crc32: int | None) -> AnchorSet | None:
    """The set for the memory state (generation, CRC) (see the module docstring); None: no set.
    ``generation`` None (no memory): the newest set."""
    if not sets:
        return None
    if generation is None:
        return max(sets, key=lambda s: -1 if s.generation is None else s.generation)
    for s in sets:
        if s.generation == generation and s.memory_crc32 == memory_crc32:
            return s
    for s in sets:
        if s.generation is None:
            return s
    older = [s for s in sets if s.generation is not None and s.generation < generation]
    return max(older, key=lambda s: s.generation) if older else None  # type: ignore[arg-type, return-value]


def memory_state(memory_path: str | os.PathLike) -> tuple[int, int] | None:
    """(generation, header CRC32) of the memory at ``memory_path``; None when there is no file."""
    from edgekv.format import Memory

    if not os.path.isfile(os.fspath(memory_path)):
        return None
    with Memory(memory_path) as mem:
        return mem.generation, mem.header_crc32


def read_anchor_set(memory_path: str | os.PathLike, generation: int | None = None,
                    memory_crc32: int | None = None) -> AnchorSet | None:
    """The set stored beside the memory for its state (default: the state the file holds now); None: none."""
    if generation is None:
        state = memory_state(memory_path)
        if state is not None:
            generation, memory_crc32 = state
    return select_set(read_anchor_sets(memory_path), generation, memory_crc32)


def read_anchors(memory_path: str | os.PathLike, generation: int | None = None,
                 memory_crc32: int | None = None) -> Anchors:
    """(task, example) pairs stored beside the memory for its state; [] when there are none.

    ``generation`` / ``memory_crc32``: the memory state to read the anchors of (default: the
    state the memory file holds now)."""
    chosen = read_anchor_set(memory_path, generation, memory_crc32)
    return [] if chosen is None else list(chosen.anchors)


def anchors_text(sets: Sequence[tuple]) -> str:
    """The file's text for stamped sets ``(generation, memory_crc32, anchors[, phrasing])``, newest first."""
    lines = []
    for gen, crc, anchors, *rest in sets:
        sketch = rest[0] if rest else None
        head = {"edgekv_anchors": ANCHORS_VERSION, "generation": int(gen), "memory_crc32": int(crc),
                "count": len(anchors)}
        if sketch is not None:
            head["phrasing"] = [int(sketch.shape[0]), int(sketch.shape[1])]
        lines.append(json.dumps(head))
        if sketch is not None:
            lines.append(json.dumps({"phrasing": _encode_sketch(sketch)}))
        lines += [json.dumps(_record(task, ex), ensure_ascii=False) for task, ex in anchors]
    return "".join(line + "\n" for line in lines)


def write_anchors(memory_path: str | os.PathLike, sets: Sequence[tuple]) -> int:
    """Replace the anchors file atomically (edgekv.atomic) with stamped ``sets`` (:func:`anchors_text`);
    returns its bytes."""
    path = anchors_path(memory_path)
    remove_stale(path)  # temporary files of killed writers
    return write_file_atomic(path, anchors_text(sets))


def commit_with_anchors(memory_path: str | os.PathLike, anchors: Sequence[tuple[str, Example]],
                        current: Sequence[tuple[str, Example]], read_generation: int, read_crc32: int,
                        commit: Callable[..., int] | None = None, phrasing: np.ndarray | None = None,
                        current_phrasing: np.ndarray | None = None, **update) -> dict:
    """Commit a memory update and the anchors of the new state together (see the module docstring).

    ``current``: the anchors of the state the update was computed from, (``read_generation``,
    ``read_crc32``); ``phrasing`` / ``current_phrasing``: the phrasing sketches of the new and of
    that state (None: none); ``update``: :func:`edgekv.format.commit_update`'s keywords (``put``,
    ``clear``, ``calibration``, ``projection``, ``top_k``); the commit is refused if the memory is no
    longer at ``read_generation``. Returns ``{"generation", "bytes"}`` (the anchors file's size).
    """
    if commit is None:
        from edgekv.format import commit_update as commit
    out: dict = {}
    anchors, current = list(anchors), list(current)

    def before(gen: int, crc: int) -> None:
        out["bytes"] = write_anchors(memory_path, [(gen, crc, anchors, phrasing),
                                                   (read_generation, read_crc32, current, current_phrasing)])

    def after(gen: int, crc: int) -> None:
        try:  # drop the previous state's set; if this fails, the two-set file is just as right
            out["bytes"] = write_anchors(memory_path, [(gen, crc, anchors, phrasing)])
        except (EdgeKVError, OSError):
            pass

    out["generation"] = commit(memory_path, expect_generation=read_generation, before_publish=before,
                               after_publish=after, **update)
    return out


def anchors_equal(a: Sequence[tuple[str, Example]], b: Sequence[tuple[str, Example]]) -> bool:
    """Same tasks and records, in order."""
    return [_record(t, e) for t, e in a] == [_record(t, e) for t, e in b]


__all__ = ["AnchorSet", "Anchors", "anchors_equal", "anchors_path", "anchors_text", "commit_with_anchors",
           "read_anchor_set",
           "memory_state", "read_anchor_sets", "read_anchors", "select_set", "write_anchors"]
