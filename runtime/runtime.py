"""The on-device runtime: retrieve, inject, generate. numpy + onnxruntime + hnswlib + tokenizers.

Per query (see ``docs/runtime.md``):
1. retrieval key: ``key.onnx`` pools the prompt's hidden state at the key layer; the
   memory's key projection and unit normalisation are applied in numpy;
2. top-k entries by inner product: exact, or HNSW over the memory's own index (the export's
   when it is bound to this memory state, else the one cached beside the memory, built on the
   device when missing or stale: :class:`edgekv.index.Retriever`);
3. alpha = softmax(sim / tau); entries laid out best-last, dequantised with sqrt(k*alpha)
   and the per-layer value gate folded into the scales, keys rotated to positions
   0..k*m-1 (:func:`edgekv.induction.assemble_memory_kv`);
4. the chat-templated prompt is fed after them as one prefill with that past; decoding
   then continues with the growing cache.
The memory file is read without keeping its pages mapped (:class:`edgekv.format.Memory`): the
header, slot table and keys are copied at load and their pages unmapped; a query reads only its
retrieved slots, with ``pread`` into buffers of their own. k defaults to the k the memory was
adapted with (its tau is fitted for it; :func:`edgekv.compat.runtime_top_k`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edgekv.compat import DEFAULT_TOP_K, ModelSide, check_memory_matches, runtime_top_k
from edgekv.configs import Config, knob
from edgekv.errors import InputError
from edgekv.format import Memory
from edgekv.index import IndexConfig, Retriever
from edgekv.induction import assemble_memory_kv, select_and_weigh
from edgekv.manifest import read_manifest
from edgekv.retrieval import effective_keys
from edgekv.rope import RopeSpec, apply_rope
from edgekv.runtime.decoder import (
    DecoderSession,
    map_row_tables,
    open_session,
    past_from_memory,
    session_options,
    worker_pool,
)
from edgekv.runtime.multimodal import EncodedImage, MultimodalModel
from edgekv.runtime.sampling import SamplingConfig, next_token
from edgekv.runtime.tokenizer import DeviceTokenizer
from edgekv.signing import key_id, trusted_key, verify_export, verify_memory


@dataclass(frozen=True)
class RuntimeConfig(Config):
    """How :class:`Runtime` loads artifacts and retrieves."""

    k: int | None = knob(None, "Entries retrieved per query (default: the k the memory was adapted with, "
                              f"{DEFAULT_TOP_K} when it does not record one).")
    threads: int | None = knob(None, "onnxruntime intra-op threads (default: onnxruntime decides).")
    retrieval: str | None = knob(None, "Force 'exact' or 'hnsw' search (default: automatic).")
    chat: bool = knob(True, "Apply the chat template to prompts when the model has one.")
    verify_hashes: bool = True  # check artifact files against manifest.json at load

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 0:
            raise InputError(f"RuntimeConfig.k must be >= 0, got {self.k}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"RuntimeConfig.threads must be >= 1, got {self.threads}")
        if self.retrieval not in (None, "exact", "hnsw"):
            raise InputError(f"RuntimeConfig.retrieval must be 'exact' or 'hnsw', got {self.retrieval!r}")


MESSAGE_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16


def check_stop(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    """Stop strings as a tuple; a string alone is one stop string; refuses empty ones."""
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise InputError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {list(stop)!r}"[:300])
    return stop


def cut_at_stop(text: str, stop: Sequence[str], start: int = 0) -> tuple[str, bool]:
    """``text`` up to where the earliest stop string begins, and whether one occurs; ``start``:
    where the search begins (no stop string begins before it)."""
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


@dataclass
class Retrieved:
    slot: int
    entry_id: int
    task: str
    source_id: str
    sim: float
    alpha: float


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    retrieved: list[Retrieved] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_memory_tokens: int = 0
    ttft_ms: float = 0.0  # retrieval key + retrieval + injection + prefill, to the first token
    tokens_per_s: float = 0.0  # decode rate after the first token
    stop_reason: str = ""

    def to_dict(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids,
            "retrieved": [r.__dict__ for r in self.retrieved],
            "num_prompt_tokens": self.num_prompt_tokens, "num_memory_tokens": self.num_memory_tokens,
            "ttft_ms": self.ttft_ms, "tokens_per_s": self.tokens_per_s, "stop_reason": self.stop_reason,
        }


@dataclass
class _Query:
    """One generation's inputs after :meth:`Runtime._prepare`, before the decoder runs."""

    ids: list[int]  # prompt token ids [S] (chat template; image tokens expanded)
    image: EncodedImage | None  # features [1, N, hidden] for the image-token positions
    retrieved: list[Retrieved]  # layout order, best last
    entries: list | None  # the retrieved slots' entries, for a shared-buffer cache to write itself
    memory_kv: tuple[np.ndarray, np.ndarray] | None  # otherwise: K, V [L, H, T, D], keys rotated to 0..T-1
    num_memory: int  # T: memory positions ahead of the prompt
    max_new_tokens: int  # cut to what the model's context leaves
    t0: float  # perf_counter() at retrieval: time to first token counts from here


