"""The accuracy ladder: where accuracy is lost between "the model sees the right examples" and
"the deployed memory".

For each task of a stream and every query q (the test split, or val) of concept c, the
"right examples" are k = ``top_k`` train examples of the same task and concept (a seeded
choice per (task, concept); all of them when the concept has fewer). The rungs, each one step
closer to what the device runs:

1. ``zero-shot``: the frozen backbone alone (``evaluate.answer`` without memory);
2. ``oracle-text``: the right examples as earlier chat turns (with their images on a VLM),
   through :class:`~edgekv.bench.methods.PromptText`'s own prompt builder and answering path,
   its retrieval replaced by the right examples (:class:`OracleText`);
3. ``oracle-kv-full``: the same examples as unpooled float32 KV: every token an entry covers
   (the conversation after the chat template's preamble when ``skip_template_prefix``, as
   entries.py drops it; the whole conversation otherwise), RoPE removed as entries.py does,
   laid out and rotated by ``memory_kv`` with uniform alpha (scale sqrt(k * 1/k) = 1), gates 1;
4. ``oracle-kv-pooled``: the same examples pooled to m positions (``pooling``), float32;
5. ``oracle-kv-stored``: rung 4 quantised as the memory stores it (``payload_dtype``; int4 by default) (``Entry.from_float``) and
   dequantised as the runtime does (``edgekv.induction.entry_kv``);
6. ``retrieved``: entries of ALL train examples of all tasks (``compute_entries``, as rung 5)
   in one memory; the real key (``KeyModel``), the all-but-the-top projection fitted on those
   keys (``fit_projection``), top-k, alpha = softmax(sim / tau), gates 1, decoded by
   ``Induction.generate`` (the runtime's mirror);
7. ``memory`` (with a memory file): ``evaluate.answer`` with that file (its tau and gates).

In every KV rung the right examples are laid out as the runtime lays out retrieved entries:
by increasing similarity of their effective key to the query's (best last); the text rung
uses the same order. Rungs 6 and 7 also report retrieval precision@k (share of the top-k
entries of the query's task and concept), recall@k (right entries in the top-k over
min(k, right entries in memory)) and the alpha mass on right entries.

Concepts: loaded examples carry no concept; :func:`example_concept` derives it from the
stream's task description (``label_map`` concept -> answer in stream.json).

Outputs: :func:`run_ladder` (JSON-able dict), :func:`ladder_markdown`, :func:`ladder_plot`,
:func:`write_ladder` (``ladder.json``, ``ladder.md``, ``ladder.png``, each atomically).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgekv.bench.methods import PromptText
from edgekv.configs import Config, knob
from edgekv.data import Example
from edgekv.errors import InputError
from edgekv.format.layout import DEFAULT_PAYLOAD_DTYPE
from edgekv.induce.config import PAYLOAD_DTYPES, POOLINGS, EntryConfig
from edgekv.induce.entries import encode_examples, entry_pooling_matrix, pooled_entry_kv, prefix_kv
from edgekv.induce.torch_induction import greedy_decode, make_cache, memory_kv, num_layers_of

RUNGS = ("zero-shot", "oracle-text", "oracle-kv-full", "oracle-kv-pooled", "oracle-kv-stored", "retrieved", "memory")
KV_RUNGS = ("oracle-kv-full", "oracle-kv-pooled", "oracle-kv-stored")
RETRIEVAL_RUNGS = ("retrieved", "memory")
QUERY_SPLITS = ("test", "val")


# ---------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LadderConfig(Config):
    """What the ladder computes; every default is the memory's (EntryConfig, AdaptConfig).
    ``to_dict`` / ``from_dict`` come from :class:`edgekv.configs.Config`."""

    top_k: int = knob(4, "k: right examples per query, and entries retrieved per query (rungs 6-7).")
    pooled_len: int = knob(16, "m: KV positions per entry of the pooled rungs (4-6).")
    pooling: str = "answer"  # answer | answer_avg | adaptive (edgekv.induce.entries)
    payload_dtype: str = DEFAULT_PAYLOAD_DTYPE  # int4 | int8 | fp16: how rungs 5-6 store entries
    tau: float | None = knob(None, "Retrieval temperature of rung 6 (default: a new memory's initial tau).")
    max_test_per_task: int = knob(0, "Queries per task (the first ones of the split); 0: all.")
    seed: int = 0  # the choice of right examples
    split: str = knob("test", "Split the queries come from: test or val.")
    skip_template_prefix: bool = True  # entries (and rung 3) drop the chat template's preamble
    max_new_tokens: int = 0  # greedy answer length; 0: the longest query answer in tokens + 2
    batch_size: int = 16  # queries per batched decode (zero-shot, oracle-text, memory)

    def __post_init__(self) -> None:
        for name, low in (("top_k", 1), ("pooled_len", 1), ("batch_size", 1), ("max_test_per_task", 0),
                          ("seed", 0), ("max_new_tokens", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"LadderConfig.{name} must be an integer >= {low}, got {v!r}")
        if self.pooling not in POOLINGS:
            raise InputError(f"LadderConfig.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.payload_dtype not in PAYLOAD_DTYPES:
            raise InputError(f"LadderConfig.payload_dtype must be one of {', '.join(PAYLOAD_DTYPES)}, got {self.payload_dtype!r}")
        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, (int, float))
                                     or not math.isfinite(self.tau) or self.tau <= 0):
            raise InputError(f"LadderConfig.tau must be a number > 0 (or None), got {self.tau!r}")
        if self.split not in QUERY_SPLITS:
            raise InputError(f"LadderConfig.split must be one of {', '.join(QUERY_SPLITS)}, got {self.split!r}")
        if not isinstance(self.skip_template_prefix, bool):
            raise InputError(f"LadderConfig.skip_template_prefix must be true or false, got {self.skip_template_prefix!r}")

    def entry_config(self) -> EntryConfig:
        return EntryConfig(pooled_len=self.pooled_len, pooling=self.pooling,
                           skip_template_prefix=self.skip_template_prefix, payload_dtype=self.payload_dtype)

    def resolved_tau(self) -> float:
        from edgekv.induce.config import AdaptConfig

        return float(self.tau) if self.tau is not None else float(AdaptConfig().init_tau)


# ---------------------------------------------------------------------------------
# concepts and the right examples
# ---------------------------------------------------------------------------------
def _meta_get(meta, name: str, default=None):
    return meta.get(name, default) if isinstance(meta, dict) else getattr(meta, name, default)


def example_concept(task_meta, example: Example) -> str:
    """The concept ``example`` teaches, from its task's description.

    ``task_meta``: the task's entry of stream.json (``label_map`` concept -> answer, optionally
    ``concepts`` {split: [...]}) or an object with ``label_map`` (a ``StreamTask``). Rules:

    * the task lists exactly one concept (date-house: ``"format"``): that one;
    * no ``label_map`` (the stream's convention for format tasks): one concept, ``"format"``;
    * otherwise the answer (normalised as the stream compares answers) names the concept:
      the one concept whose label is that answer; where several concepts share it (home-city:
      16 people, 8 cities) the one whose name occurs in the prompt as a whole word (the
      person), else all of them joined by ``|``; an answer outside ``label_map``: the
      normalised answer itself.
    """
    from edgekv.data.stream import normalise_answer

    listed = sorted({c for cs in (_meta_get(task_meta, "concepts") or {}).values() for c in cs})
    label_map = dict(_meta_get(task_meta, "label_map") or {})
    if len(listed) == 1:
        return listed[0]
    if not label_map:
        return "format" if not listed else normalise_answer(example.answer)
    answer = normalise_answer(example.answer)
    cands = sorted(c for c, a in label_map.items() if normalise_answer(str(a)) == answer)
    if len(cands) == 1:
        return cands[0]
    if not cands:
        return answer
    named = [c for c in cands if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", example.prompt, re.IGNORECASE)]
    return named[0] if len(named) == 1 else "|".join(cands)


def task_metas(stream) -> list[dict]:
    """Each task's description: its stream.json entry when ``stream`` is a loaded stream folder,
    else ``{"name", "label_map"}`` from the task objects (no label_map: a one-concept task)."""
    tasks = getattr(stream, "tasks", stream)
    listed: dict[str, dict] = {}
    path = getattr(stream, "path", None)
    if isinstance(path, str) and os.path.isfile(os.path.join(path, "stream.json")):
        with open(os.path.join(path, "stream.json"), encoding="utf-8") as f:
            listed = {t.get("name"): t for t in json.load(f).get("tasks", []) if isinstance(t, dict)}
    return [listed.get(t.name) or {"name": t.name, "label_map": dict(getattr(t, "label_map", None) or {})}
            for t in tasks]


def oracle_rows(concepts: Sequence[str], concept: str, k: int, seed: int, task: str) -> list[int]:
    """Rows of ``k`` train examples of ``concept`` (all when fewer), a choice seeded by
    (seed, task, concept), in increasing row order."""
    rows = [i for i, c in enumerate(concepts) if c == concept]
    if len(rows) <= k:
        return rows
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8")), zlib.crc32(concept.encode("utf-8"))])
    return sorted(int(r) for r in rng.choice(rows, size=k, replace=False))


def layout(rows: Sequence[int], sims: np.ndarray) -> list[int]:
    """``rows`` in the runtime's layout: increasing similarity ``sims[row]`` (best last, stable)."""
    return [rows[i] for i in np.argsort(np.asarray([sims[r] for r in rows]), kind="stable")]


# ---------------------------------------------------------------------------------
# KV of the right examples and their injection
# ---------------------------------------------------------------------------------
def unpooled_matrix(enc, cfg: EntryConfig) -> torch.Tensor:
    """[T', T] identity rows over the tokens an entry covers (T' = T minus the template's
    preamble when ``cfg.skip_template_prefix``): rung 3's "pooling" is none."""
    T = len(enc.ids)
    c = enc.content_start if cfg.skip_template_prefix else 0
    W = torch.zeros((T - c, T))
    W[:, c:] = torch.eye(T - c)
    return W


@torch.no_grad()
def float_kv(backbone, examples: Sequence[Example], cfg: EntryConfig) -> list[dict]:
    """Unpooled and pooled float32 KV of each example, from one forward pass as ``compute_entries``.

    -> per example {"full": (K, V) [L, H, T', D], "pooled": (K, V) [L, H, m, D]} (numpy, position-free)
    """
    encs = encode_examples(backbone, examples)
    vision = getattr(backbone, "vision", None)
    out: list[dict] = []
    for i in range(0, len(encs), cfg.batch_size):
        chunk = encs[i: i + cfg.batch_size]
        ids, images = [e.ids for e in chunk], [e.image for e in chunk]
        embeds = None if not any(images) else vision.embed_batch(ids, images)[0]  # [B, S, hidden]
        for enc, (K, V) in zip(chunk, prefix_kv(backbone.model, ids, embeds), strict=True):  # [L, H, T, D]
            out.append({"full": pooled_entry_kv(K, V, backbone.rope, unpooled_matrix(enc, cfg)),
                        "pooled": pooled_entry_kv(K, V, backbone.rope, entry_pooling_matrix(enc, cfg))})
    return out


def stored_kv(K: np.ndarray, V: np.ndarray, payload_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Float K, V [L, H, m, D] quantised as the memory stores them, dequantised as the runtime does."""
    from edgekv.format import Entry
    from edgekv.induction import entry_kv

    e = Entry.from_float(np.zeros(1, np.float32), K, V, payload_dtype)
    return entry_kv(e, 1.0, np.ones(K.shape[0], np.float32))


def oracle_past(kvs: Sequence[tuple[np.ndarray, np.ndarray]], rope, start_position: int = 0
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The past of a query given its right examples' KV in layout order, uniform alpha, gates 1.

    kvs: per example (K, V) [L, H, T_i, D], position-free -> K_mem, V_mem [L, 1, H, sum T_i, D]
    (entry j right after entry j-1; keys rotated to start_position.. by ``memory_kv``); None, None
    without examples. With equal T_i = m this is ``memory_kv`` over the k entries with alpha = 1/k.
    """
    from edgekv.induction import entry_scale

    if not kvs:
        return None, None
    n = len(kvs)
    s = entry_scale(1.0 / n, n)  # sqrt(k * alpha) with uniform alpha: 1
    K = torch.cat([torch.as_tensor(k) * s for k, _ in kvs], dim=2)[None]  # [1, L, H, T, D]
    V = torch.cat([torch.as_tensor(v) * s for _, v in kvs], dim=2)[None]
    one = torch.zeros((1, 1), dtype=torch.long)
    return memory_kv(K, V, one, torch.ones((1, 1)), torch.ones(K.shape[1]), rope, start_position)  # scale 1


def query_prompt(backbone, ex: Example) -> tuple[list[int], str | None]:
    """The query's ids as the runtime feeds them (chat template, generation prompt, image tokens
    expanded) and its image (None on a text backbone, which ignores images)."""
    from edgekv.induce.entries import query_ids

    vision = getattr(backbone, "vision", None)
    image = ex.image if vision is not None else None
    ids = vision.query_ids(backbone.tokenizer, ex.prompt, image) if image else query_ids(backbone.tokenizer, ex.prompt)
    return ids, image


def _inputs(backbone, ids: list[int], image: str | None) -> dict:
    if image is None:
        return {"input_ids": torch.as_tensor([ids], dtype=torch.long)}  # [1, S]
    return {"inputs_embeds": backbone.vision.embed_batch([ids], [image])[0]}  # [1, S, hidden]


@torch.no_grad()
def query_logits(backbone, ex: Example, k_mem: torch.Tensor | None, v_mem: torch.Tensor | None) -> torch.Tensor:
    """Logits [S, V] of the query's prompt after the past K_mem, V_mem [L, 1, H, T, D] (or none)."""
    ids, image = query_prompt(backbone, ex)
    T = 0 if k_mem is None else int(k_mem.shape[3])
    pos = torch.arange(T, T + len(ids))[None]  # [1, S]
    cache = make_cache(k_mem, v_mem, num_layers_of(backbone.model))
    return backbone.model(**_inputs(backbone, ids, image), position_ids=pos, past_key_values=cache).logits[0]


@torch.no_grad()
def decode_one(backbone, ex: Example, k_mem: torch.Tensor | None, v_mem: torch.Tensor | None,
               max_new_tokens: int) -> str:
    """Greedy answer of one query after the past [L, 1, H, T, D] (the runtime's decode loop)."""
    ids, image = query_prompt(backbone, ex)
    T = 0 if k_mem is None else int(k_mem.shape[3])
    pos = torch.arange(T, T + len(ids))[None]  # [1, S]
    cache = make_cache(k_mem, v_mem, num_layers_of(backbone.model))
    toks = greedy_decode(backbone.model, _inputs(backbone, ids, image), pos, cache, max_new_tokens,
                         set(backbone.eos_token_ids))
    return backbone.tokenizer.decode(toks, skip_special_tokens=True).strip()


class OracleText(PromptText):
    """PromptText with the right examples in place of its retrieval: ``shots[query id]`` are the
    examples (layout order, best last) that become earlier chat turns; prompt building and
    answering are PromptText's own (batched on a text backbone, images spliced in on a VLM)."""

    def __init__(self, ctx, shots: dict[str, list[Example]]):
        super().__init__(ctx)
        uniq: dict[str, Example] = {}
        for exs in shots.values():
            for ex in exs:
                uniq.setdefault(ex.id, ex)
        row = {i: n for n, i in enumerate(uniq)}
        self.items = [("oracle", ex) for ex in uniq.values()]
        self._rows = {qid: [row[ex.id] for ex in exs] for qid, exs in shots.items()}

    def _retrieve(self, examples: Sequence[Example]) -> list[list[int]]:
        return [list(self._rows.get(ex.id, [])) for ex in examples]


# ---------------------------------------------------------------------------------
# retrieval statistics
# ---------------------------------------------------------------------------------
def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def retrieval_stats(idx: Sequence[Sequence[int]], alpha: Sequence[Sequence[float]], labels: Sequence,
                    query_labels: Sequence, k: int) -> dict:
    """Precision@k, recall@k and alpha mass on right entries, per query and their means.

    idx[b], alpha[b]: the entry rows query b retrieved and their weights; labels[n]: entry n's
    (task, concept); query_labels[b]: query b's. An entry is right when its label equals the
    query's. precision = right retrieved / retrieved; recall = right retrieved / min(k, right
    entries in memory) (None when the memory holds none); alpha_right = sum of alpha on right ones.
    """
    counts = Counter(labels)
    prec, rec, mass = [], [], []
    for rows, a, ql in zip(idx, alpha, query_labels, strict=True):
        right = [labels[r] == ql for r in rows]
        n_right = counts.get(ql, 0)
        prec.append(sum(right) / len(rows) if len(rows) else None)
        rec.append(sum(right) / min(k, n_right) if n_right else None)
        mass.append(float(sum(float(w) for w, ok in zip(a, right, strict=True) if ok)))
    return {"precision": _mean(prec), "recall": _mean(rec), "alpha_right": _mean(mass), "k": k,
            "per_query": {"precision": prec, "recall": rec, "alpha_right": mass}}


def _record(preds: Sequence[str], queries: Sequence[Example]) -> dict:
    from edgekv.data.stream import is_correct

    correct = [bool(is_correct(p, ex.answer)) for p, ex in zip(preds, queries, strict=True)]
    return {"accuracy": _mean([float(c) for c in correct]), "n": len(correct), "correct": correct,
            "predictions": list(preds)}


# ---------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------
@dataclass
class _Setup:
    """What every task's ladder shares: the backbone, the all-train memory (rung 6), the file (rung 7)."""

    backbone: object
    cfg: LadderConfig
    tau: float
    max_new_tokens: int
    key_model: object
    proj: object  # KeyProjection fitted on the all-train keys
    ind: object  # Induction over the all-train bank
    labels: list  # (task, concept) per bank row
    rows: dict  # (task, example id) -> bank row
    reader: object | None  # evaluate.MemoryReader of the memory file
    memory_path: str | None
    file_labels: list  # (task, concept) per row of the file's bank ((task, None) unknown)
    bar: object


def _queries(task, cfg: LadderConfig) -> list[Example]:
    qs = list(getattr(task, cfg.split, None) or [])
    if not qs:
        raise InputError(f"task {task.name!r} has no {cfg.split} examples to ask")
    qs = qs[: cfg.max_test_per_task] if cfg.max_test_per_task else qs
    if len({ex.id for ex in qs}) != len(qs):
        raise InputError(f"task {task.name!r}: {cfg.split} example ids must be unique")
    return qs


def _all_train_memory(backbone, tasks, metas, cfg: LadderConfig, progress: bool):
    """Entries of every train example (as the memory stores them) -> (KeyModel, projection, Induction, labels, rows)."""
    from edgekv.host.keymodel import KeyModel
    from edgekv.induce.adapt import effective, memory_spec
    from edgekv.induce.config import AdaptConfig
    from edgekv.induce.entries import compute_entries
    from edgekv.induce.torch_induction import Induction, bank_from_entries
    from edgekv.retrieval import add_task_phrasing, memory_projection

    acfg = AdaptConfig(entry=cfg.entry_config(), top_k=cfg.top_k)
    spec = memory_spec(backbone, acfg)
    km = KeyModel(backbone.decoder, spec.key_layer, spec.key_pooling)
    entries, labels, rows, sketch = [], [], {}, None
    for t, meta in zip(tasks, metas, strict=True):
        if not t.train:
            raise InputError(f"task {t.name!r} has no train examples")
        for ex in t.train:
            rows[(t.name, ex.id)] = len(labels)
            labels.append((t.name, example_concept(meta, ex)))
        new = compute_entries(backbone, list(t.train), km, cfg.entry_config(), t.name[:32], progress)[0]
        entries += new
        if acfg.phrase_dirs:  # the phrasing sketch adapt builds, task by task, from every train example
            sketch = add_task_phrasing(sketch, np.stack([e.key for e in new]), [ex.answer for ex in t.train],
                                       acfg.phrase_rank)
    bank = bank_from_entries(entries, spec.num_layers, spec.key_dim, spec.payload_shape)
    proj = memory_projection(bank.raw_keys, sketch, acfg.phrase_dirs, acfg.proj_dirs)
    ind = Induction(backbone.model, bank, effective(bank.raw_keys, proj), cfg.top_k, backbone.rope,
                    getattr(backbone, "vision", None))
    return km, proj, ind, labels, rows


def _file_reader(backbone, memory_path: str | None, cfg: LadderConfig, tasks, metas):
    """The memory file opened for evaluation and the (task, concept) of each of its entries."""
    from edgekv.bench.evaluate import MemoryReader

    if memory_path is None:
        return None, []
    if not os.path.isfile(memory_path):
        raise InputError(f"{memory_path}: no such memory file")
    reader = MemoryReader(backbone, memory_path, cfg.top_k)
    known = {(t.name[:32], ex.id): (t.name, example_concept(m, ex)) for t, m in zip(tasks, metas, strict=True)
             for ex in t.train}
    bank = reader.ind.bank
    return reader, [known.get((task, sid), (task, None)) for task, sid in zip(bank.tasks, bank.source_ids,
                                                                           strict=True)]


def _oracle_text(s: _Setup, queries: Sequence[Example], shots: list[list[Example]]) -> list[str]:
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.methods import Context

    bc = BenchConfig(seed=s.cfg.seed, top_k=s.cfg.top_k, max_new_tokens=s.max_new_tokens,
                     eval_batch_size=s.cfg.batch_size)
    with tempfile.TemporaryDirectory(prefix="ladder-text-") as work:
        method = OracleText(Context(s.backbone, bc, 0, work), {q.id: sh for q, sh in zip(queries, shots, strict=True)})
        return method.answer(list(queries))


def _oracle_kv(s: _Setup, queries: Sequence[Example], shots: list[list[Example]]) -> dict[str, list[str]]:
    """Answers of rungs 3-5: the right examples' KV (full, pooled float, pooled as stored) as the past."""
    uniq = list({ex.id: ex for sh in shots for ex in sh}.values())
    kv = dict(zip([ex.id for ex in uniq], float_kv(s.backbone, uniq, s.cfg.entry_config()), strict=True))
    for d in kv.values():
        d["stored"] = stored_kv(*d["pooled"], s.cfg.payload_dtype)
    out: dict[str, list[str]] = {r: [] for r in KV_RUNGS}
    for q, sh in zip(queries, shots, strict=True):
        for rung, part in zip(KV_RUNGS, ("full", "pooled", "stored"), strict=True):
            k_mem, v_mem = oracle_past([kv[ex.id][part] for ex in sh], s.backbone.rope)
            out[rung].append(decode_one(s.backbone, q, k_mem, v_mem, s.max_new_tokens))
    return out


def _retrieval(ind, q: torch.Tensor, tau: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows (layout order) and alpha of queries q [Q, R] over ``ind``'s bank. -> [Q, k'] x2"""
    from edgekv.induce.torch_induction import alpha_weights, retrieve

    k = min(k, len(ind.bank))
    if k == 0:
        return torch.zeros((len(q), 0), dtype=torch.long), torch.zeros((len(q), 0))
    idx, sims = retrieve(q, ind.P, torch.zeros(len(ind.bank)), tau, k)
    return idx, alpha_weights(sims, torch.zeros_like(sims), tau)


def _retrieved(s: _Setup, queries: Sequence[Example], q: torch.Tensor, qlabels: list) -> dict:
    """Rung 6: every train example's entry in one memory, the real key and retrieval, gates 1."""
    idx, alpha = _retrieval(s.ind, q, s.tau, s.cfg.top_k)
    gates = [1.0] * num_layers_of(s.backbone.model)
    eos, tok = set(s.backbone.eos_token_ids), s.backbone.tokenizer
    preds = []
    for j, ex in enumerate(queries):
        ids, image = query_prompt(s.backbone, ex)
        toks, _ = s.ind.generate(q[j], ids, s.tau, gates, s.max_new_tokens, eos, image=image)
        preds.append(tok.decode(toks, skip_special_tokens=True).strip())
    rec = _record(preds, queries)
    rec.update(retrieval_stats(idx.tolist(), alpha.tolist(), s.labels, qlabels, s.cfg.top_k))
    return rec


def _memory(s: _Setup, queries: Sequence[Example], qlabels: list) -> dict:
    """Rung 7: the memory file through the benchmark's evaluation path, and its retrieval statistics."""
    from edgekv.bench import evaluate
    from edgekv.induce.adapt import effective
    from edgekv.induce.entries import example_keys

    r = s.reader
    preds = evaluate.answer(s.backbone, queries, s.memory_path, s.cfg.top_k, s.max_new_tokens, s.cfg.batch_size)
    q = effective(example_keys(s.backbone, r.key_model, list(queries)), r.proj)  # [Q, R]
    idx, alpha = _retrieval(r.ind, q, float(r.cal.tau), s.cfg.top_k)
    rec = _record(preds, queries)
    rec.update(retrieval_stats(idx.tolist(), alpha.tolist(), s.file_labels, qlabels, s.cfg.top_k))
    rec["tau"] = float(r.cal.tau)
    return rec


def _task_ladder(s: _Setup, task, meta) -> dict:
    """Every rung for one task's queries."""
    from edgekv.bench import evaluate
    from edgekv.induce.adapt import effective
    from edgekv.induce.entries import example_keys

    cfg, bb = s.cfg, s.backbone
    train, queries = list(task.train), _queries(task, cfg)
    tc = [example_concept(meta, ex) for ex in train]
    qc = [example_concept(meta, ex) for ex in queries]
    q = effective(example_keys(bb, s.key_model, queries), s.proj)  # [Q, R] effective query keys
    P = s.ind.P[[s.rows[(task.name, ex.id)] for ex in train]]  # [N_task, R]
    sims = (q @ P.T).numpy()  # [Q, N_task]
    shots = [[train[r] for r in layout(oracle_rows(tc, c, cfg.top_k, cfg.seed, task.name), sims[j])]
             for j, c in enumerate(qc)]
    rungs = {"zero-shot": _record(evaluate.answer(bb, queries, None, cfg.top_k, s.max_new_tokens, cfg.batch_size),
                                  queries)}
    s.bar.update(1)
    rungs["oracle-text"] = _record(_oracle_text(s, queries, shots), queries)
    s.bar.update(1)
    for rung, preds in _oracle_kv(s, queries, shots).items():
        rungs[rung] = _record(preds, queries)
    s.bar.update(len(KV_RUNGS))
    qlabels = [(task.name, c) for c in qc]
    rungs["retrieved"] = _retrieved(s, queries, q, qlabels)
    s.bar.update(1)
    if s.reader is not None:
        rungs["memory"] = _memory(s, queries, qlabels)
        s.bar.update(1)
    return {"name": task.name, "n": len(queries), "query_ids": [ex.id for ex in queries], "concepts": qc,
            "shots": {ex.id: [e.id for e in sh] for ex, sh in zip(queries, shots, strict=True)}, "rungs": rungs}


def _summary(task_records: Sequence[dict], rungs: Sequence[str]) -> dict:
    """Per rung: accuracy over every query of every task (each query weighs the same)."""
    out = {}
    for r in rungs:
        correct = [c for t in task_records for c in t["rungs"][r]["correct"]]
        out[r] = {"accuracy": _mean([float(c) for c in correct]), "n": len(correct)}
        if r in RETRIEVAL_RUNGS:
            for key in ("precision", "recall", "alpha_right"):
                out[r][key] = _mean([x for t in task_records for x in t["rungs"][r]["per_query"][key]])
    return out


def run_ladder(backbone, stream_tasks, cfg: LadderConfig | None = None, memory_path: str | None = None,
               progress: bool | None = None) -> dict:
    """The ladder of every task of ``stream_tasks`` (a loaded ``Stream``, or a list of tasks with
    ``name``, ``train``, ``test`` (``val``) and optionally ``label_map``). -> JSON-able dict

    ``memory_path``: a memory file for rung 7 (``memory``). A progress bar is drawn only when
    stderr is a terminal (and ``progress`` is not False).
    """
    from tqdm.auto import tqdm

    from edgekv.bench.runner import BenchTask, answer_tokens

    cfg = cfg or LadderConfig()
    t0 = time.perf_counter()
    tasks = list(getattr(stream_tasks, "tasks", stream_tasks))
    if not tasks:
        raise InputError("the stream has no tasks")
    metas = task_metas(stream_tasks)
    single = [m.get("name") for m in metas if not m.get("label_map") and not m.get("concepts")]
    if single:
        print(f"edgekv bench: ladder: no label_map for {', '.join(map(str, single))}: each is read as one concept "
              "(its oracle rungs take any k train examples); load the stream from its folder (stream.json) "
              "to give the concepts", file=sys.stderr)
    show = (progress is not False) and sys.stderr.isatty()
    max_new = cfg.max_new_tokens or answer_tokens(
        backbone.tokenizer, [BenchTask(t.name, (), tuple(_queries(t, cfg))) for t in tasks]) + 2
    rungs = [r for r in RUNGS if r != "memory" or memory_path is not None]
    km, proj, ind, labels, rows = _all_train_memory(backbone, tasks, metas, cfg, show)
    reader, file_labels = _file_reader(backbone, memory_path, cfg, tasks, metas)
    bar = tqdm(total=len(tasks) * len(rungs), desc="ladder", unit="rung", disable=not show, leave=False)
    s = _Setup(backbone, cfg, cfg.resolved_tau(), max_new, km, proj, ind, labels, rows, reader, memory_path,
               file_labels, bar)
    records = [_task_ladder(s, t, m) for t, m in zip(tasks, metas, strict=True)]
    bar.close()
    return {"config": cfg.to_dict(), "tau": s.tau, "max_new_tokens": max_new, "rungs": rungs,
            "model": str(getattr(backbone, "source", "")), "model_fingerprint": getattr(backbone, "fingerprint", ""),
            "stream": str(getattr(stream_tasks, "name", "")), "memory": memory_path,
            "memory_entries": len(ind.bank), "tasks": records, "all": _summary(records, rungs),
            "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def largest_drop(accuracy: dict[str, float | None], rungs: Sequence[str]) -> tuple[str, str, float] | None:
    """The consecutive rung step (zero-shot excluded: it is the floor, not a step) that loses the
    most accuracy: (from, to, drop > 0), or None when no step loses any."""
    steps = [r for r in rungs if r != "zero-shot" and accuracy.get(r) is not None]
    best = None
    for a, b in zip(steps, steps[1:], strict=False):
        drop = accuracy[a] - accuracy[b]
        if drop > 0 and (best is None or drop > best[2]):
            best = (a, b, drop)
    return best


def _drop_text(acc: dict, rungs: Sequence[str]) -> str:
    d = largest_drop(acc, rungs)
    return "none" if d is None else f"{d[0]} → {d[1]} (−{100 * d[2]:.1f})"


def _row(name: str, n: int, by_rung: dict, rungs: Sequence[str]) -> str:
    acc = {r: by_rung[r]["accuracy"] for r in rungs}
    cells = [name, str(n)] + [_pct(acc[r]) for r in rungs]
    for r in (x for x in RETRIEVAL_RUNGS if x in rungs):
        cells += [_pct(by_rung[r]["precision"]), _pct(by_rung[r]["recall"]), _pct(by_rung[r]["alpha_right"])]
    return "| " + " | ".join(cells + [_drop_text(acc, rungs)]) + " |"


def ladder_markdown(result: dict) -> str:
    """One table: a row per task (and a last row over all queries), a column per rung (accuracy
    %), p@k / r@k / alpha on right entries (%) of the retrieval rungs, and the largest drop."""
    rungs = result["rungs"]
    k = result["config"]["top_k"]
    head = ["task", "n"] + list(rungs)
    for r in (x for x in RETRIEVAL_RUNGS if x in rungs):
        tag = "" if r == "retrieved" else " (memory)"
        head += [f"p@{k}{tag}", f"r@{k}{tag}", f"α right{tag}"]
    head.append("largest drop")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += [_row(t["name"], t["n"], t["rungs"], rungs) for t in result["tasks"]]
    lines.append(_row("**all**", sum(t["n"] for t in result["tasks"]), result["all"], rungs))
    return "\n".join(lines) + "\n"


def ladder_plot(result: dict, path: str) -> None:
    """Grouped bars: per task, one bar per rung (accuracy %). Written to ``path`` (PNG)."""
    from edgekv.bench.report import _plt

    plt = _plt()
    rungs, tasks = result["rungs"], result["tasks"]
    width = 0.8 / len(rungs)
    fig, ax = plt.subplots(figsize=(2.0 + 1.4 * len(tasks), 4.0))
    for i, r in enumerate(rungs):
        ys = [float("nan") if t["rungs"][r]["accuracy"] is None else 100 * t["rungs"][r]["accuracy"] for t in tasks]
        ax.bar(np.arange(len(tasks)) + (i - (len(rungs) - 1) / 2) * width, ys, width, label=r)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([t["name"] for t in tasks], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"accuracy ladder (k = {result['config']['top_k']}, m = {result['config']['pooled_len']})")
    fig.tight_layout()
    from edgekv.atomic import atomic_file

    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_ladder(result: dict, out_dir: str) -> dict[str, str]:
    """``ladder.json``, ``ladder.md`` and ``ladder.png`` in ``out_dir``, each written atomically. -> name -> path"""
    from edgekv.atomic import write_file_atomic

    os.makedirs(out_dir, exist_ok=True)
    paths = {n: os.path.join(out_dir, f"ladder.{n}") for n in ("json", "md", "png")}
    write_file_atomic(paths["json"], json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_file_atomic(paths["md"], ladder_markdown(result))
    ladder_plot(result, paths["png"])
    return paths
