"""Choosing the next token from logits: greedy, temperature and nucleus (top-p)."""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InputError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")


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
