"""The methods the benchmark compares, behind one interface.

Every method learns tasks in order (``learn``), answers examples (``answer``) and reports
``deployed_bytes()``: the bytes that go to the device beyond the frozen backbone, on one
scale for every method (see docs/bench.md "How bytes are counted"):

* InduceKV, its ablations, reservoir and FIFO: the ``.ekv`` file size (fixed at creation);
* prompt-text: UTF-8 bytes of the stored example texts + their fp32 retrieval keys + the
  key projection (+ image file bytes for image examples);
* LoRA, replay + LoRA: adapter parameters x ``lora_bytes_per_param`` (:mod:`edgekv.bench.lora`);
* zero-shot: 0.

``host_bytes()`` is what stays on the host (anchors, replay buffer), reported separately.
``save``/``load`` move a method's state in and out of a stage folder (resumability).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from edgekv.bench import evaluate
from edgekv.bench.base import Context, Method
from edgekv.bench.config import BenchConfig
from edgekv.data import Example
from edgekv.errors import BudgetError, InputError
from edgekv.format.layout import DEFAULT_PAYLOAD_DTYPE


# ---------------------------------------------------------------------------------
# zero-shot
# ---------------------------------------------------------------------------------
class ZeroShot(Method):
    """The frozen backbone alone; its answers never change, so each example is answered once."""

    name = "zero-shot"
    budget_dependent = False

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self._cache: dict[str, str] = {}

    def learn(self, task_index, task_name, train) -> dict:
        return {}

    def answer(self, examples):
        c = self.ctx.cfg
        todo = [ex for ex in examples if ex.id not in self._cache]
        if todo:
            for ex, a in zip(todo, evaluate.answer(self.ctx.backbone, todo, None, c.top_k, c.max_new_tokens,
                                                   c.eval_batch_size), strict=True):
                self._cache[ex.id] = a
        return [self._cache[ex.id] for ex in examples]

    def first_token(self):
        from edgekv.induce.entries import query_ids

        bb = self.ctx.backbone

        def run(ex: Example) -> None:
            evaluate.greedy_batch(bb.model, [query_ids(bb.tokenizer, ex.prompt)], None, None, 1, set())

        return run


# ---------------------------------------------------------------------------------
# KV memories in one .ekv file
# ---------------------------------------------------------------------------------
class MemoryMethod(Method):
    """A fixed-size ``.ekv`` memory (InduceKV or a baseline filling it)."""

    pooled_len_field = "pooled_len"
    payload_dtype = DEFAULT_PAYLOAD_DTYPE  # every KV method stores what a new memory stores

    @property
    def memory_path(self) -> str:
        return os.path.join(self.ctx.work_dir, "memory.ekv")

    @property
    def pooled_len(self) -> int:
        return getattr(self.ctx.cfg, self.pooled_len_field)

    def adapt_config(self, task_index: int):
        from edgekv.induce.adapt import AdaptConfig
        from edgekv.induce.calibrate import CalibrationConfig
        from edgekv.induce.entries import EntryConfig
        from edgekv.induce.select import SelectionConfig

        c = self.ctx.cfg
        seed = c.seed + task_index
        return AdaptConfig(entry=EntryConfig(pooled_len=self.pooled_len, payload_dtype=self.payload_dtype),
                           selection=SelectionConfig(steps=c.selection_steps, batch_size=c.induce_batch_size,
                                                     seed=seed),
                           calibration=CalibrationConfig(steps=c.calibration_steps, batch_size=c.induce_batch_size,
                                                         seed=seed),
                           top_k=c.top_k, max_candidates=c.max_train_per_task, max_queries=c.max_queries,
                           anchors_per_task=c.anchors_per_task, eval_queries=c.eval_queries, seed=seed)

    def spec(self):
        from edgekv.induce.adapt import memory_spec

        return memory_spec(self.ctx.backbone, self.adapt_config(0))

    def min_budget(self) -> int:
        return self.spec().file_bytes_for(1)

    def params(self) -> dict:
        return {"pooled_len": self.pooled_len, "payload_dtype": self.payload_dtype}

    def answer(self, examples):
        c = self.ctx.cfg
        path = self.memory_path if os.path.exists(self.memory_path) else None
        return evaluate.answer(self.ctx.backbone, examples, path, c.top_k, c.max_new_tokens, c.eval_batch_size)

    def deployed_bytes(self) -> int:
        return os.path.getsize(self.memory_path) if os.path.exists(self.memory_path) else 0

    def host_bytes(self) -> int:
        """The anchors beside the memory (host only)."""
        p = self.memory_path + ".anchors.jsonl"
        return os.path.getsize(p) if os.path.exists(p) else 0

    def info(self) -> dict:
        from edgekv.format import Memory

        if not os.path.exists(self.memory_path):
            return {}
        with Memory(self.memory_path) as mem:
            return {"num_slots": mem.num_slots, "num_used": mem.num_used, "slot_bytes": mem.spec.slot_bytes,
                    "per_task_counts": mem.per_task_counts(), "tau": mem.calibration.tau,
                    "pooled_len": mem.spec.pooled_len, "payload_dtype": mem.spec.payload_dtype}

    def first_token(self):
        if not os.path.exists(self.memory_path):
            return None
        reader = evaluate.MemoryReader(self.ctx.backbone, self.memory_path, self.ctx.cfg.top_k)
        return evaluate.memory_first_token(self.ctx.backbone, reader)

    def _state_files(self) -> list[str]:
        return [self.memory_path, self.memory_path + ".anchors.jsonl", os.path.join(self.ctx.work_dir, "state.json")]

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        for p in self._state_files():
            if os.path.exists(p):
                shutil.copyfile(p, os.path.join(folder, os.path.basename(p)))

    def load(self, folder: str) -> None:
        for p in self._state_files():
            src = os.path.join(folder, os.path.basename(p))
            if os.path.exists(src):
                shutil.copyfile(src, p)
            elif os.path.exists(p):
                os.remove(p)


class Induce(MemoryMethod):
    """InduceKV (full): bilevel selection (coverage term on), calibration, int8 payloads."""

    name = "induce"
    random_selection = False
    coverage = True
    calibration = True

    def adapt_config(self, task_index: int):
        cfg = super().adapt_config(task_index)
        sel = replace(cfg.selection, random=self.random_selection,
                      gamma=cfg.selection.gamma if self.coverage else 0.0)
        cal = replace(cfg.calibration, enabled=self.calibration)
        return replace(cfg, selection=sel, calibration=cal)

    def params(self) -> dict:
        return {**super().params(), "random_selection": self.random_selection, "coverage": self.coverage,
                "calibration": self.calibration}

    def learn(self, task_index, task_name, train) -> dict:
        from edgekv.induce.adapt import adapt

        budget = None if os.path.exists(self.memory_path) else self.ctx.budget
        s = adapt(self.ctx.backbone, list(train), self.memory_path, budget, task_name[:32],
                  self.adapt_config(task_index))
        return {"kept_new": s["kept_new"], "dropped_old": s["dropped_old"], "J_after": s["J_after"]["J"],
                "adapt_seconds": s["seconds"]}


class InduceRandom(Induce):
    """Ablation: a seeded random subset of current memory + candidates instead of the bilevel selection."""

    name = "induce-random"
    random_selection = True


class InduceNoCov(Induce):
    """Ablation: the coverage term off (gamma = 0)."""

    name = "induce-nocov"
    coverage = False


class InduceNoCal(Induce):
    """Ablation: no calibration (tau and gates keep their initial values)."""

    name = "induce-nocal"
    calibration = False


class InduceFp16(Induce):
    """Ablation: fp16 payloads (about half the entries fit)."""

    name = "induce-fp16"
    payload_dtype = "fp16"


class InduceInt8(Induce):
    """Ablation: int8 payloads (the default before int4; about 0.54x the entries at m = 16)."""

    name = "induce-int8"
    payload_dtype = "int8"


class InduceShort(Induce):
    """Ablation: the short pooled length (BenchConfig.short_pooled_len)."""

    pooled_len_field = "short_pooled_len"


class InduceLong(Induce):
    """Ablation: the long pooled length (BenchConfig.long_pooled_len)."""

    pooled_len_field = "long_pooled_len"


UNIFORM_TAU = 1e6  # softmax(sim / tau) over sims in [-1, 1] is uniform to < 1e-6 (exact in the header's float32)


class InduceUniform(Induce):
    """Ablation: uniform alpha = 1/k over the retrieved entries (no retrieval-weighted induction).

    Everything else is InduceKV's (selection, calibrated gates); tau is set to ``UNIFORM_TAU`` at
    creation and kept out of the calibration (``CalibrationConfig.fit_tau=False``), and the memory
    file stores it, so softmax(sim / tau) is 1/k to within 1e-6 on the host and on the device
    (no runtime change)."""

    name = "induce-uniform"

    def adapt_config(self, task_index: int):
        cfg = super().adapt_config(task_index)
        return replace(cfg, init_tau=UNIFORM_TAU, calibration=replace(cfg.calibration, fit_tau=False))

    def params(self) -> dict:
        return {**super().params(), "uniform_alpha": True, "tau": UNIFORM_TAU}


def stream_slot(policy: str, seen: int, num_slots: int, rng: np.random.Generator) -> int | None:
    """Slot of the ``seen``-th example of the stream (1-based: ``seen`` counts it), or None to skip it.

    ``fifo``: the slots in turn, so the most recent ``num_slots`` examples are kept;
    ``reservoir`` (Algorithm R): the first ``num_slots`` fill the slots, then the n-th replaces a
    uniformly chosen slot with probability num_slots / n, so each of the n seen is kept with
    the same probability num_slots / n.
    """
    if policy == "fifo":
        return (seen - 1) % num_slots
    if seen <= num_slots:
        return seen - 1
    j = int(rng.integers(0, seen))
    return j if j < num_slots else None


def offer_stream(policy: str, slots: Sequence, seen: int, items: Sequence, rng: np.random.Generator
                 ) -> tuple[list, int, set[int]]:
    """Offer ``items`` in order to ``slots`` (one per memory slot, None: empty) under ``policy``.

    -> (the new slots, the new count of examples seen, the slots that now hold one of ``items``)
    """
    slots, filled = list(slots), set()
    for item in items:
        seen += 1
        s = stream_slot(policy, seen, len(slots), rng)
        if s is not None:
            slots[s] = item
            filled.add(s)
    return slots, seen, filled


def stream_rows(slots: Sequence[dict | None], filled: set[int], old: Sequence[tuple[str, str]],
                new: Sequence[tuple[str, str]]) -> list[int]:
    """The pool rows (``adapt``'s selector: ``old`` the memory's entries, then ``new`` the
    candidates, each as (task, example id)) of the examples in ``slots``: a slot in ``filled``
    holds a candidate, any other one an entry already in the memory."""
    old_rows = {k: i for i, k in enumerate(old)}
    new_rows = {k: len(old) + j for j, k in enumerate(new)}
    rows = set()
    for s, item in enumerate(slots):
        if item is not None:
            key, table = (item["task"], item["example"]["id"]), new_rows if s in filled else old_rows
            if key not in table:
                raise RuntimeError(f"slot {s} holds {key}, which is neither a candidate nor in the memory")
            rows.add(table[key])
    return sorted(rows)


class StreamMemory(MemoryMethod):
    """Reservoir / FIFO KV memory, calibrated exactly as InduceKV: the same candidates, entries and
    file; the slots are chosen by the stream order (reservoir or FIFO over every train example
    seen) instead of the bilevel selection, and everything else is InduceKV's ``adapt``: the key
    projection refitted on memory + candidates, the final calibration of tau and the gates on
    the kept memory with the current task's queries and the anchors of earlier tasks, and one
    atomic commit with the anchors (``adapt(..., selector=...)``)."""

    policy = "reservoir"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.seen = 0  # examples offered so far
        self.slots: list[dict | None] = []  # per slot of the policy: {"task", "example"} or None

    @property
    def state_path(self) -> str:
        return os.path.join(self.ctx.work_dir, "state.json")

    def params(self) -> dict:
        return {**super().params(), "policy": self.policy}

    def learn(self, task_index, task_name, train) -> dict:
        from edgekv.induce.adapt import adapt

        task, train = task_name[:32], list(train)
        acfg = self.adapt_config(task_index)
        # every example offered must be a candidate (the runner caps train at max_train_per_task already)
        acfg = replace(acfg, max_candidates=max(acfg.max_candidates, len(train)))
        rng = np.random.default_rng(self.ctx.cfg.seed * 1000 + task_index)
        after: dict = {}

        def selector(num_slots: int, old, new) -> list[int]:
            items = [{"task": task, "example": ex.__dict__} for ex in train]
            slots, seen, filled = offer_stream(self.policy, self.slots or [None] * num_slots, self.seen, items, rng)
            after.update(slots=slots, seen=seen)
            return stream_rows(slots, filled, old, new)

        budget = None if os.path.exists(self.memory_path) else self.ctx.budget
        s = adapt(self.ctx.backbone, train, self.memory_path, budget, task, acfg, selector=selector)
        self.slots, self.seen = after["slots"], after["seen"]  # only once the memory is committed
        self._write_state()
        return {"replaced_slots": s["kept_new"], "seen": self.seen, "dropped_old": s["dropped_old"],
                "J_after": s["J_after"]["J"], "adapt_seconds": s["seconds"]}

    def _write_state(self) -> None:
        with open(self.state_path, "w", encoding="utf-8") as f:
            json.dump({"seen": self.seen, "slots": self.slots}, f)

    def load(self, folder: str) -> None:
        super().load(folder)
        if os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as f:
                d = json.load(f)
            self.seen, self.slots = d["seen"], d["slots"]


class Reservoir(StreamMemory):
    """Reservoir sampling over every train example seen (each kept with equal probability); calibrated as InduceKV."""

    name = "reservoir"
    policy = "reservoir"


class Fifo(StreamMemory):
    """First in, first out: the most recent examples fill the slots; calibrated as InduceKV."""

    name = "fifo"
    policy = "fifo"


# ---------------------------------------------------------------------------------
# retrieval of the same examples as prompt text
# ---------------------------------------------------------------------------------
def prompt_key_model(backbone):
    """The retrieval key prompt-text stores and queries with: InduceKV's default key layer, mean pooling."""
    from edgekv.host.keymodel import KeyModel
    from edgekv.host.models import default_key_layer

    return KeyModel(backbone.decoder, default_key_layer(backbone.shape.num_layers), "mean")


