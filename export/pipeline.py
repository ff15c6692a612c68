"""``edgekv export``: turn a backbone (and optionally a memory) into a device folder.

Stages (one progress bar): load the backbone; write the fp32 decoder with past (edgekv's
fused graph, or optimum's with ``graph="optimum"``); check it against PyTorch (prefix KV
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
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from edgekv import __version__
from edgekv.errors import EdgeKVError, InputError, MismatchError
from edgekv.export.models import Backbone, default_key_layer, load_backbone
from edgekv.export.onnx_export import (
    DECODER_FILE,
    DEFAULT_OPSET,
    KEY_FILE,
    check_decoder,
    export_decoder,
    export_fused,
    export_key_graph,
    files_bytes,
    onnx_files,
)
from edgekv.manifest import MANIFEST_FILE, POOLINGS, file_hashes, is_export_folder, write_manifest

TOKENIZER_FILE = "tokenizer.json"
QUANTIZE_CHOICES = ("int8", "int4")
GRAPHS = ("fused", "optimum")
# The export-time check holds the fp32 decoder to this, relative to the logits' scale
# (the tests hold 1e-4 absolute on tiny models and SmolLM2).
CHECK_RTOL = 1e-4
PROBE_TEXT = ("The secret code for the red door is 4417, and the blue door opens with 2231. "
              "Question: what is the code for the red door? Answer:")
TOKENIZER_PROBES = ("hello world", "  two leading spaces", "Question: 2+2?\nAnswer: 4", "Ünïcödé ☃ — ok")


@dataclass(frozen=True)
class ExportOptions:
    """What ``edgekv export`` writes besides the fp32 decoder."""

    quantize_weights: str | None = None  # None: fp32; "int8" / "int4": weight-only block-wise MatMulNBits
    graph: str = "fused"  # "fused": edgekv's decoder graph; "optimum": optimum's export (fp32 only)
    memory: str | None = None  # a .ekv file: check it belongs to the model, build its HNSW index
    key_layer: int | None = None  # layer the retrieval key pools (None: the memory's, else default)
    key_pooling: str = "mean"  # mean | last (a memory's own pooling wins)
    force: bool = False  # replace a non-empty out_dir that is not an edgekv export
    opset: int = DEFAULT_OPSET  # ONNX opset of both graphs
    check: bool = True  # compare the decoder with PyTorch at export time

    def __post_init__(self) -> None:
        if self.quantize_weights not in (None, *QUANTIZE_CHOICES):
            raise InputError(f"--quantize-weights must be one of {QUANTIZE_CHOICES}, got {self.quantize_weights!r}")
        if self.graph not in GRAPHS:
            raise InputError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.graph == "optimum" and self.quantize_weights:
            raise InputError("--quantize-weights needs edgekv's fused graph; omit graph='optimum'")
        if self.key_layer is not None and self.key_layer < 0:
            raise InputError(f"--key-layer must be >= 0, got {self.key_layer}")
        if self.key_pooling not in POOLINGS:
            raise InputError(f"key pooling must be one of {POOLINGS}, got {self.key_pooling!r}")
        if self.opset < 14:
            raise InputError(f"opset must be >= 14, got {self.opset}")


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


# --- output folder ------------------------------------------------------------------
def check_out_dir(out_dir: str, force: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out {out_dir} is a file; pass a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_export_folder(out_dir) and not force:
        raise InputError(f"--out {out_dir} is not empty and holds no edgekv export; "
                         f"choose an empty folder or pass --force to replace it")


def staging_dir(out_dir: str) -> str:
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.edgekv-tmp-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def publish(staging: str, out_dir: str) -> None:
    """Move the finished export into place (replacing an old one only now)."""
    if not os.path.exists(out_dir):
        os.replace(staging, out_dir)
        return
    old = f"{staging}-old"
    os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# --- memory -------------------------------------------------------------------------
def memory_spec(path: str) -> Any:
    from edgekv.format import Memory

    with Memory(path) as mem:
        return mem.spec


def check_memory(spec: Any, path: str, bb: Backbone, key_layer: int | None) -> None:
    """The memory was built with this backbone, and its key layer is the one asked for."""
    if spec.model_fingerprint != bb.fingerprint:
        raise MismatchError(
            f"{path} was built for another model (memory fingerprint {spec.model_fingerprint[:12]}, "
            f"{bb.source} has {bb.fingerprint[:12]}): export the model the memory was adapted with, "
            f"or adapt a memory with this model")
    s = bb.shape
    if (spec.num_layers, spec.num_kv_heads, spec.head_dim) != (s.num_layers, s.num_kv_heads, s.head_dim):
        raise MismatchError(f"{path} holds KV of shape (layers, heads, head dim) "
                            f"{(spec.num_layers, spec.num_kv_heads, spec.head_dim)}, the model has "
                            f"{(s.num_layers, s.num_kv_heads, s.head_dim)}")
    if key_layer is not None and key_layer != spec.key_layer:
        raise MismatchError(f"--key-layer {key_layer} differs from the key layer {spec.key_layer} of {path}; "
                            f"omit --key-layer to use the memory's")


def resolve_key(bb: Backbone, opts: ExportOptions, spec: Any | None) -> tuple[int, str]:
    """(key layer, pooling): the memory's when given, else the option or the default."""
    if spec is not None:
        return int(spec.key_layer), spec.key_pooling
    layer = default_key_layer(bb.shape.num_layers) if opts.key_layer is None else opts.key_layer
    if not 0 <= layer <= bb.shape.num_layers:
        raise InputError(f"--key-layer {layer} is outside the model's layers 0..{bb.shape.num_layers}")
    return layer, opts.key_pooling


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


