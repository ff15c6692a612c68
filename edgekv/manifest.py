"""``manifest.json``: what an export folder holds and how the device runtime must read it.

Written by ``edgekv export`` (host), read by ``edgekv.runtime`` (device), so this module
imports neither numpy nor torch. The manifest binds the folder together:

* the model fingerprint (the one memory files carry), shapes and RoPE parameters;
* the key graph's layer and pooling, the decoder file and its weight type;
* the tokenizer file, chat template, special-token ids and whether encoding adds a BOS;
* ``files``: the sha256 of every file the runtime loads. Reading checks each one, so a
  truncated copy or a file from another export is refused before anything runs;
* ``index``: the HNSW index description (``edgekv.index.build_index``) or null;
* ``vision`` (optional; only vision-language exports, ``edgekv.export.vlm``): the vision
  graph and embedding table files, the image token and its id, the image processor's
  settings (``edgekv.runtime.vision``) and the family's prompt tokens. Absent in text-only
  manifests, which are unchanged by it.

Invariants: JSON with sorted keys; ``manifest_version`` 1; every file named under
``key``, ``decoder``, ``tokenizer``, ``index`` (and ``vision``) is listed in ``files``; file names are
plain names inside the folder (no paths), so a hostile manifest cannot point outside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

from edgekv import __version__
from edgekv.atomic import write_file_atomic
from edgekv.errors import CorruptFileError, InputError, MismatchError

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB (the chat template); refuse hostile sizes
WEIGHT_TYPES = ("fp32", "int8", "int4", "int4-a8")
POOLINGS = ("mean", "last")

_INT = "int"  # an int that is not a bool
_NUM = "number"
_OPT_STR = (str, type(None))
_OPT_INT = (_INT, type(None))

# field -> expected type(s); nested sections below.
SCHEMA = {
    "edgekv_version": str, "manifest_version": _INT, "model_type": str, "model_fingerprint": str,
    "source": str, "num_layers": _INT, "num_kv_heads": _INT, "head_dim": _INT, "hidden_size": _INT,
    "vocab_size": _INT, "max_positions": _INT, "rope": (dict, type(None)), "key": dict, "decoder": dict,
    "tokenizer": dict, "files": dict, "index": (dict, type(None)),
}
SECTIONS = {
    "rope": {"inv_freq": list, "attention_scaling": _NUM},
    "key": {"layer": _INT, "pooling": str, "file": str},
    "decoder": {"file": str, "weights": str, "num_layers": _INT},
    "tokenizer": {"file": str, "chat_template": _OPT_STR, "eos_token_ids": list, "bos_token_id": _OPT_INT,
                  "pad_token_id": _OPT_INT, "add_bos": bool, "bos_token": _OPT_STR, "eos_token": _OPT_STR},
    "index": {"file": str},
}
# Optional sections: absent (or null) in text-only exports, so their manifests are unchanged.
OPTIONAL_SECTIONS = {
    # vision-language models (edgekv.export.vlm): vision graph, embedding table, image token, processor
    "vision": {"family": str, "file": str, "embeddings": str, "image_token": str, "image_token_id": _INT,
               "processor": dict},
}
# Ranges checked before the runtime sizes anything by these fields (as edgekv.format does for
# memory headers): a hostile manifest must not make it build a billion-layer past.
RANGES = {"num_layers": (1, 1024), "num_kv_heads": (1, 1024), "head_dim": (1, 4096), "hidden_size": (1, 1 << 16),
          "vocab_size": (0, 1 << 24), "max_positions": (0, (1 << 31) - 1)}
MAX_LIST = 1 << 16  # eos ids, inv_freq
MAX_TURN_CHARS = 1 << 20  # tokenizer.chat_turn prefix + suffix (as the template's rendered length)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder: str, names: list[str]) -> dict[str, str]:
    """{name: sha256 hex} for files inside ``folder``."""
    return {name: file_sha256(os.path.join(folder, name)) for name in sorted(set(names))}


# --- validation ------------------------------------------------------------------
def _is(value: object, typ: object) -> bool:
    if isinstance(typ, tuple):
        return any(_is(value, t) for t in typ)
    if typ == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)  # type: ignore[arg-type]


def _type_name(typ: object) -> str:
    if isinstance(typ, tuple):
        return " or ".join(_type_name(t) for t in typ)
    return typ if isinstance(typ, str) else ("null" if typ is type(None) else typ.__name__)  # type: ignore[union-attr]


def _check_fields(data: dict, schema: dict, where: str) -> None:
    for name, typ in schema.items():
        if name not in data:
            raise ValueError(f"field {where}{name!r} is missing")
        if not _is(data[name], typ):
            raise ValueError(f"field {where}{name!r} must be {_type_name(typ)}, got {type(data[name]).__name__}")


def _check_name(name: str) -> None:
    """A file name the manifest may refer to: plain, inside the folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"file name {name!r} is not a plain file name inside the export folder")


