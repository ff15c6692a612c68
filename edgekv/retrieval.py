"""Retrieval keys and retrieval weights, as pure numpy (one definition for host and device).

A stored memory key is the raw pooled hidden state ``h`` of an example's query part. The
*effective* key used for search is ``normalise(project(h))`` where ``project`` is the
memory's key projection: subtract the memory's mean key and remove its top principal
directions ("all-but-the-top"). Mean-pooled hidden states of a small backbone are
dominated by a few directions that encode phrasing, not content; removing them is what
makes retrieval find the right entry. The projection is fitted on the host from the
memory's keys, stored in the memory file, and applied to the query on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KeyProjection:
    """mean: [R] float32, dirs: [P, R] float32 with orthonormal rows (P may be 0)."""

    mean: np.ndarray
    dirs: np.ndarray

    @staticmethod
    def identity(dim: int) -> KeyProjection:
        return KeyProjection(np.zeros(dim, np.float32), np.zeros((0, dim), np.float32))


def fit_projection(keys: np.ndarray, num_dirs: int) -> KeyProjection:
    """All-but-the-top: the keys' mean and their top ``num_dirs`` principal directions.

    keys: [N, R] raw pooled hidden states -> KeyProjection (mean [R], dirs [P, R])
    """
    keys = np.asarray(keys, dtype=np.float64)
    mean = keys.mean(axis=0) if len(keys) else np.zeros(keys.shape[1])
    centred = keys - mean
    p = int(min(num_dirs, max(len(keys) - 1, 0), keys.shape[1]))
    if p == 0:
        return KeyProjection(mean.astype(np.float32), np.zeros((0, keys.shape[1]), np.float32))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return KeyProjection(mean.astype(np.float32), vt[:p].astype(np.float32))


def effective_keys(h: np.ndarray, proj: KeyProjection) -> np.ndarray:
    """Project and unit-normalise raw keys.

    h: [N, R] (or [R]) float -> [N, R] (or [R]) float32 with unit rows
    """
    x = np.asarray(h, dtype=np.float32) - proj.mean
    if len(proj.dirs):
        x = x - (x @ proj.dirs.T) @ proj.dirs
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def topk_exact(query: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search.

    query: [R], keys: [N, R] -> (indices [k'] int64, sims [k'] float32), best first, k' = min(k, N)
    """
    sims = keys @ query  # [N]
    k = min(k, len(sims))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    idx = np.argpartition(-sims, k - 1)[:k]
    idx = idx[np.argsort(-sims[idx], kind="stable")]
    return idx.astype(np.int64), sims[idx].astype(np.float32)


def retrieval_weights(sims: np.ndarray, tau: float) -> np.ndarray:
    """alpha = softmax(sims / tau) over the retrieved entries.

    sims: [k] -> alpha: [k] float32, sums to 1
    """
    z = np.asarray(sims, dtype=np.float64) / float(tau)
    z = z - z.max() if len(z) else z
    e = np.exp(z)
    return (e / e.sum()).astype(np.float32) if len(e) else e.astype(np.float32)


def softplus(x: float) -> float:
    """tau = softplus(phi_tau)."""
    return float(np.logaddexp(0.0, x))


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """lambda_l = sigmoid(phi_l)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
