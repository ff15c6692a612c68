"""edgekv.compat: the one "does this memory belong to this model?" check. One test per rule.

Every refusal is a MismatchError on one line that names the field, both values and what to
do. ``adapt`` (check_compatible), ``export`` (check_memory) and the runtime (_check_memory)
all call it: the last tests check that each of them refuses through it.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from edgekv.compat import ModelSide, check_memory_matches, rope_difference
from edgekv.errors import MismatchError
from edgekv.format import MemorySpec
from edgekv.rope import RopeSpec

FP = "c3" * 32
ROPE = RopeSpec((1.0, 0.1, 0.01, 0.001), 1.0)
SPEC = MemorySpec(num_layers=3, num_kv_heads=2, head_dim=16, pooled_len=4, key_dim=32, model_fingerprint=FP,
                  rope=ROPE, key_layer=1, key_pooling="mean")
SIDE = ModelSide(FP, 3, 2, 16, 32, ROPE, 1, "mean", name="the model", key_source="the artifacts' key graph",
                 fix_model="FIX-MODEL", fix_key="FIX-KEY")


def refused(spec: MemorySpec = SPEC, side: ModelSide = SIDE) -> str:
    with pytest.raises(MismatchError) as e:
        check_memory_matches(spec, side, "m.ekv")
    msg = str(e.value)
    assert "\n" not in msg and "m.ekv" in msg
    return msg


def test_matching_memory_passes():
    check_memory_matches(SPEC, SIDE, "m.ekv")
    # values as the memory stores them (float32) still match the model's float64 ones
    side = dataclasses.replace(SIDE, rope=RopeSpec(tuple(x * (1 + 3e-8) for x in ROPE.inv_freq), 1.0 + 1e-8))
    check_memory_matches(SPEC, side, "m.ekv")


def test_unset_fields_are_not_checked():
    check_memory_matches(SPEC, ModelSide(), "m.ekv")
    check_memory_matches(dataclasses.replace(SPEC, key_layer=2, rope=None), ModelSide(FP, 3, 2, 16), "m.ekv")


def test_fingerprint():
    msg = refused(side=dataclasses.replace(SIDE, fingerprint="ab" * 32))
    assert "was built for another model (memory fingerprint c3c3c3c3c3c3, the model has abababababab)" in msg
    assert msg.endswith(": FIX-MODEL")


@pytest.mark.parametrize("field, value, text", [
    ("num_layers", 4, "(3, 2, 16), the model has (4, 2, 16) (num_layers 3 vs 4)"),
    ("num_kv_heads", 1, "(3, 2, 16), the model has (3, 1, 16) (num_kv_heads 2 vs 1)"),
    ("head_dim", 8, "(3, 2, 16), the model has (3, 2, 8) (head_dim 16 vs 8)"),
])
def test_each_kv_shape_field(field, value, text):
    msg = refused(side=dataclasses.replace(SIDE, **{field: value}))
    assert f"m.ekv holds KV of shape (layers, heads, head dim) {text}: FIX-MODEL" == msg


def test_key_dim():
    msg = refused(side=dataclasses.replace(SIDE, key_dim=64))
    assert "retrieval keys of dimension 32, the model has hidden size 64 (key_dim 32 vs 64): FIX-MODEL" in msg


@pytest.mark.parametrize("mem_rope, model_rope, text", [
    (None, ROPE, "no RoPE in the memory, RoPE over 8 dims, scaling 1 in the model"),
    (ROPE, None, "RoPE over 8 dims, scaling 1 in the memory, no RoPE in the model"),
    (ROPE, RopeSpec((1.0, 0.1), 1.0), "rotary dim 8 in the memory, 4 in the model"),
    (ROPE, RopeSpec(ROPE.inv_freq, 1.5), "attention scaling 1 in the memory, 1.5 in the model"),
    (ROPE, RopeSpec((1.0, 0.1, 0.01, 0.002), 1.0), "inverse frequencies differ (largest relative difference 0.5)"),
])
def test_rope(mem_rope, model_rope, text):
    msg = refused(dataclasses.replace(SPEC, rope=mem_rope), dataclasses.replace(SIDE, rope=model_rope))
    assert f"m.ekv: RoPE settings differ from the model's ({text}): FIX-MODEL" == msg
    assert rope_difference(mem_rope, model_rope) == text


def test_key_layer():
    msg = refused(side=dataclasses.replace(SIDE, key_layer=2))
    assert msg == ("the artifacts' key graph (layer 2, mean pooling) differs from the key layer 1 (mean pooling) of "
                   "m.ekv (key_layer differs): FIX-KEY")


def test_key_layer_alone_as_an_option_asks_for_it():
    msg = refused(side=dataclasses.replace(SIDE, key_layer=2, key_pooling=None, key_source="--key-layer"))
    assert "--key-layer 2 differs from the key layer 1 (mean pooling) of m.ekv (key_layer differs): FIX-KEY" in msg


def test_key_pooling():
    msg = refused(side=dataclasses.replace(SIDE, key_pooling="last"))
    assert "(layer 1, last pooling) differs from the key layer 1 (mean pooling) of m.ekv (key_pooling differs)" in msg


def test_first_difference_is_reported_in_a_fixed_order():
    side = dataclasses.replace(SIDE, fingerprint="ab" * 32, num_layers=9, key_layer=2)
    assert "another model" in refused(side=side)
    assert "holds KV of shape" in refused(side=dataclasses.replace(side, fingerprint=FP))


# --- the three callers go through it -------------------------------------------------
def test_adapt_checks_through_it():
    from edgekv.induce.adapt import AdaptConfig, backbone_side, check_compatible

    bb = SimpleNamespace(fingerprint=FP, rope=ROPE,
                         shape=SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=16, hidden_size=32))
    mem = SimpleNamespace(spec=SPEC, path="m.ekv", budget_bytes=1 << 20)
    check_compatible(mem, bb, AdaptConfig(), None)
    assert backbone_side(bb, AdaptConfig(key_layer=2)).key_layer == 2
    with pytest.raises(MismatchError, match="the config's key layer 2 differs from the key layer 1"):
        check_compatible(mem, bb, AdaptConfig(key_layer=2), None)
    bb.rope = None
    with pytest.raises(MismatchError, match="RoPE settings differ from this model's"):
        check_compatible(mem, bb, AdaptConfig(), None)
    bb.fingerprint = "ab" * 32
    with pytest.raises(MismatchError, match="another model .* adapt it with the model it was built with"):
        check_compatible(mem, bb, AdaptConfig(), None)


def test_export_checks_through_it():
    pytest.importorskip("torch")
    from edgekv.export.common import check_memory

    bb = SimpleNamespace(fingerprint=FP, rope=ROPE, source="/models/x",
                         shape=SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=16, hidden_size=32))
    check_memory(SPEC, "m.ekv", bb, None)
    with pytest.raises(MismatchError, match=r"key.layer 2 differs from the key layer 1 \(mean pooling\) of m.ekv"):
        check_memory(SPEC, "m.ekv", bb, 2)
    bb.shape.hidden_size = 48
    with pytest.raises(MismatchError, match=r"dimension 32, /models/x has hidden size 48 .*export the model the memory"):
        check_memory(SPEC, "m.ekv", bb, None)


def test_runtime_checks_through_it():
    from edgekv.runtime.runtime import Runtime

    rt = Runtime.__new__(Runtime)
    rt.rope = ROPE
    rt.manifest = {"model_fingerprint": FP, "num_layers": 3, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 32,
                   "key": {"layer": 1, "pooling": "mean"}}
    mem = SimpleNamespace(spec=SPEC, path="m.ekv")
    rt._check_memory(mem)
    rt.manifest["key"]["pooling"] = "last"
    with pytest.raises(MismatchError, match=r"the artifacts' key graph \(layer 1, last pooling\) differs .* re-export"):
        rt._check_memory(mem)
