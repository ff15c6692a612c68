"""Hostile-file fuzzer: edgekv's readers refuse bad bytes with their own errors, and nothing else.

Targets (each feeds a file to edgekv the way a user's command would):

* ``memory``    ``Memory()`` + ``read_keys`` / ``read_entry`` / ``slot_info`` / ``verify``, an
                exact ``Retriever`` search, ``describe_memory`` (``edgekv inspect``) and, when the
                file opens, a ``commit_update`` into it;
* ``manifest``  ``read_manifest`` (hashes checked); a manifest it accepts is loaded with
                ``Runtime.load`` (a memory of the same model) and generates two tokens;
* ``index``     a ``Retriever`` forced to HNSW over a *self-consistent but hostile* pair:
                ``index.hnsw`` mutated, ``index.json`` rewritten with the mutated file's sha256
                and the memory's own keys digest (what an attacker who can write the folder
                does), sometimes ``index.json`` mutated too; then searches;
* ``tokenizer`` ``DeviceTokenizer.load`` of a mutated ``tokenizer.json`` (and a mutated chat
                template), then encode / decode / chat encode;
* ``data``      ``read_examples`` over generated and mutated ``.json`` / ``.jsonl`` task files;
* ``update``    ``read_update`` + ``apply_update`` (``edgekv memory apply``) of a mutated memory
                update to a fresh copy of its base; the memory must stay the base or become the
                update's result, byte for byte.

A case passes when the call returns or raises an ``EdgeKVError`` subclass. A *finding* is:
another exception (with the frame it came from), a case slower than ``--case-seconds`` (hang),
peak RSS growing by more than ``--alloc-mib`` (an allocation sized by a field; inputs are a
few KB), or the worker process dying (a crash in C code: the supervisor sees the signal).
Each target runs in its own worker process; findings are saved under
``benchmarks/results/fuzz-findings/`` (replay one with ``--replay FILE --target T``).

Engines: ``hypothesis`` (default; structured and byte-level mutations of valid seed files,
seeded, no shrinking) and ``atheris`` (coverage-guided over raw file bytes, seeded with the
same seed files; only if ``pip install atheris`` worked).

    python scripts/fuzz.py                              # full run, >= 10,000 cases -> benchmarks/results/fuzz.json
    python scripts/fuzz.py --target index --cases 500   # one target
    python scripts/fuzz.py --engine atheris --target memory --cases 20000
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
FINDINGS_DIR = os.path.join(RESULTS, "fuzz-findings")
TARGETS = ("memory", "manifest", "index", "tokenizer", "data", "update")
FULL_CASES = {"memory": 4000, "manifest": 1500, "index": 2000, "tokenizer": 1000, "data": 3000,
              "update": 10000}  # 21,500

INTERESTING = [0, 1, 2, 3, 7, 8, 15, 16, 31, 63, 64, 65, 127, 128, 255, 256, 1023, 4096, 0x7FFF, 0xFFFF,
               0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
INT_FORMATS = {"<B": (0, 0xFF), "<H": (0, 0xFFFF), "<I": (0, 0xFFFFFFFF), "<i": (-(1 << 31), (1 << 31) - 1),
               "<Q": (0, (1 << 64) - 1)}


class Hang(Exception):
    """A case ran past its time limit."""


# ---------------------------------------------------------------------------------
# byte and JSON mutations (hypothesis strategies)
# ---------------------------------------------------------------------------------
def _st():
    from hypothesis import strategies as st

    return st


def pack_int(fmt: str, value: int) -> bytes:
    lo, hi = INT_FORMATS[fmt]
    return struct.pack(fmt, min(max(value, lo), hi) if lo < 0 else value % (hi + 1))


def byte_ops(size_hint: int):
    """Strategy: a list of raw byte edits; positions biased to the first 256 bytes (headers)."""
    st = _st()
    pos = st.one_of(st.integers(0, 255), st.integers(0, max(size_hint - 1, 0)))
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("int"), pos, st.sampled_from(sorted(INT_FORMATS)), st.sampled_from(INTERESTING)),
        st.tuples(st.just("truncate"), st.integers(0, max(size_hint, 1))),
        st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
    ), min_size=1, max_size=4)


def apply_byte_ops(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "flip" and b:
            b[op[1] % len(b)] ^= op[2]
        elif kind == "int" and b:
            raw = pack_int(op[2], op[3])
            p = op[1] % len(b)
            b[p: p + len(raw)] = raw
        elif kind == "truncate":
            del b[op[1]:]
        elif kind == "extend":
            b += op[1]
        elif kind == "insert":
            p = op[1] % (len(b) + 1)
            b[p:p] = op[2]
        elif kind == "delete" and b:
            p = op[1] % len(b)
            del b[p: p + op[2]]
    return bytes(b)


def json_values():
    """Strategy: hostile JSON values (huge/negative ints, NaN, path-like strings, nesting)."""
    st = _st()
    scalars = st.one_of(
        st.none(), st.booleans(), st.sampled_from(INTERESTING + [-1, -(1 << 63), 10**30, -(10**30)]),
        st.integers(), st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["", "..", "../../etc/passwd", "/etc/passwd", "a/b", "x\x00y", "model.onnx", "\ud800",
                         "{{ cycler.__init__.__globals__ }}", "0" * 64, "mean", "int8"]),
        st.text(max_size=40))
    return st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), c, max_size=4)),
                        max_leaves=12)


def mutated_json(seed_obj, max_ops: int = 3):
    """Strategy: ``seed_obj`` with 1..max_ops edits at random paths (replace, delete, add, nest)."""
    st = _st()

    @st.composite
    def build(draw):
        obj = copy.deepcopy(seed_obj)
        for _ in range(draw(st.integers(1, max_ops))):
            parent, key, node = None, None, obj
            for _ in range(draw(st.integers(0, 6))):
                if isinstance(node, dict) and node:
                    k = draw(st.sampled_from(sorted(node)))
                    parent, key, node = node, k, node[k]
                elif isinstance(node, list) and node:
                    i = draw(st.integers(0, len(node) - 1))
                    parent, key, node = node, i, node[i]
                else:
                    break
            op = draw(st.sampled_from(["replace", "replace", "delete", "add", "nest", "number"]))
            if parent is None:
                if op == "nest":
                    obj = [obj] if draw(st.booleans()) else {"x": obj}
                continue
            if op == "replace":
                parent[key] = draw(json_values())
            elif op == "delete":
                del parent[key]
            elif op == "add" and isinstance(node, dict):
                node[draw(st.text(max_size=12))] = draw(json_values())
            elif op == "add" and isinstance(node, list):
                node.append(draw(json_values()))
            elif op == "nest":
                parent[key] = [node] * draw(st.integers(1, 3))
            elif op == "number" and isinstance(node, (int, float)) and not isinstance(node, bool):
                parent[key] = draw(st.sampled_from(INTERESTING + [-1, -node if node else -1, node + 1, node * 1000]))
        return obj

    return build()


def json_text(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


def hostile_json_texts():
    """Strategy: JSON texts no writer produces: deep nesting, 5000-digit ints, bad UTF-8."""
    st = _st()
    return st.one_of(
        st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * (n % 3)),
        st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * (n % 5)),
        st.integers(4000, 20_000).map(lambda n: b'{"id": ' + b"9" * n + b"}"),
        st.sampled_from([b"\xff\xfe", b"\xef\xbb\xbf[]", b"\x00" * 64, b'"\\ud800"', b"NaN", b"-Infinity",
                         b'{"id": 1e999}', b"\xc3\x28", b"[" + b"1," * 50_000 + b"1]"]),
        st.binary(max_size=512))


# ---------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------
class Target:
    name = ""

    def __init__(self, work: str, export_dir: str | None = None):
        self.work = work
        self.export_dir = export_dir
        os.makedirs(work, exist_ok=True)

    def setup(self) -> None:  # build seed files
        pass

    def strategy(self):  # hypothesis strategy of cases
        raise NotImplementedError

    def run(self, case) -> str:  # returns "accepted" or raises
        raise NotImplementedError

    def seed_files(self) -> list[bytes]:  # valid inputs
        return []

    def atheris_seeds(self) -> list[bytes]:  # atheris corpus: seed files as from_bytes reads them
        return self.seed_files()

    def from_bytes(self, data: bytes):  # atheris: raw bytes -> case
        return data

    def encode_case(self, case) -> bytes:  # for saving a finding
        return case if isinstance(case, bytes) else json.dumps(case, default=repr).encode()

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.work, name)
        with open(path, "wb") as f:
            f.write(data)
        return path


def _header_fields():
    from edgekv.format import HEADER

    names = ["magic", "version", "header_bytes", "budget", "file_bytes", "generation", "fingerprint",
             "num_layers", "num_kv_heads", "head_dim", "pooled_len", "key_dim", "payload", "rope_kind",
             "num_tasks", "rotary_dim", "proj_max_dirs", "proj_num_dirs", "attention_scaling", "tau",
             "num_slots", "slot_bytes", "table_offset", "slots_offset", "next_entry_id", "table_crc32",
             "key_layer", "pooling", "top_k"]
    codes = [c for c in HEADER.format[1:].split() if not c.endswith("x")]  # the reserved byte is no field
    out, off = {}, 0
    for name, code in zip(names, codes, strict=True):
        size = struct.calcsize("<" + code)
        if code[-1] in "BHIQ":
            out[name] = (off, "<" + code)
        elif code == "f":
            out[name] = (off, "<f")
        off += size
    return out


class MemoryTarget(Target):
    """Valid memories mutated in bytes, in header fields (header CRC made valid again, so the
    deeper checks are reached) and in slot-table rows (table and header CRCs made valid)."""

    name = "memory"

    def setup(self) -> None:
        from edgekv.format import Entry, MemorySpec, commit_update, create_memory
        from edgekv.retrieval import fit_projection
        from edgekv.rope import RopeSpec

        rng = np.random.default_rng(5)
        self.seeds = []
        specs = [MemorySpec(2, 2, 8, 4, 16, "5a" * 32, "int8", RopeSpec((1.0, 0.25), 1.0), proj_max_dirs=2),
                 MemorySpec(1, 1, 4, 2, 8, "6b" * 32, "fp16", None, proj_max_dirs=0, key_pooling="last")]
        for i, spec in enumerate(specs):
            path = os.path.join(self.work, f"seed{i}.ekv")
            if os.path.exists(path):
                os.remove(path)
            create_memory(path, spec, spec.file_bytes_for(5)).close()
            shape = spec.payload_shape
            put = {s: Entry.from_float(rng.normal(size=spec.key_dim), rng.normal(size=shape), rng.normal(size=shape),
                                       spec.payload_dtype, f"task-{s % 2}", f"src-{s}") for s in (0, 2, 3)}
            proj = fit_projection(rng.normal(size=(6, spec.key_dim)), spec.proj_max_dirs)
            commit_update(path, put=put, clear=[], projection=proj if spec.proj_max_dirs else None, top_k=2 + i)
            with open(path, "rb") as f:
                self.seeds.append(f.read())
        self.fields = _header_fields()

    def seed_files(self) -> list[bytes]:
        return self.seeds

    def strategy(self):
        st = _st()
        field = st.tuples(st.just("field"), st.sampled_from(sorted(self.fields)),
                          st.one_of(st.sampled_from(INTERESTING), st.integers(-3, 3), st.floats()))
        row = st.tuples(st.just("row"), st.integers(0, 4), st.integers(0, 63), st.integers(0, 255))
        return st.tuples(st.integers(0, len(self.seeds) - 1),
                         st.lists(st.one_of(field, row), max_size=3),
                         st.one_of(st.just([]), byte_ops(20_000)), st.booleans())

    def build(self, case) -> bytes:
        seed, structured, raw_ops, recrc = case
        b = bytearray(self.seeds[seed])
        hb = struct.unpack_from("<I", b, 12)[0]
        for op in structured:
            if op[0] == "field":
                off, fmt = self.fields[op[1]]
                value = op[2]
                if fmt == "<f":
                    with np.errstate(over="ignore"):
                        struct.pack_into("<f", b, off, float(np.float32(value)))
                else:
                    if isinstance(value, float):  # a float drawn for an integer field: its integer part
                        value = int(value) if np.isfinite(value) and abs(value) < 1e18 else 0
                    old = struct.unpack_from(fmt, b, off)[0]
                    b[off: off + struct.calcsize(fmt)] = pack_int(fmt, old + value if -3 <= value <= 3 else value)
            else:  # a table row byte, then the table CRC made valid again
                _, slot, byte, value = op
                num_slots = struct.unpack_from("<I", b, 116)[0]
                if slot < num_slots and hb + 64 * num_slots <= len(b):
                    b[hb + 64 * slot + byte] = value
                    struct.pack_into("<I", b, 148, zlib.crc32(bytes(b[hb: hb + 64 * num_slots])))
        if recrc and 160 < hb <= len(b):
            struct.pack_into("<I", b, hb - 4, zlib.crc32(bytes(b[: hb - 4])))
        return apply_byte_ops(bytes(b), raw_ops) if raw_ops else bytes(b)

    def encode_case(self, case) -> bytes:
        return self.build(case) if isinstance(case, tuple) else case

    def run(self, case) -> str:
        from edgekv.commands.inspect import describe_memory
        from edgekv.format import Entry, Memory, commit_update
        from edgekv.index import Retriever

        data = self.build(case) if isinstance(case, tuple) else case
        path = self.write("case.ekv", data)
        with Memory(path) as mem:
            occ = mem.occupied()
            mem.read_keys()
            for s in occ[:8]:
                mem.read_entry(int(s))
                mem.slot_info(int(s))
            mem.per_task_counts()
            mem.verify()
            r = Retriever(mem)
            if len(r):
                q = np.ones(mem.spec.key_dim, np.float32) / np.sqrt(mem.spec.key_dim)
                r.search(q, min(3, len(r)))
            spec, free = mem.spec, [s for s in range(mem.num_slots) if s not in set(occ.tolist())]
        describe_memory(path)
        if np.prod(spec.payload_shape) <= 1 << 16 and spec.key_dim <= 4096:
            shape = spec.payload_shape
            e = Entry.from_float(np.ones(spec.key_dim), np.ones(shape), np.ones(shape), spec.payload_dtype, "fz", "fz")
            commit_update(path, put={(free or [0])[0]: e})
            with Memory(path) as mem:
                mem.verify()
        return "accepted"


class IndexTarget(Target):
    """A memory of 60 entries and its HNSW index (M=4, so several levels); each case mutates
    index.hnsw and rewrites index.json to match it (sha256) and the memory (keys digest)."""

    name = "index"
    fields = {"offsetLevel0": (0, "<Q"), "max_elements": (8, "<Q"), "count": (16, "<Q"),
              "size_data_per_element": (24, "<Q"), "label_offset": (32, "<Q"), "offsetData": (40, "<Q"),
              "maxlevel": (48, "<i"), "enterpoint": (52, "<I"), "maxM": (56, "<Q"), "maxM0": (64, "<Q"),
              "M": (72, "<Q"), "ef_construction": (88, "<Q")}

    def setup(self) -> None:
        from edgekv.format import Entry, MemorySpec, commit_update, create_memory
        from edgekv.index import INDEX_FILE, INDEX_META, IndexConfig, build_index

        spec = MemorySpec(1, 1, 4, 1, 16, "7c" * 32, "fp16", None)
        self.mem_path = os.path.join(self.work, "idx.ekv")
        if os.path.exists(self.mem_path):
            os.remove(self.mem_path)
        create_memory(self.mem_path, spec, spec.file_bytes_for(64)).close()
        rng = np.random.default_rng(7)
        zeros = np.zeros(spec.payload_shape, np.float16)
        commit_update(self.mem_path, {int(s): Entry(rng.normal(size=16), zeros, zeros, task="t")
                                      for s in rng.choice(64, size=60, replace=False)})
        self.dir = os.path.join(self.work, "idx")
        self.seed_meta = build_index(self.mem_path, self.dir, IndexConfig(M=4, ef_construction=32))
        with open(os.path.join(self.dir, INDEX_FILE), "rb") as f:
            self.seed = f.read()
        self.index_file, self.meta_file = INDEX_FILE, INDEX_META
        n, m0 = 60, 8
        self.per_el = 4 + 4 * m0 + 4 * 16 + 8
        self.n, self.m0 = n, m0

    def seed_files(self) -> list[bytes]:
        return [self.seed]

    def strategy(self):
        st = _st()
        field = st.tuples(st.just("field"), st.sampled_from(sorted(self.fields)),
                          st.one_of(st.sampled_from(INTERESTING), st.integers(-3, 3)))
        link = st.tuples(st.just("link"), st.integers(0, self.n - 1), st.integers(0, self.m0),
                         st.one_of(st.integers(0, self.n + 2), st.sampled_from(INTERESTING)))
        label = st.tuples(st.just("label"), st.integers(0, self.n - 1), st.sampled_from(INTERESTING + [5, 63, 64]))
        upper = st.tuples(st.just("upper"), st.integers(0, 4096), st.sampled_from(INTERESTING))
        meta = st.one_of(st.none(), mutated_json(self.seed_meta, 2))
        return st.tuples(st.lists(st.one_of(field, link, label, upper), max_size=3),
                         st.one_of(st.just([]), byte_ops(len(self.seed))), meta)

    def build(self, case) -> bytes:
        structured, raw_ops, _ = case
        b = bytearray(self.seed)
        for op in structured:
            if op[0] == "field":
                off, fmt = self.fields[op[1]]
                old = struct.unpack_from(fmt, b, off)[0]
                v = old + op[2] if -3 <= op[2] <= 3 else op[2]
                b[off: off + struct.calcsize(fmt)] = pack_int(fmt, v)
            elif op[0] == "link":  # word j of element i's level-0 list (0 = the count)
                struct.pack_into("<I", b, 96 + op[1] * self.per_el + 4 * op[2], op[3] % (1 << 32))
            elif op[0] == "label":
                struct.pack_into("<Q", b, 96 + op[1] * self.per_el + self.per_el - 8, op[2] % (1 << 64))
            else:  # a u32 somewhere in the upper-level link lists
                p = 96 + self.n * self.per_el + 4 * op[1]
                if p + 4 <= len(b):
                    struct.pack_into("<I", b, p, op[2] % (1 << 32))
        return apply_byte_ops(bytes(b), raw_ops) if raw_ops else bytes(b)

    def encode_case(self, case) -> bytes:
        return self.build(case) if isinstance(case, tuple) else case

    def run(self, case) -> str:
        from edgekv.format import Memory
        from edgekv.index import Retriever, file_sha256

        data = self.build(case) if isinstance(case, tuple) else case
        meta_override = case[2] if isinstance(case, tuple) else None
        path = os.path.join(self.dir, self.index_file)
        with open(path, "wb") as f:
            f.write(data)
        meta = dict(self.seed_meta, file_sha256=file_sha256(path))  # self-consistent: what an attacker writes
        text = json_text(meta_override) if meta_override is not None else json_text(meta)
        with open(os.path.join(self.dir, self.meta_file), "wb") as f:
            f.write(text)
        with Memory(self.mem_path) as mem:
            r = Retriever(mem, self.dir, force="hnsw")
            rng = np.random.default_rng(len(data))
            for k in (1, 5, len(r)):
                q = rng.normal(size=16).astype(np.float32)
                slots, sims = r.search(q / np.linalg.norm(q), k)
                if len(slots) != min(k, len(r)) or not set(slots.tolist()) <= set(r.slots.tolist()):
                    raise AssertionError(f"search returned slots {slots.tolist()[:5]} for k={k}")
            return "hnsw" if r.mode == "hnsw" else "accepted"


class ManifestTarget(Target):
    """manifest.json of a real (tiny) export, mutated as JSON and as bytes; what read_manifest
    accepts goes through Runtime.load with a memory of the same model and generates."""

    name = "manifest"

    def setup(self) -> None:
        from edgekv.format import Entry, MemorySpec, commit_update, create_memory
        from edgekv.manifest import MANIFEST_FILE
        from edgekv.rope import RopeSpec

        self.dir = os.path.join(self.work, "art")
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
        shutil.copytree(self.export_dir, self.dir)
        with open(os.path.join(self.dir, MANIFEST_FILE), encoding="utf-8") as f:
            self.seed = json.load(f)
        self.seed_bytes = json_text(self.seed)
        m = self.seed
        rope = RopeSpec(tuple(m["rope"]["inv_freq"]), m["rope"]["attention_scaling"]) if m["rope"] else None
        spec = MemorySpec(m["num_layers"], m["num_kv_heads"], m["head_dim"], 2, m["hidden_size"],
                          m["model_fingerprint"], "int8", rope, key_layer=m["key"]["layer"],
                          key_pooling=m["key"]["pooling"])
        self.mem_path = os.path.join(self.work, "m.ekv")
        if os.path.exists(self.mem_path):
            os.remove(self.mem_path)
        create_memory(self.mem_path, spec, spec.file_bytes_for(4)).close()
        rng = np.random.default_rng(3)
        shape = spec.payload_shape
        commit_update(self.mem_path, {s: Entry.from_float(rng.normal(size=spec.key_dim), rng.normal(size=shape),
                                                          rng.normal(size=shape), "int8", "t", f"s{s}")
                                      for s in range(3)})

    def seed_files(self) -> list[bytes]:
        return [self.seed_bytes]

    def strategy(self):
        st = _st()
        as_json = mutated_json(self.seed).map(json_text)
        as_bytes = byte_ops(len(self.seed_bytes)).map(lambda ops: apply_byte_ops(self.seed_bytes, ops))
        return st.one_of(as_json, as_json, as_bytes, hostile_json_texts())

    def run(self, case: bytes) -> str:
        from edgekv.manifest import MANIFEST_FILE, read_manifest
        from edgekv.runtime import Runtime

        with open(os.path.join(self.dir, MANIFEST_FILE), "wb") as f:
            f.write(case)
        read_manifest(self.dir)
        with Runtime.load(self.dir, memory=self.mem_path, k=1, threads=1) as rt:
            rt.generate("hello world", max_new_tokens=2)
        return "accepted"


class TokenizerTarget(Target):
    """tokenizer.json of a real export mutated as JSON and as bytes, or its chat template
    mutated as text; then load, encode, decode and chat-encode."""

    name = "tokenizer"

    def setup(self) -> None:
        with open(os.path.join(self.export_dir, "tokenizer.json"), "rb") as f:
            self.seed_bytes = f.read()
        self.seed = json.loads(self.seed_bytes)
        with open(os.path.join(self.export_dir, "manifest.json"), encoding="utf-8") as f:
            tk = json.load(f)["tokenizer"]
        self.template = tk["chat_template"] or "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        self.special = {"bos_token": tk["bos_token"], "eos_token": tk["eos_token"]}

    def seed_files(self) -> list[bytes]:
        return [self.seed_bytes]

    def strategy(self):
        st = _st()
        tok_json = st.tuples(mutated_json(self.seed).map(json_text), st.just(self.template))
        tok_bytes = st.tuples(byte_ops(len(self.seed_bytes)).map(lambda ops: apply_byte_ops(self.seed_bytes, ops)),
                              st.just(self.template))
        snippets = st.sampled_from(["{{ cycler.__init__.__globals__ }}", "{{ ''.__class__.__mro__ }}",
                                    "{% for %}", "{{ 1/0 }}", "{{ messages[99]['x'] }}", "{{ 'a' * 10**9 }}",
                                    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ 2 ** 10 ** 6 }}",
                                    "{{ raise_exception('no') }}", "{% set x = range(10**9) %}", "{{ lipsum.__globals__ }}",
                                    "{{ self._TemplateReference__context }}", "{{ namespace.__init__ }}"])
        template = st.tuples(st.just(self.seed_bytes), st.tuples(st.integers(0, len(self.template)), snippets)
                             .map(lambda t: self.template[: t[0]] + t[1] + self.template[t[0]:]))
        return st.one_of(tok_json, tok_bytes, template)

    def from_bytes(self, data: bytes):
        return (data, self.template)

    def encode_case(self, case) -> bytes:
        return case[0] + b"\n--- chat template ---\n" + case[1].encode("utf-8", "surrogatepass")

    def run(self, case) -> str:
        from edgekv.runtime.tokenizer import DeviceTokenizer

        path = self.write("tokenizer.json", case[0])
        tok = DeviceTokenizer.load(path, case[1], self.special)
        for text in ("hello world", "", "Ünïcödé ☃ \x00 <|im_start|>", "code for river? " * 50):
            ids = tok.encode(text)
            tok.decode(ids)
        tok.encode_chat([{"role": "user", "content": "hello"}])
        return "accepted"


class DataTarget(Target):
    """Task files: generated records (LLaVA and simple, right and wrong), hostile JSON texts,
    and byte mutations of valid files; as .json and .jsonl."""

    name = "data"

    def seed_files(self) -> list[bytes]:
        recs = [{"id": "a", "prompt": "p", "answer": "x"},
                {"id": 2, "image": "i.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                              {"from": "gpt", "value": "r"}]}]
        return [b"\n".join(json_text(r) for r in recs), json_text(recs)]

    def strategy(self):
        st = _st()
        turn = st.fixed_dictionaries({"from": st.one_of(st.sampled_from(["human", "gpt", "system", "user", "bot"]),
                                                        json_values()),
                                      "value": st.one_of(st.text(max_size=20), json_values())})
        llava = st.fixed_dictionaries({"id": st.one_of(st.text(max_size=6), st.integers(), json_values()),
                                       "conversations": st.one_of(st.lists(turn, max_size=5), json_values())},
                                      optional={"image": st.one_of(st.text(max_size=8), json_values())})
        simple = st.fixed_dictionaries({"id": st.one_of(st.text(max_size=6), st.integers()),
                                        "prompt": st.one_of(st.text(max_size=20), json_values()),
                                        "answer": st.one_of(st.text(max_size=20), json_values())})
        record = st.one_of(llava, simple, mutated_json({"id": "a", "prompt": "p", "answer": "x"}), json_values())
        records = st.lists(record, max_size=6)
        jsonl = records.map(lambda rs: b"\n".join(json_text(r) for r in rs))
        array = records.map(json_text)
        seeds = self.seed_files()
        mutated = st.tuples(st.sampled_from(seeds), byte_ops(200)).map(lambda t: apply_byte_ops(*t))
        words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).filter(str.strip)
        good = st.lists(st.tuples(words, words, st.booleans()), min_size=1, max_size=5).map(
            lambda rs: [{"id": f"r{i}", "prompt": p, "answer": a} if simple else
                        {"id": i, "conversations": [{"from": "human", "value": "<image>\n" + p},
                                                    {"from": "gpt", "value": a}]}
                        for i, (p, a, simple) in enumerate(rs)])
        valid = st.one_of(good.map(lambda rs: b"\n".join(json_text(r) for r in rs)), good.map(json_text))
        body = st.one_of(valid, valid, jsonl, array, mutated, hostile_json_texts())
        return st.tuples(body, st.sampled_from([".jsonl", ".json", ".txt"]))

    def atheris_seeds(self) -> list[bytes]:
        jsonl, array = self.seed_files()
        return [b"\x00" + jsonl, b"\x01" + array]

    def from_bytes(self, data: bytes):  # first byte: the file's extension
        return (data[1:], [".jsonl", ".json", ".txt"][data[0] % 3] if data else ".jsonl")

    def encode_case(self, case) -> bytes:  # as from_bytes reads it: extension byte, then the file
        if isinstance(case, bytes):
            return case
        return bytes([[".jsonl", ".json", ".txt"].index(case[1])]) + case[0]

    def run(self, case) -> str:
        from edgekv.data import read_examples

        body, ext = case
        read_examples(self.write("task" + ext, body))
        return "accepted"


class UpdateTarget(Target):
    """Memory updates (``.ekvu``, ``edgekv memory apply``): valid updates mutated in bytes, in the
    fixed part's fields, in the embedded memory header's fields, in the slot lists and the table
    (each with its checksums made valid again or not, so the deeper checks are reached), applied
    to a fresh copy of their base. Besides edgekv errors only, the memory afterwards must be the
    base or the update's result byte for byte (anything else is a finding)."""

    name = "update"
    fields = {"version": (8, "<I"), "flags": (12, "<I"), "base_generation": (48, "<Q"), "new_generation": (56, "<Q"),
              "base_header_crc32": (64, "<I"), "new_header_crc32": (68, "<I"), "file_bytes": (72, "<Q"),
              "header_bytes": (80, "<I"), "num_slots": (84, "<I"), "slot_bytes": (88, "<I"),
              "num_written": (92, "<I"), "num_zeroed": (96, "<I"), "body_crc32": (132, "<I")}

    def setup(self) -> None:
        from edgekv.format import (
            Calibration,
            Entry,
            MemorySpec,
            commit_update,
            create_memory,
            write_update,
        )
        from edgekv.retrieval import fit_projection
        from edgekv.rope import RopeSpec

        rng = np.random.default_rng(9)
        specs = [MemorySpec(2, 2, 8, 4, 16, "5a" * 32, "int8", RopeSpec((1.0, 0.25), 1.0), proj_max_dirs=2),
                 MemorySpec(1, 1, 4, 2, 8, "6b" * 32, "fp16", None, proj_max_dirs=0, key_pooling="last")]
        self.seeds, self.bases, self.news, self.results = [], [], [], []
        for i, spec in enumerate(specs):
            old, new = (os.path.join(self.work, f"{n}{i}.ekv") for n in ("old", "new"))
            for p in (old, new):
                if os.path.exists(p):
                    os.remove(p)
            create_memory(old, spec, spec.file_bytes_for(6)).close()
            shape = spec.payload_shape

            def entry(task: str, spec=spec, shape=shape):
                return Entry.from_float(rng.normal(size=spec.key_dim), rng.normal(size=shape),
                                        rng.normal(size=shape), spec.payload_dtype, task, "src")
            commit_update(old, {s: entry("a") for s in (0, 1, 3)}, top_k=2)
            shutil.copy(old, new)
            proj = fit_projection(rng.normal(size=(6, spec.key_dim)), spec.proj_max_dirs) if spec.proj_max_dirs else None
            commit_update(new, {s: entry("b") for s in (1, 4)}, clear=[0], projection=proj,
                          calibration=Calibration(0.3, (0.8,) * spec.num_layers))
            upd = os.path.join(self.work, f"u{i}.ekvu")
            write_update(old, new, upd)
            self.seeds.append(open(upd, "rb").read())
            self.bases.append(open(old, "rb").read())
            self.news.append(open(new, "rb").read())
            self.results.append(hashlib.sha256(self.news[-1]).hexdigest())
        self.mem_fields = _header_fields()

    def seed_files(self) -> list[bytes]:
        return self.seeds

    def strategy(self):
        st = _st()
        field = st.tuples(st.just("field"), st.sampled_from(sorted(self.fields)),
                          st.one_of(st.sampled_from(INTERESTING), st.integers(-3, 3)))
        header = st.tuples(st.just("header"), st.sampled_from(sorted(self.mem_fields)),
                           st.one_of(st.sampled_from(INTERESTING), st.integers(-3, 3)))
        tail = st.tuples(st.just("tail"), st.integers(0, 4096), st.integers(0, 3), st.sampled_from(INTERESTING))
        return st.tuples(st.integers(0, len(self.seeds) - 1), st.lists(st.one_of(field, header, tail), max_size=3),
                         st.one_of(st.just([]), byte_ops(20_000)), st.booleans(), st.booleans(),
                         st.sampled_from([0, 0, 0, 1, 2]))  # applied to: its base, its result, another memory

    def build(self, case) -> bytes:
        seed, structured, raw_ops, recrc_header, recrc_body, _ = case
        b = bytearray(self.seeds[seed])
        hb = struct.unpack_from("<I", b, 80)[0]
        for op in structured:
            if op[0] == "tail":  # a u32 in the table / slot lists / slot bytes (after the header)
                p = 140 + hb + 4 * op[1] + op[2]
                if p + 4 <= len(b):
                    struct.pack_into("<I", b, p, op[3] % (1 << 32))
                continue
            off, fmt = self.fields[op[1]] if op[0] == "field" else self.mem_fields[op[1]]
            off += 0 if op[0] == "field" else 140
            old = struct.unpack_from(fmt, b, off)[0]
            if fmt == "<f":
                struct.pack_into("<f", b, off, float(np.float32(old + op[2] if -3 <= op[2] <= 3 else 0.5)))
            else:
                b[off: off + struct.calcsize(fmt)] = pack_int(fmt, old + op[2] if -3 <= op[2] <= 3 else op[2])
        if recrc_header and 140 + hb <= len(b) and hb > 160:
            struct.pack_into("<I", b, 140 + hb - 4, zlib.crc32(bytes(b[140: 140 + hb - 4])))
        if recrc_body:
            struct.pack_into("<I", b, 132, zlib.crc32(bytes(b[140:])))
        struct.pack_into("<I", b, 136, zlib.crc32(bytes(b[:136])))
        return apply_byte_ops(bytes(b), raw_ops) if raw_ops else bytes(b)

    def encode_case(self, case) -> bytes:
        return self.build(case) if isinstance(case, tuple) else case

    def run(self, case) -> str:
        from edgekv.format import apply_update, read_update

        data = self.build(case) if isinstance(case, tuple) else case
        seed, onto = (case[0], case[5]) if isinstance(case, tuple) else (0, 0)
        base = (self.bases[seed], self.news[seed], self.bases[1 - seed])[onto]
        path, mem = self.write("case.ekvu", data), self.write("m.ekv", base)
        allowed = {hashlib.sha256(base).hexdigest()} | ({self.results[seed]} if onto == 0 else set())
        try:
            read_update(path)
            res = apply_update(mem, path)
        finally:
            if hashlib.sha256(open(mem, "rb").read()).hexdigest() not in allowed:
                raise AssertionError("after apply the memory is neither what it was nor the update's result")
        return "accepted" if res["applied"] else "no-op"


