"""Memory entries from training examples: retrieval keys and pooled, position-free KV.

For one example (prompt, answer):

* **key**: ``KeyModel`` over ``tokenizer(prompt)`` (the user prompt alone, no chat
  template) at the memory's key layer and pooling: the function the exported key graph
  computes on the device for a query, so stored and query keys match;
* **KV**: the example's conversation rendered with the chat template ([user prompt,
  assistant answer]; ``"prompt\\nanswer"`` without a template) run through the frozen
  model at positions 0..T-1; the cached keys have RoPE removed (exact inverse); K and V
  are then pooled over the token axis to m positions.

Pooling strategies (``EntryConfig.pooling``):

* ``adaptive``: adaptive average pooling of the kept tokens into m bins (bin i covers
  tokens floor(i*T/m) .. ceil((i+1)*T/m) - 1, as ``torch.nn.AdaptiveAvgPool1d``);
* ``answer``: the answer tokens (from the first answer token to the end of the
  conversation, end-of-turn included) are kept exactly, and the remaining positions (at
  least ``ceil(m/4)``) keep evenly spaced tokens of the part before the answer, first and
  last included (a longer answer is itself pooled into what is left). Copying an
  arbitrary answer (a code) needs its exact tokens; averaging KV across tokens makes
  states the model never saw, so the question part keeps real tokens too;
* ``answer_avg``: as ``answer`` but the part before the answer is adaptive-average-pooled.

``skip_template_prefix`` drops the KV of the chat template's fixed preamble (for SmolLM2
its default system prompt) from entries before pooling: every entry and every query have
it, so it costs positions and carries nothing. The KV of the kept tokens is still
computed with the preamble in context.

Examples with an image on a vision-language backbone (``backbone.vision``,
:class:`edgekv.host.vlm.ImageInputs`): the user turn holds the image, its token expanded as the
family's processor does; the model reads token embeddings whose image positions hold the
vision features. Image tokens are ordinary prefix tokens here: they count in T, pooling
selects among them like any token before the answer, and the key pools them too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgekv.data import Example
from edgekv.errors import InputError
from edgekv.format import Entry
from edgekv.host.models import text_decoder
from edgekv.host.tokens import has_chat_template, pad_batch, token_ids
from edgekv.induce.config import EntryConfig, resolve_entry_config
from edgekv.induce.torch_induction import remove_rope_t
from edgekv.rope import RopeSpec


# ---------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """One example's tokens. ids: the whole conversation; the answer is ids[answer_start:answer_end]
    (answer_end is just past the end-of-turn token); content_start: first token after the
    template's fixed preamble (0 without a template)."""

    ids: tuple[int, ...]
    answer_start: int
    answer_end: int
    content_start: int
    image: str | None = None  # image path whose features fill the image tokens of ids


def encode_ids(q: Sequence[int], full: Sequence[int], eos_ids: Sequence[int], prefix_len: int,
               answer: str = "", image: str | None = None) -> Encoded:
    """Where the answer is in ``full`` (the conversation), given ``q`` (the query as the runtime feeds it)."""
    start = _common_prefix(q, full)
    if start >= len(full):
        raise InputError(f"the answer {answer[:40]!r} adds no tokens to its prompt")
    end = len(full)
    for i in range(start, len(full)):
        if full[i] in eos_ids:
            end = i + 1
            break
    return Encoded(tuple(full), start, end, min(prefix_len, start), image)


def key_ids(tokenizer, prompt: str) -> list[int]:
    """Tokens the retrieval key pools: ``tokenizer(prompt)``, no chat template (the contract)."""
    return token_ids(tokenizer, prompt, True)


def query_ids(tokenizer, prompt: str) -> list[int]:
    """The query as the runtime feeds it: chat template with the generation prompt."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return token_ids(tokenizer, text, False)
    return token_ids(tokenizer, prompt, True)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def template_prefix_len(tokenizer) -> int:
    """Tokens of the chat template's fixed preamble (system prompt, user header). 0 without one."""
    if not has_chat_template(tokenizer):
        return 0
    a = query_ids(tokenizer, "xq zebra")
    b = query_ids(tokenizer, "7 apples")
    return _common_prefix(a, b)


def encode_example(tokenizer, prompt: str, answer: str, eos_ids: Sequence[int] = (),
                   prefix_len: int | None = None) -> Encoded:
    """Conversation tokens of (prompt, answer) and where the answer is."""
    q = query_ids(tokenizer, prompt)
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        full = token_ids(tokenizer, text, False)
    else:
        full = token_ids(tokenizer, prompt + "\n" + answer, True) + list(eos_ids[:1])
    plen = template_prefix_len(tokenizer) if prefix_len is None else prefix_len
    return encode_ids(q, full, eos_ids, plen, answer)


