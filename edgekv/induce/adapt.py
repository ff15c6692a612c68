"""One InduceKV task step on the host: task data in, the fixed-size memory adapted in place.

:func:`adapt` runs these steps, each a function below:

1. open the memory, or create it at its byte budget on the first task, and check it belongs
   to this backbone (:func:`open_memory`);
2. turn (a seeded sample of) the task's examples into candidate entries
   (:func:`encode_candidates`, :mod:`edgekv.induce.entries`);
3. add this task's phrasing (same-answer candidates' residuals) to the sketch kept with the
   anchors and refit the key projection on the current memory's keys plus the candidates'
   keys: the sketch's top ``phrase_dirs`` directions, or all-but-the-top while there is no
   sketch (:func:`phrasing`, :func:`edgekv.retrieval.memory_projection`); every key is
   compared through it from now on;
4. the query sets: current-task queries and the anchors of earlier tasks (:func:`build_queries`);
5. J of the memory as it was (:func:`j_before`);
6. bilevel selection over current memory + candidates (:func:`select_kept`,
   :mod:`edgekv.induce.select`), the calibration phi (tau, value gates) updated by the inner
   level at every outer step (:mod:`edgekv.induce.calibrate`; its objective holds the anchors
   too, see there), L_anc from the anchors of earlier tasks; its coverage term sees
   all-but-the-top keys when the projection is the phrasing one (:func:`coverage_keys`). A ``selector`` (a baseline's
   policy: reservoir, FIFO) replaces this step and names the kept entries itself
   (:func:`kept_by_selector`); every other step is the same;
7. calibrate phi once more on exactly the kept memory (:func:`final_calibration`);
8. commit atomically (:func:`commit`: kept old entries stay in their slots, new ones fill the
   freed slots, the calibration and the projection replace the old ones): the file never
   changes size; together with it, this task's anchors beside the memory
   (``MEM.ekv.anchors.jsonl``: host only, never deployed): ``anchors_per_task`` examples
   spread over the task's keys (greedy farthest point), so a few anchors stand for as many
   different items as possible. The anchors are stamped with the memory state they belong
   to and written before the memory is published (:mod:`edgekv.induce.anchors`), so a crash
   between the two writes cannot be observed;
9. the per-task summary (:func:`task_summary`).

Every query used in a loss retrieves from the memory *without its own entry*
(leave-one-out): an entry earns its place by helping other examples, which is what a
held-out query needs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from edgekv.compat import ModelSide, check_memory_matches
from edgekv.data import Example, resolve_images
from edgekv.errors import InputError, MismatchError
from edgekv.format import Calibration, Entry, Memory, MemorySpec, commit_update, create_memory
from edgekv.induce.anchors import AnchorSet, anchors_path, commit_with_anchors, read_anchor_set
from edgekv.induce.anchors import read_anchors as read_anchors  # re-export
from edgekv.induce.anchors import write_anchors as write_anchors  # re-export
from edgekv.induce.calibrate import Phi, batches, calibrate, kept_memory_objective
from edgekv.induce.config import AdaptConfig, resolve_entry_config
from edgekv.induce.entries import EntryConfig, compute_entries, encode_examples, example_keys
from edgekv.induce.select import SelectionConfig, SelectionLoss, SelectionResult, coverage, select
from edgekv.induce.torch_induction import (
    Bank,
    Induction,
    QuerySet,
    answer_nll,
    bank_from_entries,
    concat_banks,
    subset_bank,
)
from edgekv.retrieval import (
    KeyProjection,
    add_task_phrasing,
    effective_keys,
    fit_projection,
    memory_projection,
)

# A baseline's replacement for the bilevel selection: (num_slots, old, new) -> kept pool rows.
# ``old``: (task, example id) of the memory's entries in slot order; ``new``: those of the
# candidates in sample order. Pool row i is old[i] for i < len(old), else new[i - len(old)];
# at most num_slots rows, each once.
Selector = Callable[[int, Sequence[tuple[str, str]], Sequence[tuple[str, str]]], Sequence[int]]
# (candidate examples, their EntryConfig (resolved), key layer, key pooling, task) -> their entries, in order, as
# compute_entries computes them (edgekv.scale.RayEncoder: on Ray actors)
Encoder = Callable[[Sequence[Example], EntryConfig, int, str, str], list]


# ---------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------
def memory_spec(backbone, cfg: AdaptConfig) -> MemorySpec:
    """The spec of a new memory for ``backbone`` (m and payload unset: 16, int8)."""
    from edgekv.host.models import default_key_layer

    s = backbone.shape
    entry = resolve_entry_config(cfg.entry)
    key_layer = cfg.key_layer if cfg.key_layer is not None else default_key_layer(s.num_layers)
    return MemorySpec(s.num_layers, s.num_kv_heads, s.head_dim, entry.pooled_len, s.hidden_size,
                      backbone.fingerprint, entry.payload_dtype, backbone.rope, cfg.proj_max_dirs,
                      key_layer, cfg.key_pooling)


def backbone_side(backbone, cfg: AdaptConfig) -> ModelSide:
    """What a memory must match to be adapted with ``backbone``: fingerprint, KV shapes, key
    dimension, RoPE, and the config's key layer when one is set (else the memory's is used)."""
    s = backbone.shape
    return ModelSide(backbone.fingerprint, s.num_layers, s.num_kv_heads, s.head_dim, s.hidden_size, backbone.rope,
                     key_layer=cfg.key_layer, name="this model", key_source="the config's key layer",
                     fix_model="adapt it with the model it was built with, or start a new memory",
                     fix_key="omit the key layer to use the memory's, or start a new memory")


def check_compatible(mem: Memory, backbone, cfg: AdaptConfig, budget_bytes: int | None) -> EntryConfig:
    """The memory must belong to this backbone (the one check, edgekv.compat); a budget given and
    the entry sizes and key layer set in the config must match it.

    -> the config's EntryConfig with the memory's m and payload (:func:`resolve_entry_config`).
    """
    check_memory_matches(mem.spec, backbone_side(backbone, cfg), mem.path)
    if budget_bytes is not None and budget_bytes != mem.budget_bytes:
        raise MismatchError(f"{mem.path} has a budget of {mem.budget_bytes} B, the budget asked for is "
                            f"{budget_bytes} B: a memory keeps its budget (omit the budget, or start a new memory)")
    return resolve_entry_config(cfg.entry, mem.spec, mem.path)


def effective(raw: np.ndarray, proj: KeyProjection) -> torch.Tensor:
    """raw: [N, R] raw keys -> [N, R] effective keys (unit norm, through the projection)."""
    return torch.from_numpy(effective_keys(raw, proj)) if len(raw) else torch.zeros((0, raw.shape[1]))


def query_set(backbone, examples: Sequence[Example], keys: np.ndarray, proj: KeyProjection,
              tasks: Sequence[str]) -> QuerySet:
    """Queries (prompt + answer tokens, image path when there is one) with effective keys, for the loss.

    keys: [Q, R] raw keys of the examples."""
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
    tau, gates = torch.tensor(phi.tau), torch.tensor(phi.gates, dtype=torch.float32)  # [], [L]

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
        P = ind.P if ind is not None else torch.zeros((0, R))  # [N, R]
        out["omega"] = float(coverage(torch.ones(len(P)), P, eps)) if len(P) else 0.0
    return out


def _chunked(nll, qs: QuerySet, rows: Sequence[int], size: int = 8) -> float:
    rows = list(rows)
    vals = [nll(qs, rows[i: i + size]) * len(rows[i: i + size]) for i in range(0, len(rows), size)]
    return float(sum(vals) / max(len(rows), 1))


def j_value(t: dict, sel: SelectionConfig) -> float:
    return t["L_cur"] + sel.gamma * t["omega"] + (sel.beta * t["L_anc"] if t["L_anc"] is not None else 0.0)


def task_balanced(cfg: AdaptConfig, num_earlier: int) -> AdaptConfig:
    """``cfg`` with beta_eff = beta * num_earlier when ``cfg.selection.balance_tasks``.

    L_anc is the mean NLL over the anchors of all earlier tasks, L_cur over the current one; with
    beta = 1 a new task then weighs as much as all earlier tasks together. Scaled, J is (up to the
    factor) the mean over tasks, each task alike: the objective of Last. The selection, the
    calibration and the J reports all read the scaled beta."""
    if not cfg.selection.balance_tasks or num_earlier <= 1:
        return cfg
    return replace(cfg, selection=replace(cfg.selection, beta=cfg.selection.beta * num_earlier))


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
# the steps of a task
# ---------------------------------------------------------------------------------
@dataclass
class MemoryState:
    """The memory as this task step read it (the commit refuses it if it changed since)."""

    path: str
    created: bool  # by this step
    spec: MemorySpec
    entry: EntryConfig  # the config's, with the memory's m and payload
    num_slots: int
    generation: int
    header_crc32: int
    calibration: Calibration
    projection: KeyProjection
    bank: Bank  # its entries, [N_old rows]
    slots: list[int]  # the slot of each bank row (ascending)


@dataclass
class Candidates:
    """The new task's candidate entries."""

    examples: list[Example]  # the sampled task examples, in sample order
    entries: list[Entry]
    bank: Bank  # [N_new rows], entries as the device dequantises them


