"""Choosing the next token from logits: greedy or sampled, with the controls users of other
runtimes expect, in the order Hugging Face's ``generate`` applies them: repetition penalty,
temperature, top-k, top-p (nucleus), min-p."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgekv.configs import Config, knob
from edgekv.errors import InputError


@dataclass(frozen=True)
class SamplingConfig(Config):
    """How the next token is chosen."""

    temperature: float = knob(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = knob(1.0, "Nucleus sampling mass kept.")
    seed: int | None = knob(None, "Sampling seed (default: fresh randomness).")
    top_k: int = knob(0, "Sample among the k most likely tokens only; 0 = all.")
    min_p: float = knob(0.0, "Drop tokens less likely than min_p x the most likely one; 0 = off.")
    repetition_penalty: float = knob(1.0, "Penalty > 1 for tokens already in the prompt or the answer "
                                          "(logit / p if positive, x p if negative); 1 = off. Also greedy.")

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InputError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise InputError(f"SamplingConfig.top_k must be an integer >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise InputError(f"SamplingConfig.min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise InputError(f"SamplingConfig.repetition_penalty must be > 0, got {self.repetition_penalty}")


def penalize(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """Repetition penalty (CTRL; Hugging Face's RepetitionPenaltyLogitsProcessor): the logit of
    every token in ``history`` divided by ``penalty`` when positive, multiplied when negative.
    logits [V] -> [V] float64"""
    z = logits.astype(np.float64)
    if penalty != 1.0 and len(history):
        seen = np.unique(np.asarray(history, np.int64))
        z[seen] = np.where(z[seen] > 0, z[seen] / penalty, z[seen] * penalty)
    return z


def sampling_probs(logits: np.ndarray, cfg: SamplingConfig, history: Sequence[int] = ()) -> np.ndarray:
    """The distribution a sampled token is drawn from (temperature > 0). logits [V] -> p [V] float64"""
    z = penalize(logits, history, cfg.repetition_penalty) / cfg.temperature
    if 0 < cfg.top_k < len(z):
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z >= kth, z, -np.inf)  # ties with the k-th are kept, as in Hugging Face
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, cfg.top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    if cfg.min_p > 0:
        p = np.where(p >= cfg.min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


def next_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator,
               history: Sequence[int] = ()) -> int:
    """logits: [V] float -> token id; ``history``: the ids so far (prompt + answer), for the
    repetition penalty."""
    if cfg.temperature == 0:
        return int(np.argmax(penalize(logits, history, cfg.repetition_penalty)))
    p = sampling_probs(logits, cfg, history)
    return int(rng.choice(len(p), p=p))
