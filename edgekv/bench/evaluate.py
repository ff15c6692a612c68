"""Answering examples for the benchmark: batched greedy decoding with or without memory.

* :func:`greedy_batch`: greedy answers of a batch of left-padded prompts with an optional
  injected past (memory KV [L, B, H, T, D] at positions 0..T-1, the prompts after it), the
  batched form of :meth:`edgekv.induce.torch_induction.Induction.generate` (a test holds
  them together);
* :class:`MemoryReader`: a memory file opened for evaluation (entries, key model,
  projection, calibration), retrieval + injection exactly as adapt's loss and the runtime;
* :func:`is_correct`: the stream's answer normalisation (:mod:`edgekv.data.stream`);
* :func:`time_to_first_token`: median seconds from a query's text to its first token.

Image examples (and every query on a vision-language backbone) are answered by the
multimodal helper (``edgekv.induce.evaluate``); the batched text path here refuses images.
:func:`greedy_one` decodes one prompt given as ids or as embeddings (several spliced images,
prompt-text's image shots).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from edgekv.data import Example
from edgekv.errors import InputError


def is_correct(prediction: str, answer: str) -> bool:
    """The stream's rule (first line, strip, one trailing '.', collapse whitespace, casefold)."""
    try:
        from edgekv.data.stream import is_correct as stream_is_correct
    except ImportError:  # pragma: no cover - the stream module ships with edgekv
        def norm(t: str) -> str:
            t = (t.strip().splitlines() or [""])[0].strip()
            t = t[:-1] if t.endswith(".") else t
            return " ".join(t.split()).casefold()

        return norm(prediction) == norm(answer)
    return stream_is_correct(prediction, answer)


def require_text(examples: Sequence[Example], what: str) -> None:
    if any(ex.image is not None for ex in examples):
        raise InputError(f"{what} answers text examples only (the stream has image examples): "
                         f"run it on a text stream, or leave it out of the methods")


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, S] long, mask [B, S] long (1 = token), pads on the left."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, S - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, S - len(s):] = 1
    return ids, mask


@torch.no_grad()
def greedy_batch(model, prompts: Sequence[Sequence[int]], k_mem: torch.Tensor | None, v_mem: torch.Tensor | None,
                 max_new_tokens: int, eos_ids: set[int], pad_id: int = 0) -> list[list[int]]:
    """Greedy answers (token ids, without EOS) of left-padded prompts after an optional past.

    k_mem, v_mem: [L, B, H, T, D] (keys already rotated to positions 0..T-1) or None.
    Prompt tokens take positions T, T+1, ... (pads are masked and skipped in positions).
    """
    from edgekv.induce.torch_induction import make_cache

    B = len(prompts)
    x, mask = pad_left(prompts, pad_id)
    T = 0 if k_mem is None else int(k_mem.shape[3])
    attn = torch.cat([torch.ones((B, T), dtype=torch.long), mask], dim=1)  # [B, T + S]
    pos = T + (mask.cumsum(1) - 1).clamp(min=0)  # [B, S]
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cache = make_cache(k_mem, v_mem, cfg.num_hidden_layers)
    out_ids: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        res = model(input_ids=x, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
        cache = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1)  # [B]
        for b in range(B):
            if done[b]:
                continue
            tok = int(nxt[b])
            if tok in eos_ids:
                done[b] = True
            else:
                out_ids[b].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        x = nxt[:, None]
        attn = torch.cat([attn, torch.ones((B, 1), dtype=torch.long)], dim=1)
        pos = pos[:, -1:] + 1
    return out_ids


@torch.no_grad()
def greedy_one(model, ids: Sequence[int], embeds: torch.Tensor | None, max_new_tokens: int,
               eos_ids: set[int]) -> list[int]:
    """Greedy answer (token ids, without EOS) of one prompt, no memory; ``embeds`` [1, S, hidden]
    (image features spliced in) replaces the prompt's token ids when given."""
    from edgekv.induce.torch_induction import greedy_decode, make_cache

    x = torch.as_tensor([list(ids)], dtype=torch.long)
    pos = torch.arange(x.shape[1])[None]  # [1, S]
    inputs = {"input_ids": x} if embeds is None else {"inputs_embeds": embeds}
    return greedy_decode(model, inputs, pos, make_cache(None, None, 0), max_new_tokens, eos_ids)