@dataclass
class Queries:
    """The queries of the losses: current task (L_cur) and anchors of earlier tasks (L_anc)."""

    cur: QuerySet  # effective keys through the new projection
    cur_raw: np.ndarray  # [Q, R] raw keys
    anc: QuerySet | None  # None: no earlier task
    anc_raw: np.ndarray  # [A, R] raw keys (A = 0 without anchors)
    earlier: list[tuple[str, Example]]  # (task, example) of the anchors in anc
    anchors_all: list[tuple[str, Example]]  # every anchor of the memory state read (this task's old ones too)
    eval_cur: list[int]  # rows of cur and anc for the J before/after report
    eval_anc: list[int]


def checked_examples(backbone, examples: Sequence[Example], task: str, image_root: str | None) -> list[Example]:
    """The examples with image paths resolved; refused before any memory is created if there are
    none, an image is missing (vision backbones), or the task name does not fit."""
    examples = resolve_images(examples, os.path.abspath(image_root) if image_root else None)
    vision = getattr(backbone, "vision", None)
    missing_images = [ex.image for ex in examples if vision is not None and ex.image and not os.path.isfile(ex.image)]
    if missing_images:
        raise InputError(f"image {missing_images[0]} not found ({len(missing_images)} missing; image paths are "
                         f"relative to the data file's folder)")
    if not examples:
        raise InputError("the task has no examples")
    if not task or len(task.encode("utf-8")) > 32:
        raise InputError(f"task name {task!r} must be 1 to 32 bytes of UTF-8")
    return examples


