"""``edgekv export``: turn a backbone (and optionally a memory) into a device folder.

Stages (one progress bar): load the backbone; write the fp32 decoder with past (edgekv's
fused graph, or optimum's with ``graph="optimum"`` or for a family the fused graph does not
cover: ``resolve_graph``); check it against PyTorch (prefix KV
injected as past must give the joint sequence's logits); optionally quantise its weights
(weight-only int8 / int4 ``MatMulNBits``, see ``decoder_graph.WeightFormat``) and measure
the effect; write the retrieval-key graph; write the tokenizer; build the HNSW index for
a memory; write ``manifest.json`` with every file's sha256.

Everything is written into a hidden sibling folder and renamed into place at the end,
so a failed or interrupted export leaves the output folder as it was. An existing
export in ``out_dir`` is replaced; any other non-empty folder is refused unless
``force``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Iterator

from edgekv.atomic import replace_dir_atomic
from edgekv.errors import EdgeKVError, InputError
from edgekv.export.common import (
    ExportOptions,
    check_memory,
    manifest_data,
    memory_spec,
    resolve_key,
    tokenizer_and_index,
)
from edgekv.export.onnx_export import (
    DECODER_FILE,
    KEY_FILE,
    check_decoder,
    export_decoder,
    export_fused,
    export_key_graph,
    files_bytes,
    onnx_files,
)
from edgekv.host.models import Backbone, load_backbone
from edgekv.host.vlm import vlm_type
from edgekv.manifest import MANIFEST_FILE, file_hashes, is_export_folder, write_manifest
from edgekv.modelshape import FUSED_FAMILIES, load_model_config
from edgekv.signing import key_id, load_private_key, sign_export

# The export-time check holds the fp32 decoder to this, relative to the logits' scale
# (the tests hold 1e-4 absolute on tiny models and SmolLM2).
CHECK_RTOL = 1e-4
PROBE_TEXT = ("The secret code for the red door is 4417, and the blue door opens with 2231. "
              "Question: what is the code for the red door? Answer:")


# --- progress -----------------------------------------------------------------------
class Stages:
    """A tqdm bar over named stages, with the seconds each took."""

    def __init__(self, names: list[str], enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc="export", unit="stage", disable=not enabled, leave=True)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        self.bar.update(1)

    def say(self, line: str) -> None:
        """One line for the user on stderr (above the bar)."""
        self.bar.write(f"edgekv: {line}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def stage_names(opts: ExportOptions) -> list[str]:
    names = ["load", "decoder"]
    names += ["check"] if opts.check else []
    names += ["quantise"] if opts.quantize_weights else []
    names += ["key graph"] if opts.graph == "optimum" else []
    names += ["tokenizer"]
    names += ["index"] if opts.memory else []
    return [*names, "manifest"]


# --- which graph -------------------------------------------------------------------
def resolve_graph(model: str, opts: ExportOptions) -> tuple[ExportOptions, str | None]:
    """(options with the graph to write, a line for the user or None). A family outside edgekv's
    fused graph falls back to optimum's graph (fp32), refused when that cannot do either: weights
    to quantise, or a family optimum cannot export. Read from the config alone (nothing loaded)."""
    family = str(load_model_config(model).get("model_type", "unknown"))
    if opts.graph != "fused" or family in FUSED_FAMILIES:
        return opts, None
    if opts.quantize_weights:
        raise InputError(f"ExportOptions.quantize_weights needs edgekv's fused graph, which does not cover {family} "
                         f"(only {', '.join(FUSED_FAMILIES)}); export it in fp32 (optimum's graph) instead")
    from edgekv.export.onnx_export import optimum_exports

    if not optimum_exports(family):
        raise InputError(f"{family} is covered neither by edgekv's fused graph ({', '.join(FUSED_FAMILIES)}) "
                         f"nor by optimum's ONNX export; it cannot be exported")
    return (dataclasses.replace(opts, graph="optimum"),
            f"{family} is not covered by edgekv's fused graph; exporting optimum's graph (fp32) instead")


# --- output folder ------------------------------------------------------------------
def check_out_dir(out_dir: str, force: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"output folder {out_dir} is a file; pass a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_export_folder(out_dir) and not force:
        raise InputError(f"output folder {out_dir} is not empty and holds no edgekv export; "
                         f"choose an empty folder or set ExportOptions.force to replace it")


def staging_dir(out_dir: str) -> str:
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.edgekv-tmp-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def publish(staging: str, out_dir: str) -> None:
    """Move the finished export into place, replacing an old one only now, whole (edgekv.atomic)."""
    replace_dir_atomic(staging, out_dir)


# --- stages -------------------------------------------------------------------------
def probe_ids(bb: Backbone) -> tuple[list[int], int]:
    ids = list(bb.tokenizer(PROBE_TEXT).input_ids)
    if len(ids) < 4:
        raise InputError("the tokenizer turns the probe text into fewer than 4 tokens; cannot check the export")
    return ids, len(ids) // 2


def check_fp32(bb: Backbone, folder: str) -> dict:
    """The exported fp32 decoder must equal PyTorch, with and without injected past."""
    ids, split = probe_ids(bb)
    res = check_decoder(bb.model, os.path.join(folder, DECODER_FILE), ids, split)
    scale = max(1.0, res["logit_scale"])
    worst = max(res["max_abs_diff_no_past"], res["max_abs_diff_with_past"])
    if worst > CHECK_RTOL * scale:
        raise EdgeKVError(f"the exported decoder disagrees with PyTorch (max |logit diff| {worst:.2e} > "
                          f"{CHECK_RTOL * scale:.2e}); this architecture does not export correctly")
    return res


def quantise_fused(bb: Backbone, key: tuple[int, str], weights: str, fp32_dir: str, folder: str,
                   check: bool) -> tuple[dict, dict]:
    """The fused graphs with ``weights`` into ``folder``; sizes and (``check``) the effect vs PyTorch fp32."""
    files = export_fused(bb.model, bb.rope, key[0], key[1], folder, weights, tokenizer=bb.tokenizer)
    info: dict = {"fp32_bytes": files_bytes(fp32_dir, files["decoder"]), "bytes": files_bytes(folder, files["decoder"]),
                  "graph": files["stats"]["decoder"]}
    if check:
        ids, split = probe_ids(bb)
        info["check"] = check_decoder(bb.model, os.path.join(folder, DECODER_FILE), ids, split)
    return files, info


# --- the whole export ---------------------------------------------------------------
def _export_into(model: str, folder: str, opts: ExportOptions, stages: Stages, note: str | None = None) -> dict:
    """``note``: ``resolve_graph``'s line for the user, told once the model has loaded."""
    spec = memory_spec(opts.memory) if opts.memory else None
    with stages.stage("load"):
        bb = load_backbone(model)
    if note:
        stages.say(note)
    if spec is not None:
        check_memory(spec, opts.memory, bb, opts.key_layer)
    key = resolve_key(bb, opts, spec)
    fp32_dir = os.path.join(folder, ".fp32") if opts.quantize_weights else folder
    summary: dict = {"decoder": {"weights": opts.quantize_weights or "fp32", "graph": opts.graph}}
    if note:
        summary["note"] = note
    row_tables: dict = {}
    with stages.stage("decoder"):
        if opts.graph == "optimum":
            decoder_names = export_decoder(bb.model, fp32_dir, opts.opset)
        else:
            files = export_fused(bb.model, bb.rope, key[0], key[1], fp32_dir, "fp32")
            decoder_names, key_names, row_tables = files["decoder"], files["key"], files["row_tables"]
            summary["decoder"]["fp32_graph"] = files["stats"]["decoder"]
        summary["decoder"]["fp32_bytes"] = files_bytes(fp32_dir, decoder_names)
    if opts.check:
        with stages.stage("check"):
            summary["decoder"]["fp32_check"] = check_fp32(bb, fp32_dir)
    if opts.quantize_weights:
        with stages.stage("quantise"):
            files, summary["decoder"]["quantised"] = quantise_fused(bb, key, opts.quantize_weights, fp32_dir, folder,
                                                                   opts.check)
            decoder_names, key_names, row_tables = files["decoder"], files["key"], files["row_tables"]
            shutil.rmtree(fp32_dir)
    if opts.graph == "optimum":
        with stages.stage("key graph"):
            export_key_graph(bb.model, bb.decoder, key[0], key[1], os.path.join(folder, KEY_FILE), opts.opset)
            key_names = onnx_files(folder, KEY_FILE)
    tokenizer, index, names = tokenizer_and_index(bb, folder, opts.memory, stages)
    with stages.stage("manifest"):
        names = [*decoder_names, *key_names, *names]
        data = manifest_data(bb, key, summary["decoder"]["weights"], tokenizer, file_hashes(folder, names), index)
        if row_tables:  # embedding tables the runtime maps once for both sessions
            data["decoder"]["row_tables"] = row_tables
        write_manifest(folder, data)
    summary["decoder"]["bytes"] = files_bytes(folder, decoder_names)
    summary.update(model=str(bb.source), model_type=bb.shape.model_type, model_fingerprint=bb.fingerprint,
                   key={"layer": key[0], "pooling": key[1]}, index=index, add_bos=tokenizer["add_bos"],
                   files={n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))})
    return summary