class MemoryReader:
    """A memory file opened for evaluation: retrieval and injection as the runtime does them."""

    def __init__(self, backbone, memory_path: str, top_k: int):
        from edgekv.format import Memory
        from edgekv.host.keymodel import KeyModel
        from edgekv.induce.adapt import effective, read_bank
        from edgekv.induce.torch_induction import Induction

        with Memory(memory_path) as mem:
            bank, _ = read_bank(mem)
            spec, self.proj, self.cal = mem.spec, mem.projection, mem.calibration
        self.backbone = backbone
        self.ind = Induction(backbone.model, bank, effective(bank.raw_keys, self.proj), top_k, spec.rope)
        self.key_model = KeyModel(backbone.decoder, spec.key_layer, spec.key_pooling)

    def query_keys(self, examples: Sequence[Example]) -> torch.Tensor:
        """Effective keys of the queries. -> [B, R]"""
        from edgekv.induce.adapt import effective
        from edgekv.induce.entries import key_ids, raw_keys

        tok = self.backbone.tokenizer
        return effective(raw_keys(self.key_model, [key_ids(tok, ex.prompt) for ex in examples]), self.proj)

    def memory(self, q: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Memory KV of a batch of query keys q [B, R] -> [L, B, H, k*m, D] x2 (None: empty memory)."""
        if len(self.ind.bank) == 0:
            return None, None
        gates = torch.as_tensor(list(self.cal.gates), dtype=torch.float32)
        _, _, k_mem, v_mem = self.ind.memory_for(q, None, torch.zeros(len(self.ind.bank)),
                                                 torch.tensor(float(self.cal.tau)), gates, leave_one_out=False)
        return k_mem, v_mem


def answer_text(backbone, examples: Sequence[Example], memory_path: str | None, top_k: int, max_new_tokens: int,
                batch_size: int, prompt_ids: Callable[[Sequence[Example]], list[list[int]]] | None = None,
                model=None) -> list[str]:
    """Greedy answers of text examples, optionally with a memory file (batched).

    ``prompt_ids`` builds the token prompts of a batch (default: the chat-templated
    query); ``model`` replaces the backbone's model (e.g. one carrying LoRA adapters).
    """
    from edgekv.induce.entries import query_ids

    require_text(examples, "the batched evaluator")
    tok = backbone.tokenizer
    model = model if model is not None else backbone.model
    reader = MemoryReader(backbone, memory_path, top_k) if memory_path is not None else None
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = set(backbone.eos_token_ids)
    out: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i: i + batch_size])
        ids = prompt_ids(chunk) if prompt_ids is not None else [query_ids(tok, ex.prompt) for ex in chunk]
        k_mem = v_mem = None
        if reader is not None:
            k_mem, v_mem = reader.memory(reader.query_keys(chunk))
        for toks in greedy_batch(model, ids, k_mem, v_mem, max_new_tokens, eos, pad_id):
            out.append(tok.decode(toks, skip_special_tokens=True).strip())
    return out


def answer(backbone, examples: Sequence[Example], memory_path: str | None, top_k: int, max_new_tokens: int,
           batch_size: int) -> list[str]:
    """Answers of examples with an optional memory: the batched text path, or the
    multimodal helper for streams with images and for every query on a vision-language
    backbone (its keys and prompts are the runtime's, see edgekv.induce.evaluate)."""
    if getattr(backbone, "vision", None) is not None or any(ex.image is not None for ex in examples):
        try:
            from edgekv.induce.evaluate import answer_examples
        except ImportError:
            raise InputError("image examples need the multimodal evaluator (edgekv.induce.evaluate), which is "
                             "not installed in this checkout; use a text stream") from None
        return [a.text for a in answer_examples(backbone, list(examples), memory_path=memory_path, top_k=top_k,
                                                max_new_tokens=max_new_tokens)]
    return answer_text(backbone, examples, memory_path, top_k, max_new_tokens, batch_size)


def accuracy(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    if not examples:
        return float("nan")
    return float(np.mean([is_correct(p, ex.answer) for p, ex in zip(predictions, examples, strict=True)]))


@torch.no_grad()
def time_to_first_token(first_token: dict[str, Callable[[Example], None]], examples: Sequence[Example],
                        repeats: int = 2) -> dict[str, float]:
    """Median wall seconds of ``first_token[name](example)`` (query text to the first token's
    logits) per name. The names are timed interleaved, query by query, so that load from
    other processes falls on all of them alike; one untimed warm-up call each."""
    if not examples or not first_token:
        return {}
    for fn in first_token.values():
        fn(examples[0])
    times: dict[str, list[float]] = {name: [] for name in first_token}
    for _ in range(repeats):
        for ex in examples:
            for name, fn in first_token.items():
                t0 = time.perf_counter()
                fn(ex)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def memory_first_token(backbone, reader: MemoryReader) -> Callable[[Example], None]:
    """Key prefill + retrieval + injection + prompt prefill of one query (InduceKV's TTFT)."""
    from edgekv.induce.entries import query_ids

    def run(ex: Example) -> None:
        k_mem, v_mem = reader.memory(reader.query_keys([ex]))
        greedy_batch(backbone.model, [query_ids(backbone.tokenizer, ex.prompt)], k_mem, v_mem, 1, set())

    return run
