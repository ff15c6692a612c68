"""``edgekv memory diff|apply``: memory updates (thin shell over edgekv.updates).

``diff`` runs where both states are (the host); ``apply`` runs on the device, without torch.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from edgekv.cli import app, emit, guarded, table
from edgekv.units import format_size

memory_app = typer.Typer(help="Memory updates: write the difference of two states of a memory, apply it on the "
                              "device.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")


def _sub(name: str) -> Callable:
    """``memory_app.command`` with edgekv errors as one line on stderr and an exit code."""
    return lambda fn: memory_app.command(name)(guarded(fn))


def _human_diff(d: dict) -> str:
    return table([
        ("update", d["update"]),
        ("generations", f"{d['base_generation']} -> {d['new_generation']}"),
        ("slots", f"{d['slots_written']} written, {d['slots_zeroed']} zeroed of {d['num_slots']}"),
        ("size", f"{format_size(d['update_bytes'])} ({d['update_bytes']} B), {d['ratio']:.1%} of the memory's "
                 f"{format_size(d['file_bytes'])}"),
    ] + _signed(d))


def _signed(d: dict) -> list[tuple[str, str]]:
    sig = d.get("signature")
    return [("signed", f"{sig['path']} (key {sig['key_id']})")] if sig else []


def _human_apply(d: dict) -> str:
    state = (f"{d['generation_before']} -> {d['generation']}" if d["applied"]
             else f"already at generation {d['generation']}: nothing to do")
    index = d["index"]
    return table([
        ("memory", d["memory"]),
        ("generation", state),
        ("slots", f"{d['slots_written']} written, {d['slots_zeroed']} zeroed"),
        ("index", index["index"] + (f" ({index['reason']})" if "reason" in index else "")),
        ("time", f"{d['seconds']['apply']:.3f} s apply, {d['seconds']['index']:.3f} s index"),
    ] + _signed(d))


@_sub("diff")
def diff_cmd(
    old: str = typer.Argument(..., help="The memory state the device holds (.ekv)."),
    new: str = typer.Argument(..., help="A later state of the same memory (.ekv), e.g. after `edgekv adapt`."),
    out: str = typer.Option(..., "--out", "-o", help="Update file to write (.ekvu)."),
    sign: str = typer.Option(None, "--sign", help="Private key file (`edgekv keys generate`): sign the update "
                                                  "(UPDATE.sig, carrying NEW's signature) for `apply --trust`."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Write the update from OLD to NEW: NEW's header and table and only the slots that differ."""
    from edgekv.updates import diff_memories

    emit(diff_memories(old, new, out, sign=sign), json_out, _human_diff)


@_sub("apply")
def apply_cmd(
    memory: str = typer.Argument(..., help="Memory file (.ekv) at the update's base state."),
    update: str = typer.Argument(..., help="Update file written by `edgekv memory diff`."),
    trust: str = typer.Option(None, "--trust", envvar="EDGEKV_TRUST",
                              help="Public key file: refuse an update this key did not sign; the result gets "
                                   "its signature (MEM.ekv.sig)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Apply an update to MEMORY in place (atomic; checked against its base; no torch)."""
    from edgekv.updates import apply_memory_update

    emit(apply_memory_update(memory, update, trust=trust), json_out, _human_apply)