TARGET_CLASSES = {c.name: c for c in (MemoryTarget, ManifestTarget, IndexTarget, TokenizerTarget, DataTarget, UpdateTarget)}


# ---------------------------------------------------------------------------------
# running cases
# ---------------------------------------------------------------------------------
class Recorder:
    """Runs one case with a time limit, classifies its outcome, keeps the findings."""

    def __init__(self, target: Target, case_seconds: float, alloc_mib: int, save: bool):
        self.target, self.case_seconds, self.alloc_mib, self.save = target, case_seconds, alloc_mib, save
        self.outcomes: Counter = Counter()
        self.findings: list[dict] = []
        self._seen: set = set()
        self.cases = 0
        self.rss0 = None
        self.slowest = 0.0
        self.progress_path = None
        self.baseline = None  # a git revision when fuzzing the readers as they were then
        self.out_path, self.engine, self.t0 = None, "hypothesis", time.monotonic()

    def _on_alarm(self, signum, frame):
        raise Hang(f"case ran longer than {self.case_seconds} s")

    def __call__(self, case) -> None:
        from edgekv.errors import EdgeKVError

        self.cases += 1
        if self.progress_path:  # the input of a case that kills the process stays here for --replay
            with open(self.progress_path, "wb") as f:
                f.write(self.target.encode_case(case))
        if self.rss0 is None:
            self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        old = signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.case_seconds)
        t0 = time.monotonic()
        try:
            self.outcomes[self.target.run(case)] += 1
        except EdgeKVError as e:
            self.outcomes[f"refused: {type(e).__name__}"] += 1
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            kind = "hang" if isinstance(e, Hang) else "memory" if isinstance(e, MemoryError) else "exception"
            self._finding(case, kind, e)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        self.slowest = max(self.slowest, time.monotonic() - t0)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss0) / 1024
        if grown > self.alloc_mib:
            self._finding(case, "allocation", MemoryError(f"peak RSS grew by {grown:.0f} MiB on a case"))
            self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def _finding(self, case, kind: str, e: BaseException) -> None:
        self.outcomes[f"FINDING: {kind}"] += 1
        tb = traceback.extract_tb(e.__traceback__)
        ours = [f for f in tb if f.filename.startswith(ROOT) and not any(
            part in f.filename for part in ("/scripts/", "/.venv/", "/site-packages/"))]
        frame = (ours or tb or [None])[-1]
        where = f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}" if frame else "?"
        key = (kind, type(e).__name__, where)
        data = self.target.encode_case(case)
        digest = hashlib.sha256(data).hexdigest()[:12]
        if key in self._seen:
            return
        self._seen.add(key)
        saved = None
        if self.save:
            folder = os.path.join(FINDINGS_DIR, f"baseline-{self.baseline}") if self.baseline else FINDINGS_DIR
            os.makedirs(folder, exist_ok=True)
            saved = os.path.join(folder, f"{self.target.name}-{digest}.bin")
            with open(saved, "wb") as f:
                f.write(data)
        self.findings.append({"target": self.target.name, "kind": kind, "error": type(e).__name__,
                              "message": str(e)[:300], "where": where,
                              "input": os.path.relpath(saved, ROOT) if saved else digest})
        if self.out_path:  # kept even if a later case kills the process
            with open(self.out_path, "w") as f:
                json.dump(self.result(self.engine, time.monotonic() - self.t0), f, indent=2)

    def result(self, engine: str, seconds: float) -> dict:
        return {"target": self.target.name, "engine": engine, "cases": self.cases, "seconds": round(seconds, 1),
                "slowest_case_s": round(self.slowest, 3), "outcomes": dict(sorted(self.outcomes.items())),
                "findings": self.findings}


