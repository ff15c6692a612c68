"""What the text export (``pipeline``) and the vision-language export (``vlm``) share.

The options of ``edgekv export``, the memory checks and the retrieval-key choice, the
tokenizer the device encodes with and the manifest's common sections. Both exports import
this module; it imports neither of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from edgekv import __version__
from edgekv.compat import ModelSide, check_memory_matches
from edgekv.configs import Config, knob
from edgekv.errors import InputError
from edgekv.export.onnx_export import DECODER_FILE, DEFAULT_OPSET, KEY_FILE
from edgekv.host.models import Backbone, default_key_layer
from edgekv.manifest import POOLINGS

TOKENIZER_FILE = "tokenizer.json"
QUANTIZE_CHOICES = ("int8", "int4", "int4-a8")
GRAPHS = ("fused", "optimum")
TOKENIZER_PROBES = ("hello world", "  two leading spaces", "Question: 2+2?\nAnswer: 4", "Ünïcödé ☃ — ok")


@dataclass(frozen=True)
class ExportOptions(Config):
    """What ``edgekv export`` writes besides the fp32 decoder."""

    quantize_weights: str | None = knob(None, "'int8', 'int4' or 'int4-a8': block-wise decoder weights "
                                              "(MatMulNBits; int4-a8: int8 activations in every linear, "
                                              "faster, top-1 a little lower). Default: fp32.")
    graph: str = knob("fused", "'fused': edgekv's decoder graph (a family it does not cover falls back to "
                               "'optimum'); 'optimum': optimum's export (fp32 only).")
    memory: str | None = knob(None, "Memory file (.ekv): check it belongs to the model and build its HNSW index.")
    key_layer: int | None = knob(None, "Layer the retrieval key pools (default: the memory's, else the model "
                                       "default).")
    key_pooling: str = "mean"  # mean | last (a memory's own pooling wins)
    force: bool = knob(False, "Replace a non-empty output folder that is not an edgekv export.")
    sign: str | None = knob(None, "Private key file (`edgekv keys generate`): sign manifest.json "
                                  "(manifest.json.sig) so that boards run it with --trust.")
    opset: int = DEFAULT_OPSET  # ONNX opset of both graphs
    check: bool = True  # compare the decoder with PyTorch at export time

    def __post_init__(self) -> None:
        if self.quantize_weights not in (None, *QUANTIZE_CHOICES):
            raise InputError(f"ExportOptions.quantize_weights must be one of {QUANTIZE_CHOICES}, "
                             f"got {self.quantize_weights!r}")
        if self.graph not in GRAPHS:
            raise InputError(f"ExportOptions.graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.graph == "optimum" and self.quantize_weights:
            raise InputError("ExportOptions.quantize_weights needs edgekv's fused graph, not graph='optimum'")
        if self.key_layer is not None and self.key_layer < 0:
            raise InputError(f"ExportOptions.key_layer must be >= 0, got {self.key_layer}")
        if self.key_pooling not in POOLINGS:
            raise InputError(f"ExportOptions.key_pooling must be one of {POOLINGS}, got {self.key_pooling!r}")
        if self.opset < 14:
            raise InputError(f"ExportOptions.opset must be >= 14, got {self.opset}")


# --- memory -------------------------------------------------------------------------
def memory_spec(path: str) -> Any:
    from edgekv.format import Memory

    with Memory(path) as mem:
        return mem.spec


def check_memory(spec: Any, path: str, bb: Backbone, key_layer: int | None) -> None:
    """The memory was built with this backbone (the one check, edgekv.compat: fingerprint, KV
    shapes, key dimension, RoPE), and its key layer is the one asked for (``ExportOptions.key_layer``)."""
    s = bb.shape
    check_memory_matches(spec, ModelSide(
        bb.fingerprint, s.num_layers, s.num_kv_heads, s.head_dim, s.hidden_size, bb.rope, key_layer,
        name=str(bb.source), key_source="ExportOptions.key_layer",
        fix_model="export the model the memory was adapted with, or adapt a memory with this model",
        fix_key="leave ExportOptions.key_layer unset to use the memory's"), path)


def resolve_key(bb: Backbone, opts: ExportOptions, spec: Any | None) -> tuple[int, str]:
    """(key layer, pooling): the memory's when given, else the option or the default."""
    if spec is not None:
        return int(spec.key_layer), spec.key_pooling
    layer = default_key_layer(bb.shape.num_layers) if opts.key_layer is None else opts.key_layer
    if not 0 <= layer <= bb.shape.num_layers:
        raise InputError(f"ExportOptions.key_layer = {layer} is outside the model's layers 0..{bb.shape.num_layers}")
    return layer, opts.key_pooling


# --- tokenizer and manifest ---------------------------------------------------------
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


def tokenizer_and_index(bb: Backbone, folder: str, memory: str | None, stages: Any
                        ) -> tuple[dict, dict | None, list[str]]:
    """The stages both exports run before the manifest: the tokenizer, then the HNSW index of
    ``memory`` (if any). -> (tokenizer section, index metadata or None, the files they wrote)."""
    with stages.stage("tokenizer"):
        tokenizer = export_tokenizer(bb, folder)
    if not memory:
        return tokenizer, None, [TOKENIZER_FILE]
    with stages.stage("index"):
        from edgekv.index import INDEX_META, build_index

        index = build_index(memory, folder)
    return tokenizer, index, [TOKENIZER_FILE, index["file"], INDEX_META]


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
