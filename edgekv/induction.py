"""Retrieval-weighted induction in numpy: from retrieved entries to a decoder's past KV.

The device runtime calls this once per query; the host mirrors it in torch (where
gradients are needed) and a test holds the two together. Conventions:

* Retrieved entries are laid out in order of *increasing* similarity, so the best entry
  sits right before the query. Entry j occupies positions ``j*m .. (j+1)*m - 1``.
* Entry i's keys and values are scaled by ``sqrt(k * alpha_i)`` (alpha normalised to mean
  1 over the k retrieved entries, so uniform weights leave entries as computed); values
  additionally by the layer gate ``lambda_l``. Both fold into the int8 dequantisation
  scales. (The paper's plain ``sqrt(alpha_i)`` shrinks every entry by sqrt(1/k) when the
  weights are flat: on SmolLM2-135M with k = 4 it drops accuracy on a held-out code task
  from 92% to 0%; see docs/induce.md.)
* Stored keys are position-free; they are rotated into their assigned positions here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgekv.format import Entry
from edgekv.quant import dequantize_keys, dequantize_values
from edgekv.retrieval import retrieval_weights
from edgekv.rope import RopeSpec, apply_rope


def layout_order(sims: np.ndarray) -> np.ndarray:
    """Indices that order retrieved entries by increasing similarity (best last). [k] -> [k]"""
    return np.argsort(np.asarray(sims), kind="stable")


def entry_kv(entry: Entry, factor_k: float, factor_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 K, V of one entry, with K scaled by factor_k and V by factor_v [L].

    -> K [L, H, m, D] (position-free), V [L, H, m, D]
    """
    fv = np.asarray(factor_v, np.float32)
    if entry.k_scale is not None:
        k = dequantize_keys(entry.k, entry.k_scale, factor_k)
        v = dequantize_values(entry.v, entry.v_scale, fv)
    else:
        k = entry.k.astype(np.float32) * np.float32(factor_k)
        v = entry.v.astype(np.float32) * fv[:, None, None, None]
    return k, v


def entry_scale(alpha: float, k: int) -> float:
    """Factor on an entry's K and V: sqrt(k * alpha) (1 when the k weights are uniform)."""
    return float(np.sqrt(k * float(alpha)))


def assemble_memory_kv(entries: Sequence[Entry], alphas: np.ndarray, gates: Sequence[float],
                       rope: RopeSpec | None, start_position: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate entries (already in layout order) into a past KV cache.

    alphas: [k] retrieval weights (same order as entries, sum 1), gates: [L].
    -> K [L, H, k*m, D] rotated to positions start..start+k*m-1, V [L, H, k*m, D] (float32)
    """
    gates = np.asarray(gates, np.float32)
    ks, vs = [], []
    for e, a in zip(entries, alphas, strict=True):
        s = entry_scale(a, len(entries))
        k, v = entry_kv(e, s, s * gates)
        ks.append(k)
        vs.append(v)
    K = np.concatenate(ks, axis=2)
    V = np.concatenate(vs, axis=2)
    if rope is not None:
        positions = np.arange(start_position, start_position + K.shape[2])
        K = apply_rope(K, rope, positions)
    return np.ascontiguousarray(K, np.float32), np.ascontiguousarray(V, np.float32)


def select_and_weigh(sims: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Layout order and alpha for retrieved similarities.

    sims: [k] (any order) -> (order [k] indices into sims, alpha [k] in that order)
    """
    order = layout_order(sims)
    alpha = retrieval_weights(np.asarray(sims)[order], tau)
    return order, alpha