def make_target(name: str, work: str, export_dir: str | None) -> Target:
    t = TARGET_CLASSES[name](os.path.join(work, name), export_dir)
    t.setup()
    return t


def run_hypothesis(target: Target, cases: int, seed: int, recorder: Recorder) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed

    @hyp_seed(seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(target.strategy())
    def prop(case):
        recorder(case)

    prop()


def run_target(name: str, cases: int, seed: int = 0, work: str | None = None, export_dir: str | None = None,
               case_seconds: float = 10.0, alloc_mib: int = 256, save: bool = False) -> dict:
    """In-process hypothesis run of one target (what tests/test_fuzz.py calls)."""
    work = work or tempfile.mkdtemp(prefix="edgekv-fuzz-")
    target = make_target(name, work, export_dir)
    rec = Recorder(target, case_seconds, alloc_mib, save)
    t0 = time.monotonic()
    run_hypothesis(target, cases, seed, rec)
    return rec.result("hypothesis", time.monotonic() - t0)


def run_atheris(target: Target, cases: int, seed: int, recorder: Recorder, out: str) -> None:
    import atheris

    corpus = os.path.join(target.work, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for i, data in enumerate(target.atheris_seeds()):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(data)
    t0 = time.monotonic()

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(recorder.result("atheris", time.monotonic() - t0), f, indent=2)

    def one(data: bytes) -> None:
        recorder(target.from_bytes(data))
        if recorder.cases % 500 == 0:
            dump()
        if recorder.cases >= cases:
            dump()
            os._exit(0)

    atheris.Setup([sys.argv[0], f"-seed={seed + 1}", "-max_len=65536", f"-timeout={int(recorder.case_seconds) + 5}",
                   "-rss_limit_mb=4096", corpus], one)
    atheris.Fuzz()


# (module, its file); the memory format was one module, edgekv/format.py, before it became a package
BASELINE_MODULES = [("edgekv.format", "edgekv/format.py"), ("edgekv.manifest", "edgekv/manifest.py"),
                    ("edgekv.index", "edgekv/index.py"), ("edgekv.data.readers", "edgekv/data/readers.py"),
                    ("edgekv.runtime.tokenizer", "runtime/tokenizer.py"), ("edgekv.runtime.runtime", "runtime/runtime.py"),
                    ("edgekv.commands.inspect", "edgekv/commands/inspect.py")]  # describe_memory: the reader's API then


def load_baseline(rev: str) -> None:
    """Swap in the readers as they were at git revision ``rev`` (to show what the fuzzer finds
    in code before its fixes): each module's source at ``rev`` is executed over the module."""
    import importlib

    import edgekv.data
    import edgekv.runtime

    def show(path: str) -> str | None:
        res = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], capture_output=True, text=True)
        return res.stdout if res.returncode == 0 else None

    modules = list(BASELINE_MODULES)
    if show("edgekv/format.py") is None:  # a revision with the package: its modules, layout first
        modules[0:1] = [(f"edgekv.format.{m}", f"edgekv/format/{m}.py") for m in ("layout", "reader", "writer")] \
            + [("edgekv.format", "edgekv/format/__init__.py")]
    sources = {path: show(path) for _, path in modules}
    for path, src in sources.items():
        if src is None:
            raise SystemExit(f"{path} does not exist at revision {rev}")
    loaded = [importlib.import_module(name) for name, _ in modules]  # all imported before any is replaced
    for module, (_, path) in zip(loaded, modules, strict=True):
        exec(compile(sources[path], os.path.join(ROOT, path), "exec"), module.__dict__)
    edgekv.data.read_examples = edgekv.data.readers.read_examples
    edgekv.runtime.Runtime = edgekv.runtime.runtime.Runtime


