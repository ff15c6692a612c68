"""Reference computations in PyTorch that runtime tests compare against.

Written plainly and independently of edgekv's host pipeline (``edgekv.induce``), so that
a bug there cannot hide a bug in the runtime.
"""

from __future__ import annotations

import numpy as np


def cache_layers(cache) -> list[tuple]:
    """(K, V) torch tensors [B, H, T, D] per layer from a transformers cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def prefix_kv(model, ids: list[int], position_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cached K (RoPE applied, as the model caches them) and V of ``ids``. -> [L, H, T, D] x2"""
    import torch

    with torch.no_grad():
        x = torch.tensor([ids])
        pos = torch.arange(position_offset, position_offset + len(ids))[None]
        out = model(input_ids=x, position_ids=pos, use_cache=True)
    layers = cache_layers(out.past_key_values)
    K = np.stack([k[0].float().numpy() for k, _ in layers])
    V = np.stack([v[0].float().numpy() for _, v in layers])
    return K, V


def joint_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [S, V] of one sequence."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def greedy(model, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Plain greedy decoding with the model's own cache; stops at EOS (not included)."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        res = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(max_new_tokens):
            tok = int(res.logits[0, -1].argmax())
            if tok in eos_ids:
                break
            out.append(tok)
            res = model(input_ids=torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out
