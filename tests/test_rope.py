"""RoPE removal and rotation (numpy) against its own algebra and against transformers."""

from __future__ import annotations

import numpy as np
import pytest

from edgekv.rope import RopeSpec, apply_rope, cos_sin, remove_rope


def default_spec(head_dim: int = 64, rotary_dim: int | None = None, theta: float = 10000.0,
                 scaling: float = 1.0) -> RopeSpec:
    rd = rotary_dim or head_dim
    inv = (1.0 / theta ** (np.arange(0, rd, 2) / rd)).astype(np.float32)
    return RopeSpec(tuple(inv.tolist()), scaling)


def keys(seed: int, shape=(3, 2, 7, 64)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = rng.normal(size=shape).astype(np.float32)
    pos = rng.integers(0, 8192, size=shape[-2])
    return k, pos


@pytest.mark.parametrize("rotary_dim, scaling", [(None, 1.0), (32, 1.0), (None, 1.37), (16, 0.8)])
def test_apply_remove_round_trip(rotary_dim, scaling):
    spec = default_spec(64, rotary_dim, scaling=scaling)
    k, pos = keys(1)
    np.testing.assert_allclose(remove_rope(apply_rope(k, spec, pos), spec, pos), k, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(apply_rope(remove_rope(k, spec, pos), spec, pos), k, atol=2e-6, rtol=1e-5)
    out = apply_rope(k, spec, pos)
    assert out.dtype == np.float32 and out.shape == k.shape


def test_rotation_preserves_pair_norms_and_position_zero_is_identity():
    spec = default_spec(64)
    k, pos = keys(2)
    out = apply_rope(k, spec, pos)
    half = 32
    np.testing.assert_allclose(np.hypot(out[..., :half], out[..., half:]), np.hypot(k[..., :half], k[..., half:]),
                               rtol=1e-5, atol=1e-6)
    zero = np.zeros(k.shape[-2], np.int64)
    assert np.array_equal(apply_rope(k, spec, zero), k)
    assert np.array_equal(remove_rope(k, spec, zero), k)


def test_reference_rotation_formula():
    """Channel pairs (i, i + rd/2) rotate by position * inv_freq[i] (HF rotate_half layout)."""
    spec = default_spec(8, 6, theta=100.0)  # rd 6 of head dim 8: pairs (0,3), (1,4), (2,5); 6, 7 pass
    k, pos = keys(3, (1, 1, 5, 8))
    out = apply_rope(k, spec, pos)
    ref = k.astype(np.float64).copy()
    for t, p in enumerate(pos):
        for i, f in enumerate(spec.inv_freq):
            a, b = k[0, 0, t, i], k[0, 0, t, i + 3]
            c, s = np.cos(p * np.float32(f)), np.sin(p * np.float32(f))
            ref[0, 0, t, i], ref[0, 0, t, i + 3] = a * c - b * s, b * c + a * s
    np.testing.assert_allclose(out, ref, atol=5e-4)  # float32 phases at positions up to 8191
    assert np.array_equal(out[..., 6:], k[..., 6:])  # partial rotary: the rest passes through


def test_attention_scaling_scales_the_rotated_part_only():
    k, pos = keys(4)
    plain, scaled = default_spec(64, 32), default_spec(64, 32, scaling=1.5)
    a, b = apply_rope(k, plain, pos), apply_rope(k, scaled, pos)
    np.testing.assert_allclose(b[..., :32], 1.5 * a[..., :32], rtol=1e-6, atol=1e-7)
    assert np.array_equal(b[..., 32:], k[..., 32:])


def test_scores_depend_only_on_relative_position():
    spec = default_spec(64)
    rng = np.random.default_rng(5)
    q, k = rng.normal(size=(2, 1, 64)).astype(np.float32)
    for p, r in [(3, 10), (100, 7), (1000, 999)]:
        base = float(apply_rope(q, spec, np.array([p]))[0] @ apply_rope(k, spec, np.array([r]))[0])
        moved = float(apply_rope(q, spec, np.array([p + 57]))[0] @ apply_rope(k, spec, np.array([r + 57]))[0])
        assert abs(base - moved) < 2e-4 * (1 + abs(base))


def test_cos_sin_layout():
    spec = default_spec(8)
    cos, sin = cos_sin(spec, np.array([0, 3]))
    assert cos.shape == sin.shape == (2, 8) and cos.dtype == np.float32
    assert np.array_equal(cos[:, :4], cos[:, 4:]) and np.array_equal(sin[:, :4], sin[:, 4:])
    np.testing.assert_allclose(cos[1, :4], np.cos(3 * np.asarray(spec.inv_freq)), rtol=1e-6)


# --------------------------------------------------------------------------------------
# equality with transformers (Llama rotary module and apply_rotary_pos_emb)
# --------------------------------------------------------------------------------------
ROPE_CONFIGS = {
    "default": {},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
    "partial": {"partial_rotary_factor": 0.5},
}


@pytest.mark.parametrize("kind", sorted(ROPE_CONFIGS))
def test_equals_transformers(kind):
    pytest.importorskip("transformers")
    import torch
    from tiny_models import tiny_config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = tiny_config("llama", 320)
    for name, value in ROPE_CONFIGS[kind].items():
        setattr(cfg, name, value)
    rotary = LlamaRotaryEmbedding(cfg)
    spec = RopeSpec(tuple(float(x) for x in rotary.inv_freq), float(rotary.attention_scaling))
    rd = spec.rotary_dim
    assert rd == (8 if kind == "partial" else 16)
    if kind == "yarn":
        assert spec.attention_scaling > 1.0
    if kind == "llama3":  # rescaled frequencies differ from the default ones
        assert not np.allclose(spec.inv_freq, default_spec(16).inv_freq)

    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 17, 130, 511, 4000]])
    q = torch.randn(1, 4, positions.shape[1], 16)
    k = torch.randn(1, 2, positions.shape[1], 16)
    cos, sin = rotary(k, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q[..., :rd], k[..., :rd], cos, sin)
    k_ref = torch.cat([k_ref, k[..., rd:]], dim=-1).numpy()  # partial rotary: rest passes through
    q_ref = torch.cat([q_ref, q[..., rd:]], dim=-1).numpy()

    pos = positions[0].numpy()
    np.testing.assert_allclose(apply_rope(k[0].numpy(), spec, pos), k_ref[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(apply_rope(q[0].numpy(), spec, pos), q_ref[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(remove_rope(k_ref[0], spec, pos), k[0].numpy(), atol=1e-5, rtol=1e-5)
    ours_cos, ours_sin = cos_sin(spec, pos)
    np.testing.assert_allclose(ours_cos * spec.attention_scaling, cos[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(ours_sin * spec.attention_scaling, sin[0].numpy(), atol=1e-6)
