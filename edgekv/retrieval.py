"""Retrieval keys and retrieval weights, as pure numpy (one definition for host and device).

A stored memory key is the raw pooled hidden state ``h`` of an example's query part. The
*effective* key used for search is ``normalise(project(h))`` where ``project`` is the
memory's key projection: subtract the memory's mean key, remove its *phrasing directions*
and then its top principal directions ("all-but-the-top"). Mean-pooled hidden states of a
small backbone are dominated by directions that encode phrasing, not content; removing them
is what makes retrieval find the right entry. The phrasing directions are learnt from the
examples that share an answer (the same item asked in different words): their differences
from their class mean (:func:`class_residuals`) span what a key should ignore, summed over
every task in a low-rank sketch kept on the host (:func:`update_sketch`). The projection is
fitted on the host, stored in the memory file, and applied to the query on the device.
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


def fit_projection(keys: np.ndarray, num_dirs: int, fixed: np.ndarray | None = None) -> KeyProjection:
    """All-but-the-top: the keys' mean and their top ``num_dirs`` principal directions.

    ``fixed``: directions removed before the principal ones are fitted (the memory's phrasing
    directions, :func:`sketch_dirs`); the projection removes both (rows: ``fixed``, then the
    principal directions of what remains).
    keys: [N, R] raw pooled hidden states, fixed: [W, R] orthonormal rows -> KeyProjection (mean [R], dirs [P, R])
    """
    keys = np.asarray(keys, dtype=np.float64)
    mean = keys.mean(axis=0) if len(keys) else np.zeros(keys.shape[1])
    centred = keys - mean
    fixed = np.zeros((0, keys.shape[1])) if fixed is None or not len(fixed) else np.asarray(fixed, np.float64)  # [W, R]
    if len(fixed):
        centred = centred - (centred @ fixed.T) @ fixed
    p = int(min(num_dirs, max(len(keys) - 1, 0), keys.shape[1] - len(fixed)))
    top = np.linalg.svd(centred, full_matrices=False)[2][:p] if p > 0 else np.zeros((0, keys.shape[1]))
    dirs = np.concatenate([fixed, top])  # [W + p, R]
    if len(fixed) and len(dirs):
        dirs = np.linalg.qr(dirs.T)[0].T  # orthonormal to float precision (same span)
    return KeyProjection(mean.astype(np.float32), dirs.astype(np.float32))


def class_residuals(keys: np.ndarray, labels: list) -> np.ndarray:
    """Phrasing residuals: each key minus the mean key of its class, over classes of two or more.

    Examples with the same answer (the same item asked in different words) differ only in
    phrasing, so these residuals span the directions a key should ignore.
    keys: [N, R], labels: N hashable class labels -> [M, R] float64 (M = rows in classes of >= 2)
    """
    keys = np.asarray(keys, dtype=np.float64)
    groups: dict = {}
    for i, c in enumerate(labels):
        groups.setdefault(c, []).append(i)
    parts = [keys[ix] - keys[ix].mean(axis=0) for ix in groups.values() if len(ix) > 1]
    return np.concatenate(parts) if parts else np.zeros((0, keys.shape[1]))


def answer_class(answer: str) -> str:
    """The class an example's answer puts it in (for :func:`class_residuals`): whitespace-normalised, case-folded."""
    return " ".join(answer.split()).casefold()


def update_sketch(sketch: np.ndarray | None, residuals: np.ndarray, rank: int) -> np.ndarray:
    """Low-rank sketch of the phrasing scatter summed over tasks: rows s_i v_i of the top ``rank``
    singular triplets of [sketch; residuals], so sketch^T sketch ~ sum over tasks of residuals^T residuals.

    sketch: [S, R] or None, residuals: [M, R] -> [min(rank, S + M), R] float32
    """
    stacked = np.asarray(residuals, np.float64) if sketch is None else \
        np.concatenate([np.asarray(sketch, np.float64), np.asarray(residuals, np.float64)])
    if not len(stacked):
        return stacked.astype(np.float32)
    _, s, vt = np.linalg.svd(stacked, full_matrices=False)
    keep = int(min(rank, int((s > s[0] * 1e-6).sum())))
    return (s[:keep, None] * vt[:keep]).astype(np.float32)


def add_task_phrasing(sketch: np.ndarray | None, keys: np.ndarray, answers: list[str], rank: int
                      ) -> np.ndarray | None:
    """The sketch after one more task: its examples grouped by :func:`answer_class`, their
    :func:`class_residuals` added (:func:`update_sketch`). None stays None while no task had a
    class of two examples. keys: [N, R] raw keys of the task's examples, answers: N -> [S', R] or None"""
    res = class_residuals(keys, [answer_class(a) for a in answers])
    return update_sketch(sketch, res, rank) if len(res) or sketch is not None else sketch


def sketch_dirs(sketch: np.ndarray | None, num: int) -> np.ndarray:
    """The top ``num`` phrasing directions of a sketch. sketch: [S, R] -> [min(num, S), R] orthonormal rows"""
    if sketch is None or not len(sketch) or num <= 0:
        return np.zeros((0, 0 if sketch is None else np.shape(sketch)[1]), np.float32)
    vt = np.linalg.svd(np.asarray(sketch, np.float64), full_matrices=False)[2]
    return vt[:num].astype(np.float32)


def memory_projection(keys: np.ndarray, sketch: np.ndarray | None, phrase_dirs: int, proj_dirs: int
                      ) -> KeyProjection:
    """The key projection a memory (or a baseline's store) is searched through: the top
    ``phrase_dirs`` phrasing directions of ``sketch`` alone; all-but-the-top (``proj_dirs``
    principal directions) only while there are none (no sketch, or ``phrase_dirs`` 0). Once the
    phrasing is removed, the top principal directions of what remains are what separates the
    items (a single task of 4 classes keeps only 3 such directions), so they stay.
    keys: [N, R] raw, sketch: [S, R] or None -> KeyProjection"""
    fixed = sketch_dirs(sketch, phrase_dirs)  # [W, R]
    return fit_projection(keys, 0 if len(fixed) else proj_dirs, fixed)


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
