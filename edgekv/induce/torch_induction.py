"""Retrieval-weighted induction in PyTorch: the host mirror of :mod:`edgekv.induction`.

The device runtime assembles the memory cache in numpy (``assemble_memory_kv``); this
module computes the same thing in torch so that the loss of a query's answer with memory
attached is differentiable in the calibration phi (tau, value gates) and in selection
weights w. Conventions, identical to the runtime (a test holds them together):

* top-k by similarity to the query's effective key; with selection weights, by
  ``sim / tau + log w`` (the same ranking when every w is 1);
* alpha = softmax(sim / tau + log w) over the retrieved entries, i.e.
  ``alpha_i ∝ w_i exp(sim_i / tau)`` (plain softmax(sim / tau) when w = 1);
* entries laid out by *increasing* similarity, entry j at positions j*m .. (j+1)*m-1;
* keys scaled by sqrt(k * alpha_i) (:func:`edgekv.induction.entry_scale`) and rotated to
  their positions, values scaled by sqrt(k * alpha_i) * lambda_l. Here the scale is computed
  from log alpha (``exp((log k + log alpha_i) / 2)``, :func:`memory_kv_log`): with a small tau an
  alpha_i underflows to 0 in float32, where sqrt's derivative is infinite and the softmax's
  backward turns it into NaN (0 * inf) in tau's gradient; in log space the gradient is
  ``c_i (delta_ij - alpha_j) / 2``, finite everywhere;
* the chat-templated query follows at positions k*m ... with an all-ones attention mask.

Queries with an image (vision-language backbones, :class:`edgekv.host.vlm.ImageInputs`) enter the
decoder as ``inputs_embeds`` (token embeddings, image positions replaced by the vision
features); text-only batches keep the ``input_ids`` path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from edgekv.format import Entry
from edgekv.host.models import output_logits, text_decoder
from edgekv.host.tokens import pad_batch
from edgekv.induction import entry_kv
from edgekv.rope import RopeSpec


# ---------------------------------------------------------------------------------
# RoPE (mirror of edgekv.rope)
# ---------------------------------------------------------------------------------
def rope_cos_sin(spec: RopeSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int -> cos, sin: [T, rotary_dim] float32 (duplicated halves, HF layout)."""
    inv = torch.tensor(spec.inv_freq, dtype=torch.float32)
    freqs = positions.to(torch.float32)[:, None] * inv[None, :]  # [T, rd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, rd]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope_t(k: torch.Tensor, spec: RopeSpec, positions: torch.Tensor) -> torch.Tensor:
    """Rotate position-free keys into ``positions``. k: [..., T, D] -> [..., T, D]"""
    rd = spec.rotary_dim
    cos, sin = rope_cos_sin(spec, positions)
    rot, rest = k[..., :rd], k[..., rd:]
    out = (rot * cos + _rotate_half(rot) * sin) * spec.attention_scaling
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def remove_rope_t(k: torch.Tensor, spec: RopeSpec, positions: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`apply_rope_t`. k: [..., T, D] at ``positions`` -> position-free."""
    rd = spec.rotary_dim
    cos, sin = rope_cos_sin(spec, positions)
    rot, rest = k[..., :rd], k[..., rd:]
    out = (rot * cos - _rotate_half(rot) * sin) / spec.attention_scaling
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


# ---------------------------------------------------------------------------------
# the entries a query can retrieve
# ---------------------------------------------------------------------------------
@dataclass
class Bank:
    """Memory entries as host tensors (what the device would dequantise), one row per entry.

    raw_keys: [N, R] raw pooled hidden states; K, V: [N, L, H, m, D] float32, position-free.
    """

    raw_keys: np.ndarray
    K: torch.Tensor
    V: torch.Tensor
    source_ids: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.raw_keys)

    @property
    def pooled_len(self) -> int:
        return int(self.K.shape[3])


def bank_from_entries(entries: Sequence[Entry], num_layers: int, key_dim: int,
                      payload_shape: tuple[int, int, int, int]) -> Bank:
    """Dequantise entries exactly as the runtime does (factors 1) into a :class:`Bank`."""
    ones = np.ones(num_layers, np.float32)
    if not entries:
        z = torch.zeros((0, *payload_shape))
        return Bank(np.zeros((0, key_dim), np.float32), z, z.clone())
    ks, vs = zip(*(entry_kv(e, 1.0, ones) for e in entries), strict=True)
    return Bank(np.stack([np.asarray(e.key, np.float32) for e in entries]),
                torch.from_numpy(np.stack(ks)), torch.from_numpy(np.stack(vs)),
                [e.source_id for e in entries], [e.task for e in entries])


def concat_banks(a: Bank, b: Bank) -> Bank:
    return Bank(np.concatenate([a.raw_keys, b.raw_keys]), torch.cat([a.K, b.K]), torch.cat([a.V, b.V]),
                a.source_ids + b.source_ids, a.tasks + b.tasks)


def subset_bank(bank: Bank, rows: Sequence[int]) -> Bank:
    rows = list(rows)
    idx = torch.as_tensor(rows, dtype=torch.long)
    return Bank(bank.raw_keys[rows], bank.K[idx], bank.V[idx],
                [bank.source_ids[i] for i in rows], [bank.tasks[i] for i in rows])


# ---------------------------------------------------------------------------------
# retrieval and weights
# ---------------------------------------------------------------------------------
def retrieve(q: torch.Tensor, P: torch.Tensor, log_w: torch.Tensor, tau: torch.Tensor | float,
             k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k entries per query, in layout order (increasing similarity, best last).

    q: [B, R] effective query keys, P: [N, R] effective entry keys, log_w: [N],
    exclude: [B, N] bool (True = may not be retrieved, e.g. the query's own entry)
    -> idx [B, k] long, sims [B, k] (no gradient: which entries are retrieved is discrete)
    """
    with torch.no_grad():
        sims = q @ P.T  # [B, N]
        score = sims / float(tau) + log_w[None, :]
        if exclude is not None:
            score = score.masked_fill(exclude, float("-inf"))
        top = score.topk(k, dim=1).indices  # [B, k] best first
        top_sims = sims.gather(1, top)
        order = top_sims.argsort(dim=1, stable=True)  # increasing similarity
        idx = top.gather(1, order)
    return idx, sims.gather(1, idx)


def log_alpha_weights(sims: torch.Tensor, log_w: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """log alpha, alpha ∝ w exp(sim / tau) over the retrieved entries. sims, log_w: [B, k] -> [B, k]

    Finite (and with a finite gradient) where alpha itself underflows to 0 in float32."""
    return torch.log_softmax(sims / tau + log_w, dim=-1)


def alpha_weights(sims: torch.Tensor, log_w: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """alpha ∝ w exp(sim / tau) over the retrieved entries. sims, log_w: [B, k] -> [B, k]"""
    return log_alpha_weights(sims, log_w, tau).exp()


def memory_kv(K: torch.Tensor, V: torch.Tensor, idx: torch.Tensor, alpha: torch.Tensor,
              gates: torch.Tensor, rope: RopeSpec | None, start_position: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The injected past KV of a batch of queries for given weights alpha [B, k] (sum 1 per row):
    :func:`memory_kv_log` of ``alpha.log()``. Not for alpha that needs a gradient where some of
    it is 0 (the gradient of log there is infinite): :class:`Induction` passes log alpha."""
    return memory_kv_log(K, V, idx, alpha.log(), gates, rope, start_position)


def memory_kv_log(K: torch.Tensor, V: torch.Tensor, idx: torch.Tensor, log_alpha: torch.Tensor,
                  gates: torch.Tensor, rope: RopeSpec | None, start_position: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The injected past KV of a batch of queries (torch mirror of ``assemble_memory_kv``).

    K, V: [N, L, H, m, D] position-free entries; idx, log_alpha: [B, k] in layout order
    (:func:`log_alpha_weights`); gates: [L] -> K_mem, V_mem: [L, B, H, k*m, D] (keys rotated
    to start..start+k*m-1)

    The entry scale sqrt(k * alpha_i) (``entry_scale``) is taken in log space,
    exp((log k + log alpha_i) / 2): sqrt(alpha) has an infinite derivative where alpha_i has
    underflowed to 0 (a small tau and a far entry), which the softmax's backward turns into a
    NaN gradient of tau (0 * inf); this form's gradient is finite everywhere.
    """
    B, k = idx.shape
    N, L, H, m, D = K.shape
    s = torch.exp(0.5 * (log_alpha + math.log(k)))[:, :, None, None, None, None]  # [B, k, 1, 1, 1, 1], entry_scale
    k_sel = K[idx] * s  # [B, k, L, H, m, D]
    v_sel = V[idx] * s * gates[None, None, :, None, None, None]
    k_mem = k_sel.permute(2, 0, 3, 1, 4, 5).reshape(L, B, H, k * m, D)  # entry j at j*m..
    v_mem = v_sel.permute(2, 0, 3, 1, 4, 5).reshape(L, B, H, k * m, D)
    if rope is not None:
        k_mem = apply_rope_t(k_mem, rope, torch.arange(start_position, start_position + k * m))
    return k_mem, v_mem


def make_cache(k_mem: torch.Tensor | None, v_mem: torch.Tensor | None, num_layers: int):
    """A transformers DynamicCache holding K, V [L, B, H, T, D] (empty when None)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if k_mem is not None and k_mem.shape[3] > 0:
        for layer in range(num_layers):
            cache.update(k_mem[layer], v_mem[layer], layer)
    return cache


@torch.no_grad()
def greedy_decode(model, inputs: dict, pos: torch.Tensor, cache, max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """The runtime's greedy loop for one sequence: token ids generated (without EOS).

    inputs: the prompt as ``{"input_ids": [1, S]}`` or ``{"inputs_embeds": [1, S, hidden]}``;
    pos: [1, S] its positions (after any past in ``cache``); later steps feed token ids.
    """
    out: list[int] = []
    for _ in range(max_new_tokens):
        res = model(**inputs, position_ids=pos, past_key_values=cache, use_cache=True)
        cache = res.past_key_values
        tok = int(res.logits[0, -1].argmax())
        if tok in eos_ids:
            break
        out.append(tok)
        pos = pos[:, -1:] + 1
        inputs = {"input_ids": torch.as_tensor([[tok]], dtype=torch.long)}
    return out


def num_layers_of(model) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


# ---------------------------------------------------------------------------------
# the loss of answers with memory attached
# ---------------------------------------------------------------------------------
@dataclass
class QuerySet:
    """Queries with known answers, ready for the loss.

    keys: [Q, R] effective query keys; ids[i]: the query's chat-templated tokens followed by
    its answer (and end-of-turn) tokens; answer_start[i]: index of the first answer token;
    images[i]: the query's image path (its image tokens are in ids[i]) or None; empty: no images.
    """

    keys: torch.Tensor
    ids: list[list[int]]
    answer_start: list[int]
    source_ids: list[str]
    tasks: list[str] = field(default_factory=list)
    images: list[str | None] = field(default_factory=list)

    def images_of(self, rows: Sequence[int]) -> list[str | None] | None:
        """Image paths of ``rows``, or None when none of them has an image (the text path)."""
        if not self.images:
            return None
        imgs = [self.images[r] for r in rows]
        return imgs if any(i is not None for i in imgs) else None

    def __len__(self) -> int:
        return len(self.ids)


def answer_nll(model, ids: list[list[int]], answer_start: list[int], k_mem: torch.Tensor | None,
               v_mem: torch.Tensor | None, embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token NLL of each sequence's answer tokens with memory [L, B, H, T, D] as past.

    embeds: optional [B, S, hidden] inputs (right-padded like ``ids``; image positions hold
    the vision features) fed instead of the token ids; the targets are still ``ids``.
    -> [B] (one value per query; each query weighs the same whatever its answer length)
    """
    num_layers = num_layers_of(model)
    T = 0 if k_mem is None else int(k_mem.shape[3])
    x, mask = pad_batch(ids)
    B, S = x.shape
    full_mask = torch.cat([torch.ones((B, T), dtype=torch.long), mask], dim=1)
    pos = torch.arange(T, T + S)[None].expand(B, S)
    inputs = {"input_ids": x} if embeds is None else {"inputs_embeds": embeds}
    out = text_decoder(model)(**inputs, attention_mask=full_mask, position_ids=pos,
                              past_key_values=make_cache(k_mem, v_mem, num_layers), use_cache=True)
    h = out.last_hidden_state  # [B, S, Hd]
    # logits only where a target follows: position t predicts token t+1
    tgt = torch.zeros((B, S), dtype=torch.bool)
    for i, (seq, a) in enumerate(zip(ids, answer_start, strict=True)):
        tgt[i, a - 1: len(seq) - 1] = True
    rows, cols = tgt.nonzero(as_tuple=True)
    logits = output_logits(model, h[rows, cols]).float()  # [n, V]
    labels = x[rows, cols + 1]
    tok_nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # [n]
    per_seq = torch.zeros(B).index_add(0, rows, tok_nll)
    counts = torch.zeros(B).index_add(0, rows, torch.ones_like(tok_nll))
    return per_seq / counts.clamp(min=1)


class Induction:
    """Loss and greedy decoding of queries with retrieval-weighted memory over a :class:`Bank`.

    ``P``: [N, R] effective (projected, unit-norm) keys of the bank's entries.

    ``inputs``: the backbone's :class:`edgekv.host.vlm.ImageInputs` (``Backbone.vision``; vision-language
    backbones), used for queries with an image.
    """

    def __init__(self, model, bank: Bank, P: torch.Tensor, top_k: int, rope: RopeSpec | None, inputs=None):
        self.model = model
        self.bank = bank
        self.P = P
        self.top_k = top_k
        self.rope = rope
        self.inputs = inputs
        self.num_layers = num_layers_of(model)

    def exclusion(self, source_ids: Sequence[str]) -> torch.Tensor:
        """[B, N] True where entry n was built from query b's own example (leave-one-out)."""
        own = {s: [] for s in source_ids}
        for n, s in enumerate(self.bank.source_ids):
            if s in own:
                own[s].append(n)
        ex = torch.zeros((len(source_ids), len(self.bank)), dtype=torch.bool)
        for b, s in enumerate(source_ids):
            ex[b, own[s]] = True
        return ex

    def _k(self, num_excluded: int) -> int:
        return max(0, min(self.top_k, len(self.bank) - num_excluded))

    def memory_for(self, q: torch.Tensor, source_ids: Sequence[str] | None, log_w: torch.Tensor,
                   tau: torch.Tensor, gates: torch.Tensor, leave_one_out: bool = True):
        """Retrieve and assemble the memory of a batch of queries. -> (idx, alpha, K_mem, V_mem)"""
        ex = self.exclusion(source_ids) if (leave_one_out and source_ids is not None) else None
        k = self._k(int(ex.sum(1).max()) if ex is not None and len(ex) else 0)
        if k == 0:
            return None, None, None, None
        idx, sims = retrieve(q, self.P, log_w.detach(), tau.detach() if torch.is_tensor(tau) else tau, k, ex)
        log_alpha = log_alpha_weights(sims, log_w[idx], tau)  # [B, k]
        k_mem, v_mem = memory_kv_log(self.bank.K, self.bank.V, idx, log_alpha, gates, self.rope)
        return idx, log_alpha.exp(), k_mem, v_mem

    def loss(self, qs: QuerySet, rows: Sequence[int], log_w: torch.Tensor, tau: torch.Tensor,
             gates: torch.Tensor, leave_one_out: bool = True) -> torch.Tensor:
        """Mean answer NLL of queries ``rows`` of ``qs`` with memory attached. -> scalar"""
        rows = list(rows)
        src = [qs.source_ids[r] for r in rows]
        _, _, k_mem, v_mem = self.memory_for(qs.keys[rows], src, log_w, tau, gates, leave_one_out)
        ids = [qs.ids[r] for r in rows]
        images = qs.images_of(rows)
        embeds = None if images is None else self._embeds(ids, images)
        nll = answer_nll(self.model, ids, [qs.answer_start[r] for r in rows], k_mem, v_mem, embeds)
        return nll.mean()

    def _embeds(self, ids: list[list[int]], images: Sequence[str | None]) -> torch.Tensor:
        if self.inputs is None:
            raise ValueError("queries with images need Induction(inputs=...) (a vision-language backbone)")
        return self.inputs.embed_batch(ids, images)[0]

    @torch.no_grad()
    def generate(self, q: torch.Tensor, prompt_ids: list[int], tau: float, gates: Sequence[float],
                 max_new_tokens: int, eos_ids: set[int], use_memory: bool = True,
                 image: str | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Greedy decoding of one query (the runtime's decode loop in torch).

        q: [R] effective key; image: path whose features fill the image tokens of ``prompt_ids``.
        -> (generated token ids without EOS, retrieved bank rows in layout order)
        """
        g = torch.as_tensor(list(gates), dtype=torch.float32)
        log_w = torch.zeros(len(self.bank))
        if use_memory and len(self.bank):
            idx, _, k_mem, v_mem = self.memory_for(q[None], None, log_w, torch.tensor(float(tau)), g, False)
        else:
            idx, k_mem, v_mem = None, None, None
        T = 0 if k_mem is None else int(k_mem.shape[3])
        cache = make_cache(k_mem, v_mem, self.num_layers)
        x = torch.as_tensor([prompt_ids], dtype=torch.long)
        pos = torch.arange(T, T + x.shape[1])[None]
        # the prompt with an image enters as embeddings; generated tokens as ids
        inputs = {"input_ids": x} if image is None else {"inputs_embeds": self._embeds([list(prompt_ids)], [image])}
        return greedy_decode(self.model, inputs, pos, cache, max_new_tokens, eos_ids), (None if idx is None else idx[0])