def prompt_keys(backbone, examples: Sequence[Example], key_model=None) -> np.ndarray:
    """Raw retrieval keys [N, R] float32 of ``examples`` as :class:`PromptText` stores them (prompt,
    and image on a vision-language backbone; a text backbone ignores images). ``key_model``:
    :func:`prompt_key_model` when None. What ``edgekv.bench.device.MethodState.keys`` holds."""
    from edgekv.induce.entries import example_keys

    if getattr(backbone, "vision", None) is None:
        examples = [replace(ex, image=None) for ex in examples]
    return example_keys(backbone, key_model if key_model is not None else prompt_key_model(backbone), list(examples))


def prompt_projection_rows() -> int:
    """Directions prompt text's stored projection is counted for (bytes): room for the phrasing
    ones or the principal ones, whichever is more (as InduceKV's header reserves room)."""
    from edgekv.induce.adapt import AdaptConfig

    cfg = AdaptConfig()
    return max(cfg.proj_dirs, cfg.phrase_dirs)


def prompt_phrasing(sketch: np.ndarray | None, keys: np.ndarray, examples: Sequence[Example]) -> np.ndarray | None:
    """Prompt text's phrasing sketch after one more task (as adapt adds a task's; unchanged when
    the default ``AdaptConfig`` has no phrasing directions). keys: [N, R] raw keys of ``examples``"""
    from edgekv.induce.adapt import AdaptConfig
    from edgekv.retrieval import add_task_phrasing

    cfg = AdaptConfig()
    if not cfg.phrase_dirs:
        return sketch
    return add_task_phrasing(sketch, keys, [ex.answer for ex in examples], cfg.phrase_rank)


