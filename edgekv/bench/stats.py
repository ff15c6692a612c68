"""Bootstrap intervals of the continual-learning metrics over runs and test queries (numpy).

A run's per-query record is ``correct[i][j]``: the 0/1 list of task j's evaluated queries
after learning task i, or None where the cell was not evaluated (``runner.run_record``).
Every row of column j answers the same queries of task j, so a resample of task j's queries
is one index list applied to the whole column.

Hierarchical bootstrap (:func:`bootstrap_metrics`): per bootstrap sample, draw R runs with
replacement out of the R runs; within each drawn run, draw each task's n_j queries with
replacement (the same indices for every row of the column); rebuild A from the resampled
queries, compute Avg, Last, BWT and Forgetting with :mod:`edgekv.bench.metrics` (one place
per equation), and average them over the drawn runs. The 95 % interval is the 2.5th and
97.5th percentile over ``num_boot`` samples; ``mean`` is the estimate on the data itself
(the metric of every run's full A, averaged over runs).

:func:`paired_difference` applies the same draws (run and query indices) to two methods
evaluated on the same runs, and reports metric(a) - metric(b): what backs "A beats B".
:func:`aggregate` summarises the run records of several benchmark runs (``results.json``)
per (method, budget) and pairs every method with a reference (InduceKV) at the main budget.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from edgekv.bench import metrics

METRICS = ("avg", "last", "bwt", "forgetting")
HIGHER_IS_BETTER = {"avg": True, "last": True, "bwt": True, "forgetting": False}
NUM_BOOT = 2000
LEVEL = 0.95

Correct = Sequence[Sequence[Sequence[int] | None]]  # [T][T] lists of 0/1 (n_j each) or None


def as_array(correct: Correct) -> tuple[np.ndarray, np.ndarray]:
    """correct[i][j] -> C [T, T, N] float (NaN: not evaluated or past n_j), n [T] queries of task j.

    Raises ValueError when the rows of a column hold different numbers of queries."""
    T = len(correct)
    n = np.zeros(T, np.int64)  # [T]
    for j in range(T):
        lens = {len(correct[i][j]) for i in range(T) if correct[i][j] is not None}
        if len(lens) > 1:
            raise ValueError(f"column {j}: rows evaluate different numbers of queries {sorted(lens)}")
        n[j] = lens.pop() if lens else 0
    C = np.full((T, T, max(1, int(n.max(initial=0)))), np.nan)  # [T, T, N]
    for i in range(T):
        for j in range(T):
            if correct[i][j] is not None and n[j]:
                C[i, j, : n[j]] = np.asarray(correct[i][j], np.float64)
    return C, n


def metric_values(A: np.ndarray) -> np.ndarray:
    """A [T, T] -> [4] avg, last, bwt, forgetting (NaN where undefined)."""
    return np.array([metrics.avg(A), metrics.last(A), metrics.bwt(A), metrics.forgetting(A)], np.float64)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return np.nanmean(x, axis=axis)


def point_metrics(correct: Correct) -> np.ndarray:
    """[4] metrics of the run's full (not resampled) A."""
    C, n = as_array(correct)
    T = len(C)
    A = np.full((T, T), np.nan)  # [T, T]
    for j in range(T):
        if n[j]:
            A[:, j] = C[:, j, : n[j]].mean(-1)
    return metric_values(A)