def validate(data: object) -> None:
    """Raise ValueError naming the first field that is missing, mistyped or inconsistent."""
    if not isinstance(data, dict):
        raise ValueError("the manifest must be a JSON object")
    _check_fields(data, SCHEMA, "")
    if data["manifest_version"] != MANIFEST_VERSION:
        raise ValueError(f"manifest_version {data['manifest_version']} is not supported (this edgekv reads "
                         f"{MANIFEST_VERSION}); export again with this edgekv version")
    for section, schema in SECTIONS.items():
        if data[section] is not None:
            _check_fields(data[section], schema, f"{section}.")
    if data["key"]["pooling"] not in POOLINGS:
        raise ValueError(f"field 'key.pooling' must be one of {POOLINGS}")
    if data["decoder"]["weights"] not in WEIGHT_TYPES:
        raise ValueError(f"field 'decoder.weights' must be one of {WEIGHT_TYPES}")
    for name, (low, high) in RANGES.items():
        if not low <= data[name] <= high:
            raise ValueError(f"field {name!r} = {data[name]} is outside [{low}, {high}]")
    if data["decoder"]["num_layers"] != data["num_layers"]:
        raise ValueError("field 'decoder.num_layers' differs from 'num_layers'")
    if not 0 <= data["key"]["layer"] <= data["num_layers"]:
        raise ValueError(f"field 'key.layer' must be in [0, num_layers={data['num_layers']}]")
    if data["rope"] is not None:
        rope = data["rope"]
        if not all(_is(x, _NUM) and math.isfinite(x) for x in rope["inv_freq"]):
            raise ValueError("field 'rope.inv_freq' must be a list of finite numbers")
        if not 0 < 2 * len(rope["inv_freq"]) <= data["head_dim"]:
            raise ValueError("field 'rope.inv_freq' must hold 1 to head_dim/2 frequencies")
        if not math.isfinite(rope["attention_scaling"]):
            raise ValueError("field 'rope.attention_scaling' must be a finite number")
    eos = data["tokenizer"]["eos_token_ids"]
    if len(eos) > MAX_LIST or not all(_is(x, _INT) and 0 <= x < 1 << 31 for x in eos):
        raise ValueError("field 'tokenizer.eos_token_ids' must be a list of token ids (non-negative integers)")
    turn = data["tokenizer"].get("chat_turn")  # optional: the pre-rendered user turn (runtime/tokenizer.py)
    if turn is not None:
        if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in
                                                 ("prefix", "suffix", "template_sha256")):
            raise ValueError("field 'tokenizer.chat_turn' must be null or hold strings prefix, suffix, template_sha256")
        if len(turn["prefix"]) + len(turn["suffix"]) > MAX_TURN_CHARS:
            raise ValueError(f"field 'tokenizer.chat_turn' is longer than {MAX_TURN_CHARS} characters")
    files = data["files"]
    for name, digest in files.items():
        _check_name(name)
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"files[{name!r}] must be a sha256 hex string")
    for section in ("key", "decoder", "tokenizer", "index"):
        if data[section] is not None and data[section]["file"] not in files:
            raise ValueError(f"{section}.file {data[section]['file']!r} is not listed in 'files'")
    for section, schema in OPTIONAL_SECTIONS.items():
        if data.get(section) is not None:
            if not isinstance(data[section], dict):
                raise ValueError(f"field {section!r} must be dict or null")
            _check_fields(data[section], schema, f"{section}.")
    if data.get("vision") is not None:
        for name in (data["vision"]["file"], data["vision"]["embeddings"]):
            if name not in files:
                raise ValueError(f"vision file {name!r} is not listed in 'files'")
    # optional key.input: what key.onnx reads ("inputs_embeds": token embeddings, VLM exports only)
    key_input = data["key"].get("input", "input_ids")
    if key_input not in ("input_ids", "inputs_embeds") or (key_input == "inputs_embeds" and not data.get("vision")):
        raise ValueError(f"field 'key.input' must be 'input_ids', or 'inputs_embeds' with a 'vision' section; "
                         f"got {key_input!r}")


# --- reading and writing ---------------------------------------------------------
def write_manifest(folder: str, data: dict) -> str:
    """Validate ``data`` and write ``folder/manifest.json`` atomically (sorted keys); return the path."""
    data = {"edgekv_version": __version__, "manifest_version": MANIFEST_VERSION, **data}
    try:
        validate(data)
    except ValueError as e:
        raise InputError(f"cannot write manifest: {e}") from None
    path = os.path.join(folder, MANIFEST_FILE)
    write_file_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def bounded_file(path: str, limit: int, what: str, if_missing: str) -> None:
    """Refuse an artifact file that is missing (:class:`InputError`; ``if_missing`` says why and
    what to do) or larger than ``limit`` bytes (:class:`CorruptFileError`: not read at all)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: {if_missing}")
    size = os.path.getsize(path)
    if size > limit:
        raise CorruptFileError(f"{path}: {size} bytes is too large for {what} (limit {limit}); re-export the model")


def _load(path: str) -> dict:
    bounded_file(path, MAX_MANIFEST_BYTES, "a manifest",
                 "no such file: not an edgekv export folder (write one with `edgekv export`)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        validate(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise CorruptFileError(f"{path}: not a valid edgekv manifest ({e}); re-export the model") from None
    return data


def verify_files(folder: str, files: dict[str, str]) -> None:
    """Each listed file exists in ``folder`` and has the recorded sha256."""
    for name in sorted(files):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise InputError(f"{name} is missing from {folder}: re-export the model or restore the file")
        if file_sha256(path) != files[name]:
            raise MismatchError(f"{name} does not match manifest.json (hash differs): "
                                f"re-export or restore the file")


def read_manifest(folder: str, verify_hashes: bool = True) -> dict:
    """Read and validate ``folder/manifest.json``; with ``verify_hashes`` check every file's sha256."""
    data = _load(os.path.join(folder, MANIFEST_FILE))
    if verify_hashes:
        verify_files(folder, data["files"])
    return data


def is_export_folder(folder: str) -> bool:
    """True when ``folder`` holds a manifest.json (an earlier edgekv export, valid or not)."""
    return os.path.isfile(os.path.join(folder, MANIFEST_FILE))