def prompt_projection(keys: np.ndarray, sketch: np.ndarray | None):
    """Prompt text's key projection over its stored items, as InduceKV fits its own (the default
    ``AdaptConfig``, :func:`edgekv.retrieval.memory_projection`).
    keys: [N, R] raw, sketch: [S, R] or None -> KeyProjection"""
    from edgekv.induce.adapt import AdaptConfig
    from edgekv.retrieval import memory_projection

    cfg = AdaptConfig()
    return memory_projection(keys, sketch, cfg.phrase_dirs, cfg.proj_dirs)


class PromptText(Method):
    """Examples kept as text under the byte budget; the top-k by the same frozen retrieval key
    (same layer, pooling and all-but-the-top projection as InduceKV) are put in the prompt as
    earlier chat turns (best last, as InduceKV lays out entries). On a vision-language backbone
    the stored examples keep their images: retrieval keys cover prompt + image (as InduceKV's),
    and a retrieved example's image goes into its chat turn (features spliced in)."""

    name = "prompt-text"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.items: list[tuple[str, Example]] = []
        self.keys = np.zeros((0, 0), np.float32)  # [N, R] raw keys of items
        self.sketch: np.ndarray | None = None  # [S, R] phrasing sketch of every task seen (as InduceKV's)

    def _key_setup(self):
        return prompt_key_model(self.ctx.backbone)

    @property
    def phrase_dirs(self) -> int:
        from edgekv.induce.adapt import AdaptConfig

        return AdaptConfig().phrase_dirs

    @property
    def proj_dirs(self) -> int:
        return prompt_projection_rows()

    def params(self) -> dict:
        return {"phrase_dirs": self.phrase_dirs} if self.phrase_dirs else {}  # absent at 0: earlier stages stay valid

    @property
    def vision(self):
        return getattr(self.ctx.backbone, "vision", None)

    @staticmethod
    def item_bytes(ex: Example, key_dim: int, with_image: bool = True) -> int:
        """Text (prompt + answer, UTF-8) + fp32 key + the image file (PNG bytes) if any and kept."""
        img = os.path.getsize(ex.image) if with_image and ex.image is not None and os.path.isfile(ex.image) else 0
        return len(ex.prompt.encode("utf-8")) + len(ex.answer.encode("utf-8")) + 4 * key_dim + img

    @staticmethod
    def store_bytes(examples: Sequence[Example], key_dim: int, with_images: bool = True,
                    proj_dirs: int | None = None) -> int:
        """Bytes a device holds for ``examples`` stored as prompt text: the key projection
        (``proj_dirs`` directions + mean, fp32; default :func:`prompt_projection_rows`) and every
        example's :meth:`item_bytes`."""
        if proj_dirs is None:
            proj_dirs = prompt_projection_rows()
        return 4 * key_dim * (proj_dirs + 1) + sum(PromptText.item_bytes(ex, key_dim, with_images)
                                                   for ex in examples)

    def _fixed_bytes(self) -> int:
        R = self.ctx.backbone.shape.hidden_size
        return 4 * R * (self.proj_dirs + 1)  # projection: directions + mean

    def min_budget(self) -> int:
        return self._fixed_bytes() + 4 * self.ctx.backbone.shape.hidden_size + 64

    def deployed_bytes(self) -> int:
        R = self.ctx.backbone.shape.hidden_size
        keep = self.vision is not None
        return self.store_bytes([ex for _, ex in self.items], R, keep, self.proj_dirs)

    def info(self) -> dict:
        return {"num_examples": len(self.items)}

    def _keys(self, examples: Sequence[Example]) -> np.ndarray:
        """Raw retrieval keys of prompts (and images on a VLM). -> [N, R]"""
        return prompt_keys(self.ctx.backbone, examples, self._key_setup())

    def learn(self, task_index, task_name, train) -> dict:
        keys = self._keys(train)
        self.sketch = prompt_phrasing(self.sketch, keys, train)  # as InduceKV adds it from its candidates
        self.items += [(task_name, ex) for ex in train]
        self.keys = keys if len(self.keys) == 0 else np.concatenate([self.keys, keys])
        rng = np.random.default_rng(self.ctx.cfg.seed * 1000 + task_index)
        dropped = 0
        while self.deployed_bytes() > self.ctx.budget and self.items:  # evict uniformly at random
            i = int(rng.integers(0, len(self.items)))
            del self.items[i]
            self.keys = np.delete(self.keys, i, axis=0)
            dropped += 1
        self._write_state()
        return {"dropped": dropped}

    def _retrieve(self, examples: Sequence[Example]) -> list[list[int]]:
        """Rows of the top-k items per query, increasing similarity (best last)."""
        from edgekv.retrieval import effective_keys

        if not self.items:
            return [[] for _ in examples]
        proj = self.projection()
        P = effective_keys(self.keys, proj)  # [N, R]
        q = effective_keys(self._keys(examples), proj)  # [B, R]
        sims = q @ P.T  # [B, N]
        k = min(self.ctx.cfg.top_k, len(self.items))
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # best first
        return [row[::-1].tolist() for row in top]

    def projection(self):
        return prompt_projection(self.keys, self.sketch)

    def retrieved(self, examples: Sequence[Example]) -> list[list[str]]:
        """Ids of the stored examples each query gets as shots (best last)."""
        return [[self.items[r][1].id for r in rows] for rows in self._retrieve(examples)]

    def chat(self, ex: Example) -> tuple[list[int], list[str]]:
        """(prompt ids, image paths in token order) of one query on a VLM: the retrieved
        examples as answered chat turns with their images, then the query with its image."""
        shots = [self.items[r][1] for r in self._retrieve([ex])[0]]
        turns = [(s.prompt, s.image, s.answer) for s in shots] + [(ex.prompt, ex.image, None)]
        return self.vision.chat_ids(self.ctx.backbone.tokenizer, turns)

    def _answer_one(self, ex: Example, max_new_tokens: int) -> list[int]:
        ids, images = self.chat(ex)
        embeds = self.vision.embed_images(ids, images) if images else None
        return evaluate.greedy_one(self.ctx.backbone.model, ids, embeds, max_new_tokens,
                                   set(self.ctx.backbone.eos_token_ids))

    def prompt_ids(self, examples: Sequence[Example]) -> list[list[int]]:
        """Prompt ids of text queries on a text backbone (batched path; images ignored)."""
        return [self.text_ids([self.items[r][1] for r in rows], ex)
                for ex, rows in zip(examples, self._retrieve(examples), strict=True)]

    def text_ids(self, shots: Sequence[Example], ex: Example) -> list[int]:
        """Prompt ids of text query ``ex`` after ``shots`` (layout order, best last) as answered chat
        turns (the template's layout; without a template, prompt and answer lines); images ignored."""
        from edgekv.host.tokens import has_chat_template

        tok = self.ctx.backbone.tokenizer
        if has_chat_template(tok):
            msgs = []
            for s in shots:
                msgs += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.answer}]
            msgs.append({"role": "user", "content": ex.prompt})
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False).input_ids)
        text = "".join(f"{s.prompt}\n{s.answer}\n" for s in shots) + ex.prompt
        return list(tok(text, add_special_tokens=True).input_ids)

    def shot_ids(self, shots: Sequence[Example], ex: Example) -> list[int]:
        """The ids this method prefills for query ``ex`` with ``shots`` (best last): on a VLM the chat
        with every image's token span expanded (``chat_ids``), else :meth:`text_ids`."""
        if self.vision is not None:
            turns = [(s.prompt, s.image, s.answer) for s in shots] + [(ex.prompt, ex.image, None)]
            return self.vision.chat_ids(self.ctx.backbone.tokenizer, turns)[0]
        return self.text_ids(shots, ex)

    def answer(self, examples):
        c = self.ctx.cfg
        if self.vision is not None:  # per query: shots with images, features spliced in
            tok = self.ctx.backbone.tokenizer
            return [tok.decode(self._answer_one(ex, c.max_new_tokens), skip_special_tokens=True).strip()
                    for ex in examples]
        examples = [replace(ex, image=None) for ex in examples]  # a text backbone ignores images
        return evaluate.answer_text(self.ctx.backbone, examples, None, c.top_k, c.max_new_tokens,
                                    c.eval_batch_size, prompt_ids=self.prompt_ids)

    def first_token(self):
        """Key + retrieval + prompt prefill (shots' images included; image features are cached
        per path, so their encoder time is not counted)."""
        def run(ex: Example) -> None:
            if self.vision is not None:
                self._answer_one(ex, 1)
            else:
                evaluate.greedy_batch(self.ctx.backbone.model, self.prompt_ids([ex]), None, None, 1, set())

        return run

    @property
    def state_path(self) -> str:
        return os.path.join(self.ctx.work_dir, "state.json")

    def _write_state(self) -> None:
        with open(self.state_path, "w", encoding="utf-8") as f:
            json.dump({"items": [[t, ex.__dict__] for t, ex in self.items]}, f)
        np.save(os.path.join(self.ctx.work_dir, "keys.npy"), self.keys)
        sketch_path = os.path.join(self.ctx.work_dir, "phrasing.npy")
        if self.sketch is not None:
            np.save(sketch_path, self.sketch)
        elif os.path.exists(sketch_path):
            os.remove(sketch_path)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        for name in ("state.json", "keys.npy", "phrasing.npy"):
            if os.path.exists(os.path.join(self.ctx.work_dir, name)):
                shutil.copyfile(os.path.join(self.ctx.work_dir, name), os.path.join(folder, name))

    def load(self, folder: str) -> None:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            self.items = [(t, Example(**d)) for t, d in json.load(f)["items"]]
        self.keys = np.load(os.path.join(folder, "keys.npy"))
        sketch_path = os.path.join(folder, "phrasing.npy")
        self.sketch = np.load(sketch_path, allow_pickle=False) if os.path.exists(sketch_path) else None
        self._write_state()


