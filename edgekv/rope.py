"""Rotary position embeddings (RoPE) as pure numpy: remove and re-apply.

Cached keys of RoPE models carry their position. edgekv stores memory keys
*position-free* (the exact inverse rotation applied) and the runtime rotates them into
the positions it assigns. The convention is Hugging Face's ``rotate_half`` layout (the
first and second halves of the rotary dims pair up), used by Llama, Qwen2, Gemma and
most decoders: ``k_rot = (k * cos + rotate_half(k) * sin) * attention_scaling``.
Only the first ``rotary_dim`` channels rotate (partial rotary); the rest pass through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RopeSpec:
    """What is needed to rotate keys: inverse frequencies and the output scaling.

    ``inv_freq`` holds the model's (possibly rescaled, e.g. Llama-3 or YaRN) inverse
    frequencies, rotary_dim/2 of them, so every rope_type reduces to the same arithmetic.
    """

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)


def cos_sin(spec: RopeSpec, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """positions: [T] int -> cos, sin: [T, rotary_dim] float32 (duplicated halves, HF layout)."""
    inv = np.asarray(spec.inv_freq, dtype=np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv[None, :]  # [T, rd/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, rd]
    return np.cos(emb), np.sin(emb)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(k: np.ndarray, spec: RopeSpec, positions: np.ndarray) -> np.ndarray:
    """Rotate position-free keys into ``positions``.

    k: [..., T, D] float32, positions: [T] -> [..., T, D] float32
    """
    rd = spec.rotary_dim
    cos, sin = cos_sin(spec, positions)
    rot, rest = k[..., :rd], k[..., rd:]
    out = (rot * cos + _rotate_half(rot) * sin) * np.float32(spec.attention_scaling)
    return np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def remove_rope(k: np.ndarray, spec: RopeSpec, positions: np.ndarray) -> np.ndarray:
    """Exact inverse of :func:`apply_rope` (rotation by -position, scaling undone).

    k: [..., T, D] float32 keys at ``positions`` -> [..., T, D] position-free keys
    """
    rd = spec.rotary_dim
    cos, sin = cos_sin(spec, positions)
    rot, rest = k[..., :rd], k[..., rd:]
    out = (rot * cos - _rotate_half(rot) * sin) / np.float32(spec.attention_scaling)
    return np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out
