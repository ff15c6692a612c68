"""int8 / int4 KV quantisation against a reference, its error bound, and the slot budget it buys.

Also the size arithmetic through ``edgekv profile``: SmolLM2-135M's shape at m=64, where an
int8 slot (with its table row) must cost at most 0.53x an fp16 one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.errors import InputError
from edgekv.quant import (
    dequantize_keys,
    dequantize_values,
    error_bound,
    pack_int4,
    quantize_keys,
    quantize_values,
    unpack_int4,
)
from edgekv.units import parse_size

L, H, M, D = 3, 2, 16, 8


def up16(y: np.ndarray) -> np.ndarray:
    """Reference: the smallest float16 >= y (1.0 where y == 0)."""
    y = np.asarray(y, np.float64)
    res = np.empty(y.shape, np.float16)
    for i, val in np.ndenumerate(y):
        h = np.float16(val)
        while float(h) < val:
            h = np.nextafter(h, np.float16(np.inf))
        while float(h) > val and float(np.nextafter(h, np.float16(-np.inf))) >= val:
            h = np.nextafter(h, np.float16(-np.inf))
        res[i] = h if val > 0 else np.float16(1.0)
    return res


def payloads(seed: int, dtype) -> list[np.ndarray]:
    """[L, H, M, D] test payloads: normal, outliers, zeros, tiny values, half-way points, large."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(L, H, M, D))
    outliers = x.copy()
    outliers[..., 3] *= 300.0  # one outlier channel (what per-channel key scales are for)
    outliers[:, :, 5, :] *= 50.0  # one outlier token
    zeros = x.copy()
    zeros[..., 1] = 0.0  # an all-zero channel
    zeros[:, :, 2, :] = 0.0  # an all-zero token
    zeros[0] = 0.0  # an all-zero layer
    tiny = x * 1e-6
    tiny[1] *= 1e-30  # below float16's range: the scale becomes the smallest float16 subnormal
    # values on, and one float step either side of, rounding half-way points (q + 0.5) * s
    s = np.float64(np.float16(0.0137))
    q = rng.integers(-126, 126, size=(L, H, M, D))
    half = ((q + 0.5) * s).astype(dtype)
    step = rng.integers(-1, 2, size=half.shape)  # -1, 0, +1 steps of ``dtype``
    half = np.where(step == 0, half, np.nextafter(half, np.where(step > 0, np.inf, -np.inf).astype(dtype)))
    half[..., 0, :] = 127 * s  # so the per-channel (key) scales are s
    half[..., :, 0] = 127 * s  # and the per-token (value) scales too
    large = rng.uniform(-1000, 1000, size=(L, H, M, D))
    return [a.astype(dtype) for a in (x, outliers, zeros, tiny, half, large)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_within_error_bound(dtype):
    for i, x in enumerate(payloads(31, dtype)):
        kq, ks = quantize_keys(x)
        vq, vs = quantize_values(x)
        assert kq.dtype == np.int8 and vq.dtype == np.int8 and kq.shape == vq.shape == x.shape
        assert ks.dtype == np.float16 and ks.shape == (L, H, D)  # per channel
        assert vs.dtype == np.float16 and vs.shape == (L, H, M)  # per token
        assert kq.min() >= -127 and vq.min() >= -127
        # scales are the reference up16(absmax / 127)
        x64 = x.astype(np.float64)
        assert np.array_equal(ks, up16(np.abs(x64).max(axis=-2) / 127)), i
        assert np.array_equal(vs, up16(np.abs(x64).max(axis=-1) / 127)), i
        # codes are the nearest level (ties to even)
        assert np.array_equal(kq, np.rint(x64 / ks.astype(np.float64)[..., None, :]).astype(np.int8)), i
        assert np.array_equal(vq, np.rint(x64 / vs.astype(np.float64)[..., :, None]).astype(np.int8)), i
        # and the error stays within the bound the scales give
        kd, vd = dequantize_keys(kq, ks), dequantize_values(vq, vs)
        assert kd.dtype == vd.dtype == np.float32
        kerr, verr = np.abs(kd - x64), np.abs(vd - x64)
        assert np.all(kerr <= error_bound(ks)[..., None, :]), (i, (kerr / ks.astype(np.float64)[..., None, :]).max())
        assert np.all(verr <= error_bound(vs)[..., :, None]), (i, (verr / vs.astype(np.float64)[..., :, None]).max())
        # the bound is s/2, no looser
        np.testing.assert_allclose(error_bound(ks), ks.astype(np.float32) / 2, rtol=1e-5, atol=1e-12)
    # zero channels and tokens come back exactly
    x = payloads(31, dtype)[2]
    assert not dequantize_keys(*quantize_keys(x))[..., 1].any()
    assert not dequantize_values(*quantize_values(x))[:, :, 2, :].any()


def test_half_way_points_round_to_the_nearest_level():
    """x = (q + 0.5 + tiny) * s must give q + 1; float32 arithmetic used to give q."""
    s = np.float64(np.float16(0.0137))
    x = np.array([[100.5 * s * (1 + 2e-8), -40.5 * s * (1 + 3e-8)], [127 * s, 127 * s]])
    q, scale = quantize_keys(x)
    assert scale.tolist() == [np.float16(0.0137)] * 2
    assert q[0].tolist() == [101, -41]
    assert np.all(np.abs(dequantize_keys(q, scale) - x) <= error_bound(scale))


def test_dequantise_with_factor_equals_factor_times_plain():
    rng = np.random.default_rng(32)
    x = rng.normal(size=(L, H, M, D)).astype(np.float32)
    kq, ks = quantize_keys(x)
    vq, vs = quantize_values(x)
    plain_k, plain_v = dequantize_keys(kq, ks), dequantize_values(vq, vs)
    for factor in (0.37, np.float32(2.5), np.array([0.1, 0.5, 2.0], np.float32)):
        f = np.asarray(factor, np.float32).reshape(-1, 1, 1, 1) if np.ndim(factor) else factor
        np.testing.assert_allclose(dequantize_keys(kq, ks, factor), f * plain_k, rtol=1e-6)
        np.testing.assert_allclose(dequantize_values(vq, vs, factor), f * plain_v, rtol=1e-6)
    # a per-layer factor scales each layer by its own value (and not some other axis)
    out = dequantize_values(vq, vs, np.array([0.0, 1.0, 3.0]))
    assert not out[0].any() and np.array_equal(out[1], plain_v[1])
    np.testing.assert_allclose(out[2], 3 * plain_v[2], rtol=1e-6)
    out = dequantize_keys(kq, ks, np.array([2.0, 0.0, 1.0]))
    assert np.array_equal(out[0], 2 * plain_k[0]) and not out[1].any() and np.array_equal(out[2], plain_k[2])


@pytest.mark.parametrize("bad, msg", [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (-np.inf, "NaN or inf"),
                                      (2e9, "exceed the float16 scale range")])
def test_bad_values_are_refused(bad, msg):
    x = np.ones((L, H, M, D), np.float32)
    x[1, 0, 3, 2] = bad
    with pytest.raises(InputError, match=msg):
        quantize_keys(x)
    with pytest.raises(InputError, match=msg):
        quantize_values(x)


# --------------------------------------------------------------------------------------
# int4: qmax = 7, packed two codes per byte
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_int4_round_trip_within_error_bound(dtype):
    for i, x in enumerate(payloads(33, dtype)):
        kq, ks = quantize_keys(x, qmax=7)
        vq, vs = quantize_values(x, qmax=7)
        assert kq.dtype == vq.dtype == np.int8 and kq.shape == vq.shape == x.shape
        assert ks.shape == (L, H, D) and vs.shape == (L, H, M)
        assert np.abs(kq).max() <= 7 and np.abs(vq).max() <= 7, i
        x64 = x.astype(np.float64)
        assert np.array_equal(ks, up16(np.abs(x64).max(axis=-2) / 7)), i
        assert np.array_equal(vs, up16(np.abs(x64).max(axis=-1) / 7)), i
        assert np.array_equal(kq, np.rint(x64 / ks.astype(np.float64)[..., None, :]).astype(np.int8)), i
        kerr = np.abs(dequantize_keys(kq, ks) - x64)
        verr = np.abs(dequantize_values(vq, vs) - x64)
        assert np.all(kerr <= error_bound(ks)[..., None, :]), i
        assert np.all(verr <= error_bound(vs)[..., :, None]), i
    # the levels are used: a channel whose maximum is 7 s gets the code 7, not 127's share of it
    x = payloads(33, dtype)[0]
    assert np.abs(quantize_keys(x, qmax=7)[0]).max(axis=-2).min() == 7
    # int8 is the default and unchanged by the keyword
    for a, b in zip(quantize_keys(x), quantize_keys(x, qmax=127), strict=True):
        assert a.tobytes() == b.tobytes()


def test_int4_scales_refuse_values_beyond_float16_range():
    x = np.ones((L, H, M, D), np.float32)
    x[0, 0, 0, 0] = 5e5  # fits int8's scale range (8.3e6), not int4's (7 * 65504)
    quantize_keys(x)
    with pytest.raises(InputError, match=r"exceed the float16 scale range \(\|x\| > 4.6e5\)"):
        quantize_keys(x, qmax=7)


def test_pack_int4_round_trip_and_nibble_order():
    codes = np.arange(-7, 8, dtype=np.int8)  # every value
    pairs = np.stack(np.meshgrid(codes, codes, indexing="ij"), -1).reshape(-1, 2)  # [225, 2] every pair
    packed = pack_int4(pairs)
    assert packed.dtype == np.uint8 and packed.shape == (225, 1)
    assert np.array_equal(unpack_int4(packed), pairs)
    # element 2i in the low nibble, 2i+1 in the high one, two's complement
    assert pack_int4(np.array([1, 2], np.int8)).tolist() == [0x21]
    assert pack_int4(np.array([-1, 7], np.int8)).tolist() == [0x7F]
    assert pack_int4(np.array([7, -7], np.int8)).tolist() == [0x97]
    assert pack_int4(np.array([-7, 0, 0, -2], np.int8)).tolist() == [0x09, 0xE0]
    assert unpack_int4(np.array([0x8F], np.uint8)).tolist() == [-1, -8]  # -8 reads back (never written)
    rng = np.random.default_rng(34)
    for shape in [(L, H, M, D), (5, 2), (1, 64)]:
        q = rng.integers(-7, 8, size=shape).astype(np.int8)
        p = pack_int4(q)
        assert p.shape == shape[:-1] + (shape[-1] // 2,)
        assert np.array_equal(unpack_int4(p), q)
        ref = ((q[..., 0::2].astype(np.int64) & 15) | ((q[..., 1::2].astype(np.int64) & 15) << 4))
        assert np.array_equal(p, ref.astype(np.uint8))


@pytest.mark.parametrize("q, msg", [
    (np.array([0, 8], np.int8), r"int4 codes must be in \[-7, 7\], got values in \[0, 8\]"),
    (np.array([-8, 0], np.int8), r"int4 codes must be in \[-7, 7\], got values in \[-8, 0\]"),
    (np.array([[1, 2, 3]], np.int8), r"even last axis, got shape \(1, 3\)"),
    (np.array([0.5, 1.0]), "int4 codes must be integers, got dtype float64"),
])
def test_pack_int4_refuses_out_of_range_and_odd_d(q, msg):
    with pytest.raises(InputError, match=msg):
        pack_int4(q)


# --------------------------------------------------------------------------------------
# the budget this buys: edgekv profile
# --------------------------------------------------------------------------------------
def profile(*args: str) -> dict:
    res = CliRunner().invoke(app, ["profile", "--model", "smollm2-135m", "--pooled-len", "64", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_int8_slot_is_at_most_053_of_fp16_for_smollm2():
    i8, f16 = profile("--budget", "64MiB", "--payload", "int8"), profile("--budget", "64MiB", "--payload", "fp16")
    for d in (i8, f16):
        assert {"slot_bytes", "num_slots", "payload_bytes_per_slot", "key_bytes_per_slot", "overhead_bytes"} <= set(d)
        assert (d["num_layers"], d["num_kv_heads"], d["head_dim"], d["pooled_len"]) == (30, 3, 64, 64)
        assert d["key_bytes_per_slot"] == 4 * 576
        assert d["budget_bytes"] == 64 << 20
        assert d["num_slots"] == (d["budget_bytes"] - d["overhead_bytes"]) // (d["slot_bytes"] + 64)
        assert d["file_bytes"] == d["overhead_bytes"] + d["num_slots"] * (d["slot_bytes"] + 64) <= d["budget_bytes"]
    payload = 30 * 3 * 64 * 64  # L H m D
    assert i8["payload_bytes_per_slot"] == 2 * payload and f16["payload_bytes_per_slot"] == 4 * payload
    assert i8["scale_bytes_per_slot"] == 2 * (30 * 3 * 64) * 2 and f16["scale_bytes_per_slot"] == 0
    assert i8["slot_bytes"] == 762_624 and f16["slot_bytes"] == 1_476_864
    ratio = (i8["slot_bytes"] + i8["table_bytes_per_slot"]) / (f16["slot_bytes"] + f16["table_bytes_per_slot"])
    assert ratio <= 0.53, ratio
    assert i8["num_slots"] == 87 and f16["num_slots"] == 45
    assert i8["memory_tokens_per_layer"] == 4 * 64


@pytest.mark.parametrize("text, want", [("16MB", 16_000_000), ("16MiB", 16 << 20), ("1048576", 1 << 20),
                                        ("64mib", 64 << 20), ("1.5 KB", 1500), ("2GiB", 2 << 30)])
def test_sizes_parse(text, want):
    assert parse_size(text) == want
    if want >= 16_000_000:
        assert profile("--budget", text)["budget_bytes"] == want


@pytest.mark.parametrize("text", ["16XB", "-5", "MiB", "", "1e6", "16 M B"])
def test_bad_size_exits_3_with_one_line(text):
    res = CliRunner().invoke(app, ["profile", "--model", "smollm2-135m", "--budget", text, "--json"])
    assert res.exit_code == 3
    assert res.stdout == ""
    assert res.stderr == (f"edgekv: error: cannot parse size {text!r}: use bytes (1048576), SI units (16MB) "
                          "or binary units (16MiB)\n")
    with pytest.raises(InputError):
        parse_size(text)
