"""One InduceKV task step on the host: task data in, the fixed-size memory adapted in place.

1. open the memory (or create it at its byte budget on the first task);
2. turn (a seeded sample of) the task's examples into candidate entries
   (:mod:`edgekv.induce.entries`);
3. fit the key projection (all-but-the-top) on the current memory's keys plus the
   candidates' keys; every key is compared through it from now on;
4. bilevel selection over current memory + candidates (:mod:`edgekv.induce.select`), the
   calibration phi (tau, value gates) updated by the inner level at every outer step
   (:mod:`edgekv.induce.calibrate`; its objective holds the anchors too, see there),
   L_anc from the anchors of earlier tasks;
5. keep the top-B entries, calibrate phi once more on exactly the kept memory;
6. commit atomically (kept old entries stay in their slots, new ones fill the freed
   slots, the calibration and the projection replace the old ones): the file never
   changes size; together with it, this task's anchors beside the memory
   (``MEM.ekv.anchors.jsonl``: host only, never deployed): ``anchors_per_task`` examples
   spread over the task's keys (greedy farthest point), so a few anchors stand for as many
   different items as possible. The anchors are stamped with the memory state they belong
   to and written before the memory is published (:mod:`edgekv.induce.anchors`), so a crash
   between the two writes cannot be observed.

Every query used in a loss retrieves from the memory *without its own entry*
(leave-one-out): an entry earns its place by helping other examples, which is what a
held-out query needs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from edgekv.compat import ModelSide, check_memory_matches
from edgekv.data import Example
from edgekv.errors import InputError, MismatchError
from edgekv.format import Calibration, Entry, Memory, MemorySpec, commit_update, create_memory
from edgekv.induce.anchors import anchors_path, commit_with_anchors, read_anchors
from edgekv.induce.anchors import write_anchors as write_anchors  # re-export
from edgekv.induce.calibrate import Phi, batches, calibrate
from edgekv.induce.config import AdaptConfig
from edgekv.induce.entries import EntryConfig, compute_entries, encode_examples, example_keys
from edgekv.induce.select import SelectionConfig, coverage, select
from edgekv.induce.torch_induction import (
    Bank,
    Induction,
    QuerySet,
    answer_nll,
    bank_from_entries,
    concat_banks,
    subset_bank,
)
from edgekv.retrieval import KeyProjection, effective_keys, fit_projection


# ---------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------
def memory_spec(backbone, cfg: AdaptConfig) -> MemorySpec:
    from edgekv.host.models import default_key_layer

    s = backbone.shape
    key_layer = cfg.key_layer if cfg.key_layer is not None else default_key_layer(s.num_layers)
    return MemorySpec(s.num_layers, s.num_kv_heads, s.head_dim, cfg.entry.pooled_len, s.hidden_size,
                      backbone.fingerprint, cfg.entry.payload_dtype, backbone.rope, cfg.proj_max_dirs,
                      key_layer, cfg.key_pooling)


def backbone_side(backbone, cfg: AdaptConfig) -> ModelSide:
    """What a memory must match to be adapted with ``backbone``: fingerprint, KV shapes, key
    dimension, RoPE, and the config's key layer when one is set (else the memory's is used)."""
    s = backbone.shape
    return ModelSide(backbone.fingerprint, s.num_layers, s.num_kv_heads, s.head_dim, s.hidden_size, backbone.rope,
                     key_layer=cfg.key_layer, name="this model", key_source="the config's key layer",
                     fix_model="adapt it with the model it was built with, or start a new memory",
                     fix_key="omit the key layer to use the memory's, or start a new memory")


def check_compatible(mem: Memory, backbone, cfg: AdaptConfig, budget_bytes: int | None,
                     explicit: Sequence[str] = ()) -> None:
    """The memory must belong to this backbone (the one check, edgekv.compat); explicitly given
    sizes and the config's key layer must match it."""
    s = mem.spec
    check_memory_matches(s, backbone_side(backbone, cfg), mem.path)
    if budget_bytes is not None and budget_bytes != mem.budget_bytes:
        raise MismatchError(f"{mem.path} has a budget of {mem.budget_bytes} B, the budget asked for is "
                            f"{budget_bytes} B: a memory keeps its budget (omit the budget, or start a new memory)")
    if "pooled_len" in explicit and cfg.entry.pooled_len != s.pooled_len:
        raise MismatchError(f"{mem.path} holds entries of m = {s.pooled_len} positions, EntryConfig.pooled_len says "
                            f"{cfg.entry.pooled_len} (omit it, or start a new memory)")
    if "payload_dtype" in explicit and cfg.entry.payload_dtype != s.payload_dtype:
        raise MismatchError(f"{mem.path} stores {s.payload_dtype} payloads, EntryConfig.payload_dtype says "
                            f"{cfg.entry.payload_dtype} (omit it, or start a new memory)")


