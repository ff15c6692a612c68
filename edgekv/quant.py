"""Symmetric int8 quantisation of KV payloads, as small pure numpy functions.

Keys are quantised per channel (one scale per head-dim channel, shared over the pooled
tokens) and values per token (one scale per token, shared over channels), as in KIVI:
keys have outlier channels, values do not. Scales are stored as float16. A scale is
rounded *up* to the next float16 so that ``|x| <= 127 * scale`` always holds and the
round-trip error is bounded by ``scale / 2`` per element (see :func:`error_bound`).

Dequantisation takes an extra multiplicative factor per entry and per layer, which is
where InduceKV folds ``sqrt(k * alpha_i)`` (keys and values) and the value gate
``lambda_l`` (values): scaling then costs nothing beyond the dequantisation itself.
"""

from __future__ import annotations

import numpy as np

from edgekv.errors import InputError

QMAX = 127
_FP16_MAX = float(np.finfo(np.float16).max)


def _scale_fp16(absmax: np.ndarray) -> np.ndarray:
    """float16 scales with ``127 * scale >= absmax`` (rounded up); 1.0 where absmax is 0."""
    if not np.all(np.isfinite(absmax)):
        raise InputError("cannot quantise a KV payload that contains NaN or inf")
    scale = absmax.astype(np.float64) / QMAX
    if np.any(scale > _FP16_MAX):
        raise InputError("KV payload values exceed the float16 scale range (|x| > 8.3e6)")
    s16 = scale.astype(np.float16)
    low = s16.astype(np.float64) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    s16[absmax == 0] = np.float16(1.0)
    return s16


def _quantise(x: np.ndarray, scale16: np.ndarray) -> np.ndarray:
    # float64: the division is then exact enough that rint picks the nearest level for
    # float32 and float64 inputs alike (in float32, x/s can round onto a half-way point)
    q = np.rint(x.astype(np.float64) / scale16.astype(np.float64))
    return np.clip(q, -QMAX, QMAX).astype(np.int8)


def quantize_keys(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, per channel (reduce over the token axis -2).

    k: [..., m, D] float -> (q [..., m, D] int8, scales [..., D] float16)
    """
    scale = _scale_fp16(np.max(np.abs(k), axis=-2))
    return _quantise(k, scale[..., None, :]), scale


def quantize_values(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, per token (reduce over the channel axis -1).

    v: [..., m, D] float -> (q [..., m, D] int8, scales [..., m] float16)
    """
    scale = _scale_fp16(np.max(np.abs(v), axis=-1))
    return _quantise(v, scale[..., :, None]), scale


def dequantize_keys(q: np.ndarray, scales: np.ndarray, factor: np.ndarray | float = 1.0) -> np.ndarray:
    """Float32 keys from int8 and per-channel scales, times ``factor``.

    q: [L, H, m, D] int8, scales: [L, H, D] f16, factor: scalar or [L] -> [L, H, m, D] f32
    """
    s = scales.astype(np.float32) * _per_layer(factor, scales.ndim)
    return q.astype(np.float32) * s[..., None, :]


def dequantize_values(q: np.ndarray, scales: np.ndarray, factor: np.ndarray | float = 1.0) -> np.ndarray:
    """Float32 values from int8 and per-token scales, times ``factor``.

    q: [L, H, m, D] int8, scales: [L, H, m] f16, factor: scalar or [L] -> [L, H, m, D] f32
    """
    s = scales.astype(np.float32) * _per_layer(factor, scales.ndim)
    return q.astype(np.float32) * s[..., :, None]


def _per_layer(factor: np.ndarray | float, ndim: int) -> np.ndarray:
    """A scalar or per-layer [L] factor, shaped to broadcast over [L, ...] with ``ndim`` axes."""
    f = np.asarray(factor, dtype=np.float32)
    if f.ndim == 0:
        return f
    return f.reshape(f.shape + (1,) * (ndim - f.ndim))


def error_bound(scales: np.ndarray) -> np.ndarray:
    """Largest possible |x - dequantise(quantise(x))| for elements using ``scales``: scale/2.

    Exact for round-to-nearest with no clipping, which the rounded-up scales guarantee;
    a float32 relative slack of 1e-6 covers the arithmetic.
    """
    s = scales.astype(np.float32)
    return s / 2 * (1 + 1e-6) + 1e-12
