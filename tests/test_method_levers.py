"""Method levers measured on val before they become defaults: task-balanced J (beta scaled by the
number of earlier tasks) and ``rare`` key pooling (mean weighted by log(1 + token id) ** 2)."""

from __future__ import annotations

import math

import pytest
import torch

from edgekv.host.keymodel import pool_hidden, rare_weights
from edgekv.induce.adapt import task_balanced
from edgekv.induce.config import AdaptConfig, SelectionConfig


def test_task_balanced_scales_beta_by_earlier_tasks_only_when_asked():
    off = AdaptConfig(selection=SelectionConfig(beta=0.5))
    assert task_balanced(off, 5) is off  # default: unchanged
    on = AdaptConfig(selection=SelectionConfig(beta=0.5, balance_tasks=True))
    assert task_balanced(on, 5).selection.beta == pytest.approx(2.5)
    assert task_balanced(on, 1).selection.beta == pytest.approx(0.5)  # one earlier task: already balanced
    assert task_balanced(on, 0).selection.beta == pytest.approx(0.5)
    assert task_balanced(on, 5).selection.gamma == on.selection.gamma  # nothing else moves


def test_rare_weights_are_log1p_id_squared():
    ids = torch.tensor([[0, 1, 99, 49151]])
    expect = [math.log1p(i) ** 2 for i in (0, 1, 99, 49151)]
    assert rare_weights(ids)[0].tolist() == pytest.approx(expect, rel=1e-6)


def test_rare_pooling_is_the_weighted_mean_over_unmasked_tokens():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 3, generator=g)
    ids = torch.tensor([[5, 300, 7000, 0], [2, 40000, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = pool_hidden(h, mask, "rare", ids)
    for b in range(2):
        w = [math.log1p(int(i)) ** 2 * int(m) for i, m in zip(ids[b], mask[b], strict=True)]
        ref = sum(w[s] * h[b, s] for s in range(4)) / sum(w)
        assert torch.allclose(got[b], ref, atol=1e-6)
    # padding never counts, whatever token id it carries
    ids2 = ids.clone()
    ids2[0, 3] = 49000
    assert torch.allclose(pool_hidden(h, mask, "rare", ids2), got)
    # the rare token dominates the mean: pooled is closer to its state than to the common one's
    assert torch.dist(got[1], h[1, 1]) < torch.dist(got[1], h[1, 0])


def test_rare_pooling_needs_the_ids():
    with pytest.raises(ValueError, match="token ids"):
        pool_hidden(torch.zeros(1, 2, 3), torch.ones(1, 2), "rare")