def effective(raw: np.ndarray, proj: KeyProjection) -> torch.Tensor:
    return torch.from_numpy(effective_keys(raw, proj)) if len(raw) else torch.zeros((0, raw.shape[1]))


def query_set(backbone, examples: Sequence[Example], keys: np.ndarray, proj: KeyProjection,
              tasks: Sequence[str]) -> QuerySet:
    """Queries (prompt + answer tokens, image path when there is one) with effective keys, for the loss."""
    encs = encode_examples(backbone, examples)
    images = [e.image for e in encs] if any(e.image for e in encs) else []
    return QuerySet(effective(keys, proj), [list(e.ids[: e.answer_end]) for e in encs],
                    [e.answer_start for e in encs], [ex.id for ex in examples], list(tasks), images)


def sample(n: int, k: int, seed: int) -> list[int]:
    """k of range(n) without replacement (all, in order, when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def spread_rows(P: np.ndarray, num: int, seed: int) -> list[int]:
    """``num`` rows of unit keys P [N, R] spread over the key space (greedy farthest point:
    each next row has the lowest best similarity to those chosen). Sorted; all when N <= num."""
    n = len(P)
    if num >= n:
        return list(range(n))
    if num == 0:
        return []
    chosen = [int(np.random.default_rng(seed).integers(n))]
    best = P @ P[chosen[0]]  # [N] highest similarity to any chosen row
    for _ in range(num - 1):
        best[chosen] = np.inf
        nxt = int(np.argmin(best))
        chosen.append(nxt)
        best = np.maximum(best, P @ P[nxt])
    return sorted(chosen)


def terms(model, ind: Induction | None, cur: QuerySet, anc: QuerySet | None, phi: Calibration, eps: float,
          rows_cur: Sequence[int], rows_anc: Sequence[int], inputs=None) -> dict:
    """J's terms for a memory (w = 1 on every entry; ``ind`` None: empty memory), no gradients."""
    tau, gates = torch.tensor(phi.tau), torch.tensor(phi.gates, dtype=torch.float32)

    def nll(qs: QuerySet, rows: list[int]) -> float:
        if ind is None:  # the model alone
            ids, images = [qs.ids[r] for r in rows], qs.images_of(rows)
            embeds = None if images is None else inputs.embed_batch(ids, images)[0]
            return float(answer_nll(model, ids, [qs.answer_start[r] for r in rows], None, None, embeds).mean())
        return float(ind.loss(qs, rows, torch.zeros(len(ind.bank)), tau, gates))

    with torch.no_grad():
        out = {"L_cur": _chunked(nll, cur, rows_cur)}
        out["L_anc"] = _chunked(nll, anc, rows_anc) if anc is not None and len(rows_anc) else None
        R = cur.keys.shape[1]
        P = ind.P if ind is not None else torch.zeros((0, R))
        out["omega"] = float(coverage(torch.ones(len(P)), P, eps)) if len(P) else 0.0
    return out


