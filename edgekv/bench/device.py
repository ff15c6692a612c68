"""Time to first token of the benchmark's methods on the device runtime (``edgekv.runtime``).

Users run the onnxruntime runtime, not host torch, so the benchmark's TTFT is measured
there: one export of the backbone (:func:`export_for_bench`), each method's final state
as the device would hold it (:class:`MethodState`, read from a finished run by
:func:`method_states_from_bench`), and :func:`measure_device_ttft`, which times every
method on the same queries, interleaved query by query.

What is timed, per query, from the query text to the first token's logits (greedy pick
included), in one shared decoder session (so no session's spinning thread pool falls on
another's prefill):

* ``memory`` (induce and its ablations, reservoir, fifo): ``Runtime.generate(query,
  max_new_tokens=1)`` with the method's ``.ekv`` file: prompt ids, the key pass
  (``key.onnx``), top-k search, memory KV assembly (slot reads, dequantisation, RoPE) and
  the prompt's prefill after it. Retrieval is exact: ``Runtime.load`` uses an HNSW index
  only when the export's manifest lists one built for that very memory (``edgekv export
  --memory``), and even then only from 2,048 entries on (``IndexConfig.exact_below``);
  benchmark memories hold far fewer, so exact numpy search over the memory's effective
  keys is what the device would run. No index is built.
* ``prompt`` (prompt-text; also prompt-text at matched context, ``prompt-text-matched``: a
  best-first prefix of the shots that fits :attr:`MethodState.shot_tokens`, counted with the
  device tokenizer's own chat rendering, inside the timed call since the device must do it
  too; other variants through :attr:`MethodState.top_k` /
  :attr:`MethodState.shot`): the key pass on the same
  ``key.onnx`` (``Runtime.query_key``), the method's own key projection and numpy
  top-k over its stored keys (exactly ``PromptText._retrieve``), the retrieved examples as
  earlier answered chat turns (best last) rendered by the device tokenizer's chat template
  (``DeviceTokenizer.encode_chat``; without a template the host's plain layout), then the
  prefill of that whole prompt with no memory.
* ``plain`` (zero-shot; lora and replay-lora, whose adapters merge into the weights so the
  graph costs what the base model costs): ``Runtime.generate(query, max_new_tokens=1)``
  without memory.

Beyond timing, :meth:`_PromptShots.generate` answers a query whole with its shots (the prompt
``build`` makes, then the runtime's own prefill and greedy decode): ``edgekv demo`` scores
prompt text's accuracy with it, and times both methods with :func:`time_first_token` (the
prepare / warm-up / interleaved passes :func:`measure_device_ttft` runs).

Images (a vision-language export): queries with an image are timed as image queries
(``generate(image=...)`` for memory and plain methods), reported apart from the text queries:
each method's figures over the text queries at the top of its entry (the keys a text run has),
those over the image queries in its ``image`` sub-block, both timed in the same interleaved
passes (text and image queries alternate). A query's own image is encoded inside the timed
call for every method (as ``generate(image=...)`` does); a prompt method's retrieved shots keep
their images, each spliced into its own chat turn through the runtime's embedding path
(``MultimodalModel.embed`` fills every image-token position, several images in token order),
with each shot image's features computed once per path before timing (the host benchmark
caches them the same way): the vision encoder's time for shots is not counted, their
positions' prefill is. ``image_tokens`` is the mean number of prompt positions that hold
image features (the query's image and the shots'), part of ``prompt_tokens``. The result's
``images`` field says so. A text-only export ignores the images (its queries are all text).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np

from edgekv.data import Example
from edgekv.errors import EdgeKVError, InputError, MismatchError

KINDS = ("memory", "prompt", "plain")
DEFAULT_THREADS = 2
IMAGES_NOTE = ("image queries (their own image) are reported apart from text queries (each method's 'image' "
               "block); a query's own image is encoded inside the timed call for every method. Shot images: each "
               "retrieved shot's image is spliced into its own chat turn through the runtime's embedding path "
               "(MultimodalModel.embed, several images in token order); its features are computed once per path "
               "before timing (vision encoder not timed, the image positions' prefill is).")
TEXT_EXPORT_NOTE = "a text-only export: the queries' images are ignored (every query is timed as text)"


@dataclass
class MethodState:
    """What the device holds of one method after the last task.

    kind: ``memory`` (``memory`` = the .ekv file), ``prompt`` (``items`` = the stored examples,
    ``keys`` = their raw retrieval keys [N, R] float32, ``projection`` = the key projection,
    fitted from ``keys`` with ``proj_dirs`` directions when None) or ``plain`` (nothing).
    ``top_k``: shots / entries per query (None: the config's ``top_k``). ``shot``: applied to
    each retrieved example before it goes into the prompt (a matched-context variant's
    shortening). ``shot_tokens``: at most this many prompt tokens of shots (None: no limit): of
    the top-k, best first, each shot is added whole while the tokens the shots add to the
    query's prompt fit; the first that does not ends the list
    (:class:`edgekv.bench.methods.PromptTextMatched`; ``method_states_from_bench`` sets it from
    the class's ``shot_token_limit(cfg)``). ``key_layer`` / ``key_pooling``: what ``keys`` pool
    (None: the default key layer, mean pooling, as :class:`edgekv.bench.methods.PromptText`);
    checked against the export's key graph.
    """

    kind: str
    memory: str | None = None
    items: tuple[Example, ...] = ()
    keys: np.ndarray | None = None
    projection: object | None = None  # edgekv.retrieval.KeyProjection
    proj_dirs: int = 3
    top_k: int | None = None
    shot: Callable[[Example], Example] | None = None
    shot_tokens: int | None = None
    key_layer: int | None = None
    key_pooling: str | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"MethodState.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "memory" and not self.memory:
            raise InputError("a memory method's state needs the path of its .ekv file")
        if self.kind == "prompt":
            self.items = tuple(self.items)
            n = len(self.items)
            keys = np.zeros((0, 0), np.float32) if self.keys is None else np.asarray(self.keys, np.float32)
            if n and (keys.ndim != 2 or len(keys) != n):
                raise InputError(f"a prompt method's state has {n} examples but keys of shape {keys.shape}")
            self.keys = keys


# --- the export ---------------------------------------------------------------------
def export_for_bench(model: str, out_dir: str, fingerprint: str | None = None, quantize_weights: str | None = None,
                     progress: bool = False) -> str:
    """``edgekv export`` of the benchmark's backbone into ``out_dir/artifacts``, once. -> that folder

    Skipped when the folder already holds a complete export (manifest valid, every file's
    sha256 as the manifest records it; exports are published atomically) of the same model:
    the same ``fingerprint`` (the backbone's ``model_fingerprint``, e.g. ``backbone.fingerprint``)
    when given, else the same ``source`` string; and the same edgekv version and decoder
    weights. Otherwise (re-)exported, replacing the folder.
    """
    from edgekv import __version__
    from edgekv.manifest import read_manifest

    artifacts = os.path.join(os.path.abspath(out_dir), "artifacts")
    if os.path.isdir(artifacts):
        try:
            m = read_manifest(artifacts, verify_hashes=True)
        except (EdgeKVError, OSError, ValueError, KeyError):
            m = None
        if m is not None and m.get("edgekv_version") == __version__ \
                and m.get("decoder", {}).get("weights") == (quantize_weights or "fp32") \
                and (m.get("model_fingerprint") == fingerprint if fingerprint else m.get("source") == str(model)):
            return artifacts
    from edgekv.export.pipeline import export_model

    os.makedirs(os.path.dirname(artifacts), exist_ok=True)
    export_model(str(model), artifacts, quantize_weights=quantize_weights, progress=progress, force=True)
    return artifacts


# --- states from a finished run -----------------------------------------------------
def method_kind(name: str, cls=None) -> str:
    """``memory`` / ``prompt`` / ``plain`` of a registry class (or, without one, of its name)."""
    if cls is not None:
        from edgekv.bench.methods import MemoryMethod, PromptText

        if issubclass(cls, MemoryMethod):
            return "memory"
        if issubclass(cls, PromptText):
            return "prompt"
        return "plain"
    if name.startswith("prompt-text"):
        return "prompt"
    if name.startswith("induce") or name in ("reservoir", "fifo"):
        return "memory"
    return "plain"


def read_prompt_state(folder: str, proj_dirs: int | None = None) -> MethodState:
    """A prompt-text state folder (``PromptText.save``: state.json + keys.npy) as a MethodState."""
    import json

    from edgekv.bench.methods import prompt_projection
    from edgekv.retrieval import fit_projection

    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        items = tuple(Example(**d) for _, d in json.load(f)["items"])
    keys = np.load(os.path.join(folder, "keys.npy"), allow_pickle=False).astype(np.float32)
    sketch_path = os.path.join(folder, "phrasing.npy")
    sketch = np.load(sketch_path, allow_pickle=False) if os.path.isfile(sketch_path) else None
    if proj_dirs is None:  # what PromptText fitted
        proj = prompt_projection(keys, sketch) if len(items) else None
        proj_dirs = 0 if proj is None else len(proj.dirs)
    else:
        proj = fit_projection(keys, proj_dirs) if len(items) else None
    return MethodState("prompt", items=items, keys=keys, projection=proj, proj_dirs=proj_dirs,
                       info={"state": folder})


def method_states_from_bench(out_dir: str, names: Sequence[str], main_budget: int, tasks, cfg=None
                             ) -> dict[str, MethodState]:
    """The final states a benchmark run left in ``out_dir``: ``stages/<method>/<budget>/task<T-1>/state/``.

    ``tasks``: the run's tasks (or their number T). ``cfg``: its BenchConfig (method names of the
    pooled-length ablations; default ``BenchConfig()``). Memory methods need ``memory.ekv``,
    prompt methods ``state.json`` + ``keys.npy``; a method whose state is missing (not run,
    or not finished) is left out. Plain methods need nothing.
    """
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.methods import registry
    from edgekv.bench.runner import stage_dir

    T = tasks if isinstance(tasks, int) else len(tasks)
    if T < 1:
        raise InputError("the run has no tasks")
    reg_cfg = cfg if cfg is not None else BenchConfig()
    reg = registry(reg_cfg)
    out: dict[str, MethodState] = {}
    for name in names:
        cls = reg.get(name)
        kind = method_kind(name, cls)
        if kind == "plain":
            out[name] = MethodState("plain")
            continue
        dependent = True if cls is None else cls.budget_dependent
        state = os.path.join(stage_dir(out_dir, name, main_budget if dependent else None, T - 1), "state")
        if kind == "memory":
            path = os.path.join(state, "memory.ekv")
            if os.path.isfile(path):
                out[name] = MethodState("memory", memory=path, info={"state": state})
        elif os.path.isfile(os.path.join(state, "state.json")) and os.path.isfile(os.path.join(state, "keys.npy")):
            st = read_prompt_state(state)
            top_k = getattr(cls, "top_k", None) if cls is not None else None  # a variant with fewer shots
            limit = getattr(cls, "shot_token_limit", None) if cls is not None else None  # matched context
            out[name] = replace(st, top_k=top_k if isinstance(top_k, int) else None,
                                shot_tokens=int(limit(reg_cfg)) if callable(limit) else None)
    return out


# --- the timed paths ----------------------------------------------------------------
def _as_example(q, i: int) -> Example:
    if isinstance(q, Example):
        return q
    if isinstance(q, str):
        return Example(f"q{i}", q, "")
    raise InputError(f"a query must be an Example or a string, got {type(q).__name__}")


def _default_key_layer(num_layers: int) -> int | None:
    """The key layer PromptText's keys pool (None where the host layer is not installed: unchecked)."""
    try:
        from edgekv.host.models import default_key_layer
    except ImportError:
        return None
    return int(default_key_layer(num_layers))


class _Timed:
    """One method on the device: ``run(query)`` is the timed call; ``facts`` what it fed."""

    kind = "plain"

    def __init__(self, name: str):
        self.name = name
        self.reset()

    def reset(self) -> None:
        """Forget what earlier calls fed (after the warm-up)."""
        self.calls: list[dict] = []  # per run() call: what it fed (prompt_tokens, memory_tokens, ...)

    def record(self, **facts) -> None:
        self.calls.append(facts)

    def run(self, q: Example) -> None:
        raise NotImplementedError

    def prepare(self, q: Example) -> None:
        """Untimed work before the timing (caches)."""

    def facts(self, calls: Sequence[int] | None = None) -> dict:
        """Mean per query of what the calls (indices into :attr:`calls`; None: all) fed."""
        sel = self.calls if calls is None else [self.calls[i] for i in calls]
        keys = ("prompt_tokens", "memory_tokens", "image_tokens") + (("shots", "shot_images") if self.kind == "prompt"
                                                                      else ())
        return {k: _mean([c[k] for c in sel if c.get(k) is not None]) for k in keys}

    def close(self) -> None:
        pass


def _mean(x: list[int]) -> float | None:
    return float(np.mean(x)) if x else None


class _Generate(_Timed):
    """memory / plain: the runtime's own generation, one token."""

    def __init__(self, name: str, kind: str, rt, use_memory: bool, own: bool, image_cache: dict | None = None):
        super().__init__(name)
        self.kind, self.rt, self.use_memory, self.own = kind, rt, use_memory, own
        self.images = {} if image_cache is None else image_cache  # path -> EncodedImage (token counts only)

    def prepare(self, q: Example) -> None:
        """The query image's feature count (``image_tokens``), untimed; the timed call encodes it again."""
        if self.rt.vision is not None and q.image is not None and q.image not in self.images:
            self.images[q.image] = self.rt.vision.encode_image(q.image)

    def run(self, q: Example) -> None:
        image = q.image if self.rt.vision is not None else None  # a text export ignores images
        res = self.rt.generate(q.prompt, max_new_tokens=1, use_memory=self.use_memory, image=image)
        enc = self.images.get(image) if image is not None else None
        self.record(prompt_tokens=res.num_prompt_tokens, memory_tokens=res.num_memory_tokens,
                    image_tokens=0 if image is None else None if enc is None else int(enc.features.shape[1]))
        self.last = res

    def close(self) -> None:
        if self.own:
            self.rt.close()


class _PromptShots(_Timed):
    """prompt: key pass + numpy retrieval over the stored keys + prefill of the shots as chat turns."""

    kind = "prompt"

    def __init__(self, name: str, base, key_session, state: MethodState, top_k: int, image_cache: dict):
        from edgekv.retrieval import effective_keys, fit_projection

        super().__init__(name)
        self.base, self.state = base, state
        self.items = state.items
        self.k = min(top_k, len(self.items))
        proj = state.projection
        if proj is None and len(self.items):
            proj = fit_projection(state.keys, state.proj_dirs)
        self.P = effective_keys(state.keys, proj) if len(self.items) else None  # [N, R]
        # Runtime.query_key with this method's projection in place of a memory's (the same key graph)
        self.keyrt = None
        if len(self.items):
            import copy

            self.keyrt = copy.copy(base)
            self.keyrt.key_session = key_session
            self.keyrt.memory = SimpleNamespace(projection=proj)
        self.vision = base.vision
        self.images = image_cache  # path -> EncodedImage, filled by prepare()
        self.last_rows: list[int] = []
        self.last_ids: list[int] = []

    # retrieval: exactly PromptText._retrieve (rows of the top-k, best last)
    def retrieve(self, q: Example, img=None) -> list[int]:
        if self.keyrt is None or self.k == 0:
            return []
        key = self.keyrt.query_key(q.prompt, img)  # [R] effective, unit
        sims = key[None, :] @ self.P.T  # [1, N]
        top = np.argsort(-sims, axis=1, kind="stable")[0, :self.k]  # best first
        return top[::-1].tolist()

    def _shots(self, rows: list[int]) -> list[Example]:
        shots = [self.items[r] for r in rows]
        if self.state.shot is not None:
            shots = [self.state.shot(s) for s in shots]
        if self.vision is None:  # a text export ignores images, as the host's text backbone does
            shots = [replace(s, image=None) for s in shots]
        return shots

    def image(self, path: str):
        """A shot image's features, encoded once per path (:meth:`prepare` fills the cache before timing)."""
        if path not in self.images:
            self.images[path] = self.vision.encode_image(path)
        return self.images[path]

    def prepare(self, q: Example) -> None:
        img = self.vision.encode_image(q.image) if self.vision is not None and q.image else None
        for s in self._shots(self.retrieve(q, img)):
            if s.image is not None:
                self.image(s.image)

    def chat_ids(self, shots: Sequence[Example], q: Example, qimg) -> tuple[list[int], np.ndarray | None]:
        """Token ids of the shots as answered user turns then the query (generation prompt), and the
        image features [1, N, hidden] of the image-token positions in token order (None: no image)."""
        rt = self.base
        tok = rt.tokenizer
        turns = [(s.prompt, None if s.image is None else self.image(s.image), s.answer) for s in shots]
        turns.append((q.prompt, qimg, None))
        chat = rt.config.chat and bool(tok.chat_template)
        if not any(img is not None for _, img, _ in turns):
            if chat:
                msgs = []
                for p, _, a in turns:
                    msgs.append({"role": "user", "content": p})
                    if a is not None:
                        msgs.append({"role": "assistant", "content": a})
                return tok.encode_chat(msgs), None
            return tok.encode("".join(f"{p}\n{a}\n" for p, _, a in turns[:-1]) + q.prompt), None
        v = self.vision
        token = v.image_token
        if chat:
            msgs = []
            for p, img, a in turns:
                msgs.append(self._user(p) if img is not None else {"role": "user", "content": p})
                if a is not None:
                    msgs.append({"role": "assistant", "content": a})
            text = tok.render_chat(msgs, add_generation_prompt=True)
        else:  # the host's layout without a template (ImageInputs.chat_ids)
            text = "".join((f"{token}\n" if img is not None else "") + p + (f"\n{a}\n" if a is not None else "")
                           for p, img, a in turns)
        images = [img for _, img, _ in turns if img is not None]
        parts = text.split(token)
        if len(parts) != len(images) + 1:
            raise InputError(f"expected {len(images)} image tokens {token!r} in the chat text, found "
                             f"{len(parts) - 1}; leave the token out of prompts")
        text = parts[0] + "".join(v.tokens.text(img) + rest for img, rest in zip(images, parts[1:], strict=True))
        ids = tok.encode(text, add_special_tokens=not chat)
        feats = np.concatenate([img.features for img in images], axis=1)  # [1, N, hidden]
        return ids, feats

    def _user(self, prompt: str) -> dict:
        """An image + prompt user turn as the runtime places one (MultimodalModel.prompt_text)."""
        v, tok = self.vision, self.base.tokenizer
        if v.image_token in prompt:
            raise InputError(f"the prompt contains the image token {v.image_token!r}")
        listed = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        text = tok.render_chat([listed])
        if text.count(v.image_token) == 1 and prompt in text:
            return listed
        return {"role": "user", "content": f"{v.image_token}\n{prompt}"}

    def fit(self, rows: list[int], q: Example, qimg=None) -> list[int]:
        """The best-first prefix of ``rows`` (best last) whose shots add at most ``state.shot_tokens``
        tokens to the query's prompt, each shot whole (what ``PromptTextMatched`` keeps on the host)."""
        limit = self.state.shot_tokens
        if limit is None or not rows:
            return rows
        base = len(self.chat_ids([], q, qimg)[0])
        keep: list[int] = []  # best first
        for r in reversed(rows):
            cand = keep + [r]
            if len(self.chat_ids(self._shots(cand[::-1]), q, qimg)[0]) - base > limit:
                break
            keep = cand
        return keep[::-1]

    def build(self, q: Example, qimg=None) -> tuple[list[int], np.ndarray | None, list[Example], list[int]]:
        """(prompt ids, image features or None, the shots, their rows; best last) of one query."""
        rows = self.fit(self.retrieve(q, qimg), q, qimg)
        shots = self._shots(rows)
        ids, feats = self.chat_ids(shots, q, qimg)
        return ids, feats, shots, rows

    def generate(self, q: Example, max_new_tokens: int):
        """The whole greedy answer to ``q`` with its shots (an ``edgekv.runtime.GenerationResult``):
        the prompt :meth:`build` makes (what :meth:`run` times), then the runtime's own prefill and
        decode (``Runtime._prefill`` / ``Runtime._decode``, no memory; stops at EOS, at most
        ``max_new_tokens``, cut to the model's context). ``ttft_ms`` counts from the key pass on."""
        from edgekv.runtime.runtime import GenerationResult, _Query
        from edgekv.runtime.sampling import SamplingConfig

        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rt = self.base
        qimg = rt.encode_image(q.image) if self.vision is not None and q.image else None
        t0 = time.perf_counter()
        ids, feats, _, rows = self.build(q, qimg)
        if rt.max_positions and len(ids) + 1 > rt.max_positions:
            raise InputError(f"{self.name}: a prompt of {len(ids)} tokens with its shots exceeds the model's context "
                             f"of {rt.max_positions}")
        if rt.max_positions:
            max_new_tokens = min(max_new_tokens, rt.max_positions - len(ids))
        query = _Query(ids, None if feats is None else SimpleNamespace(features=feats), [], None, None, 0,
                       max_new_tokens, t0)
        res = GenerationResult(num_prompt_tokens=len(ids))
        cache = rt._start_past(None, len(ids) + max_new_tokens)
        try:
            logits, past = rt._prefill(query, cache)
            for _ in rt._decode(logits, past, query, SamplingConfig(), res):
                pass
        finally:
            if getattr(rt.decoder, "shared_buffer", False):
                rt.decoder.release_cache(cache)
        self.last_rows, self.last_ids = rows, ids
        return res

    def run(self, q: Example) -> None:
        rt = self.base
        qimg = rt.encode_image(q.image) if self.vision is not None and q.image else None
        ids, feats, shots, rows = self.build(q, qimg)
        if rt.max_positions and len(ids) + 1 > rt.max_positions:
            raise InputError(f"{self.name}: a prompt of {len(ids)} tokens with its shots exceeds the model's context "
                             f"of {rt.max_positions}")
        dec = rt.decoder
        shared = bool(getattr(dec, "shared_buffer", False))
        past = dec.acquire_cache(len(ids) + 1) if shared else dec.empty_past()  # as Runtime.stream, no memory
        try:
            if feats is None:
                logits, _ = dec.forward(np.asarray([ids], np.int64), past, last_only=True)
            else:
                logits, _ = self.vision.forward_ids(ids, feats, past)
            int(np.argmax(logits[0, -1]))  # greedy first token
        finally:
            if shared:
                dec.release_cache(past)
        self.last_rows, self.last_ids = rows, ids
        image_id = self.vision.image_token_id if feats is not None else None
        self.record(prompt_tokens=len(ids), memory_tokens=0,
                    image_tokens=0 if image_id is None else sum(1 for i in ids if i == image_id),
                    shots=len(rows), shot_images=sum(1 for s in shots if s.image is not None))


# --- the measurement ----------------------------------------------------------------
def _cfg_get(cfg, names: Sequence[str], default):
    for n in names:
        v = getattr(cfg, n, None) if cfg is not None else None
        if v is not None:
            return v
    return default


def open_methods(artifacts: str, method_states: dict[str, MethodState], cfg=None, threads: int | None = None):
    """(base runtime, {name: timed method}) sharing one decoder session; close with :func:`close_methods`."""
    from edgekv.format import Memory
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import open_session, session_options

    threads = int(threads or _cfg_get(cfg, ("threads", "device_threads", "ttft_threads"), DEFAULT_THREADS))
    top_k = int(_cfg_get(cfg, ("top_k",), 4))
    base = Runtime.load(artifacts, threads=threads)
    methods: dict[str, _Timed] = {}
    key_session = None
    image_cache: dict = {}
    try:
        for name, st in method_states.items():
            k = st.top_k if st.top_k is not None else top_k
            if st.kind == "memory":
                with Memory(st.memory) as mem:
                    used = mem.num_used
                if used == 0 or k == 0:  # nothing to retrieve: the prompt alone
                    methods[name] = _Generate(name, "memory", base, False, False, image_cache)
                    continue
                rt = Runtime.load(artifacts, memory=st.memory, k=min(k, used), threads=threads, retrieval="exact",
                                  verify_hashes=False)
                # one decoder session (and one key session) for every method: the memory runtime's own go
                rt.decoder, rt.vision = base.decoder, base.vision
                if key_session is None:
                    key_session = rt.key_session
                rt.key_session = key_session
                methods[name] = _Generate(name, "memory", rt, True, True, image_cache)
            elif st.kind == "plain":
                methods[name] = _Generate(name, "plain", base, False, False, image_cache)
        prompts = {n: st for n, st in method_states.items() if st.kind == "prompt"}
        if prompts:
            m = base.manifest
            for name, st in prompts.items():
                if len(st.items) and st.keys.shape[1] != int(m["hidden_size"]):
                    raise MismatchError(f"{name}: keys of dimension {st.keys.shape[1]}, the model's hidden size is "
                                        f"{m['hidden_size']}: the state belongs to another model")
                want = (st.key_layer if st.key_layer is not None else _default_key_layer(int(m["num_layers"])),
                        st.key_pooling or "mean")
                got = (int(m["key"]["layer"]), m["key"]["pooling"])
                if want[0] is not None and want != got:
                    raise MismatchError(f"{name}: its keys pool layer {want[0]} ({want[1]}), the export's key graph "
                                        f"layer {got[0]} ({got[1]}): export with neither a memory nor a key layer (the default key graph)")
            if key_session is None:
                key_session = open_session(os.path.join(artifacts, m["key"]["file"]), threads,
                                           session_options(threads, getattr(base, "_tables", None), spin=False))
            for name, st in prompts.items():
                methods[name] = _PromptShots(name, base, key_session, st,
                                             st.top_k if st.top_k is not None else top_k, image_cache)
    except BaseException:
        close_methods(base, methods)
        raise
    return base, {n: methods[n] for n in method_states}


def close_methods(base, methods: dict) -> None:
    for t in methods.values():
        t.close()
    base.close()


def _time_interleaved(methods: dict[str, _Timed], qs: Sequence[Example], repeats: int) -> dict[str, list[float]]:
    """ms of every call: ``repeats`` passes over ``qs``, every method per query, the order rotating."""
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    turn = 0
    for _ in range(repeats):
        for q in qs:
            order = names[turn % len(names):] + names[:turn % len(names)]
            turn += 1
            for n in order:
                t0 = time.perf_counter()
                methods[n].run(q)
                times[n].append((time.perf_counter() - t0) * 1000)
    return times


def time_first_token(methods: dict[str, _Timed], qs: Sequence[Example], repeats: int = 1) -> dict[str, list[float]]:
    """ms of every timed call of every method (:func:`open_methods`' methods) over ``qs``, in order.

    Untimed first: each method's :meth:`_Timed.prepare` over ``qs`` (shot images' features, cached
    per path) and one warm-up call per kind of query (text, image: the vision graph too); then
    ``repeats`` passes over ``qs``, every method per query, the order rotating from query to query.
    ``reset`` after the warm-up, so each method's ``calls`` hold the timed calls only.
    """
    for t in methods.values():
        for q in qs:
            t.prepare(q)
    first = [q for q in qs if q.image is None][:1] + [q for q in qs if q.image is not None][:1]
    for t in methods.values():
        for q in first:
            t.run(q)
        t.reset()
    return _time_interleaved(methods, qs, repeats)


def _alternate(text: Sequence[Example], image: Sequence[Example]) -> list[Example]:
    """Text and image queries alternating (t0, i0, t1, i1, ...), the longer list's rest at the end."""
    out: list[Example] = []
    for i in range(max(len(text), len(image))):
        out += ([text[i]] if i < len(text) else []) + ([image[i]] if i < len(image) else [])
    return out


def _block(ms: Sequence[float], facts: dict) -> dict:
    """median / p25 / p75 ms and n of one method's calls over one kind of query, with what they fed."""
    x = np.asarray(ms, np.float64)
    if not len(x):
        return {"median_ms": None, "p25_ms": None, "p75_ms": None, "n": 0, **facts}
    return {"median_ms": float(np.median(x)), "p25_ms": float(np.percentile(x, 25)),
            "p75_ms": float(np.percentile(x, 75)), "n": len(x), **facts}


def measure_device_ttft(artifacts_dir: str, method_states: dict[str, MethodState], queries, cfg=None,
                        repeats: int | None = None, threads: int | None = None, reference: str = "induce") -> dict:
    """Time to first token of every method on the device runtime, in ms.

    ``queries``: Examples (or prompt strings), timed in turn for every method (the methods'
    order rotates from query to query), ``repeats`` passes over them (default 2, or
    ``cfg.ttft_repeats``); one untimed warm-up call per method and kind of query first.
    Queries with an image (on a vision-language export) are image queries: they alternate
    with the text queries in the passes and are reported apart. ``cfg``: a BenchConfig
    (``top_k``; threads from ``cfg.threads`` / ``device_threads`` when it has one, default 2).
    -> {"methods": {name: {kind, median_ms, p25_ms, p75_ms, n, over_<reference>, prompt_tokens,
    memory_tokens, image_tokens[, shots, shot_images], "image": {the same over the image
    queries} (only when there are image queries)}}, "reference", "threads", "queries" (text
    queries), "image_queries", "repeats", "retrieval", "images", "artifacts",
    "model_fingerprint", "weights"}; the top-level figures are over the text queries (None,
    ``n`` 0, when every query has an image).
    """
    qs = [_as_example(q, i) for i, q in enumerate(queries)]
    if not qs:
        raise InputError("no queries to time")
    if not method_states:
        return {"methods": {}}
    repeats = int(repeats or _cfg_get(cfg, ("ttft_repeats",), 2))
    base, methods = open_methods(artifacts_dir, method_states, cfg, threads)
    try:
        vlm = base.vision is not None
        dropped = 0 if vlm else sum(1 for q in qs if q.image is not None)
        if dropped:  # a text export ignores images: every query is a text query
            qs = [replace(q, image=None) for q in qs]
        text = [q for q in qs if q.image is None]
        image = [q for q in qs if q.image is not None]
        qs = _alternate(text, image)
        names = list(methods)
        times = time_first_token(methods, qs, repeats)
        is_image = [q.image is not None for q in qs] * repeats  # per call, in the order every method ran them
        which = {"text": [i for i, b in enumerate(is_image) if not b], "image": [i for i, b in enumerate(is_image) if b]}
        blocks: dict[str, dict[str, dict]] = {kind: {n: _block([times[n][i] for i in idx], methods[n].facts(idx))
                                                     for n in names} for kind, idx in which.items()}
        out: dict = {}
        for kind in ("text", "image"):
            ref = blocks[kind].get(reference, {}).get("median_ms")
            for n in names:
                m = blocks[kind][n]["median_ms"]
                blocks[kind][n][f"over_{reference}"] = m / ref if ref and m is not None else None
        for n in names:
            out[n] = {"kind": methods[n].kind, **blocks["text"][n]}
            if image:
                out[n]["image"] = blocks["image"][n]
        has_ref = any(blocks[kind].get(reference, {}).get("median_ms") for kind in which)
        mem = [t for t in methods.values() if isinstance(t, _Generate) and t.use_memory]
        has_images = vlm and (bool(image) or any(t.kind == "prompt" for t in methods.values()))
        return {
            "methods": out, "reference": reference if has_ref else None, "threads": base.config.threads,
            "queries": len(text), "image_queries": len(image), "repeats": repeats,
            "retrieval": "exact numpy search over each memory's effective keys (no HNSW index: the runtime uses one "
                         "only when the export lists an index built for that memory, and only from 2,048 entries)"
                         + (f"; modes: {sorted({t.rt.retriever.mode for t in mem})}" if mem else ""),
            "images": IMAGES_NOTE if has_images else TEXT_EXPORT_NOTE if dropped else None,
            "artifacts": artifacts_dir, "model_fingerprint": base.manifest.get("model_fingerprint"),
            "weights": base.manifest.get("decoder", {}).get("weights"),
            "timed": "wall time of each call from the query text (and image) to the first token's logits (greedy "
                     "pick included), one shared decoder session",
        }
    finally:
        close_methods(base, methods)


def ttft_seconds(result: dict) -> dict[str, float]:
    """``{"<name>_s": median seconds}``: the shape ``edgekv.bench.report.ttft_summary`` takes."""
    return {f"{n}_s": r["median_ms"] / 1000 for n, r in result.get("methods", {}).items()
            if r.get("median_ms") is not None}