def open_memory(backbone, memory_path: str, budget_bytes: int | None, cfg: AdaptConfig) -> MemoryState:
    """Read the memory at ``memory_path`` (created first, at its budget, if missing) after the
    compatibility check."""
    created = False
    if not os.path.exists(memory_path):
        if budget_bytes is None:
            raise InputError(f"{memory_path} does not exist: pass --budget to create it")
        create_memory(memory_path, memory_spec(backbone, cfg), budget_bytes,
                      Calibration(cfg.init_tau, (cfg.init_gate,) * backbone.shape.num_layers), top_k=cfg.top_k).close()
        created = True
    with Memory(memory_path) as mem:
        entry = check_compatible(mem, backbone, cfg, budget_bytes)
        bank, slots = read_bank(mem)
        return MemoryState(memory_path, created, mem.spec, entry, mem.num_slots, mem.generation, mem.header_crc32,
                           mem.calibration, mem.projection, bank, slots)


def encode_candidates(backbone, examples: Sequence[Example], key_model, state: MemoryState, cfg: AdaptConfig,
                      task: str, progress: bool = False, encoder: Encoder | None = None) -> Candidates:
    """Entries (keys + pooled KV) of a seeded sample of at most ``max_candidates`` examples
    (computed here, or by ``encoder``: the same entries, elsewhere)."""
    rows = sample(len(examples), cfg.max_candidates, cfg.seed)
    cand = [examples[i] for i in rows]
    if encoder is None:
        entries, _ = compute_entries(backbone, cand, key_model, state.entry, task, progress)
    else:
        entries = encoder(cand, resolve_entry_config(state.entry), state.spec.key_layer, state.spec.key_pooling, task)
    s = state.spec
    return Candidates(cand, entries, bank_from_entries(entries, s.num_layers, s.key_dim, s.payload_shape))


def phrasing(held: AnchorSet | None, state: MemoryState, cands: Candidates, cfg: AdaptConfig
             ) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """The phrasing sketch before and after this task, and the phrasing directions the projection removes.

    Candidates with the same answer are one class; their residuals from the class mean are this
    task's phrasing scatter, added to the sketch kept with the memory state read (``held``: its
    set in the anchors file). -> (sketch read [S, R] or None, new sketch [S', R] or None, phrasing
    directions to remove)"""
    R = state.spec.key_dim
    old = held.phrasing if held is not None and held.phrasing is not None and held.phrasing.shape[1] == R else None
    new = add_task_phrasing(old, cands.bank.raw_keys, [ex.answer for ex in cands.examples], cfg.phrase_rank)
    return old, new, min(cfg.phrase_dirs, state.spec.proj_max_dirs)  # the header's room bounds the directions


