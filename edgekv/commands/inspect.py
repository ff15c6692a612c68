"""``edgekv inspect MEM.ekv``: what a memory file holds."""

from __future__ import annotations

import os

import typer

from edgekv.cli import command, emit, table
from edgekv.format import Memory
from edgekv.units import format_size


def describe_memory(path: str) -> dict:
    with Memory(path) as m:
        s = m.spec
        return {
            "path": path,
            "format_version": m.format_version,
            "model_fingerprint": s.model_fingerprint,
            "num_layers": s.num_layers,
            "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "pooled_len": s.pooled_len,
            "key_dim": s.key_dim,
            "key_layer": s.key_layer,
            "key_pooling": s.key_pooling,
            "payload_dtype": s.payload_dtype,
            "rope": None if s.rope is None else {"rotary_dim": s.rope.rotary_dim,
                                                 "attention_scaling": s.rope.attention_scaling},
            "num_slots": m.num_slots,
            "num_used": m.num_used,
            "slot_bytes": s.slot_bytes,
            "header_bytes": s.header_bytes,
            "file_bytes": m.file_bytes,
            "file_bytes_on_disk": os.path.getsize(path),
            "budget_bytes": m.budget_bytes,
            "generation": m.generation,
            "top_k": m.top_k,  # the k tau is fitted for (None: not recorded, format version 1)
            "tau": m.calibration.tau,
            "value_gates": list(m.calibration.gates),
            "key_projection_dirs": int(len(m.projection.dirs)),
            "per_task_counts": m.per_task_counts(),
        }


def _human(d: dict) -> str:
    rows = [
        ("memory", d["path"]),
        ("format version", d["format_version"]),
        ("model fingerprint", d["model_fingerprint"][:16] + "…"),
        ("shape", f"{d['num_layers']} layers x {d['num_kv_heads']} KV heads x head dim {d['head_dim']}"),
        ("pooled length m", d["pooled_len"]),
        ("payload", d["payload_dtype"]),
        ("slots used", f"{d['num_used']} / {d['num_slots']}"),
        ("slot size", format_size(d["slot_bytes"])),
        ("file size", f"{format_size(d['file_bytes'])} of budget {format_size(d['budget_bytes'])}"),
        ("generation", d["generation"]),
        ("tau", f"{d['tau']:.4g}"),
        ("k (calibrated for)", "not recorded" if d["top_k"] is None else d["top_k"]),
    ]
    rows += [(f"task {t}", f"{n} entries") for t, n in d["per_task_counts"].items()]
    return table(rows)


@command("inspect")
def inspect_cmd(
    memory: str = typer.Argument(..., help="Memory file (.ekv)."),
    verify: bool = typer.Option(False, "--verify", help="Also check every slot's checksum."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a memory file's header, slots used per task, and bytes."""
    data = describe_memory(memory)
    if verify:
        with Memory(memory) as m:
            m.verify()
        data["verified"] = True
    emit(data, json_out, _human)