def _draws(shapes: Sequence[tuple[int, int]], num_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, N) of every run -> run draws rs [B, R] int, uniforms u [B, R, Tmax, Nmax] (query draws)."""
    rng = np.random.default_rng(seed)
    R = len(shapes)
    rs = rng.integers(0, R, size=(num_boot, R))  # [B, R]
    u = rng.random((num_boot, R, max(t for t, _ in shapes), max(n for _, n in shapes)))  # [B, R, Tmax, Nmax]
    return rs, u


def _resampled(C: np.ndarray, n: np.ndarray, u: np.ndarray) -> np.ndarray:
    """C [T, T, N], n [T], u [M, T, >=N] -> [M, 4] metrics of M resampled accuracy matrices."""
    T, M = len(C), len(u)
    A = np.full((M, T, T), np.nan)  # [M, T, T]
    for j in range(T):
        if n[j]:
            idx = np.floor(u[:, j, : n[j]] * n[j]).astype(np.int64)  # [M, n_j] the same for every row i
            A[:, :, j] = C[:, j, :][:, idx].mean(-1).T  # [T, M, n_j] -> [M, T]
    return np.stack([metric_values(a) for a in A]) if M else np.zeros((0, len(METRICS)))


def boot_values(runs_correct: Sequence[Correct], num_boot: int = NUM_BOOT, seed: int = 0) -> np.ndarray:
    """-> [B, R, 4] metrics of the run drawn at each of R positions of each bootstrap sample."""
    arrays = [as_array(c) for c in runs_correct]
    if not arrays:
        raise ValueError("bootstrap needs at least one run")
    rs, u = _draws([(len(C), C.shape[2]) for C, _ in arrays], num_boot, seed)
    vals = np.full((num_boot, len(arrays), len(METRICS)), np.nan)  # [B, R, 4]
    for r, (C, n) in enumerate(arrays):
        b, k = np.nonzero(rs == r)  # positions where run r was drawn
        vals[b, k] = _resampled(C, n, u[b, k, : len(C), : C.shape[2]])
    return vals


def _summary(point: np.ndarray, boot: np.ndarray) -> dict[str, dict[str, float | None]]:
    """point [4], boot [B, 4] -> {metric: {"mean", "lo", "hi"}} (None where undefined)."""
    q = 100 * (1 - LEVEL) / 2
    out = {}
    for m, name in enumerate(METRICS):
        col = boot[:, m][~np.isnan(boot[:, m])]  # [B']
        lo, hi = (np.percentile(col, [q, 100 - q]) if col.size else (np.nan, np.nan))
        out[name] = {k: (None if np.isnan(v) else float(v)) for k, v in
                     (("mean", point[m]), ("lo", lo), ("hi", hi))}
    return out


def bootstrap_metrics(runs_correct: Sequence[Correct], num_boot: int = NUM_BOOT, seed: int = 0
                      ) -> dict[str, dict[str, float | None]]:
    """Mean over runs and 95 % hierarchical bootstrap interval (runs, then queries) of each metric."""
    point = _nanmean(np.stack([point_metrics(c) for c in runs_correct]), axis=0)  # [4]
    return _summary(point, _nanmean(boot_values(runs_correct, num_boot, seed), axis=1))


def verdict(lo: float | None, hi: float | None, higher_is_better: bool = True) -> str:
    """"better" / "worse" (a than b) when the interval of a - b excludes 0, else "cannot tell"."""
    if lo is None or hi is None or lo <= 0 <= hi:
        return "cannot tell"
    return "better" if (lo > 0) == higher_is_better else "worse"


def paired_difference(runs_a: Sequence[Correct], runs_b: Sequence[Correct], num_boot: int = NUM_BOOT,
                      seed: int = 0) -> dict[str, dict]:
    """metric(a) - metric(b) on the same runs and queries: mean, 95 % interval, verdict of a vs b.

    ``runs_a[r]`` and ``runs_b[r]`` must be the same run (same tasks, same queries per task)."""
    if len(runs_a) != len(runs_b):
        raise ValueError(f"paired runs differ in number: {len(runs_a)} vs {len(runs_b)}")
    for r, (a, b) in enumerate(zip(runs_a, runs_b, strict=True)):
        if not np.array_equal(as_array(a)[1], as_array(b)[1]):
            raise ValueError(f"run {r}: the two methods were not evaluated on the same queries")
    point = _nanmean(np.stack([point_metrics(a) - point_metrics(b) for a, b in zip(runs_a, runs_b,
                                                                                     strict=True)]), axis=0)
    diff = boot_values(runs_a, num_boot, seed) - boot_values(runs_b, num_boot, seed)  # [B, R, 4] same draws
    out = _summary(point, _nanmean(diff, axis=1))
    for name, d in out.items():
        d["verdict"] = verdict(d["lo"], d["hi"], HIGHER_IS_BETTER[name])
    return out


def _key_runs(results_list: Sequence[dict], labels: Sequence[str], key: tuple) -> list[tuple[str, dict]]:
    return [(label, r) for label, res in zip(labels, results_list, strict=True) for r in res["runs"]
            if (r["method"], r["budget"]) == key]


def aggregate(results_list: Sequence[dict], labels: Sequence[str], reference: str = "induce",
              num_boot: int = NUM_BOOT, seed: int = 0) -> dict:
    """Per (method, budget) over the runs (one ``run_bench`` result each, named by ``labels``):
    per-run metrics, mean and 95 % interval over runs x queries; paired differences
    reference - method at the main budget for every other method there."""
    keys = list(dict.fromkeys((r["method"], r["budget"]) for res in results_list for r in res["runs"]))
    methods = []
    for key in keys:
        recs = _key_runs(results_list, labels, key)
        methods.append({"method": key[0], "budget": key[1], "runs": [lab for lab, _ in recs],
                        "per_run": [r["metrics"] for _, r in recs],
                        "metrics": bootstrap_metrics([r["correct"] for _, r in recs], num_boot, seed),
                        "deployed_bytes": [r["deployed_bytes"][-1] for _, r in recs],
                        "bytes_constant": all(r["bytes_constant"] for _, r in recs)})
    main = results_list[0]["main_budget"]
    ref = dict(_key_runs(results_list, labels, (reference, main)))
    paired = []
    for key in keys:
        if key[0] == reference or key[1] not in (None, main) or not ref:
            continue
        other = [(lab, r) for lab, r in _key_runs(results_list, labels, key) if lab in ref]
        if other:
            paired.append({"method": key[0], "budget": key[1], "runs": [lab for lab, _ in other],
                           "metrics": paired_difference([ref[lab]["correct"] for lab, _ in other],
                                                        [r["correct"] for _, r in other], num_boot, seed)})
    return {"bootstrap": {"num_boot": num_boot, "seed": seed, "level": LEVEL,
                          "resampling": "runs with replacement, then each task's queries within a run"},
            "runs": list(labels), "methods": methods,
            "paired": {"reference": reference, "budget": main, "difference": f"{reference} - method",
                       "verdict_of": reference, "methods": paired}}