def build_queries(backbone, examples: Sequence[Example], key_model, cands: Candidates, proj: KeyProjection,
                  state: MemoryState, cfg: AdaptConfig, task: str, anchors_all: Sequence[tuple[str, Example]]
                  ) -> Queries:
    """Current-task queries (a seeded sample of at most ``max_queries``; candidates' keys reused)
    and the anchors of earlier tasks (``anchors_all``: those stored with the memory state read),
    keys through ``proj``."""
    q_examples = [examples[i] for i in sample(len(examples), cfg.max_queries, cfg.seed + 1)]
    cand_key = {ex.id: cands.bank.raw_keys[i] for i, ex in enumerate(cands.examples)}  # id -> [R]
    missing = [ex for ex in q_examples if ex.id not in cand_key]
    if missing:
        for ex, k in zip(missing, example_keys(backbone, key_model, missing), strict=True):
            cand_key[ex.id] = k
    cur_raw = np.stack([cand_key[ex.id] for ex in q_examples])  # [Q, R]
    cur = query_set(backbone, q_examples, cur_raw, proj, [task] * len(q_examples))
    anchors_all = list(anchors_all)
    earlier = [(t, ex) for t, ex in anchors_all if t != task]
    anc, anc_raw = None, np.zeros((0, state.spec.key_dim), np.float32)  # [A, R]
    if earlier:
        anc_raw = example_keys(backbone, key_model, [ex for _, ex in earlier])
        anc = query_set(backbone, [ex for _, ex in earlier], anc_raw, proj, [t for t, _ in earlier])
    eval_cur = sample(len(cur), cfg.eval_queries, cfg.seed + 2)
    eval_anc = sample(len(anc), cfg.eval_queries, cfg.seed + 3) if anc is not None else []
    return Queries(cur, cur_raw, anc, anc_raw, earlier, anchors_all, eval_cur, eval_anc)


def j_before(backbone, state: MemoryState, q: Queries, cfg: AdaptConfig) -> dict:
    """J's terms of the memory as it was (its own projection and calibration) on the eval rows."""
    vision = getattr(backbone, "vision", None)
    if not len(state.bank):
        t = terms(backbone.model, None, q.cur, q.anc, state.calibration, cfg.selection.eps, q.eval_cur, q.eval_anc,
                  vision)
    else:
        old = state.projection
        cur_old = replace(q.cur, keys=effective(q.cur_raw, old))  # [Q, R]
        anc_old = None if q.anc is None else replace(q.anc, keys=effective(q.anc_raw, old))  # [A, R]
        ind = Induction(backbone.model, state.bank, effective(state.bank.raw_keys, old), cfg.top_k, state.spec.rope,
                        vision)
        t = terms(backbone.model, ind, cur_old, anc_old, state.calibration, cfg.selection.eps, q.eval_cur,
                  q.eval_anc)
    t["J"] = j_value(t, cfg.selection)
    return t


def coverage_keys(pool: Bank, P: torch.Tensor, phrased: bool, cfg: AdaptConfig) -> torch.Tensor:
    """Keys the selection's coverage term sees: P, except with phrasing directions in the projection,
    then all-but-the-top keys. Removing the phrasing makes one item's entries share a key (what
    retrieval wants), and coverage would then count them as one and keep a single entry per
    item (edge6 val: 3 shape-code entries for 4 shapes, while date-house's distinct dates kept
    17); two phrasings of an item are two payloads the model can use. -> [N, R]"""
    if not phrased:
        return P
    return effective(pool.raw_keys, fit_projection(pool.raw_keys, cfg.proj_dirs))


