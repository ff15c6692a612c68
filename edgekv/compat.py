"""Does this memory belong to this model? One check, used by ``adapt``, ``export`` and the runtime.

A memory's :class:`~edgekv.format.MemorySpec` records the backbone its entries came from
(fingerprint), the KV shapes every slot holds, how its retrieval keys were computed (layer,
pooling, dimension) and the RoPE its keys were made position-free with. A model side
(:class:`ModelSide`: a loaded backbone on the host, an artifacts folder's manifest on the
device) describes the same things; :func:`check_memory_matches` compares them field by field
and raises a :class:`MismatchError` that names the field, both values and what to do.

Fields the caller does not know or does not constrain are ``None`` on the model side and are
not checked (``adapt`` follows the memory's key layer unless one is asked for).

:func:`runtime_top_k` is the one check of the k a runtime retrieves with against the k the
memory's calibration (tau) was fitted for, which the memory records (format version 2).
Device-safe: standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgekv.errors import MismatchError
from edgekv.rope import RopeSpec

if TYPE_CHECKING:
    from edgekv.format import MemorySpec

_UNCHECKED = object()  # ModelSide.rope default: RoPE not checked
ROPE_RTOL = 1e-5  # the memory stores RoPE values as float32


@dataclass(frozen=True)
class ModelSide:
    """What a memory must match on the model side. ``None``: not checked.

    ``name``: how messages call the model side ("the model", "this model", a model path);
    ``key_source``: what asks for the key layer/pooling ("the artifacts' key graph",
    "--key-layer"; the message reads "KEY_SOURCE 1 differs from the key layer 2 (mean
    pooling) of MEM"); ``fix_model``: what to do when the memory belongs to another model
    (fingerprint, shapes, key dimension, RoPE); ``fix_key``: what to do when only the key
    layer / pooling differ.
    """

    fingerprint: str | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    key_dim: int | None = None  # the hidden size the retrieval key pools
    rope: RopeSpec | None | object = _UNCHECKED  # None: the model has no RoPE
    key_layer: int | None = None
    key_pooling: str | None = None
    name: str = "the model"
    key_source: str = "the key layer asked for"
    fix_model: str = "use the model the memory was adapted with, or adapt a new memory with this model"
    fix_key: str = "use the memory's key layer and pooling"

    @property
    def checks_rope(self) -> bool:
        return self.rope is not _UNCHECKED


def _rope_text(rope: RopeSpec | None) -> str:
    if rope is None:
        return "no RoPE"
    return f"RoPE over {rope.rotary_dim} dims, scaling {rope.attention_scaling:g}"


def rope_difference(mem: RopeSpec | None, model: RopeSpec | None) -> str | None:
    """How two RoPE settings differ (None: they agree to float32 precision)."""
    if (mem is None) != (model is None):
        return f"{_rope_text(mem)} in the memory, {_rope_text(model)} in the model"
    if mem is None or model is None:
        return None
    if mem.rotary_dim != model.rotary_dim:
        return f"rotary dim {mem.rotary_dim} in the memory, {model.rotary_dim} in the model"
    if not math.isclose(mem.attention_scaling, model.attention_scaling, rel_tol=ROPE_RTOL, abs_tol=1e-7):
        return f"attention scaling {mem.attention_scaling:g} in the memory, {model.attention_scaling:g} in the model"
    worst = max((abs(a - b) / max(abs(b), 1e-30) for a, b in zip(mem.inv_freq, model.inv_freq, strict=True)),
                default=0.0)
    if worst > ROPE_RTOL:
        return f"inverse frequencies differ (largest relative difference {worst:.2g})"
    return None


def check_memory_matches(spec: MemorySpec, model: ModelSide, path: str) -> None:
    """Raise :class:`MismatchError` unless the memory at ``path`` (``spec``) belongs to ``model``.

    Order: fingerprint, KV shapes (layers, heads, head dim), key dimension, RoPE, key layer,
    key pooling; the first difference is reported.
    """
    if model.fingerprint is not None and spec.model_fingerprint != model.fingerprint:
        raise MismatchError(
            f"{path} was built for another model (memory fingerprint {spec.model_fingerprint[:12]}, {model.name} has "
            f"{model.fingerprint[:12]}): {model.fix_model}")
    shape = (("num_layers", spec.num_layers, model.num_layers), ("num_kv_heads", spec.num_kv_heads, model.num_kv_heads),
             ("head_dim", spec.head_dim, model.head_dim))
    for field, got, want in shape:
        if want is not None and got != int(want):
            got_t = tuple(s for _, s, _ in shape)
            want_t = tuple(w if w is not None else s for _, s, w in shape)
            raise MismatchError(
                f"{path} holds KV of shape (layers, heads, head dim) {got_t}, {model.name} has {want_t} ({field} "
                f"{got} vs {int(want)}): {model.fix_model}")
    if model.key_dim is not None and spec.key_dim != int(model.key_dim):
        raise MismatchError(
            f"{path} has retrieval keys of dimension {spec.key_dim}, {model.name} has hidden size {int(model.key_dim)} "
            f"(key_dim {spec.key_dim} vs {int(model.key_dim)}): {model.fix_model}")
    if model.checks_rope:
        diff = rope_difference(spec.rope, model.rope)  # type: ignore[arg-type]
        if diff is not None:
            raise MismatchError(f"{path}: RoPE settings differ from {model.name}'s ({diff}): {model.fix_model}")
    layer_differs = model.key_layer is not None and spec.key_layer != int(model.key_layer)
    pooling_differs = model.key_pooling is not None and spec.key_pooling != model.key_pooling
    if layer_differs or pooling_differs:
        if model.key_pooling is None:
            want = f"{int(model.key_layer)}"  # type: ignore[arg-type]
        elif model.key_layer is None:
            want = f"({model.key_pooling} pooling)"
        else:
            want = f"(layer {int(model.key_layer)}, {model.key_pooling} pooling)"
        field = "key_layer" if layer_differs else "key_pooling"
        raise MismatchError(
            f"{model.key_source} {want} differs from the key layer {spec.key_layer} ({spec.key_pooling} pooling) of "
            f"{path} ({field} differs): {model.fix_key}")


DEFAULT_TOP_K = 4  # the runtime's k for a memory that does not record the k it was adapted with


def runtime_top_k(asked: int | None, stored: int | None, num_entries: int, path: str) -> int:
    """The k to retrieve with from the memory at ``path``: ``asked`` (None: the memory's own).

    ``stored``: the k the memory's tau was fitted for (``Memory.top_k``; None: not recorded,
    then any k is taken and the default is :data:`DEFAULT_TOP_K`). ``adapt`` retrieves at most
    the memory's ``num_entries``, so a memory holding fewer entries than ``stored`` was
    fitted for that many: the default, and also accepted. k = 0 (no retrieval) is always
    accepted. Any other k is a :class:`MismatchError` that says what was asked, what the
    memory was calibrated for and what to do.
    """
    if stored is None:
        return DEFAULT_TOP_K if asked is None else asked
    fitted = min(stored, num_entries) or stored  # an empty memory: what it records
    if asked is None:
        return fitted
    if asked in (0, stored, fitted):
        return asked
    with_entries = f" (k = {fitted} with its {num_entries} entries)" if fitted != stored else ""
    raise MismatchError(
        f"RuntimeConfig.k = {asked} asked for, but {path} was calibrated for k = {stored}{with_entries}: its tau "
        f"is fitted to that many retrieved entries; run with k = {fitted} (the default), or re-adapt the memory "
        f"with AdaptConfig.top_k = {asked}")