def _chunked(nll, qs: QuerySet, rows: Sequence[int], size: int = 8) -> float:
    rows = list(rows)
    vals = [nll(qs, rows[i: i + size]) * len(rows[i: i + size]) for i in range(0, len(rows), size)]
    return float(sum(vals) / max(len(rows), 1))


def j_value(t: dict, sel: SelectionConfig) -> float:
    return t["L_cur"] + sel.gamma * t["omega"] + (sel.beta * t["L_anc"] if t["L_anc"] is not None else 0.0)


def read_bank(mem: Memory) -> tuple[Bank, list[int]]:
    """The memory's entries as a host bank, and their slots."""
    s = mem.spec
    slots = mem.occupied().tolist()
    entries = [mem.read_entry(i) for i in slots]
    return bank_from_entries(entries, s.num_layers, s.key_dim, s.payload_shape), slots


def assign_slots(num_slots: int, old_slots: Sequence[int], keep_old: Sequence[int], num_new: int
                 ) -> tuple[list[int], list[int]]:
    """Kept old entries stay; new entries fill the free slots in ascending order.

    -> (slots for the new entries, slots to clear)
    """
    kept = {old_slots[i] for i in keep_old}
    free = [s for s in range(num_slots) if s not in kept]
    if num_new > len(free):
        raise RuntimeError(f"{num_new} new entries for {len(free)} free slots (selection keeps at most the slots)")
    new_slots = free[:num_new]
    dropped = sorted(set(old_slots) - kept - set(new_slots))
    return new_slots, dropped


