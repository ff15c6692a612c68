"""``edgekv export --model MODEL --out DIR``: write the device folder (ONNX graphs, tokenizer, manifest)."""

from __future__ import annotations

import sys

import typer

from edgekv.cli import command, emit, field_option, table
from edgekv.export.common import ExportOptions
from edgekv.units import format_size


def _human(d: dict) -> str:
    dec = d["decoder"]
    rows = [
        ("export", d["out"]),
        ("model", f"{d['model']} ({d['model_type']})"),
        ("model fingerprint", d["model_fingerprint"][:16] + "…"),
        ("key graph", f"layer {d['key']['layer']}, {d['key']['pooling']} pooling"),
        ("decoder weights", dec["weights"]),
    ]
    if dec["graph"] != "fused":
        rows.append(("decoder graph", "optimum's (fp32)" + (f": {d['note'].split(';')[0]}" if d.get("note") else "")))
    if "fp32_check" in dec:
        c = dec["fp32_check"]
        rows.append(("check vs PyTorch", f"max |logit diff| {c['max_abs_diff_with_past']:.1e} with injected past, "
                                         f"{c['max_abs_diff_no_past']:.1e} without"))
    if "quantised" in dec:
        q, w = dec["quantised"], dec["weights"]
        rows.append((f"{w} decoder", f"{format_size(q['fp32_bytes'])} -> {format_size(q['bytes'])}"))
        if "check" in q:
            rows.append((f"{w} effect", f"max |logit diff| {q['check']['max_abs_diff_with_past']:.3g}, "
                                        f"top-1 agreement {q['check']['argmax_agreement']:.1%}"))
    if d["index"]:
        rows.append(("HNSW index", f"{d['index']['num_items']} entries, dim {d['index']['dim']}"))
    rows += [(f"  {name}", format_size(size)) for name, size in d["files"].items()]
    if d.get("signed_by"):
        rows.append(("signed", f"manifest.json.sig, key {d['signed_by']}"))
    rows.append(("total", f"{format_size(d['total_bytes'])} in {d['seconds']['total']:.1f} s"))
    return table(rows)


@command("export")
def export_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face model folder, .gguf file, or built-in name (smollm2-135m)."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write (created; an old export is replaced)."),
    quantize_weights: str = field_option(ExportOptions, "quantize_weights", "--quantize-weights"),
    memory: str = field_option(ExportOptions, "memory", "--memory"),
    key_layer: int = field_option(ExportOptions, "key_layer", "--key-layer"),
    force: bool = field_option(ExportOptions, "force", "--force"),
    graph: str = field_option(ExportOptions, "graph", "--graph"),
    sign: str = field_option(ExportOptions, "sign", "--sign"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (they show only on a terminal)."),
) -> None:
    """Export a decoder for the device runtime: ONNX with past, key graph, tokenizer, manifest."""
    from edgekv.export.pipeline import export_model

    summary = export_model(model, out, quantize_weights=quantize_weights, memory=memory, key_layer=key_layer,
                           progress=sys.stderr.isatty() and not json_out and not no_progress, force=force, graph=graph,
                           sign=sign)
    emit(summary, json_out, _human)
