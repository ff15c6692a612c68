"""Memory updates on the device: what ``edgekv memory diff|apply|ls|rm`` run.

The update file and its atomic application are :mod:`edgekv.format.update`; applying also brings
along the HNSW index cached beside the memory (``MEM.ekv.hnsw``, :mod:`edgekv.index`): updated in
place for the changed slots when the key projection did not change, else rebuilt, and bound to
the new state. numpy, hnswlib and the standard library only (no torch): it runs on the board.

:func:`list_entries` / :func:`remove_entries` (``edgekv memory ls|rm``): the occupied slots, and
removing a task's or some entries' slots in one commit (:func:`edgekv.format.commit_update`'s
``clear``: same size, generation + 1, untouched slots byte-identical), with the cached index, the
host's anchors file and the signature beside the memory kept consistent with it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from edgekv import signing
from edgekv.errors import InputError
from edgekv.format import Memory, commit_update
from edgekv.format.layout import TASK_NAME_BYTES, _decode_name, _encode_name
from edgekv.format.update import apply_update, write_update
from edgekv.index import IndexConfig, follow_update, index_before_update


def diff_memories(old: str | os.PathLike, new: str | os.PathLike, out: str | os.PathLike,
                  sign: str | os.PathLike | None = None) -> dict:
    """Write the update from memory state ``old`` to ``new`` (a later state of the same memory) to
    ``out``; returns its summary (generations, slots written / zeroed, update and file bytes).
    ``sign``: a private key file; the update is signed (``OUT.sig``, with the signature of ``new``
    for the board to keep: :func:`edgekv.signing.sign_update`)."""
    key = signing.load_private_key(sign) if sign else None  # a bad key fails before anything is written
    summary = write_update(old, new, out)
    if key is not None:
        summary["signature"] = {"path": signing.sign_update(out, new, key),
                                "key_id": signing.key_id(key.public_key())}
    return summary


def apply_memory_update(memory: str | os.PathLike, update: str | os.PathLike,
                        config: IndexConfig = IndexConfig(), trust: str | bytes | None = None) -> dict:
    """Apply ``update`` to ``memory`` (atomic; a no-op when the memory already is the update's
    state), then move the cached index to the new state. Returns the summary, with ``index``
    (none / updated / rebuilt / failed) and ``seconds`` (apply, index).

    ``trust``: a public key (None: ``EDGEKV_TRUST``, if set): the update must be signed by it
    (else :class:`SignatureError`, nothing written), and the result's signature it carries is
    written as ``MEM.ekv.sig`` after the memory (a crash in between leaves a stale signature that
    a trusting run refuses; applying the same update again writes it)."""
    memory = os.fspath(memory)
    key = signing.trusted_key(trust)
    result = signing.verify_update(update, key) if key is not None else None
    before = index_before_update(memory)
    summary = apply_update(memory, update)
    if result is not None:
        summary["signature"] = {"path": signing.adopt_result_signature(memory, result),
                                "key_id": result["key_id"]}
    changed = summary.pop("changed_slots")
    t0 = time.perf_counter()
    if summary["applied"]:
        summary["index"] = follow_update(memory, before, changed, config)
    else:
        summary["index"] = {"index": "none", "reason": "the memory was already at the update's state"}
    summary["seconds"] = {"apply": summary["seconds"], "index": round(time.perf_counter() - t0, 4)}
    return summary


# --- edgekv memory ls / rm -----------------------------------------------------------------------
ANCHORS_SUFFIX = ".anchors.jsonl"  # edgekv.induce.anchors.anchors_path (host only; imported when the file exists)


def _entries(mem: Memory) -> list[dict]:
    keep = ("slot", "entry_id", "task", "source_id", "insert_seq")
    return [{k: info[k] for k in keep} for info in (mem.slot_info(int(s)) for s in mem.occupied())]


def list_entries(path: str | os.PathLike) -> list[dict]:
    """The occupied slots of the memory at ``path``, in slot order: ``slot``, ``entry_id``,
    ``task``, ``source_id`` and ``insert_seq`` (the insertion order: larger is newer)."""
    with Memory(path) as mem:
        return _entries(mem)


def memory_entries(path: str | os.PathLike) -> dict:
    """What ``edgekv memory ls`` shows: :func:`list_entries` (``entries``) with the memory's slot
    count, occupied slots, generation and entries per task, all from one read of the file."""
    with Memory(path) as mem:
        return {"memory": mem.path, "generation": mem.generation, "num_slots": mem.num_slots,
                "num_used": mem.num_used, "per_task_counts": mem.per_task_counts(), "entries": _entries(mem)}


def _stored_name(task: str) -> str:
    """A task name as the header stores it (long names are shortened, as the writer does)."""
    return _decode_name(_encode_name(task, TASK_NAME_BYTES))


def _id_list(ids: Iterable[int], most: int = 20) -> str:
    ids = sorted(ids)
    more = f", ... ({len(ids)} in all)" if len(ids) > most else ""
    return ", ".join(map(str, ids[:most])) + more


def _slots_to_clear(mem: Memory, task: str | None, entry_ids: list[int] | None) -> list[int]:
    """The occupied slots that ``task`` / ``entry_ids`` name; an InputError naming what the memory
    holds when a name or id is not there, or when that would remove nothing."""
    entries = _entries(mem)
    counts = mem.per_task_counts()
    held = ", ".join(f"{t} ({n})" for t, n in counts.items() if n) or "none (the memory is empty)"
    if task is not None:
        name = _stored_name(task)
        if name not in counts:
            raise InputError(f"{mem.path}: no task {task!r}; its tasks (entries): {held}; nothing was removed")
        if not counts[name]:
            raise InputError(f"{mem.path}: task {task!r} has no entries, nothing to remove; tasks with entries: "
                             f"{held}")
        return [e["slot"] for e in entries if e["task"] == name]
    ids = {int(i) for i in entry_ids or ()}
    if not ids:
        raise InputError("give at least one entry id to remove (edgekv memory ls lists them)")
    missing = ids - {e["entry_id"] for e in entries}
    if missing:
        have = _id_list(e["entry_id"] for e in entries) or "none (the memory is empty)"
        raise InputError(f"{mem.path}: no entry with id {_id_list(missing)}; its entry ids: {have}; nothing was "
                         f"removed")
    return [e["slot"] for e in entries if e["entry_id"] in ids]


def remove_entries(path: str | os.PathLike, task: str | None = None, entry_ids: Iterable[int] | None = None,
                   sign: str | os.PathLike | None = None, config: IndexConfig = IndexConfig()) -> dict:
    """Remove every entry of ``task``, or the entries with ids ``entry_ids``, from the memory at
    ``path`` in one atomic commit (:func:`edgekv.format.commit_update` with ``clear``): the slots
    are zeroed and marked empty, the file keeps its size, the generation goes up by one, every
    other slot is byte-identical. Task names stay in the header (the format never removes them).
    Returns the summary: ``removed`` (the entries, as :func:`list_entries`), generations, slots,
    ``anchors``, ``index`` and ``signature``.

    Refused (:class:`InputError`, nothing written): both or neither of ``task`` / ``entry_ids``, a
    task or an id the memory does not hold (the message lists what it holds), a task without
    entries; and a signed memory (``MEM.ekv.sig``) unless ``sign`` (a private key file) is given:
    the new state is then signed (as ``adapt --sign``). A concurrent writer: :class:`MismatchError`.

    Beside the memory: the cached HNSW index follows as after ``memory apply`` (rebuilt, bound to
    the new state; an index bound to the old state is never used for the new one). The host's
    anchors file (``MEM.ekv.anchors.jsonl``), if there is one, is committed with the memory as
    ``adapt`` commits it (:func:`edgekv.induce.anchors.commit_with_anchors`): the new state's set
    is the current one without the anchors of the removed task (``--entry``: of each task whose
    last entry was removed), so the next ``adapt`` does not keep fitting a task that is gone.
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    if (task is None) == (entry_ids is None):
        raise InputError("give either a task or entry ids to remove, not both and not neither")
    entry_ids = None if entry_ids is None else [int(i) for i in entry_ids]
    key = signing.load_private_key(sign) if sign else None  # a bad key fails before anything is written
    with Memory(path) as mem:
        generation, crc, num_slots, used = mem.generation, mem.header_crc32, mem.num_slots, mem.num_used
        slots = _slots_to_clear(mem, task, entry_ids)
        chosen = set(slots)
        removed = [e for e in _entries(mem) if e["slot"] in chosen]
        counts = mem.per_task_counts()
    sig = signing.signature_path(path)
    if key is None and os.path.exists(sig):  # a local change: the signature would no longer cover the file
        raise InputError(f"{path} is signed ({os.path.basename(sig)}) and removing entries changes it: pass --sign "
                         f"KEY to sign the new state, or delete {os.path.basename(sig)} first (trusting runs then "
                         f"refuse the memory until it is signed again); nothing was removed")
    emptied = sorted(t for t in {r["task"] for r in removed} if sum(r["task"] == t for r in removed) == counts[t])
    index_before = index_before_update(path)
    anchors = None
    if os.path.isfile(path + ANCHORS_SUFFIX):  # host only (adapt writes it); its module needs the task-data reader
        from edgekv.induce.anchors import anchors_path, commit_with_anchors, read_anchors

        current = read_anchors(path, generation, crc)  # the set of the state the slots were read from
        kept = [(t, ex) for t, ex in current if _stored_name(t) not in emptied]
        new_generation = commit_with_anchors(path, kept, current, generation, crc, clear=slots)["generation"]
        anchors = {"path": anchors_path(path), "kept": len(kept), "dropped": len(current) - len(kept)}
    else:
        new_generation = commit_update(path, clear=slots, expect_generation=generation)
    summary = {"memory": path, "removed": removed, "slots_cleared": len(slots), "tasks_emptied": emptied,
               "generation_before": generation, "generation": new_generation, "num_slots": num_slots,
               "num_used_before": used, "num_used": used - len(slots), "anchors": anchors}
    if key is not None:  # after the commit: a crash in between leaves a stale signature, refused under --trust
        summary["signature"] = {"path": signing.sign_memory(path, key, expect_generation=new_generation),
                                "key_id": signing.key_id(key.public_key())}
    t1 = time.perf_counter()
    summary["index"] = follow_update(path, index_before, slots, config)
    summary["seconds"] = {"remove": round(t1 - t0, 4), "index": round(time.perf_counter() - t1, 4)}
    return summary