# ---------------------------------------------------------------------------------
# the task step
# ---------------------------------------------------------------------------------
def adapt(backbone, examples: Sequence[Example], memory_path: str, budget_bytes: int | None = None,
          task: str = "task", cfg: AdaptConfig | None = None, explicit: Sequence[str] = (),
          progress: bool = False, image_root: str | None = None) -> dict:
    """Adapt the memory at ``memory_path`` to ``task`` (create it first if missing).

    ``explicit``: names of config fields the user set on purpose (``pooled_len``,
    ``payload_dtype``): these must match an existing memory; others follow the memory.
    ``image_root``: folder that relative image paths of the examples are relative to (the
    data file's); they are stored resolved in the anchors file.
    Returns the per-task summary (see ``edgekv adapt --json``).
    """
    from edgekv.data import resolve_images
    from edgekv.host.keymodel import KeyModel

    cfg = cfg or AdaptConfig()
    examples = resolve_images(examples, os.path.abspath(image_root) if image_root else None)
    vision = getattr(backbone, "vision", None)
    missing_images = [ex.image for ex in examples if vision is not None and ex.image and not os.path.isfile(ex.image)]
    if missing_images:  # before the memory is created
        raise InputError(f"image {missing_images[0]} not found ({len(missing_images)} missing; image paths are "
                         f"relative to the data file's folder)")
    t0 = time.perf_counter()
    memory_path = os.fspath(memory_path)
    if not examples:
        raise InputError("the task has no examples")
    if not task or len(task.encode("utf-8")) > 32:
        raise InputError(f"task name {task!r} must be 1 to 32 bytes of UTF-8")
    created = False
    if not os.path.exists(memory_path):
        if budget_bytes is None:
            raise InputError(f"{memory_path} does not exist: pass --budget to create it")
        create_memory(memory_path, memory_spec(backbone, cfg), budget_bytes,
                      Calibration(cfg.init_tau, (cfg.init_gate,) * backbone.shape.num_layers)).close()
        created = True
    with Memory(memory_path) as mem:
        check_compatible(mem, backbone, cfg, budget_bytes, explicit)
        spec, num_slots, read_generation, read_crc = mem.spec, mem.num_slots, mem.generation, mem.header_crc32
        old_cal, old_proj = mem.calibration, mem.projection
        old_bank, old_slots = read_bank(mem)
    ecfg = EntryConfig(spec.pooled_len, cfg.entry.pooling, cfg.entry.skip_template_prefix,
                       spec.payload_dtype, cfg.entry.batch_size)
    key_model = KeyModel(backbone.decoder, spec.key_layer, spec.key_pooling)
    rng_seed = cfg.seed

    # candidates and current-task queries
    cand_rows = sample(len(examples), cfg.max_candidates, rng_seed)
    cand_examples = [examples[i] for i in cand_rows]
    new_entries, _ = compute_entries(backbone, cand_examples, key_model, ecfg, task, progress)
    new_bank = bank_from_entries(new_entries, spec.num_layers, spec.key_dim, spec.payload_shape)
    pool = concat_banks(old_bank, new_bank)
    proj = fit_projection(pool.raw_keys, cfg.proj_dirs)
    P = effective(pool.raw_keys, proj)

    q_rows = sample(len(examples), cfg.max_queries, rng_seed + 1)
    q_examples = [examples[i] for i in q_rows]
    cand_key = {ex.id: new_bank.raw_keys[i] for i, ex in enumerate(cand_examples)}
    missing = [ex for ex in q_examples if ex.id not in cand_key]
    if missing:
        for ex, k in zip(missing, example_keys(backbone, key_model, missing), strict=True):
            cand_key[ex.id] = k
    cur_raw = np.stack([cand_key[ex.id] for ex in q_examples])
    cur = query_set(backbone, q_examples, cur_raw, proj, [task] * len(q_examples))
    anchors_all = read_anchors(memory_path, read_generation, read_crc)  # those of the state read above
    earlier = [(t, ex) for t, ex in anchors_all if t != task]
    anc = None
    anc_raw = np.zeros((0, spec.key_dim), np.float32)
    if earlier:
        anc_raw = example_keys(backbone, key_model, [ex for _, ex in earlier])
        anc = query_set(backbone, [ex for _, ex in earlier], anc_raw, proj, [t for t, _ in earlier])

    eval_cur = sample(len(cur), cfg.eval_queries, rng_seed + 2)
    eval_anc = sample(len(anc), cfg.eval_queries, rng_seed + 3) if anc is not None else []

    # J before: the memory as it was (its own projection and calibration)
    old_ind = None
    if len(old_bank):
        cur_old = QuerySet(effective(cur_raw, old_proj), cur.ids, cur.answer_start, cur.source_ids, cur.tasks,
                           cur.images)
        anc_old = None if anc is None else QuerySet(effective(anc_raw, old_proj), anc.ids, anc.answer_start,
                                                    anc.source_ids, anc.tasks, anc.images)
        old_ind = Induction(backbone.model, old_bank, effective(old_bank.raw_keys, old_proj), cfg.top_k, spec.rope,
                            vision)
        before = terms(backbone.model, old_ind, cur_old, anc_old, old_cal, cfg.selection.eps, eval_cur, eval_anc)
    else:
        before = terms(backbone.model, None, cur, anc, old_cal, cfg.selection.eps, eval_cur, eval_anc, vision)
    before["J"] = j_value(before, cfg.selection)

    # bilevel selection; the inner level steps phi on L_cur after every outer backward
    ind = Induction(backbone.model, pool, P, cfg.top_k, spec.rope, vision)
    phi = Phi.from_calibration(old_cal, cfg.calibration)
    opt = torch.optim.Adam(phi.parameters(), lr=cfg.calibration.lr)
    sel = cfg.selection
    cur_batches = batches(len(cur), sel.batch_size, sel.steps, sel.seed)
    anc_batches = batches(len(anc), sel.batch_size, sel.steps, sel.seed + 1) if anc is not None else None

    def loss_terms(w: torch.Tensor, step: int):
        opt.zero_grad()
        log_w = torch.log(w.clamp(min=1e-6))
        l_cur = ind.loss(cur, cur_batches[step], log_w, phi.tau(), phi.gates())
        l_anc = None
        if anc_batches is not None:  # phi sees the anchors only with calibration.with_anchors
            tau, gates = (phi.tau(), phi.gates()) if cfg.calibration.with_anchors else \
                (phi.tau().detach(), phi.gates().detach())
            l_anc = ind.loss(anc, anc_batches[step], log_w, tau, gates)
        return l_cur, l_anc

    result = select(num_slots, P, loss_terms, sel, after_backward=opt.step if cfg.calibration.enabled else None,
                    progress=progress)
    keep = result.keep.tolist()
    num_old = len(old_bank)
    keep_old = [i for i in keep if i < num_old]
    keep_new = [i - num_old for i in keep if i >= num_old]

    # final calibration on exactly the kept memory (every w = 1)
    kept_bank = subset_bank(pool, keep)
    kept_P = P[keep]
    kept_ind = Induction(backbone.model, kept_bank, kept_P, cfg.top_k, spec.rope, vision)

    use_anc = anc is not None and cfg.calibration.with_anchors
    cal_anc = iter(batches(len(anc), cfg.calibration.batch_size, cfg.calibration.steps,
                           cfg.calibration.seed + 1)) if use_anc else None

    def cal_loss(phi_: Phi, rows: list[int]) -> torch.Tensor:
        zeros = torch.zeros(len(kept_bank))
        loss = kept_ind.loss(cur, rows, zeros, phi_.tau(), phi_.gates())
        if cal_anc is not None:
            loss = loss + sel.beta * kept_ind.loss(anc, next(cal_anc), zeros, phi_.tau(), phi_.gates())
        return loss

    cal_losses = calibrate(phi, cal_loss, len(cur), cfg.calibration, progress)
    calibration = phi.calibration()
    after = terms(backbone.model, kept_ind, cur, anc, calibration, sel.eps, eval_cur, eval_anc)
    after["J"] = j_value(after, sel)

    # commit: one atomic update
    new_slots, clear = assign_slots(num_slots, old_slots, keep_old, len(keep_new))
    put: dict[int, Entry] = {s: new_entries[i] for s, i in zip(new_slots, keep_new, strict=True)}
    # anchors of this task (spread over its keys) replace any earlier ones of the same name
    rows = spread_rows(P[num_old:].numpy(), cfg.anchors_per_task, rng_seed + 4)
    anchors = earlier + [(task, cand_examples[i]) for i in rows]
    # the anchors of the new state are written (stamped) before the memory is published, both
    # under its write lock: a crash between the two cannot be observed (edgekv/induce/anchors.py);
    # a concurrent adapt is refused (expect_generation), not mixed in
    anchor_bytes = commit_with_anchors(memory_path, anchors, anchors_all, read_generation, read_crc, commit_update,
                                       put=put, clear=clear, calibration=calibration, projection=proj)["bytes"]

    with Memory(memory_path) as mem:
        summary = {
            "task": task,
            "created": created,
            "memory": memory_path,
            "num_examples": len(examples),
            "num_candidates": len(new_entries),
            "num_slots": mem.num_slots,
            "num_used": mem.num_used,
            "kept_new": len(keep_new),
            "kept_old": len(keep_old),
            "dropped_old": num_old - len(keep_old),
            "per_task_counts": mem.per_task_counts(),
            "file_bytes": mem.file_bytes,
            "file_bytes_on_disk": os.path.getsize(memory_path),
            "budget_bytes": mem.budget_bytes,
            "slot_bytes": spec.slot_bytes,
            "pooled_len": spec.pooled_len,
            "payload_dtype": spec.payload_dtype,
            "key_layer": spec.key_layer,
            "key_pooling": spec.key_pooling,
            "top_k": cfg.top_k,
            "projection_dirs": int(len(proj.dirs)),
            "J_before": before,
            "J_after": after,
            "selection_steps": len(result.history),
            "calibration": {"tau": calibration.tau, "gates": list(calibration.gates),
                            "tau_before": old_cal.tau, "final_losses": cal_losses},
            "anchors": {"path": anchors_path(memory_path), "count": len(anchors),
                        "this_task": len(rows), "bytes": anchor_bytes},
            "generation": mem.generation,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return summary