class Runtime:
    """Load with :meth:`load`; then :meth:`generate` (or :meth:`stream`)."""

    def __init__(self, artifacts: str, manifest: dict, config: RuntimeConfig, memory: Memory | None,
                 index_dir: str | None):
        self.artifacts = artifacts
        self.manifest = manifest
        self.config = config
        m = manifest
        self.num_layers = int(m["num_layers"])
        self.max_positions = int(m.get("max_positions") or 0)
        self.rope = RopeSpec(tuple(m["rope"]["inv_freq"]), float(m["rope"]["attention_scaling"])) \
            if m.get("rope") else None
        tk = m["tokenizer"]
        self.tokenizer = DeviceTokenizer.load(os.path.join(artifacts, tk["file"]), tk.get("chat_template"),
                                              {"bos_token": tk.get("bos_token"), "eos_token": tk.get("eos_token")},
                                              tk.get("chat_turn"))
        self.eos_ids = set(int(i) for i in tk.get("eos_token_ids") or [])
        # vision-language artifacts: image path + a decoder on embeddings with the same interface
        self.vision = MultimodalModel.from_manifest(artifacts, m, config.threads) if m.get("vision") else None
        # embedding tables both graphs only read by row: mapped once, shared by both sessions
        self._tables = map_row_tables(artifacts, m["decoder"].get("row_tables") or {})
        self.decoder = self.vision.decoder if self.vision is not None else DecoderSession(
            os.path.join(artifacts, m["decoder"]["file"]), self.num_layers, int(m["num_kv_heads"]),
            int(m["head_dim"]), config.threads, session_options(config.threads, self._tables))
        self.key_session = None
        self.trusted_key_id: str | None = None  # the key manifest and memory were checked against (load's trust)
        self.memory = memory
        self.retriever = None
        if memory is None:
            self.config = replace(config, k=DEFAULT_TOP_K if config.k is None else config.k)
            return
        self._check_memory(memory)
        # the k the memory's tau is fitted for unless asked otherwise; another k is refused
        self.config = config = replace(config, k=runtime_top_k(config.k, memory.top_k, memory.num_used, memory.path))
        if config.k > memory.num_used:
            raise InputError(f"RuntimeConfig.k = {config.k} is larger than the memory's {memory.num_used} "
                             f"entries; use {memory.num_used} or fewer")
        self.key_session = open_session(os.path.join(artifacts, m["key"]["file"]), config.threads,
                                        session_options(config.threads, self._tables, spin=False))
        self.retriever = Retriever(memory, index_dir, IndexConfig(), force=config.retrieval)

    # --- loading ------------------------------------------------------------------
    @classmethod
    def load(cls, artifacts: str, memory: str | None = None, k: int | None = None, threads: int | None = None,
             retrieval: str | None = None, chat: bool = True, verify_hashes: bool = True,
             trust: str | bytes | None = None) -> Runtime:
        """Open exported ``artifacts`` (and a memory file) for generation.

        ``k``: entries retrieved per query; None: the k the memory was adapted with (4 when it
        does not record one). A k other than the memory's is refused (:class:`MismatchError`):
        its tau is calibrated for its own k.

        ``trust``: a public key (PEM file path, PEM or raw bytes; None: the file named by
        ``EDGEKV_TRUST``, if set). Then ``manifest.json`` and the memory must be signed by it
        (``edgekv.signing``; :class:`SignatureError` otherwise) and every artifact's hash is checked.
        """
        config = RuntimeConfig(k=k, threads=threads, retrieval=retrieval, chat=chat, verify_hashes=verify_hashes)
        if not os.path.isdir(artifacts):
            raise InputError(f"{artifacts}: not a folder; pass the folder `edgekv export` wrote")
        key = trusted_key(trust)
        if key is not None:  # the signed manifest vouches for the artifacts through their hashes
            verify_export(artifacts, key)
        manifest = read_manifest(artifacts, verify_hashes=verify_hashes or key is not None)
        mem = Memory(memory) if memory else None
        # only an index the manifest lists (and so, with verify_hashes, one whose hash it records)
        index_dir = artifacts if mem is not None and manifest.get("index") else None
        try:
            if key is not None and mem is not None:
                verify_memory(mem, key)  # hashed through the descriptor the runtime then reads
            rt = cls(artifacts, manifest, config, mem, index_dir)
            rt.trusted_key_id = None if key is None else key_id(key)
            return rt
        except BaseException:
            if mem is not None:
                mem.close()
            raise

    def _check_memory(self, mem: Memory) -> None:
        """The memory belongs to these artifacts (the one check, edgekv.compat): fingerprint, KV
        shapes, key dimension, RoPE, and the key graph's layer and pooling."""
        m, key = self.manifest, self.manifest["key"]
        side = ModelSide(m["model_fingerprint"], int(m["num_layers"]), int(m["num_kv_heads"]), int(m["head_dim"]),
                         int(m["hidden_size"]), self.rope, int(key["layer"]), key["pooling"], name="the model",
                         key_source="the artifacts' key graph",
                         fix_model="run with the artifacts of the model it was adapted with, or adapt a new memory "
                                   "with this model",
                         fix_key=f"re-export with `edgekv export MODEL --memory {mem.path}`")
        check_memory_matches(mem.spec, side, mem.path)

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- pieces -------------------------------------------------------------------
    def prompt_ids(self, prompt: str, template: bool = True) -> list[int]:
        """Token ids of the prompt as the decoder sees it (chat template when available and
        ``template``; ``template`` False: the prompt as it is, a completion)."""
        if not prompt or not prompt.strip():
            raise InputError("the prompt is empty")
        if template and self.config.chat and self.tokenizer.chat_template:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def conversation_ids(self, messages: Sequence[dict]) -> tuple[str, list[int]]:
        """A conversation ``[{"role": system|user|assistant, "content": str}, ...]`` ending with a
        user turn -> (the last user message, which retrieval keys on; token ids [S] with the
        generation prompt). The chat template renders it; without one (or with ``chat`` off) the
        contents are joined by newlines."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError("messages must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES or not isinstance(m.get("content"), str):
                raise InputError(f"messages[{i}] must be {{\"role\": one of {', '.join(MESSAGE_ROLES)}, "
                                 f"\"content\": a string}}")
        if messages[-1]["role"] != "user":
            raise InputError(f"the last message must be the user's, got role {messages[-1]['role']!r}")
        last = messages[-1]["content"]
        if not last.strip():
            raise InputError("the last user message is empty")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.config.chat and self.tokenizer.chat_template:
            return last, self.tokenizer.encode_chat(turns)
        return last, self.tokenizer.encode("\n".join(m["content"] for m in turns))

    def encode_image(self, image) -> EncodedImage:
        """Features [1, N, hidden] (and tile grid) of a path or PIL image (vision-language artifacts only)."""
        if self.vision is None:
            raise InputError(f"{self.artifacts} holds a text-only model; an image needs a vision-language export")
        return self.vision.encode_image(image)

    def query_key(self, prompt: str, image: EncodedImage | None = None) -> np.ndarray:
        """Effective retrieval key of ``prompt`` (and ``image``): [R] float32 unit vector.

        A key graph on embeddings (manifest ``key.input == "inputs_embeds"``, vision-language
        exports) pools ``"<image>\\n" + prompt`` (image token expanded, no chat template) with the
        image positions holding the image features, so the key covers the image; without an
        image it pools the prompt's token embeddings (= the text key).
        """
        embeds_key = self.manifest["key"].get("input") == "inputs_embeds"
        if image is not None and not embeds_key:  # older VLM export: text-only key graph
            image = None
        ids = self.tokenizer.encode(prompt) if image is None else \
            self.vision.prompt_ids(self.tokenizer, prompt, False, image)
        if self.max_positions and len(ids) > self.max_positions:  # the key graph's RoPE table ends there
            raise InputError(f"prompt of {len(ids)} tokens exceeds the model's context of {self.max_positions}")
        mask = np.ones((1, len(ids)), np.int64)
        if embeds_key:
            embeds = self.vision.decoder.embed(np.asarray([ids], np.int64)) if image is None else \
                self.vision.embed(ids, image.features)
            (pooled,) = self.key_session.run(["pooled"], {"inputs_embeds": embeds, "attention_mask": mask})
        else:
            (pooled,) = self.key_session.run(["pooled"], {"input_ids": np.asarray([ids], np.int64),
                                                          "attention_mask": mask})
        return effective_keys(pooled[0], self.memory.projection)

    def retrieve(self, prompt: str, k: int | None = None, image: EncodedImage | None = None) -> list[Retrieved]:
        """Top-k entries for ``prompt`` (and its encoded ``image``) in layout order (best last), with their alpha."""
        if self.retriever is None:
            return []
        k = self.config.k if k is None else k
        slots, sims = self.retriever.search(self.query_key(prompt, image), k)
        order, alpha = select_and_weigh(sims, self.memory.calibration.tau)
        out = []
        for i, a in zip(order, alpha, strict=True):
            info = self.memory.slot_info(int(slots[i]))
            out.append(Retrieved(int(slots[i]), info["entry_id"], info["task"], info["source_id"],
                                 float(sims[i]), float(a)))
        return out

    def read_entries(self, retrieved: list[Retrieved]) -> list:
        """The retrieved slots' entries (checksums verified), read in the runtime's threads."""
        threads = min(len(retrieved), self.threads)
        if threads <= 1:
            return [self.memory.read_entry(r.slot) for r in retrieved]
        return list(worker_pool(threads).map(lambda r: self.memory.read_entry(r.slot), retrieved))

    @property
    def threads(self) -> int:
        """Threads the runtime's own numpy work uses (slot reads, KV writes): the configured ones."""
        return self.config.threads or os.cpu_count() or 1

    def memory_kv(self, retrieved: list[Retrieved]) -> tuple[np.ndarray, np.ndarray] | None:
        """K, V [L, H, k*m, D] for the retrieved entries (read from their slots only)."""
        if not retrieved:
            return None
        entries = self.read_entries(retrieved)
        return assemble_memory_kv(entries, np.array([r.alpha for r in retrieved]),
                                  self.memory.calibration.gates, self.rope)

    def rotate(self, k: np.ndarray, v: np.ndarray, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Position-free K [L, H, T, D] rotated to positions start..start+T-1 (and V as float32)."""
        k = np.asarray(k, np.float32)
        if self.rope is not None:
            k = apply_rope(k, self.rope, np.arange(start, start + k.shape[2]))
        return np.ascontiguousarray(k), np.ascontiguousarray(v, np.float32)

    def logits(self, input_ids: np.ndarray, past_k: np.ndarray | None = None,
               past_v: np.ndarray | None = None) -> np.ndarray:
        """Logits [S, V] of ``input_ids`` [S] after an injected past K, V [L, H, T, D] (rotated)."""
        past = self.decoder.empty_past() if past_k is None else past_from_memory(past_k, past_v)
        logits, _ = self.decoder.forward(np.asarray(input_ids, np.int64)[None, :], past)
        return logits[0]

    def _start_past(self, mem: tuple[np.ndarray, np.ndarray] | None, capacity: int):
        """The cache a generation starts from, holding the memory KV [L, H, T, D] (if any).

        A decoder graph with a shared past/present buffer gets one preallocated KVCache of
        ``capacity`` positions: the memory is copied in once, the prompt and every new token
        are appended in place. Other graphs get per-layer numpy views of the memory.
        """
        if getattr(self.decoder, "shared_buffer", False):
            cache = self.decoder.acquire_cache(capacity)  # handed back by stream when it ends
            if mem is not None:
                cache.fill(*mem)
            return cache
        return self.decoder.empty_past() if mem is None else past_from_memory(*mem)

    # --- generation ---------------------------------------------------------------
    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, use_memory: bool = True,
               result: GenerationResult | None = None,
               inject: tuple[np.ndarray, np.ndarray] | None = None, image=None, *,
               messages: Sequence[dict] | None = None, raw: bool = False,
               stop: Sequence[str] = (), top_k: int = 0, min_p: float = 0.0,
               repetition_penalty: float = 1.0) -> Iterator[str]:
        """Yield text pieces as they are generated; fills ``result`` (if given) as it goes.

        ``messages``: a whole conversation instead of ``prompt`` (:meth:`conversation_ids`;
        retrieval keys on its last user message). ``raw``: ``prompt`` is encoded as it is, no
        chat template (a completion). ``stop``: strings that end the generation; the text stops
        before the first one (``stop_reason`` "stop"), and no piece yielded ever holds part of one.
        ``top_k``, ``min_p``, ``repetition_penalty``: :class:`~edgekv.runtime.sampling.SamplingConfig`.

        ``inject``: position-free float K, V [L, H, T, D] to use as memory instead of
        retrieving (keys are rotated to positions 0..T-1), e.g. to check the injection path.
        ``image``: a path or PIL image (vision-language artifacts; ``edgekv.runtime.multimodal``):
        its features take the image-token positions of the prompt, and the retrieval key covers it
        (a key graph on embeddings; see :meth:`query_key`).

        Three steps: :meth:`_prepare` (prompt ids, retrieval, memory KV), :meth:`_prefill`
        (memory + prompt into the cache), :meth:`_decode` (one token at a time).
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = SamplingConfig(temperature, top_p, seed, top_k, min_p, repetition_penalty)
        stop = check_stop(stop)
        res = result if result is not None else GenerationResult()
        ids = None
        if messages is not None:
            if image is not None:
                raise InputError("an image goes with a single prompt, not with messages")
            prompt, ids = self.conversation_ids(messages)
        elif raw:
            ids = self.prompt_ids(prompt, template=False)
        q = self._prepare(prompt, max_new_tokens, use_memory and inject is None, inject, image, ids)
        res.retrieved, res.num_prompt_tokens, res.num_memory_tokens = q.retrieved, len(q.ids), q.num_memory
        cache = self._start_past(q.memory_kv, q.num_memory + len(q.ids) + q.max_new_tokens)
        try:  # a pooled KVCache goes back to the decoder when the generation ends
            logits, past = self._prefill(q, cache)
            yield from self._decode(logits, past, q, sampling, res, stop)
        finally:
            if getattr(self.decoder, "shared_buffer", False):
                self.decoder.release_cache(cache)

    def _prepare(self, prompt: str, max_new_tokens: int, retrieve: bool,
                 inject: tuple[np.ndarray, np.ndarray] | None, image, ids: list[int] | None = None) -> _Query:
        """Prompt ids [S] (``ids`` when given), the retrieved entries and their memory KV
        [L, H, T, D]; the decoder is not run yet. ``max_new_tokens`` is cut to what the model's
        context leaves."""
        img = None if image is None else self.encode_image(image)
        if ids is None:
            ids = self.prompt_ids(prompt) if img is None else self.vision.prompt_ids(self.tokenizer, prompt,
                                                                                     self.config.chat, img)
        if self.max_positions and len(ids) > self.max_positions:
            raise InputError(f"prompt of {len(ids)} tokens exceeds the model's context of {self.max_positions}; "
                             f"shorten the prompt")
        t0 = time.perf_counter()
        retrieved = self.retrieve(prompt, image=img) if retrieve and self.retriever is not None else []
        # a shared-buffer decoder takes the retrieved entries straight into its KV buffers
        direct = bool(retrieved) and getattr(self.decoder, "shared_buffer", False)
        entries = self.read_entries(retrieved) if direct else None
        mem = None if direct else self.memory_kv(retrieved) if inject is None else self.rotate(*inject)
        num_mem = sum(e.k.shape[2] for e in entries) if direct else 0 if mem is None else mem[0].shape[2]
        if self.max_positions and num_mem + len(ids) > self.max_positions:
            raise InputError(f"prompt of {len(ids)} tokens plus {num_mem} memory tokens exceeds the model's "
                             f"context of {self.max_positions}; shorten the prompt or lower k")
        if self.max_positions and num_mem + len(ids) + max_new_tokens > self.max_positions:
            max_new_tokens = self.max_positions - num_mem - len(ids)
        return _Query(ids, img, retrieved, entries, mem, num_mem, max_new_tokens, t0)

    def _prefill(self, q: _Query, past) -> tuple[np.ndarray, object]:
        """Feed the prompt after the memory: -> logits [1, S', V] (S' = 1 for the text decoder's
        last position, S with an image) and the cache holding T + S positions."""
        if q.entries is not None:  # shared buffer: dequantise the slots straight into the cache
            past.write_entries(q.entries, np.array([r.alpha for r in q.retrieved]), self.memory.calibration.gates,
                               self.rope, self.threads)
        if q.image is None:
            return self.decoder.forward(np.asarray([q.ids], np.int64), past, last_only=True)
        return self.vision.forward_ids(q.ids, q.image.features, past)

    def _decode(self, logits: np.ndarray, past, q: _Query, sampling: SamplingConfig,
                res: GenerationResult, stop: tuple[str, ...] = ()) -> Iterator[str]:
        """Sample from ``logits[0, -1]`` [V], feed the token back ([1, 1] per step), up to
        ``q.max_new_tokens``, EOS or a ``stop`` string; yield the text as it becomes whole
        characters (decoded one token at a time, :class:`~edgekv.runtime.tokenizer.TextStream`),
        holding back the last len(longest stop) - 1 characters while a stop string could still
        begin there. A stop string is looked for only where the new piece could complete one."""
        rng = np.random.default_rng(sampling.seed)
        penalized = sampling.repetition_penalty != 1.0
        hold = max((len(s) for s in stop), default=1) - 1
        stream = self.tokenizer.text_stream()
        out_ids = res.token_ids = stream.ids  # the ids generated so far
        sent = 0  # characters of the text yielded so far
        t_first = None
        res.stop_reason = "length"
        for _ in range(q.max_new_tokens):
            tok = next_token(logits[0, -1], sampling, rng, q.ids + out_ids if penalized else ())
            if t_first is None:
                t_first = time.perf_counter()
                res.ttft_ms = (t_first - q.t0) * 1000
            if tok in self.eos_ids:
                res.stop_reason = "eos"
                break
            piece = stream.push(tok)
            if piece:
                text = stream.text
                res.text, stopped = cut_at_stop(text, stop, max(len(text) - len(piece) - hold, 0))
                if stopped:
                    res.stop_reason = "stop"
                    break
                if len(text) - hold > sent:
                    yield text[sent:len(text) - hold]
                    sent = len(text) - hold
            if len(out_ids) == q.max_new_tokens:
                break
            logits, past = self.decoder.forward(np.asarray([[tok]], np.int64), past)
        if res.stop_reason != "stop":  # the whole answer once: its last characters may be incomplete bytes
            res.text, stopped = cut_at_stop(self.tokenizer.decode(out_ids), stop)
            res.stop_reason = "stop" if stopped else res.stop_reason
        if len(res.text) > sent:
            yield res.text[sent:]
        if t_first is not None and len(out_ids) > 1:
            res.tokens_per_s = (len(out_ids) - 1) / max(time.perf_counter() - t_first, 1e-9)

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, use_memory: bool = True,
                 inject: tuple[np.ndarray, np.ndarray] | None = None, image=None, *,
                 messages: Sequence[dict] | None = None, raw: bool = False,
                 stop: Sequence[str] = (), top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0) -> GenerationResult:
        """Generate a full answer; greedy by default; stops at EOS (or a ``stop`` string)."""
        res = GenerationResult()
        for _ in self.stream(prompt, max_new_tokens, temperature, top_p, seed, use_memory, res, inject, image,
                             messages=messages, raw=raw, stop=stop, top_k=top_k, min_p=min_p,
                             repetition_penalty=repetition_penalty):
            pass
        return res

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 64, **options) -> GenerationResult:
        """The assistant's next turn in a conversation (:meth:`conversation_ids`); ``options`` as
        :meth:`generate` (temperature, top_p, seed, use_memory, stop, top_k, min_p, repetition_penalty)."""
        return self.generate("", max_new_tokens, messages=messages, **options)
