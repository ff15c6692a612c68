"""Retrieval keys and weights (numpy) against straightforward references."""

from __future__ import annotations

import numpy as np
import pytest

from edgekv.retrieval import (
    KeyProjection,
    class_residuals,
    effective_keys,
    fit_projection,
    memory_projection,
    retrieval_weights,
    sigmoid,
    sketch_dirs,
    softplus,
    topk_exact,
    update_sketch,
)


def planted_keys(seed: int, n: int = 200, dim: int = 32, strong: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Keys = offset + large variance along ``strong`` random directions + small noise."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, strong)))
    coef = rng.normal(size=(n, strong)) * np.array([50.0, 30.0, 20.0][:strong])
    keys = 5.0 + coef @ basis.T + rng.normal(size=(n, dim))
    return keys, basis.T  # [n, dim], [strong, dim]


def projector(rows: np.ndarray) -> np.ndarray:
    return rows.T @ rows


def test_fit_projection_finds_the_top_principal_directions():
    keys, planted = planted_keys(1)
    proj = fit_projection(keys, 3)
    assert proj.mean.dtype == np.float32 and proj.dirs.dtype == np.float32 and proj.dirs.shape == (3, 32)
    np.testing.assert_allclose(proj.mean, keys.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(proj.dirs @ proj.dirs.T, np.eye(3), atol=1e-5)  # orthonormal rows
    # the same subspace as the reference: top eigenvectors of the covariance
    cov = np.cov(keys.T)
    w, v = np.linalg.eigh(cov)
    ref = v[:, np.argsort(w)[::-1][:3]].T
    np.testing.assert_allclose(projector(proj.dirs), projector(ref), atol=1e-4)
    # and close to the planted directions
    np.testing.assert_allclose(projector(proj.dirs), projector(planted), atol=0.05)


def test_effective_keys_are_unit_and_orthogonal_to_removed_directions():
    keys, _ = planted_keys(2)
    proj = fit_projection(keys, 3)
    eff = effective_keys(keys, proj)
    assert eff.shape == keys.shape and eff.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(eff, axis=1), 1.0, atol=1e-5)
    assert np.abs(eff @ proj.dirs.T).max() < 1e-4
    # reference: centre, project out, normalise, in float64
    x = keys - proj.mean.astype(np.float64)
    d = proj.dirs.astype(np.float64)
    x = x - x @ d.T @ d
    np.testing.assert_allclose(eff, x / np.linalg.norm(x, axis=1, keepdims=True), atol=2e-5)
    # one key [R] -> [R]
    np.testing.assert_allclose(effective_keys(keys[5], proj), eff[5], atol=1e-6)


def test_identity_projection_only_normalises():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(10, 16))
    eff = effective_keys(h, KeyProjection.identity(16))
    np.testing.assert_allclose(eff, h / np.linalg.norm(h, axis=1, keepdims=True), rtol=1e-5)
    assert not effective_keys(np.zeros(16), KeyProjection.identity(16)).any()  # no NaN for a zero key


def test_fit_projection_caps_directions():
    rng = np.random.default_rng(4)
    keys = rng.normal(size=(3, 8))
    assert fit_projection(keys, 8).dirs.shape == (2, 8)  # at most N - 1 (centred rank)
    assert fit_projection(keys, 0).dirs.shape == (0, 8)
    assert fit_projection(keys[:1], 3).dirs.shape == (0, 8)
    assert fit_projection(rng.normal(size=(50, 4)), 9).dirs.shape == (4, 4)


def test_projection_lifts_retrieval_of_content_under_shared_directions():
    """Keys dominated by shared high-variance directions ("phrasing") retrieve by content once
    the top directions are removed (the all-but-the-top finding in docs/method.md)."""
    rng = np.random.default_rng(5)
    dim, n_items, per_item = 48, 20, 3
    content = rng.normal(size=(n_items, dim))
    style_basis, _ = np.linalg.qr(rng.normal(size=(dim, 3)))

    def phrase(item: int) -> np.ndarray:
        return 10.0 + content[item] + (rng.normal(size=3) * [40.0, 25.0, 15.0]) @ style_basis.T

    mem = np.stack([phrase(i) for i in range(n_items) for _ in range(per_item)])
    labels = np.repeat(np.arange(n_items), per_item)
    queries = np.stack([phrase(i) for i in range(n_items)])

    def precision(proj: KeyProjection) -> float:
        keys = effective_keys(mem, proj)
        hits = [np.mean(labels[topk_exact(effective_keys(q, proj), keys, per_item)[0]] == i)
                for i, q in enumerate(queries)]
        return float(np.mean(hits))

    raw = precision(KeyProjection.identity(dim))
    projected = precision(fit_projection(mem, 3))
    assert raw < 0.5 and projected > 0.9, (raw, projected)


def test_topk_exact_equals_argsort_reference():
    rng = np.random.default_rng(6)
    keys = rng.normal(size=(500, 24)).astype(np.float32)
    for _ in range(20):
        q = rng.normal(size=24).astype(np.float32)
        sims = keys @ q
        for k in (1, 5, 37):
            idx, s = topk_exact(q, keys, k)
            ref = np.argsort(-sims, kind="stable")[:k]
            assert idx.dtype == np.int64 and s.dtype == np.float32
            assert idx.tolist() == ref.tolist()
            assert np.array_equal(s, sims[ref])
    idx, s = topk_exact(q, keys[:3], 10)  # k > N: all, best first
    assert idx.tolist() == np.argsort(-(keys[:3] @ q)).tolist()
    idx, s = topk_exact(q, keys[:0], 4)
    assert idx.shape == s.shape == (0,)


