"""Symmetric int8 / int4 quantisation of KV payloads, as small pure numpy functions.

Keys are quantised per channel (one scale per head-dim channel, shared over the pooled
tokens) and values per token (one scale per token, shared over channels), as in KIVI:
keys have outlier channels, values do not. Scales are stored as float16. A scale is
rounded *up* to the next float16 so that ``|x| <= qmax * scale`` always holds and the
round-trip error is bounded by ``scale / 2`` per element (see :func:`error_bound`).
``qmax`` is 127 for int8 payloads and 7 for int4 (:data:`QMAX_INT4`); int4 codes are
carried as int8 arrays with values in [-7, 7] and packed two per byte only in the file
(:func:`pack_int4` / :func:`unpack_int4`), so dequantisation is the same for both.

Dequantisation takes an extra multiplicative factor per entry and per layer, which is
where InduceKV folds ``sqrt(k * alpha_i)`` (keys and values) and the value gate
``lambda_l`` (values): scaling then costs nothing beyond the dequantisation itself.
"""

from __future__ import annotations

import numpy as np

from edgekv.errors import InputError

QMAX = 127  # int8 payloads: codes in [-127, 127]
QMAX_INT4 = 7  # int4 payloads: codes in [-7, 7] (-8 is never written)
_FP16_MAX = float(np.finfo(np.float16).max)


def _scale_fp16(absmax: np.ndarray, *, qmax: int = QMAX) -> np.ndarray:
    """float16 scales with ``qmax * scale >= absmax`` (rounded up); 1.0 where absmax is 0."""
    if not np.all(np.isfinite(absmax)):
        raise InputError("cannot quantise a KV payload that contains NaN or inf")
    scale = absmax.astype(np.float64) / qmax
    if np.any(scale > _FP16_MAX):
        mant, exp = f"{qmax * _FP16_MAX:.1e}".split("e")
        raise InputError(f"KV payload values exceed the float16 scale range (|x| > {mant}e{int(exp)})")
    s16 = scale.astype(np.float16)
    low = s16.astype(np.float64) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    s16[absmax == 0] = np.float16(1.0)
    return s16


def _quantise(x: np.ndarray, scale16: np.ndarray, *, qmax: int = QMAX) -> np.ndarray:
    # float64: the division is then exact enough that rint picks the nearest level for
    # float32 and float64 inputs alike (in float32, x/s can round onto a half-way point)
    q = np.rint(x.astype(np.float64) / scale16.astype(np.float64))
    return np.clip(q, -qmax, qmax).astype(np.int8)


def quantize_keys(k: np.ndarray, *, qmax: int = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric, per channel (reduce over the token axis -2); codes in [-qmax, qmax].

    k: [..., m, D] float -> (q [..., m, D] int8, scales [..., D] float16)
    """
    scale = _scale_fp16(np.max(np.abs(k), axis=-2), qmax=qmax)
    return _quantise(k, scale[..., None, :], qmax=qmax), scale


def quantize_values(v: np.ndarray, *, qmax: int = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric, per token (reduce over the channel axis -1); codes in [-qmax, qmax].

    v: [..., m, D] float -> (q [..., m, D] int8, scales [..., m] float16)
    """
    scale = _scale_fp16(np.max(np.abs(v), axis=-1), qmax=qmax)
    return _quantise(v, scale[..., :, None], qmax=qmax), scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two int4 codes per byte: element 2i in the low nibble, 2i+1 in the high one (two's complement).

    q: [..., D] int8 in [-7, 7], D even -> [..., D//2] uint8
    """
    q = np.asarray(q)
    if q.ndim == 0 or q.shape[-1] % 2:
        raise InputError(f"int4 packing needs an even last axis, got shape {q.shape}")
    if q.dtype.kind not in "iu":
        raise InputError(f"int4 codes must be integers, got dtype {q.dtype}")
    if q.size and (q.min() < -QMAX_INT4 or q.max() > QMAX_INT4):
        raise InputError(f"int4 codes must be in [-{QMAX_INT4}, {QMAX_INT4}], got values in [{q.min()}, {q.max()}]")
    nib = q.astype(np.uint8) & 0x0F  # two's complement: -1 -> 0xF
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(p: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_int4`.

    p: [..., n] uint8 -> [..., 2n] int8 (codes in [-8, 7]; [-7, 7] for bytes pack_int4 wrote)
    """
    p = np.asarray(p, np.uint8)
    lo = (p & 0x0F).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.int8)
    out[..., 0::2] = lo - ((lo & 8) << 1)  # sign-extend the nibble: 8..15 -> -8..-1
    out[..., 1::2] = hi - ((hi & 8) << 1)
    return out


def dequantize_keys(q: np.ndarray, scales: np.ndarray, factor: np.ndarray | float = 1.0) -> np.ndarray:
    """Float32 keys from int8 (or unpacked int4) codes and per-channel scales, times ``factor``.

    q: [L, H, m, D] int8, scales: [L, H, D] f16, factor: scalar or [L] -> [L, H, m, D] f32
    """
    s = scales.astype(np.float32) * _per_layer(factor, scales.ndim)
    return q.astype(np.float32) * s[..., None, :]


def dequantize_values(q: np.ndarray, scales: np.ndarray, factor: np.ndarray | float = 1.0) -> np.ndarray:
    """Float32 values from int8 (or unpacked int4) codes and per-token scales, times ``factor``.

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
