"""``edgekv memory diff|apply|ls|rm``: memory updates (thin shell over edgekv.updates).

``diff`` runs where both states are (the host); ``apply`` runs on the device, without torch.
``ls`` lists the occupied slots; ``rm`` removes a task's or some entries' slots in one commit.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from edgekv.cli import app, emit, guarded, table
from edgekv.units import format_size

memory_app = typer.Typer(help="Memory updates: write the difference of two states of a memory, apply it on the "
                              "device; list a memory's entries, remove some.", no_args_is_help=True)
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


def _columns(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """Rows under a header, each column as wide as its widest cell (numbers right-aligned)."""
    cells = [tuple(str(c) for c in r) for r in rows]
    width = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    numeric = [all(isinstance(r[i], int) for r in rows) for i in range(len(header))]
    return ["  ".join((c.rjust(w) if num else c.ljust(w)) for c, w, num in zip(r, width, numeric, strict=True)).rstrip()
            for r in [header, *cells]]


def _human_ls(d: dict) -> str:
    rows = [(e["slot"], e["entry_id"], e["task"], e["source_id"], e["insert_seq"]) for e in d["entries"]]
    lines = _columns(("slot", "entry id", "task", "source id", "order"), rows) if rows else []
    lines.append(f"{d['num_used']} of {d['num_slots']} slots occupied ({d['memory']}, generation {d['generation']})")
    return "\n".join(lines)


def _human_rm(d: dict) -> str:
    index, anchors = d["index"], d["anchors"]
    removed = d["removed"]
    ids = ", ".join(str(e["entry_id"]) for e in removed[:20]) + (f", ... ({len(removed)} in all)"
                                                                  if len(removed) > 20 else "")
    tasks = ", ".join(sorted({e["task"] for e in removed}))
    what = "1 entry" if len(removed) == 1 else f"{len(removed)} entries"
    rows = [
        ("memory", d["memory"]),
        ("generation", f"{d['generation_before']} -> {d['generation']}"),
        ("removed", f"{what} (task {tasks}; entry ids {ids})"),
        ("slots", f"{d['num_used']} of {d['num_slots']} occupied (was {d['num_used_before']})"),
        ("anchors", "no anchors file beside the memory" if anchors is None else
         f"{anchors['dropped']} dropped, {anchors['kept']} kept ({anchors['path']})"),
        ("index", index["index"] + (f" ({index['reason']})" if "reason" in index else "")),
    ]
    return table(rows + _signed(d))


@_sub("ls")
def ls_cmd(
    memory: str = typer.Argument(..., help="Memory file (.ekv)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List MEMORY's occupied slots: slot, entry id, task, source id, insertion order."""
    from edgekv.updates import memory_entries

    emit(memory_entries(memory), json_out, _human_ls)


@_sub("rm")
def rm_cmd(
    memory: str = typer.Argument(..., help="Memory file (.ekv)."),
    task: str = typer.Option(None, "--task", help="Remove every entry of this task."),
    entry: list[int] = typer.Option(None, "--entry", help="Remove the entry with this id (`memory ls` lists "
                                                          "them); repeat for several."),
    sign: str = typer.Option(None, "--sign", help="Private key file: sign the new state (MEM.ekv.sig). Required "
                                                  "when the memory is signed: a removal would leave a signature "
                                                  "that no longer covers it."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove a task's (--task) or some (--entry) entries from MEMORY: one atomic commit, same size."""
    from edgekv.updates import remove_entries

    if (task is None) == (not entry):
        raise typer.BadParameter("give --task TASK or --entry ID (repeatable), one of the two",
                                 param_hint="'--task' / '--entry'")
    emit(remove_entries(memory, task=task, entry_ids=entry or None, sign=sign), json_out, _human_rm)