@pytest.mark.parametrize("tau", [0.01, 0.05, 1.0, 7.5])
def test_retrieval_weights_equal_softmax(tau):
    rng = np.random.default_rng(7)
    sims = rng.uniform(-1, 1, size=8)
    ref = np.exp(sims / tau) / np.exp(sims / tau).sum()
    alpha = retrieval_weights(sims, tau)
    assert alpha.dtype == np.float32
    np.testing.assert_allclose(alpha, ref, rtol=1e-5, atol=1e-30)
    assert abs(float(alpha.sum()) - 1.0) < 1e-6
    order = np.argsort(-sims)
    assert np.all(np.diff(alpha[order]) <= 0)  # monotone in the similarity (ties only by underflow)


def test_retrieval_weights_extremes():
    alpha = retrieval_weights(np.array([1000.0, 999.0, -1000.0]), 0.01)  # would overflow without max shift
    assert np.all(np.isfinite(alpha)) and alpha[0] > 0.999 and abs(float(alpha.sum()) - 1) < 1e-6
    assert retrieval_weights(np.array([0.3]), 0.05).tolist() == [1.0]
    np.testing.assert_allclose(retrieval_weights(np.full(4, 0.7), 0.1), 0.25, rtol=1e-6)
    assert retrieval_weights(np.zeros(0), 0.1).shape == (0,)


def test_softplus_and_sigmoid():
    assert softplus(0.0) == pytest.approx(np.log(2.0))
    assert softplus(50.0) == pytest.approx(50.0)
    assert softplus(-50.0) == pytest.approx(np.exp(-50.0), rel=1e-6)
    x = np.array([-3.0, 0.0, 2.0])
    np.testing.assert_allclose(sigmoid(x), 1 / (1 + np.exp(-x)), rtol=1e-12)
    assert sigmoid(0.0) == 0.5


# --- phrasing directions -----------------------------------------------------------
def phrased_keys(seed: int, items: int = 16, templates: int = 12, dim: int = 48, span: int = 10):
    """Key = item vector (scale 1) + template vector (scale 4, in a ``span``-dimensional phrasing
    subspace) + noise: the phrasing dominates. -> train keys [items * 2, dim] (each item in two of
    the first templates), their item labels, query keys [items, dim] (each item in the last template,
    which no train key uses)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, span)))[0].T  # [span, dim]
    item, tmpl = rng.normal(size=(items, dim)), 4.0 * rng.normal(size=(templates, span)) @ basis
    train, labels, queries = [], [], []
    for i in range(items):
        for t in (i % (templates - 1), (i + 1 + i // (templates - 1)) % (templates - 1)):
            train.append(item[i] + tmpl[t] + 0.05 * rng.normal(size=dim))
            labels.append(i)
        queries.append(item[i] + tmpl[-1] + 0.05 * rng.normal(size=dim))
    return np.stack(train), labels, np.stack(queries)


def test_class_residuals_are_deviations_from_the_class_mean():
    keys = np.arange(12, dtype=np.float64).reshape(4, 3) ** 1.5
    res = class_residuals(keys, ["a", "b", "a", "c"])  # b and c are singletons: no residual
    np.testing.assert_allclose(res, np.stack([keys[0] - (keys[0] + keys[2]) / 2, keys[2] - (keys[0] + keys[2]) / 2]))
    assert class_residuals(keys, ["a", "b", "c", "d"]).shape == (0, 3)


def test_the_sketch_keeps_the_summed_scatter():
    rng = np.random.default_rng(3)
    r1, r2 = rng.normal(size=(5, 16)), rng.normal(size=(7, 16))
    full = update_sketch(update_sketch(None, r1, 64), r2, 64)  # rank large enough: exact
    np.testing.assert_allclose(full.T.astype(np.float64) @ full, r1.T @ r1 + r2.T @ r2, atol=1e-4)
    low = update_sketch(update_sketch(None, r1, 3), r2, 3)
    assert low.shape == (3, 16)
    top = np.linalg.svd(np.concatenate([r1, r2]), full_matrices=False)[2][:1]  # the strongest direction survives
    assert abs(float(sketch_dirs(low, 1)[0] @ top[0])) > 0.95


def test_fit_projection_removes_fixed_directions_first():
    keys, planted = planted_keys(2)
    fixed = np.linalg.qr(np.random.default_rng(5).normal(size=(32, 2)))[0].T  # [2, 32]
    proj = fit_projection(keys, 3, fixed)
    assert proj.dirs.shape == (5, 32)
    np.testing.assert_allclose(proj.dirs @ proj.dirs.T, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(effective_keys(keys, proj) @ fixed.T, 0.0, atol=1e-5)  # fixed removed
    # without fixed directions: exactly the all-but-the-top of before
    np.testing.assert_array_equal(fit_projection(keys, 3, None).dirs, fit_projection(keys, 3).dirs)


def test_phrasing_directions_make_retrieval_find_the_item_not_the_phrasing():
    train, labels, queries = phrased_keys(0)

    def recall(proj):
        S = effective_keys(queries, proj) @ effective_keys(train, proj).T  # [items, 2 * items]
        return float(np.mean([labels[int(np.argmax(S[i]))] == i for i in range(len(queries))]))

    plain = recall(fit_projection(train, 3))
    sketch = update_sketch(None, class_residuals(train, labels), 64)
    phrased = recall(memory_projection(train, sketch, 10, 3))  # 10: the phrasing span
    assert len(memory_projection(train, sketch, 10, 3).dirs) == 10  # no principal directions beside them
    np.testing.assert_array_equal(memory_projection(train, None, 10, 3).dirs, fit_projection(train, 3).dirs)
    assert plain <= 0.5 and phrased == 1.0, (plain, phrased)