def select_kept(backbone, pool: Bank, P: torch.Tensor, state: MemoryState, q: Queries, phi: Phi,
                cfg: AdaptConfig, progress: bool = False, cover: torch.Tensor | None = None) -> SelectionResult:
    """The bilevel selection over ``pool`` (P: [N, R] its effective keys); the inner level steps
    ``phi`` after every outer backward (``calibration.enabled``). ``cover``: [N, R] keys the
    coverage term measures diversity on (default P)."""
    sel, cal = cfg.selection, cfg.calibration
    ind = Induction(backbone.model, pool, P, cfg.top_k, state.spec.rope, getattr(backbone, "vision", None))
    anc_batches = batches(len(q.anc), sel.batch_size, sel.steps, sel.seed + 1) if q.anc is not None else None
    loss = SelectionLoss(ind, phi, q.cur, batches(len(q.cur), sel.batch_size, sel.steps, sel.seed), q.anc,
                         anc_batches, anchors_move_phi=cal.with_anchors)
    opt = torch.optim.Adam(phi.parameters(), lr=cal.lr)

    def step_phi() -> None:  # the inner level: one Adam step on this outer step's gradient
        opt.step()
        opt.zero_grad()

    return select(state.num_slots, P if cover is None else cover, loss, sel,
                  after_backward=step_phi if cal.enabled else None, progress=progress)


def kept_by_selector(selector: Selector, num_slots: int, pool: Bank, num_old: int) -> list[int]:
    """The pool rows ``selector`` keeps, ascending, checked (in range, each once, at most the slots)."""
    keys = list(zip(pool.tasks, pool.source_ids, strict=True))
    keep = sorted(int(i) for i in selector(num_slots, keys[:num_old], keys[num_old:]))
    if len(set(keep)) != len(keep) or len(keep) > num_slots or any(not 0 <= i < len(pool) for i in keep):
        raise RuntimeError(f"the selector must keep at most {num_slots} distinct rows of {len(pool)}, got {keep}")
    return keep


def final_calibration(backbone, pool: Bank, P: torch.Tensor, keep: Sequence[int], phi: Phi, q: Queries,
                      state: MemoryState, cfg: AdaptConfig, progress: bool = False) -> tuple[Induction, list[float]]:
    """Calibrate ``phi`` (in place) on exactly the kept memory (every w = 1).

    -> (the induction over the kept memory, the loss of each calibration step)"""
    kept_ind = Induction(backbone.model, subset_bank(pool, keep), P[keep], cfg.top_k, state.spec.rope,
                         getattr(backbone, "vision", None))  # P[keep]: [B, R]
    loss_fn = kept_memory_objective(kept_ind, q.cur, q.anc, cfg.calibration, cfg.selection.beta)
    return kept_ind, calibrate(phi, loss_fn, len(q.cur), cfg.calibration, progress)


def commit(state: MemoryState, keep: Sequence[int], cands: Candidates, P: torch.Tensor, q: Queries,
           calibration: Calibration, proj: KeyProjection, cfg: AdaptConfig, task: str,
           sketches: tuple[np.ndarray | None, np.ndarray | None] = (None, None)) -> dict:
    """One atomic update of the memory and, with it, the anchors (this task's, spread over its
    keys, replace any earlier ones of the same name) and the phrasing sketch (``sketches``: the
    new state's and the state read's). -> counts for the summary"""
    num_old = len(state.bank)
    keep_old = [i for i in keep if i < num_old]
    keep_new = [i - num_old for i in keep if i >= num_old]
    new_slots, clear = assign_slots(state.num_slots, state.slots, keep_old, len(keep_new))
    put: dict[int, Entry] = {s: cands.entries[i] for s, i in zip(new_slots, keep_new, strict=True)}
    rows = spread_rows(P[num_old:].numpy(), cfg.anchors_per_task, cfg.seed + 4)  # P[num_old:]: [N_new, R]
    anchors = q.earlier + [(task, cands.examples[i]) for i in rows]
    # the anchors of the new state are written (stamped) before the memory is published, both
    # under its write lock: a crash between the two cannot be observed (edgekv/induce/anchors.py);
    # a concurrent adapt is refused (expect_generation), not mixed in
    anchor_bytes = commit_with_anchors(state.path, anchors, q.anchors_all, state.generation, state.header_crc32,
                                       commit_update, phrasing=sketches[0], current_phrasing=sketches[1],
                                       put=put, clear=clear, calibration=calibration,
                                       projection=proj, top_k=cfg.top_k)["bytes"]  # the k the calibration was fitted for
    return {"kept_new": len(keep_new), "kept_old": len(keep_old), "dropped_old": num_old - len(keep_old),
            "anchors": {"path": anchors_path(state.path), "count": len(anchors), "this_task": len(rows),
                        "bytes": anchor_bytes}}