def export_tokenizer(bb: Backbone, folder: str) -> dict:
    """tokenizer.json (+ tokenizer_config.json with the chat template); the manifest section.

    The device encodes with ``tokenizers`` alone, so the post-processor in tokenizer.json
    must reproduce ``tokenizer(text)`` of Hugging Face (a BOS it adds, included): checked
    on probe texts here rather than discovered on the device.
    """
    from tokenizers import Tokenizer

    tok = bb.tokenizer
    if not getattr(tok, "is_fast", False):
        raise InputError(f"{bb.source}: the model has no fast tokenizer (tokenizer.json), which the device needs")
    tok.save_pretrained(folder, legacy_format=False, save_jinja_files=False)
    device = Tokenizer.from_file(os.path.join(folder, TOKENIZER_FILE))
    for text in TOKENIZER_PROBES:
        want, got = list(tok(text).input_ids), device.encode(text).ids
        if want != got:
            raise InputError(f"the model's tokenizer cannot be reproduced from tokenizer.json alone "
                             f"({text!r}: Hugging Face {want[:8]}, tokenizers {got[:8]}); not supported")
    bos = tok.bos_token_id
    with_special = list(tok("a").input_ids)
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    from edgekv.runtime.tokenizer import DeviceTokenizer, chat_turn_of

    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
    chat_turn = chat_turn_of(DeviceTokenizer.load(os.path.join(folder, TOKENIZER_FILE), template, special)) \
        if template else None
    return {
        "file": TOKENIZER_FILE, "chat_template": template, "chat_turn": chat_turn,
        "eos_token_ids": [int(i) for i in bb.eos_token_ids],
        "bos_token_id": None if bos is None else int(bos),
        "pad_token_id": None if tok.pad_token_id is None else int(tok.pad_token_id),
        "add_bos": bool(bos is not None and with_special[:1] == [bos] and list(tok("a", add_special_tokens=False)
                                                                             .input_ids)[:1] != [bos]),
        "bos_token": tok.bos_token, "eos_token": tok.eos_token,
    }


def manifest_data(bb: Backbone, key: tuple[int, str], weights: str, tokenizer: dict, files: dict,
                  index: dict | None) -> dict:
    s = bb.shape
    rope = None if bb.rope is None else {"inv_freq": [float(x) for x in bb.rope.inv_freq],
                                         "attention_scaling": float(bb.rope.attention_scaling)}
    return {
        "edgekv_version": __version__, "model_type": s.model_type, "model_fingerprint": bb.fingerprint,
        "source": str(bb.source), "num_layers": s.num_layers, "num_kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim, "hidden_size": s.hidden_size, "vocab_size": s.vocab_size,
        "max_positions": s.max_positions, "rope": rope,
        "key": {"layer": key[0], "pooling": key[1], "file": KEY_FILE},
        "decoder": {"file": DECODER_FILE, "weights": weights, "num_layers": s.num_layers},
        "tokenizer": tokenizer, "files": files, "index": index,
    }


# --- the whole export ---------------------------------------------------------------
def _export_into(model: str, folder: str, opts: ExportOptions, stages: Stages) -> dict:
    spec = memory_spec(opts.memory) if opts.memory else None
    with stages.stage("load"):
        bb = load_backbone(model)
    if spec is not None:
        check_memory(spec, opts.memory, bb, opts.key_layer)
    key = resolve_key(bb, opts, spec)
    fp32_dir = os.path.join(folder, ".fp32") if opts.quantize_weights else folder
    summary: dict = {"decoder": {"weights": opts.quantize_weights or "fp32", "graph": opts.graph}}
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
    with stages.stage("tokenizer"):
        tokenizer = export_tokenizer(bb, folder)
    index = None
    if opts.memory:
        with stages.stage("index"):
            from edgekv.index import INDEX_META, build_index

            index = build_index(opts.memory, folder)
    with stages.stage("manifest"):
        names = [*decoder_names, *key_names, TOKENIZER_FILE] + ([index["file"], INDEX_META] if index else [])
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
    t0 = time.perf_counter()
    from edgekv.export import vlm  # vision-language models: their own graphs (export/vlm.py)

    is_vlm = vlm.vlm_type(model) is not None
    stages = Stages(vlm.stage_names(opts) if is_vlm else stage_names(opts), progress)
    staging = staging_dir(out_dir)
    try:
        summary = (vlm.export_vlm_into if is_vlm else _export_into)(model, staging, opts, stages)
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
                 graph: str = "fused") -> dict:
    """Export MODEL (folder, .gguf or built-in name) into ``out_dir``; return the summary."""
    opts = ExportOptions(quantize_weights=quantize_weights, memory=memory, key_layer=key_layer, force=force,
                         graph=graph)
    return run_export(model, out_dir, opts, progress)