class PromptTextMatched(PromptText):
    """prompt-text at InduceKV's context: shots best-first, whole, while their prompt tokens fit k x m.

    The same stored examples, keys and retrieval as prompt-text; of a query's top-k (best first)
    each shot is added whole while the prompt tokens the shots add (their answered chat turns,
    an image's whole token span on a VLM) stay within ``top_k * pooled_len``, the positions
    InduceKV injects; the first shot that does not fit ends the list (so the shots are a
    best-first prefix of prompt-text's). Counted exactly: the query's prompt with the shots
    minus the query's prompt alone, in the layout that is prefilled (best last)."""

    name = "prompt-text-matched"

    @staticmethod
    def shot_token_limit(cfg: BenchConfig) -> int:
        """Most prompt tokens of shots: k x m, what InduceKV injects."""
        return cfg.top_k * cfg.pooled_len

    def params(self) -> dict:
        return {**super().params(), "shot_tokens": self.shot_token_limit(self.ctx.cfg)}

    def shot_tokens(self, shots: Sequence[Example], ex: Example) -> int:
        """Prompt tokens ``shots`` (layout order) add to query ``ex``'s prompt."""
        return len(self.shot_ids(shots, ex)) - len(self.shot_ids([], ex))

    def _retrieve(self, examples: Sequence[Example]) -> list[list[int]]:
        limit = self.shot_token_limit(self.ctx.cfg)
        out = []
        for ex, rows in zip(examples, super()._retrieve(examples), strict=True):
            if self.vision is None:  # a text backbone ignores images
                ex = replace(ex, image=None)
            keep: list[int] = []  # best first
            for r in reversed(rows):
                cand = keep + [r]
                if self.shot_tokens([self.items[x][1] for x in reversed(cand)], ex) > limit:
                    break
                keep = cand
            out.append(keep[::-1])  # best last
        return out


