"""Memory updates on the device: what ``edgekv memory diff`` and ``edgekv memory apply`` run.

The update file and its atomic application are :mod:`edgekv.format.update`; applying also brings
along the HNSW index cached beside the memory (``MEM.ekv.hnsw``, :mod:`edgekv.index`): updated in
place for the changed slots when the key projection did not change, else rebuilt, and bound to
the new state. numpy, hnswlib and the standard library only (no torch): it runs on the board.
"""

from __future__ import annotations

import os
import time

from edgekv import signing
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
