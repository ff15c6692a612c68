"""Continual-learning metrics of an accuracy matrix (pure numpy).

Definitions: docs/method.md, section "Continual-learning metrics"
(tasks 1..T; here rows and columns are 0-based):

    A[i][j]     accuracy on task j after adapting on task i
    Last        = mean_j A[T][j]
    Avg         = mean_i ( mean_{j<=i} A[i][j] )
    BWT         = mean_{j<T} (A[T][j] - A[j][j])            (negative = forgetting)
    Forgetting  = mean_{j<T} max_{t<T} (A[t][j] - A[T][j])

``A`` is [T, T] float with NaN where a cell was not evaluated; NaN cells are skipped in
means and maxima. Forgetting takes the maximum over *every* earlier row t < T, as the
definition is written: where the benchmark fills the upper triangle (t < j, task j not
learned yet) those cells take part too. BWT and Forgetting need T >= 2 (NaN otherwise).
"""

from __future__ import annotations

import numpy as np


def _check(A: np.ndarray) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square [T, T] with T >= 1, got shape {A.shape}")
    return A


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def last(A: np.ndarray) -> float:
    """mean_j A[T][j]. A: [T, T] -> scalar"""
    A = _check(A)
    return _nanmean(A[-1])


def avg(A: np.ndarray) -> float:
    """mean_i ( mean_{j<=i} A[i][j] ). A: [T, T] -> scalar"""
    A = _check(A)
    return _nanmean(np.array([_nanmean(A[i, : i + 1]) for i in range(len(A))]))


def bwt(A: np.ndarray) -> float:
    """mean_{j<T} (A[T][j] - A[j][j]). A: [T, T] -> scalar (NaN for T = 1)"""
    A = _check(A)
    T = len(A)
    return _nanmean(A[-1, : T - 1] - np.diag(A)[: T - 1]) if T > 1 else float("nan")


def forgetting(A: np.ndarray) -> float:
    """mean_{j<T} max_{t<T} (A[t][j] - A[T][j]). A: [T, T] -> scalar (NaN for T = 1)"""
    A = _check(A)
    T = len(A)
    if T == 1:
        return float("nan")
    vals = []
    for j in range(T - 1):
        col = A[: T - 1, j]  # [T-1] rows t < T
        col = col[~np.isnan(col)]
        vals.append(float(col.max() - A[-1, j]) if col.size and not np.isnan(A[-1, j]) else float("nan"))
    return _nanmean(np.array(vals))


def summary(A: np.ndarray) -> dict[str, float | None]:
    """Avg, Last, BWT, Forgetting (None where undefined, JSON-ready)."""
    out = {"avg": avg(A), "last": last(A), "bwt": bwt(A), "forgetting": forgetting(A)}
    return {k: (None if np.isnan(v) else v) for k, v in out.items()}