def run_export(model: str, out_dir: str, opts: ExportOptions, progress: bool = True) -> dict:
    """Export ``model`` into ``out_dir`` with ``opts``; return a summary (sizes, checks, seconds)."""
    out_dir = os.path.abspath(out_dir)
    check_out_dir(out_dir, opts.force)
    signer = load_private_key(opts.sign) if opts.sign else None  # a bad key fails before the export runs
    t0 = time.perf_counter()
    from edgekv.export import vlm  # vision-language models: their own graphs (export/vlm.py)

    is_vlm = vlm_type(model) is not None
    opts, note = (opts, None) if is_vlm else resolve_graph(model, opts)
    stages = Stages(vlm.stage_names(opts) if is_vlm else stage_names(opts), progress)
    staging = staging_dir(out_dir)
    try:
        summary = vlm.export_vlm_into(model, staging, opts, stages) if is_vlm else \
            _export_into(model, staging, opts, stages, note)
        if signer is not None:  # inside the staging folder: the export and its signature appear together
            sig = sign_export(staging, signer)
            summary["files"][os.path.basename(sig)] = os.path.getsize(sig)
            summary["signed_by"] = key_id(signer.public_key())
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        stages.close()
    summary["out"] = out_dir
    summary["total_bytes"] = sum(summary["files"].values())
    summary["seconds"] = {**stages.seconds, "total": round(time.perf_counter() - t0, 3)}
    summary["manifest"] = os.path.join(out_dir, MANIFEST_FILE)
    return summary


def export_model(model: str, out_dir: str, quantize_weights: str | None = None, memory: str | None = None,
                 key_layer: int | None = None, progress: bool = True, force: bool = False,
                 graph: str = "fused", sign: str | None = None) -> dict:
    """Export MODEL (folder, .gguf or built-in name) into ``out_dir``; return the summary.
    ``sign``: a private key file; the manifest is signed (``manifest.json.sig``, edgekv.signing)."""
    opts = ExportOptions(quantize_weights=quantize_weights, memory=memory, key_layer=key_layer, force=force,
                         graph=graph, sign=sign)
    return run_export(model, out_dir, opts, progress)