# ---------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------
def registry(cfg: BenchConfig) -> dict[str, Callable[[Context], Method]]:
    """Method name -> factory, in report order. Pooled-length ablations are named by m."""
    from edgekv.bench.lora import Lora, ReplayLora

    short = type(f"InduceM{cfg.short_pooled_len}", (InduceShort,), {
        "name": f"induce-m{cfg.short_pooled_len}", "__doc__": f"Ablation: pooled length m = {cfg.short_pooled_len}."})
    long_ = type(f"InduceM{cfg.long_pooled_len}", (InduceLong,), {
        "name": f"induce-m{cfg.long_pooled_len}", "__doc__": f"Ablation: pooled length m = {cfg.long_pooled_len}."})
    classes = [ZeroShot, Induce, InduceRandom, InduceNoCov, InduceNoCal, InduceFp16, InduceInt8, short, long_,
               InduceUniform, Reservoir, Fifo, PromptText, PromptTextMatched, Lora, ReplayLora]
    return {c.name: c for c in classes}


def describe(cfg: BenchConfig) -> dict[str, str]:
    """Method name -> one line (its docstring's first line)."""
    return {n: (c.__doc__ or "").strip().splitlines()[0] for n, c in registry(cfg).items()}


def parse_methods(text: str | None, cfg: BenchConfig) -> list[str]:
    """Comma-separated method names (None or 'all': every method), in registry order."""
    names = list(registry(cfg))
    if text is None or text.strip() == "all":
        return names
    asked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in asked if t not in names]
    if unknown or not asked:
        raise InputError(f"unknown method {', '.join(unknown) or repr(text)}: choose from {', '.join(names)}")
    return [n for n in names if n in asked]


def check_budget(method: Method, budget: int) -> None:
    need = method.min_budget()
    if budget < need:
        raise BudgetError(f"budget {budget} B is too small for {method.name}: it needs at least {need} B "
                          f"({_why(method)}); raise the budget or leave the method out of the methods")


def _why(method: Method) -> str:
    if isinstance(method, MemoryMethod):
        return f"one entry of m = {method.pooled_len} {method.payload_dtype} with the file header"
    if isinstance(method, PromptText):
        return "one short example with its key and the projection"
    return "a rank-1 adapter"
