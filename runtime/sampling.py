"""Choosing the next token from logits: greedy, temperature and nucleus (top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept when sampling
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


def next_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """logits: [V] float -> token id."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, cfg.top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))