def worker(args) -> None:
    """One target in this process: writes its result JSON to args.worker_out."""
    if args.baseline:
        load_baseline(args.baseline)
    if args.engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["edgekv"]):
            import edgekv.commands.inspect  # noqa: F401
            import edgekv.data  # noqa: F401
            import edgekv.format  # noqa: F401
            import edgekv.format.update  # noqa: F401
            import edgekv.index  # noqa: F401
            import edgekv.manifest  # noqa: F401
            import edgekv.runtime  # noqa: F401
            import edgekv.runtime.tokenizer  # noqa: F401
    target = make_target(args.target, args.work, args.export)
    soft = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + (6 << 30), soft[1]))  # a runaway allocation fails here
    rec = Recorder(target, args.case_seconds, args.alloc_mib, save=True)
    rec.progress_path = args.worker_out + ".case"
    rec.baseline = args.baseline
    rec.out_path, rec.engine = args.worker_out, args.engine
    if args.engine == "atheris":
        run_atheris(target, args.cases, args.seed, rec, args.worker_out)
        return
    t0 = time.monotonic()
    run_hypothesis(target, args.cases, args.seed, rec)
    with open(args.worker_out, "w") as f:
        json.dump(rec.result("hypothesis", time.monotonic() - t0), f, indent=2)