def encode_image_example(vision, tokenizer, ex: Example, eos_ids: Sequence[int], prefix_len: int) -> Encoded:
    """Conversation tokens of an example with an image ([user: image + prompt, assistant: answer])
    on a vision-language backbone (``vision``: its :class:`edgekv.host.vlm.ImageInputs`); the
    kept template preamble ends before the first image token."""
    q, full = vision.conversation_ids(tokenizer, ex.prompt, ex.answer, ex.image, eos_ids)
    first_image = full.index(vision.token_id)
    return encode_ids(q, full, eos_ids, min(prefix_len, first_image), ex.answer, ex.image)


# ---------------------------------------------------------------------------------
# pooling over the token axis
# ---------------------------------------------------------------------------------
def adaptive_bins(T: int, m: int) -> list[tuple[int, int]]:
    """Bin i covers tokens [floor(i*T/m), ceil((i+1)*T/m)) (as AdaptiveAvgPool1d)."""
    return [(i * T // m, -(-(i + 1) * T // m)) for i in range(m)]


def pooling_matrix(T: int, m: int) -> torch.Tensor:
    """[m, T] averaging weights of adaptive pooling (rows sum to 1)."""
    W = torch.zeros((m, T))
    for i, (a, b) in enumerate(adaptive_bins(T, m)):
        W[i, a:b] = 1.0 / (b - a)
    return W


def selection_matrix(T: int, m: int) -> torch.Tensor:
    """[m, T] one-hot rows keeping m evenly spaced tokens (first and last included;
    tokens repeat when T < m)."""
    pos = np.floor(np.arange(m) * T / m).astype(int) if m > T else np.linspace(0, T - 1, m).round().astype(int)
    W = torch.zeros((m, T))
    W[torch.arange(m), torch.as_tensor(pos)] = 1.0
    return W


def answer_pooling_matrix(T: int, m: int, answer_start: int, average: bool = False) -> torch.Tensor:
    """[m, T] weights: answer tokens (``answer_start``..T-1) kept when they fit, the tokens
    before them reduced to the remaining positions (evenly spaced tokens, or bin averages)."""
    n_ans = T - answer_start
    n_pre = answer_start
    if n_pre == 0:
        return pooling_matrix(T, m)
    r = max(m - n_ans, math.ceil(m / 4)) if m > 1 else 0  # positions for the question part
    r = min(r, n_pre) if n_pre < m else r
    W = torch.zeros((m, T))
    if r > 0:
        W[:r, :answer_start] = pooling_matrix(n_pre, r) if average else selection_matrix(n_pre, r)
    W[r:, answer_start:] = pooling_matrix(n_ans, m - r)  # identity rows when n_ans == m - r
    return W


def pool_tokens(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x: [..., T, D], W: [m, T] -> [..., m, D]"""
    return torch.einsum("mt,...td->...md", W, x)


def entry_pooling_matrix(enc: Encoded, cfg: EntryConfig) -> torch.Tensor:
    """[m, T] weights over the whole conversation for this example and strategy (m unset: a new
    memory's default)."""
    cfg = resolve_entry_config(cfg)
    T = len(enc.ids)
    c = enc.content_start if cfg.skip_template_prefix else 0
    if cfg.pooling == "adaptive":
        inner = pooling_matrix(T - c, cfg.pooled_len)
    else:
        inner = answer_pooling_matrix(T - c, cfg.pooled_len, enc.answer_start - c, cfg.pooling == "answer_avg")
    W = torch.zeros((cfg.pooled_len, T))
    W[:, c:] = inner
    return W


# ---------------------------------------------------------------------------------
# keys and KV from the model
# ---------------------------------------------------------------------------------
def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) [B, H, T, D] per layer from a transformers cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


@torch.no_grad()
def raw_keys(key_model, id_lists: Sequence[Sequence[int]], batch_size: int = 16, inputs=None,
             images: Sequence[str | None] | None = None) -> np.ndarray:
    """Raw pooled keys of token lists through ``KeyModel`` (right-padded batches). -> [N, R] f32

    ``inputs`` (a vision-language backbone's ``ImageInputs``): the key runs on token
    embeddings with the image positions of ``images[i]`` filled (``KeyModel.forward_embeds``,
    the function of the embeddings key graph).
    """
    out = []
    for i in range(0, len(id_lists), batch_size):
        chunk = id_lists[i: i + batch_size]
        if inputs is None:
            x, mask = pad_batch(chunk)
            out.append(key_model(x, mask).float().numpy())
        else:
            imgs = list(images[i: i + batch_size]) if images is not None else [None] * len(chunk)
            embeds, mask = inputs.embed_batch(chunk, imgs)
            ids = pad_batch(chunk)[0] if key_model.pooling == "rare" else None
            out.append(key_model.forward_embeds(embeds, mask, ids).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def prefix_kv(model, id_lists: Sequence[Sequence[int]], embeds: torch.Tensor | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cached K (RoPE applied) and V of each sequence at positions 0..T-1.

    embeds: optional [B, S, hidden] right-padded inputs used instead of the ids (images spliced in).
    -> per sequence (K, V): [L, H, T, D] float32
    """
    from transformers import DynamicCache

    x, mask = pad_batch(id_lists)
    inputs = {"input_ids": x} if embeds is None else {"inputs_embeds": embeds}
    # a plain DynamicCache keeps every position (the model's own drops what its windowed layers no longer see)
    out = text_decoder(model)(**inputs, attention_mask=mask, past_key_values=DynamicCache(),
                              use_cache=True)  # no LM head needed
    layers = cache_layers(out.past_key_values)
    K = torch.stack([k for k, _ in layers], dim=1).float()  # [B, L, H, S, D]
    V = torch.stack([v for _, v in layers], dim=1).float()
    return [(K[i, :, :, : len(s)], V[i, :, :, : len(s)]) for i, s in enumerate(id_lists)]


def pooled_entry_kv(K: torch.Tensor, V: torch.Tensor, rope: RopeSpec | None, W: torch.Tensor
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Position-free, pooled K and V of one conversation.

    K, V: [L, H, T, D] (K with RoPE at positions 0..T-1), W: [m, T] -> [L, H, m, D] float32 x2
    """
    if rope is not None:
        K = remove_rope_t(K, rope, torch.arange(K.shape[2]))
    return pool_tokens(K, W).numpy(), pool_tokens(V, W).numpy()


def encode_examples(backbone, examples: Sequence[Example]) -> list[Encoded]:
    """Conversation tokens of each example (image ones through ``backbone.vision``)."""
    tok, eos = backbone.tokenizer, tuple(backbone.eos_token_ids)
    plen = template_prefix_len(tok)
    vision = getattr(backbone, "vision", None)
    if vision is None and any(ex.image for ex in examples):
        _warn_images_ignored(backbone)
    return [encode_image_example(vision, tok, ex, eos, plen) if vision is not None and ex.image else
            encode_example(tok, ex.prompt, ex.answer, eos, plen) for ex in examples]


def example_keys(backbone, key_model, examples: Sequence[Example], batch_size: int = 16) -> np.ndarray:
    """Raw retrieval keys of the examples' prompts (and images). -> [N, R] float32"""
    tok = backbone.tokenizer
    vision = getattr(backbone, "vision", None)
    if vision is None:
        return raw_keys(key_model, [key_ids(tok, ex.prompt) for ex in examples], batch_size)
    ids = [key_ids(tok, ex.prompt) if ex.image is None else vision.key_ids(tok, ex.prompt, ex.image)
           for ex in examples]
    return raw_keys(key_model, ids, batch_size, vision, [ex.image for ex in examples])


def _warn_images_ignored(backbone) -> None:
    import warnings

    warnings.warn(f"{backbone.source}: a text-only backbone; the examples' images are ignored", stacklevel=3)


def compute_entries(backbone, examples: Sequence[Example], key_model, cfg: EntryConfig, task: str,
                    progress: bool = False) -> tuple[list[Entry], list[Encoded]]:
    """Entries (quantised as the memory stores them) and tokens of ``examples`` (m and payload
    unset in ``cfg``: a new memory's defaults)."""
    from tqdm.auto import tqdm

    cfg = resolve_entry_config(cfg)

    model = backbone.model
    vision = getattr(backbone, "vision", None)
    encs = encode_examples(backbone, examples)
    keys = example_keys(backbone, key_model, examples, cfg.batch_size)
    entries: list[Entry] = []
    bar = tqdm(total=len(examples), desc=f"entries ({task})", unit="ex", disable=not progress, leave=False)
    for i in range(0, len(examples), cfg.batch_size):
        chunk = encs[i: i + cfg.batch_size]
        ids = [e.ids for e in chunk]
        images = [e.image for e in chunk]
        embeds = None if not any(images) else vision.embed_batch(ids, images)[0]
        for j, (enc, (K, V)) in enumerate(zip(chunk, prefix_kv(model, ids, embeds), strict=True)):
            k, v = pooled_entry_kv(K, V, backbone.rope, entry_pooling_matrix(enc, cfg))
            ex = examples[i + j]
            entries.append(Entry.from_float(keys[i + j], k, v, cfg.payload_dtype, task, ex.id))
        bar.update(len(chunk))
    bar.close()
    return entries, encs
