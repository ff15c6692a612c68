"""Bootstrap intervals (edgekv.bench.stats) on synthetic per-query correctness."""

from __future__ import annotations

import numpy as np
import pytest

from edgekv.bench import metrics, stats


def synthetic_run(rng: np.random.Generator, p: np.ndarray, n: int, lower: bool = True) -> list:
    """correct[i][j]: n Bernoulli(p[i, j]) answers per cell; None above the diagonal when ``lower``.
    p: [T, T]"""
    T = len(p)
    return [[(rng.random(n) < p[i, j]).astype(int).tolist() if (j <= i or not lower) else None
             for j in range(T)] for i in range(T)]


P = np.array([[0.8, 0.0, 0.0],
              [0.5, 0.7, 0.0],
              [0.4, 0.6, 0.9]])


def test_point_estimate_is_the_metric_of_the_full_matrix():
    run = synthetic_run(np.random.default_rng(0), P, 20)
    A = np.array([[np.mean(c) if c is not None else np.nan for c in row] for row in run])
    got = stats.bootstrap_metrics([run], num_boot=50)
    assert got["last"]["mean"] == pytest.approx(metrics.last(A))
    assert got["avg"]["mean"] == pytest.approx(metrics.avg(A))
    assert got["bwt"]["mean"] == pytest.approx(metrics.bwt(A))
    assert got["forgetting"]["mean"] == pytest.approx(metrics.forgetting(A))
    two = stats.bootstrap_metrics([run, synthetic_run(np.random.default_rng(1), P, 20)], num_boot=50)
    assert two["last"]["lo"] <= two["last"]["mean"] <= two["last"]["hi"]


def test_interval_covers_the_true_mean():
    true_last = P[-1].mean()
    true_avg = metrics.avg(np.where(np.tril(np.ones((3, 3))) > 0, P, np.nan))
    true_bwt = metrics.bwt(P)
    misses = 0
    for s in range(20):
        rng = np.random.default_rng(100 + s)
        got = stats.bootstrap_metrics([synthetic_run(rng, P, 40) for _ in range(4)], num_boot=400, seed=s)
        for key, true in (("last", true_last), ("avg", true_avg), ("bwt", true_bwt)):
            misses += not got[key]["lo"] <= true <= got[key]["hi"]
    assert misses <= 6  # 60 intervals at 95 %: ~3 misses expected


def test_interval_shrinks_with_more_queries():
    rng = np.random.default_rng(0)
    width = {}
    for n in (16, 256):
        got = stats.bootstrap_metrics([synthetic_run(rng, P, n)], num_boot=500)
        width[n] = {k: got[k]["hi"] - got[k]["lo"] for k in stats.METRICS}
    for k in stats.METRICS:
        assert width[256][k] < 0.5 * width[16][k], k


def test_interval_is_a_point_when_all_queries_agree():
    run = [[[1] * 10, None], [[0] * 10, [1] * 10]]  # A = [[1, -], [0, 1]]
    got = stats.bootstrap_metrics([run, run], num_boot=200)
    assert got["last"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5}
    assert got["bwt"] == {"mean": -1.0, "lo": -1.0, "hi": -1.0}
    assert got["forgetting"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}


def test_single_task_leaves_bwt_undefined():
    got = stats.bootstrap_metrics([[[[1, 0, 1]]]], num_boot=20)
    assert got["bwt"] == {"mean": None, "lo": None, "hi": None}
    assert got["last"]["mean"] == pytest.approx(2 / 3)


def test_same_query_indices_for_every_row_of_a_column():
    # rows 0 and 1 of column 0 answer identically: every resample keeps A[0][0] == A[1][0], so BWT = 0 exactly
    rng = np.random.default_rng(3)
    col = (rng.random(30) < 0.5).astype(int).tolist()
    run = [[col, None], [col, (rng.random(30) < 0.5).astype(int).tolist()]]
    got = stats.bootstrap_metrics([run], num_boot=300)
    assert got["bwt"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert got["last"]["hi"] > got["last"]["lo"]


def test_paired_difference_of_a_method_with_itself_is_zero():
    rng = np.random.default_rng(0)
    runs = [synthetic_run(rng, P, 24) for _ in range(4)]
    got = stats.paired_difference(runs, runs, num_boot=300)
    for k in stats.METRICS:
        assert (got[k]["mean"], got[k]["lo"], got[k]["hi"]) == (0.0, 0.0, 0.0), k
        assert got[k]["verdict"] == "cannot tell"


def test_paired_difference_detects_a_clear_gap_and_its_direction():
    rng = np.random.default_rng(1)
    good = [synthetic_run(rng, P, 40) for _ in range(4)]
    bad = [synthetic_run(rng, 0.5 * P, 40) for _ in range(4)]
    got = stats.paired_difference(good, bad, num_boot=400)
    assert got["last"]["lo"] > 0 and got["last"]["verdict"] == "better"
    assert stats.paired_difference(bad, good, num_boot=400)["last"]["verdict"] == "worse"
    assert stats.verdict(-0.3, -0.1, higher_is_better=False) == "better"  # less forgetting
    assert stats.verdict(-0.1, 0.2) == "cannot tell"
    with pytest.raises(ValueError, match="same queries"):
        stats.paired_difference(good, [synthetic_run(rng, P, 39) for _ in range(4)], num_boot=10)


def test_deterministic_with_a_seed():
    rng = np.random.default_rng(0)
    runs = [synthetic_run(rng, P, 24) for _ in range(3)]
    assert stats.bootstrap_metrics(runs, num_boot=200, seed=5) == stats.bootstrap_metrics(runs, num_boot=200, seed=5)
    assert stats.bootstrap_metrics(runs, num_boot=200, seed=5) != stats.bootstrap_metrics(runs, num_boot=200, seed=6)


def test_rows_of_a_column_must_hold_the_same_queries():
    with pytest.raises(ValueError, match="column 0"):
        stats.as_array([[[1, 0], None], [[1], [1]]])


def test_aggregate_pairs_every_method_with_the_reference():
    def results(seed):
        def rec(method, budget, p):
            corr = synthetic_run(np.random.default_rng(seed * 10 + len(method)), p, 12)
            A = np.array([[np.mean(c) if c is not None else np.nan for c in row] for row in corr])
            return {"method": method, "budget": budget, "correct": corr, "metrics": metrics.summary(A),
                    "deployed_bytes": [budget or 0] * 3, "bytes_constant": True}
        return {"main_budget": 100, "runs": [rec("zero-shot", None, 0 * P), rec("induce", 50, 0.5 * P),
                                             rec("induce", 100, P), rec("lora", 100, 0.2 * P)]}

    agg = stats.aggregate([results(0), results(1)], ["a-s0", "a-s1"], num_boot=100)
    assert [(m["method"], m["budget"]) for m in agg["methods"]] == [("zero-shot", None), ("induce", 50),
                                                                     ("induce", 100), ("lora", 100)]
    assert all(m["runs"] == ["a-s0", "a-s1"] and set(m["metrics"]) == set(stats.METRICS) for m in agg["methods"])
    p = agg["paired"]
    assert p["reference"] == "induce" and p["budget"] == 100
    assert [(m["method"], m["budget"]) for m in p["methods"]] == [("zero-shot", None), ("lora", 100)]
    assert p["methods"][0]["metrics"]["last"]["verdict"] == "better"  # induce vs an all-wrong zero-shot
