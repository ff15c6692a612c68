"""``edgekv profile``: the budget arithmetic before anything is built."""

from __future__ import annotations

import typer

from edgekv.budget import BudgetConfig, budget_report
from edgekv.cli import command, emit, table
from edgekv.errors import InputError
from edgekv.modelshape import model_shape
from edgekv.units import format_size, parse_size


def _human(d: dict) -> str:
    rows = [
        ("model", f"{d['model_type']}: {d['num_layers']} layers x {d['num_kv_heads']} KV heads x head dim {d['head_dim']}"),
        ("budget", format_size(d["budget_bytes"])),
        ("payload", f"{d['payload_dtype']}, m = {d['pooled_len']} positions per entry"),
        ("slot", format_size(d["slot_bytes"])),
        ("  retrieval key", format_size(d["key_bytes_per_slot"])),
        ("  K payload", format_size(d["k_payload_bytes_per_slot"])),
        ("  V payload", format_size(d["v_payload_bytes_per_slot"])),
        ("  scales", format_size(d["scale_bytes_per_slot"])),
        ("  padding", format_size(d["padding_bytes_per_slot"])),
        ("  table entry", format_size(d["table_bytes_per_slot"])),
        ("fixed overhead", format_size(d["overhead_bytes"])),
        ("slots that fit", d["num_slots"]),
        ("file size", format_size(d["file_bytes"])),
        ("memory KV tokens", f"{d['memory_tokens_per_layer']} per layer with k = {d['top_k']}"),
    ]
    return table(rows)


@command("profile")
def profile_cmd(
    model: str = typer.Option(..., "--model", help="Hugging Face model folder, config.json, or built-in name."),
    budget: str = typer.Option(..., "--budget", help="Memory budget: bytes, 16MB or 16MiB."),
    pooled_len: int = typer.Option(64, "--pooled-len", help="KV positions per entry (m)."),
    payload: str = typer.Option("int8", "--payload", help="Payload dtype: int8 or fp16."),
    k: int = typer.Option(4, "-k", "--top-k", help="Entries retrieved per query."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Budget arithmetic: bytes per slot by part, slots that fit, memory tokens per query."""
    if payload not in ("int8", "fp16"):
        raise InputError(f"--payload must be int8 or fp16, got {payload!r}")
    if pooled_len < 1 or k < 1:
        raise InputError("--pooled-len and -k must be at least 1")
    cfg = BudgetConfig(pooled_len=pooled_len, payload_dtype=payload, top_k=k)
    emit(budget_report(model_shape(model), parse_size(budget), cfg), json_out, _human)
