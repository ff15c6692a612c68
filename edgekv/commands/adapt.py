"""``edgekv adapt``: adapt a fixed-size memory to the next task (creates it on the first call)."""

from __future__ import annotations

import os

import typer

from edgekv.cli import command, emit, field_option, table
from edgekv.errors import InputError
from edgekv.induce.config import AdaptConfig, EntryConfig, SelectionConfig
from edgekv.scale import RayConfig
from edgekv.units import format_size, parse_size


def _fmt_terms(t: dict) -> str:
    anc = "-" if t["L_anc"] is None else f"{t['L_anc']:.3f}"
    return f"J {t['J']:.3f}  (L_cur {t['L_cur']:.3f}, L_anc {anc}, Omega {t['omega']:.1f})"


def _human(d: dict) -> str:
    gates = d["calibration"]["gates"]
    rows = [
        ("task", d["task"] + ("  (new memory)" if d["created"] else "")),
        ("memory", d["memory"]),
        ("examples / candidates", f"{d['num_examples']} / {d['num_candidates']}"),
        ("slots used", f"{d['num_used']} / {d['num_slots']}  (kept {d['kept_old']} old, added "
                       f"{d['kept_new']} new, dropped {d['dropped_old']} old)"),
        ("file size", f"{format_size(d['file_bytes'])} ({d['file_bytes']} B) of budget "
                      f"{format_size(d['budget_bytes'])}"),
        ("before", _fmt_terms(d["J_before"])),
        ("after", _fmt_terms(d["J_after"])),
        ("calibration", f"tau {d['calibration']['tau']:.4g} (was {d['calibration']['tau_before']:.4g}), "
                        f"value gates {min(gates):.3f}..{max(gates):.3f}"),
        ("anchors (host only)", f"{d['anchors']['count']} examples, {format_size(d['anchors']['bytes'])} "
                                f"in {d['anchors']['path']}"),
        ("time", f"{d['seconds']} s"),
    ]
    rows += [(f"entries of {t}", n) for t, n in d["per_task_counts"].items()]
    if d.get("signature"):
        rows.append(("signed", f"{d['signature']['path']} (key {d['signature']['key_id']})"))
    return table(rows)


@command("adapt")
def adapt_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face model folder (text or LLaVA/Idefics3), .gguf, "
                                                   "or built-in name."),
    data: str = typer.Option(..., "--data", help="Task data: LLaVA JSON/JSONL or JSONL of prompt/answer "
                                                 "(image paths relative to the file's folder)."),
    memory: str = typer.Option(..., "--memory", help="Memory file (.ekv); created on the first call."),
    budget: str = typer.Option(None, "--budget", help="Byte budget (16MB, 16MiB); needed to create the memory."),
    task: str = typer.Option(None, "--task", help="Task name (default: the data file's name without extension, "
                                                  "or its folder's when that is generic: tasks/shape-code/train.json "
                                                  "-> shape-code)."),
    pooled_len: int = field_option(EntryConfig, "pooled_len", "--pooled-len"),  # None: the memory's
    payload: str = field_option(EntryConfig, "payload_dtype", "--payload"),
    steps: int = field_option(SelectionConfig, "steps", "--steps", default=None),
    top_k: int = field_option(AdaptConfig, "top_k", "-k", "--entries"),
    seed: int = field_option(AdaptConfig, "seed", "--seed"),
    threads: int = typer.Option(None, "--threads", "-t", help="PyTorch threads (default: PyTorch decides)."),
    sign: str = typer.Option(None, "--sign", help="Private key file (`edgekv keys generate`): sign the memory after "
                                                  "its commit (MEM.ekv.sig) so that boards use it with --trust."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ray: bool = typer.Option(False, "--ray", help="Encode the candidates on Ray actors (each loads the model once); "
                             "the memory file is the local run's. Needs the [scale] extra."),
    ray_address: str = field_option(RayConfig, "address", "--ray-address"),
    ray_workers: int = field_option(RayConfig, "workers", "--ray-workers"),
    ray_cpus: int = field_option(RayConfig, "cpus_per_cell", "--ray-cpus-per-cell"),
) -> None:
    """Adapt MEM.ekv to a task in place (atomic; the file never changes size)."""
    from edgekv.data import default_task_name, read_examples
    from edgekv.host.models import load_backbone
    from edgekv.induce.adapt import adapt

    cfg = AdaptConfig(entry=EntryConfig(pooled_len=pooled_len, payload_dtype=payload),  # set: the memory must match
                      selection=SelectionConfig() if steps is None else SelectionConfig(steps=steps),
                      top_k=top_k, seed=seed)
    budget_bytes = parse_size(budget) if budget is not None else None
    examples = read_examples(data)
    if threads:
        import torch

        torch.set_num_threads(threads)
    signer = None
    if sign:  # a bad key fails before the adaptation runs
        from edgekv.signing import load_private_key

        signer = load_private_key(sign)
    task = task or default_task_name(data)
    if not task:  # e.g. data/train.json: every task would be "train" and replace the previous one's anchors
        raise InputError(f"{data}: the file's name and its folder's are generic (train, test, data, ...), so they "
                         f"do not name the task; pass --task NAME")
    backbone = load_backbone(model)  # vision-language folders come with their image path (backbone.vision)
    encoder = None
    if ray or ray_address:
        from edgekv.scale import RayEncoder

        encoder = RayEncoder(model, RayConfig(address=ray_address, workers=ray_workers, cpus_per_cell=ray_cpus))
    summary = adapt(backbone, examples, memory, budget_bytes, task, cfg, progress=not no_progress,
                    image_root=os.path.dirname(os.path.abspath(data)), encoder=encoder)
    if signer is not None:  # after the commit: a crash in between leaves a stale signature, refused under --trust
        from edgekv.signing import key_id, sign_memory

        summary["signature"] = {"path": sign_memory(memory, signer, expect_generation=summary["generation"]),
                                "key_id": key_id(signer.public_key())}
    emit(summary, json_out, _human)