def tiny_export(work: str) -> str:
    """A tiny Llama exported once (cached beside the other edgekv caches)."""
    cache = os.path.join(ROOT, ".cache", "edgekv", "fuzz-export")
    art = os.path.join(cache, "artifacts")
    if os.path.isfile(os.path.join(art, "manifest.json")):
        return art
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import make_tiny_model

    from edgekv.export.pipeline import export_model

    model = make_tiny_model("llama", os.path.join(cache, "llama"))
    export_model(model, art, progress=False)
    return art


def supervise(args) -> dict:
    """Each target in a worker process; a worker that dies by a signal is a crash finding."""
    work = args.work or tempfile.mkdtemp(prefix="edgekv-fuzz-")
    export = args.export
    targets = TARGETS if args.target == "all" else (args.target,)
    if export is None and {"manifest", "tokenizer"} & set(targets):
        export = tiny_export(work)
    results = []
    for name in targets:
        cases = args.cases or FULL_CASES[name]
        out = os.path.join(work, f"{name}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--target", name, "--cases", str(cases),
               "--seed", str(args.seed), "--engine", args.engine, "--work", work, "--worker-out", out,
               "--case-seconds", str(args.case_seconds), "--alloc-mib", str(args.alloc_mib)]
        if export:
            cmd += ["--export", export]
        if args.baseline:
            cmd += ["--baseline", args.baseline]
        t0 = time.monotonic()
        print(f"[fuzz] {name}: {cases} cases ({args.engine}) ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if os.path.isfile(out):
            with open(out) as f:
                res = json.load(f)
        else:
            res = {"target": name, "engine": args.engine, "cases": None, "outcomes": {}, "findings": []}
        if proc.returncode != 0:
            how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exit code {proc.returncode}")
            case_file, saved = out + ".case", None
            if os.path.exists(case_file):  # the input the worker was running when it died
                folder = os.path.join(FINDINGS_DIR, f"baseline-{args.baseline}") if args.baseline else FINDINGS_DIR
                os.makedirs(folder, exist_ok=True)
                data = open(case_file, "rb").read()
                saved = os.path.join(folder, f"{name}-crash-{hashlib.sha256(data).hexdigest()[:12]}.bin")
                shutil.copy(case_file, saved)
            res["findings"].append({"target": name, "kind": "crash", "error": how,
                                    "message": proc.stderr.strip()[-600:],
                                    "input": os.path.relpath(saved, ROOT) if saved else None})
        res["seconds"] = round(time.monotonic() - t0, 1)
        print(f"[fuzz] {name}: {res['cases']} cases in {res['seconds']} s, {len(res['findings'])} findings; "
              f"{res['outcomes']}", flush=True)
        results.append(res)
    total = sum(r["cases"] or 0 for r in results)
    return {"engine": args.engine, "seed": args.seed, "total_cases": total,
            "findings": [f for r in results for f in r["findings"]], "targets": results,
            "command": "python scripts/fuzz.py " + " ".join(sys.argv[1:])}


def replay(args) -> None:
    if args.baseline:
        load_baseline(args.baseline)
    work = args.work or tempfile.mkdtemp(prefix="edgekv-fuzz-")
    target = make_target(args.target, work, args.export or (tiny_export(work) if args.target in
                                                             ("manifest", "tokenizer") else None))
    with open(args.replay, "rb") as f:
        data = f.read()
    if args.target == "tokenizer" and b"\n--- chat template ---\n" in data:
        tok, tpl = data.split(b"\n--- chat template ---\n", 1)
        case = (tok, tpl.decode("utf-8", "surrogatepass"))
    else:
        case = target.from_bytes(data) if args.target == "data" else data
    from edgekv.errors import EdgeKVError

    try:
        print(target.run(case))
    except EdgeKVError as e:
        print(f"refused: {type(e).__name__}: {e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="all", choices=("all", *TARGETS))
    p.add_argument("--cases", type=int, default=0, help="cases per target (default: the full run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="hypothesis", choices=("hypothesis", "atheris"))
    p.add_argument("--case-seconds", type=float, default=10.0, help="a case slower than this is a hang")
    p.add_argument("--alloc-mib", type=int, default=256, help="peak RSS growth that counts as a finding")
    p.add_argument("--export", help="an export folder (default: a tiny Llama, exported once and cached)")
    p.add_argument("--work", help="scratch folder (default: a new temporary one)")
    p.add_argument("--out", default=os.path.join(RESULTS, "fuzz.json"))
    p.add_argument("--replay", help="run one saved finding again (with --target)")
    p.add_argument("--baseline", help="fuzz the readers as they were at this git revision (e.g. HEAD)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.replay:
        replay(args)
        return
    if args.engine == "atheris":
        try:
            import atheris  # noqa: F401
        except ImportError:
            sys.exit("atheris is not installed (pip install atheris); use --engine hypothesis")
    scratch = None if args.work else tempfile.mkdtemp(prefix="edgekv-fuzz-")
    args.work = args.work or scratch
    try:
        report = supervise(args)
    finally:
        if scratch:  # findings were copied to benchmarks/results/fuzz-findings/
            shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"[fuzz] {report['total_cases']} cases, {len(report['findings'])} findings -> {args.out}")
    sys.exit(1 if report["findings"] else 0)


if __name__ == "__main__":
    main()