def task_summary(state: MemoryState, task: str, num_examples: int, cands: Candidates, committed: dict,
                 proj: KeyProjection, before: dict, after: dict, selection_steps: int, calibration: Calibration,
                 cal_losses: list[float], cfg: AdaptConfig, t0: float) -> dict:
    """The per-task summary (``edgekv adapt --json``), read back from the committed memory."""
    spec = state.spec
    with Memory(state.path) as mem:
        return {
            "task": task,
            "created": state.created,
            "memory": state.path,
            "num_examples": num_examples,
            "num_candidates": len(cands.entries),
            "num_slots": mem.num_slots,
            "num_used": mem.num_used,
            "kept_new": committed["kept_new"],
            "kept_old": committed["kept_old"],
            "dropped_old": committed["dropped_old"],
            "per_task_counts": mem.per_task_counts(),
            "file_bytes": mem.file_bytes,
            "file_bytes_on_disk": os.path.getsize(state.path),
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
            "selection_steps": selection_steps,
            "calibration": {"tau": calibration.tau, "gates": list(calibration.gates),
                            "tau_before": state.calibration.tau, "final_losses": cal_losses},
            "anchors": committed["anchors"],
            "generation": mem.generation,
            "seconds": round(time.perf_counter() - t0, 2),
        }


# ---------------------------------------------------------------------------------
# the task step
# ---------------------------------------------------------------------------------
def adapt(backbone, examples: Sequence[Example], memory_path: str, budget_bytes: int | None = None,
          task: str = "task", cfg: AdaptConfig | None = None, progress: bool = False,
          image_root: str | None = None, selector: Selector | None = None, encoder: Encoder | None = None) -> dict:
    """Adapt the memory at ``memory_path`` to ``task`` (create it first if missing).

    ``cfg.entry``'s ``pooled_len`` / ``payload_dtype``: None follows an existing memory (a new
    one gets 16 / int4); a value set must match it (:func:`resolve_entry_config`).
    ``image_root``: folder that relative image paths of the examples are relative to (the
    data file's); they are stored resolved in the anchors file.
    ``selector``: replaces the bilevel selection (see :data:`Selector`); the candidates, the
    projection, the final calibration and the commit are InduceKV's.
    ``encoder``: computes the candidates' entries instead of this process (see :data:`Encoder`;
    :class:`edgekv.scale.RayEncoder`); it must give the entries ``compute_entries`` gives.
    Returns the per-task summary (see ``edgekv adapt --json``).
    """
    from edgekv.host.keymodel import KeyModel

    cfg = cfg or AdaptConfig()
    examples = checked_examples(backbone, examples, task, image_root)
    t0 = time.perf_counter()
    state = open_memory(backbone, os.fspath(memory_path), budget_bytes, cfg)
    key_model = KeyModel(backbone.decoder, state.spec.key_layer, state.spec.key_pooling)
    cands = encode_candidates(backbone, examples, key_model, state, cfg, task, progress, encoder)
    pool = concat_banks(state.bank, cands.bank)  # old entries first, then the candidates: [N rows]
    held = read_anchor_set(state.path, state.generation, state.header_crc32)  # anchors + sketch of the state read
    old_sketch, sketch, phrase_dirs = phrasing(held, state, cands, cfg)
    proj = memory_projection(pool.raw_keys, sketch, phrase_dirs, cfg.proj_dirs)
    phrased = sketch is not None and len(sketch) > 0 and phrase_dirs > 0  # the projection is the phrasing one
    P = effective(pool.raw_keys, proj)  # [N, R]
    q = build_queries(backbone, examples, key_model, cands, proj, state, cfg, task,
                      [] if held is None else held.anchors)
    cfg = task_balanced(cfg, len({t for t, _ in q.earlier}))
    before = j_before(backbone, state, q, cfg)

    phi = Phi.from_calibration(state.calibration, cfg.calibration)
    if selector is None:
        result = select_kept(backbone, pool, P, state, q, phi, cfg, progress, coverage_keys(pool, P, phrased, cfg))
        keep, steps = result.keep.tolist(), len(result.history)
    else:
        keep, steps = kept_by_selector(selector, state.num_slots, pool, len(state.bank)), 0
    kept_ind, cal_losses = final_calibration(backbone, pool, P, keep, phi, q, state, cfg, progress)
    calibration = phi.calibration()
    after = terms(backbone.model, kept_ind, q.cur, q.anc, calibration, cfg.selection.eps, q.eval_cur, q.eval_anc)
    after["J"] = j_value(after, cfg.selection)

    committed = commit(state, keep, cands, P, q, calibration, proj, cfg, task, (sketch, old_sketch))
    return task_summary(state, task, len(examples), cands, committed, proj, before, after, steps, calibration,
                        cal_losses, cfg, t0)
