"""Sampling controls against Hugging Face's logits processors (the reference users know):
repetition penalty, temperature, top-k, top-p, min-p, alone and combined; greedy with a
repetition penalty; draws follow the distribution; the runtime passes the controls through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekv.errors import InputError
from edgekv.runtime.sampling import SamplingConfig, next_token, penalize, sampling_probs


def hf_probs(logits: np.ndarray, cfg: SamplingConfig, history: list[int]) -> np.ndarray:
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([history], dtype=torch.long)
    z = torch.from_numpy(logits.astype(np.float64))[None]
    procs = []
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    procs.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        procs.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        procs.append(TopPLogitsWarper(cfg.top_p))
    if cfg.min_p:
        procs.append(MinPLogitsWarper(cfg.min_p))
    for p in procs:
        z = p(ids, z)
    return torch.softmax(z, -1)[0].numpy()


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=1.3, top_p=0.8),
    SamplingConfig(temperature=0.9, min_p=0.05),
    SamplingConfig(temperature=1.0, repetition_penalty=1.3),
    SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.15),
])
def test_distribution_equals_hugging_face(cfg):
    rng = np.random.default_rng(0)
    for _ in range(5):
        logits = rng.normal(0, 3, size=200).astype(np.float32)
        history = rng.integers(0, 200, size=30).tolist()
        ours, ref = sampling_probs(logits, cfg, history), hf_probs(logits, cfg, history)
        assert np.abs(ours - ref).max() <= 1e-6, np.abs(ours - ref).max()
        assert ours.sum() == pytest.approx(1.0)


def test_each_control_changes_the_distribution():
    rng = np.random.default_rng(1)
    logits, history = rng.normal(0, 2, size=100), list(range(10))
    base = sampling_probs(logits, SamplingConfig(temperature=1.0), history)
    assert (base > 0).all()
    assert (sampling_probs(logits, SamplingConfig(temperature=1.0, top_k=3), history) > 0).sum() == 3
    assert (sampling_probs(logits, SamplingConfig(temperature=1.0, min_p=0.2), history) > 0).sum() < 100
    rep = sampling_probs(logits, SamplingConfig(temperature=1.0, repetition_penalty=2.0), history)
    pos = [t for t in history if logits[t] > 0]
    assert pos and all(rep[t] < base[t] for t in pos)  # seen tokens with positive logits lose mass


def test_greedy_with_repetition_penalty_and_sampled_frequencies():
    logits = np.array([3.0, 2.9, -1.0, 0.5])
    assert next_token(logits, SamplingConfig(), np.random.default_rng(0), [0]) == 0  # no penalty: argmax
    assert next_token(logits, SamplingConfig(repetition_penalty=1.5), np.random.default_rng(0), [0]) == 1
    assert np.allclose(penalize(logits, [0, 2, 2], 2.0), [1.5, 2.9, -2.0, 0.5])
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    rng = np.random.default_rng(0)
    draws = np.bincount([next_token(logits, cfg, rng) for _ in range(4000)], minlength=4)
    p = sampling_probs(logits, cfg)
    assert draws[2] == draws[3] == 0 and abs(draws[0] / 4000 - p[0]) < 0.03


@pytest.mark.parametrize("bad, phrase", [
    (dict(top_k=-1), "top_k must be an integer >= 0"), (dict(min_p=1.0), "min_p must be in [0, 1)"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
])
def test_bad_values_are_refused(bad, phrase):
    with pytest.raises(InputError, match=phrase.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        SamplingConfig(**bad)


def test_runtime_applies_the_controls(exported):
    from edgekv.runtime import Runtime

    with Runtime.load(exported("llama"), k=0, threads=1) as rt:
        plain = rt.generate("code for river?", 12)
        again = rt.generate("code for river?", 12, top_k=1, temperature=1.0, seed=3)  # top-1 sampling is greedy
        assert again.token_ids == plain.token_ids
        pen = rt.generate("code for river?", 12, repetition_penalty=5.0)
        assert pen.token_ids != plain.token_ids  # a strong penalty changes a 12-token greedy answer
        assert len(set(pen.token_ids)) >= len(set(plain.token_ids))
