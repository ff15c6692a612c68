"""Budget arithmetic: what a byte budget buys before anything is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgekv.configs import Config, knob
from edgekv.errors import InputError
from edgekv.format import PAYLOAD_CODES, TABLE_ENTRY_BYTES, MemorySpec
from edgekv.format.layout import DEFAULT_PAYLOAD_DTYPE
from edgekv.modelshape import ModelShape


@dataclass(frozen=True)
class BudgetConfig(Config):
    """Choices that set a slot's size."""

    pooled_len: int = knob(16, "KV positions per entry, m (adapt's default is 16).")
    payload_dtype: str = knob(DEFAULT_PAYLOAD_DTYPE, "Payload dtype: int4 (densest; a new memory's default), int8 "
                                                     "or fp16.")
    top_k: int = knob(4, "Entries retrieved per query.")
    proj_max_dirs: int = 8  # key-projection directions the header has room for

    def __post_init__(self) -> None:
        for name in ("pooled_len", "top_k"):
            if getattr(self, name) < 1:
                raise InputError(f"BudgetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.payload_dtype not in PAYLOAD_CODES:
            raise InputError(f"BudgetConfig.payload_dtype must be int8, int4 or fp16, got {self.payload_dtype!r}")
        if self.proj_max_dirs < 0:
            raise InputError(f"BudgetConfig.proj_max_dirs must be >= 0, got {self.proj_max_dirs}")


def spec_for(shape: ModelShape, cfg: BudgetConfig, fingerprint: str = "0" * 64, rope=None) -> MemorySpec:
    return MemorySpec(shape.num_layers, shape.num_kv_heads, shape.head_dim, cfg.pooled_len,
                      shape.hidden_size, fingerprint, cfg.payload_dtype, rope, cfg.proj_max_dirs)


def budget_report(shape: ModelShape, budget_bytes: int, cfg: BudgetConfig, rope=None) -> dict:
    """Bytes per slot by part, slots that fit, and memory KV tokens k entries add per layer."""
    spec = spec_for(shape, cfg, rope=rope)
    layout = spec.slot_layout()
    part = {name: nbytes for name, (_, nbytes, _, _) in layout.items()}
    payload = part["k"] + part["v"]
    scales = part.get("k_scale", 0) + part.get("v_scale", 0)
    padding = spec.slot_bytes - sum(part.values())
    num_slots = spec.num_slots_for(budget_bytes)
    file_bytes = spec.file_bytes_for(num_slots)
    return {
        "model_type": shape.model_type,
        "num_layers": shape.num_layers,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "key_dim": shape.hidden_size,
        "budget_bytes": budget_bytes,
        "pooled_len": cfg.pooled_len,
        "payload_dtype": cfg.payload_dtype,
        "slot_bytes": spec.slot_bytes,
        "key_bytes_per_slot": part["key"],
        "payload_bytes_per_slot": payload,
        "k_payload_bytes_per_slot": part["k"],
        "v_payload_bytes_per_slot": part["v"],
        "scale_bytes_per_slot": scales,
        "padding_bytes_per_slot": padding,
        "table_bytes_per_slot": TABLE_ENTRY_BYTES,
        "overhead_bytes": spec.header_bytes,
        "num_slots": num_slots,
        "file_bytes": file_bytes,
        "unused_budget_bytes": budget_bytes - file_bytes,
        "top_k": cfg.top_k,
        "memory_tokens_per_layer": cfg.top_k * cfg.pooled_len,
        "config": asdict(cfg),
    }
