"""The bytes of a memory file (``.ekv``): constants, struct formats, the dataclasses that describe
what the header and the slots hold, size arithmetic and checksums.

``docs/memory-format.md`` describes every byte. :mod:`edgekv.format.reader` decodes them,
:mod:`edgekv.format.writer` writes them; both take every offset and size from here.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from edgekv.errors import InputError
from edgekv.quant import QMAX, QMAX_INT4, quantize_keys, quantize_values
from edgekv.retrieval import KeyProjection
from edgekv.rope import RopeSpec

MAGIC = b"EDGEKVM\x00"
FORMAT_VERSION = 2  # what the writer writes
READ_VERSIONS = (1, 2)  # what the reader opens; version 1 has no top_k (its bytes 157..159 are padding)
ALIGN = 64
MAX_TASKS = 256
TASK_NAME_BYTES = 32
SOURCE_ID_BYTES = 36
# code 3 (int4) is newer than format version 2's first readers; they refuse it as an unknown
# payload code (reader._check_fields), so it needs no version bump
PAYLOAD_CODES = {"int8": 1, "fp16": 2, "int4": 3}
# The payload a new memory gets when none is asked for: int4 holds 1.85x the entries of int8 at
# m = 16, and on edge6's val split (2 seeds, tiny-vlm, 8 MiB) it raised Last by +5.7 points
# [-0.0, +11.4] over int8 (docs/method.md, "Deliberate departures").
DEFAULT_PAYLOAD_DTYPE = "int4"
QUANT_LEVELS = {"int8": QMAX, "int4": QMAX_INT4}  # qmax of the quantised payloads (codes in [-qmax, qmax])
PAYLOAD_NAMES = {v: k for k, v in PAYLOAD_CODES.items()}
POOLING_CODES = {"mean": 1, "last": 2}
POOLING_NAMES = {v: k for k, v in POOLING_CODES.items()}

# Fixed part of the header. Arrays follow it (see docs/memory-format.md).
HEADER = struct.Struct(
    "<8s I I Q Q Q 32s"  # magic, version, header_bytes, budget, file_bytes, generation, fingerprint
    " I I I I I"  # num_layers, num_kv_heads, head_dim, pooled_len, key_dim
    " B B H I I I"  # payload code, rope kind, num_tasks, rotary_dim, proj_max_dirs, proj_num_dirs
    " f f"  # attention_scaling, tau
    " I I Q Q Q I"  # num_slots, slot_bytes, table_offset, slots_offset, next_entry_id, table_crc32
    " I B x H"  # key_layer, key pooling code, reserved, top_k (version 2; 0 = not recorded)
)
HEADER_FIELDS = ("magic", "version", "header_bytes", "budget_bytes", "file_bytes", "generation", "fingerprint",
                 "num_layers", "num_kv_heads", "head_dim", "pooled_len", "key_dim",
                 "payload_code", "rope_kind", "num_tasks", "rotary_dim", "proj_max_dirs", "proj_num_dirs",
                 "attention_scaling", "tau",
                 "num_slots", "slot_bytes", "table_offset", "slots_offset", "next_entry_id", "table_crc32",
                 "key_layer", "pooling_code", "top_k")  # HEADER's fields, in order
MAX_TOP_K = 0xFFFF  # top_k is a u16
# One slot-table row: flags, reserved, task index, slot crc32, key crc32, entry id,
# insertion sequence, source example id (UTF-8, NUL padded).
TABLE_ENTRY = struct.Struct(f"<B B H I I Q Q {SOURCE_ID_BYTES}s")
TABLE_ENTRY_BYTES = TABLE_ENTRY.size  # 64
TABLE_DTYPE = np.dtype(
    [("flags", "u1"), ("reserved", "u1"), ("task", "<u2"), ("crc32", "<u4"), ("key_crc32", "<u4"),
     ("entry_id", "<u8"), ("insert_seq", "<u8"), ("source_id", f"S{SOURCE_ID_BYTES}")]
)
FLAG_OCCUPIED = 1

# Sanity limits checked before any size derived from a header field is used.
_LIMITS = {"num_layers": 1024, "num_kv_heads": 1024, "head_dim": 4096, "pooled_len": 1 << 16,
           "key_dim": 1 << 16, "proj_max_dirs": 64}
_MAX_HEADER_BYTES = 1 << 26
MAX_SLOTS = 0xFFFFFFFF  # num_slots is a u32


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class MemorySpec:
    """Shapes of one memory: what every slot holds. Fixed at creation."""

    num_layers: int  # L
    num_kv_heads: int  # H
    head_dim: int  # D
    pooled_len: int  # m, KV positions per entry
    key_dim: int  # R, retrieval-key dimension
    model_fingerprint: str  # 64 hex chars: sha256 of the backbone the entries came from
    payload_dtype: str = "int8"  # "int8" / "int4" (per-channel K, per-token V scales) or "fp16"
    rope: RopeSpec | None = None  # None: keys are stored as computed (model without RoPE)
    proj_max_dirs: int = 8  # capacity of the stored key projection (directions removed)
    key_layer: int = 1  # hidden-state layer the retrieval key pools (0 = embeddings)
    key_pooling: str = "mean"  # how the key pools tokens: mean | last

    def __post_init__(self) -> None:
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            low = 0 if name == "proj_max_dirs" else 1
            if not isinstance(value, (int, np.integer)) or not low <= value <= limit:
                raise InputError(f"MemorySpec.{name} must be an integer in [{low}, {limit}], got {value!r}")
        if not isinstance(self.key_layer, (int, np.integer)) or not 0 <= self.key_layer <= self.num_layers:
            raise InputError(f"MemorySpec.key_layer must be in [0, {self.num_layers}], got {self.key_layer!r}")
        if self.key_pooling not in POOLING_CODES:
            raise InputError(f"MemorySpec.key_pooling must be one of {sorted(POOLING_CODES)}, got {self.key_pooling!r}")
        if self.payload_dtype not in PAYLOAD_CODES:
            raise InputError(f"MemorySpec.payload_dtype must be 'int8', 'int4' or 'fp16', got {self.payload_dtype!r}")
        if self.payload_dtype == "int4" and self.head_dim % 2:
            raise InputError(f"MemorySpec.payload_dtype 'int4' packs two channels per byte and needs an even "
                             f"head_dim, got {self.head_dim}")
        try:
            fp = bytes.fromhex(self.model_fingerprint)
        except ValueError:
            fp = b""
        if len(fp) != 32:
            raise InputError("MemorySpec.model_fingerprint must be 64 hex characters (a sha256)")
        if self.rope is not None and not 0 < self.rope.rotary_dim <= self.head_dim:
            raise InputError(f"rotary dim {self.rope.rotary_dim} does not fit head_dim {self.head_dim}")

    # --- slot layout -------------------------------------------------------------
    @property
    def payload_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_kv_heads, self.pooled_len, self.head_dim)

    def slot_layout(self) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
        """name -> (offset in slot, nbytes, dtype, shape), in on-disk order.

        int4: "k" and "v" are the packed bytes [L, H, m, D//2] (:func:`edgekv.quant.pack_int4`).
        """
        L, H, m, D = self.payload_shape
        parts: list[tuple[str, str, tuple[int, ...]]] = [("key", "<f4", (self.key_dim,))]
        if self.payload_dtype == "int8":
            parts += [("k", "i1", (L, H, m, D)), ("v", "i1", (L, H, m, D)),
                      ("k_scale", "<f2", (L, H, D)), ("v_scale", "<f2", (L, H, m))]
        elif self.payload_dtype == "int4":
            parts += [("k", "u1", (L, H, m, D // 2)), ("v", "u1", (L, H, m, D // 2)),
                      ("k_scale", "<f2", (L, H, D)), ("v_scale", "<f2", (L, H, m))]
        else:
            parts += [("k", "<f2", (L, H, m, D)), ("v", "<f2", (L, H, m, D))]
        layout, off = {}, 0
        for name, dt, shape in parts:
            nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
            layout[name] = (off, nbytes, dt, shape)
            off += nbytes
        return layout

    @property
    def slot_bytes(self) -> int:
        last = list(self.slot_layout().values())[-1]
        return _align(last[0] + last[1])

    @property
    def header_bytes(self) -> int:
        rd2 = self.rope.rotary_dim // 2 if self.rope else 0
        arrays = 4 * (self.num_layers + rd2 + self.key_dim + self.proj_max_dirs * self.key_dim)
        return _align(HEADER.size + arrays + MAX_TASKS * TASK_NAME_BYTES + 4)

    def num_slots_for(self, budget_bytes: int) -> int:
        """Slots that fit: floor((budget - header) / (table entry + slot))."""
        return max(0, (budget_bytes - self.header_bytes) // (TABLE_ENTRY_BYTES + self.slot_bytes))

    def file_bytes_for(self, num_slots: int) -> int:
        return self.header_bytes + num_slots * (TABLE_ENTRY_BYTES + self.slot_bytes)


@dataclass(frozen=True)
class Calibration:
    """phi made concrete: tau (retrieval temperature) and lambda_l (value gate per layer)."""

    tau: float
    gates: tuple[float, ...]

    @staticmethod
    def default(num_layers: int, tau: float = 0.05) -> Calibration:
        return Calibration(tau=tau, gates=(1.0,) * num_layers)


@dataclass
class Entry:
    """One memory entry as stored in a slot.

    key: [R] f32 raw pooled hidden state; k, v: [L, H, m, D] int8 (with k_scale [L, H, D],
    v_scale [L, H, m] f16) or float16 (scales None). Keys are position-free. An int4 entry is
    an int8 one whose codes lie in [-7, 7]: unpacked here, packed two per byte in the file.
    """

    key: np.ndarray
    k: np.ndarray
    v: np.ndarray
    k_scale: np.ndarray | None = None
    v_scale: np.ndarray | None = None
    task: str = ""
    source_id: str = ""
    entry_id: int = -1  # assigned at commit when negative
    insert_seq: int = -1  # assigned at commit when negative

    @staticmethod
    def from_float(key: np.ndarray, k: np.ndarray, v: np.ndarray, payload_dtype: str = "int8",
                   task: str = "", source_id: str = "") -> Entry:
        """Quantise float K/V [L, H, m, D] into an entry of the given payload dtype."""
        if payload_dtype not in PAYLOAD_CODES:
            raise InputError(f"payload dtype must be 'int8', 'int4' or 'fp16', got {payload_dtype!r}")
        if payload_dtype in QUANT_LEVELS:
            kq, ks = quantize_keys(k, qmax=QUANT_LEVELS[payload_dtype])
            vq, vs = quantize_values(v, qmax=QUANT_LEVELS[payload_dtype])
            return Entry(np.asarray(key, np.float32), kq, vq, ks, vs, task, source_id)
        return Entry(np.asarray(key, np.float32), np.asarray(k, np.float16),
                     np.asarray(v, np.float16), None, None, task, source_id)


@dataclass
class _Header:
    spec: MemorySpec
    budget_bytes: int
    file_bytes: int
    generation: int
    num_slots: int
    next_entry_id: int
    table_crc32: int
    calibration: Calibration
    projection: KeyProjection
    tasks: list[str] = field(default_factory=list)
    top_k: int | None = None  # the k the calibration was fitted for; None: not recorded (version 1)
    format_version: int = FORMAT_VERSION  # as read; the writer always writes FORMAT_VERSION

    @property
    def table_offset(self) -> int:
        return self.spec.header_bytes

    @property
    def slots_offset(self) -> int:
        return self.table_offset + self.num_slots * TABLE_ENTRY_BYTES


# ---------------------------------------------------------------------------------
# names (task names in the header, source ids in the table) and checksums
# ---------------------------------------------------------------------------------
def _encode_name(text: str, size: int) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > size:
        # keep it unique and readable: prefix + short hash
        digest = zlib.crc32(raw).to_bytes(4, "big").hex()
        raw = raw[: size - 9].decode("utf-8", "ignore").encode("utf-8") + b"~" + digest.encode()
    return raw.ljust(size, b"\x00")


def _decode_name(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "replace")


def _stored_crc32(header_raw: bytes, header_bytes: int) -> int:
    """The header CRC32 stored in its last 4 bytes (what :attr:`Memory.header_crc32` reads)."""
    return struct.unpack_from("<I", header_raw, header_bytes - 4)[0]


def _zeros_crc32(nbytes: int) -> int:
    """CRC32 of ``nbytes`` zero bytes, without allocating them."""
    chunk, crc = bytes(min(nbytes, 1 << 20)), 0
    while nbytes > 0:
        crc = zlib.crc32(chunk[: min(nbytes, len(chunk))], crc)
        nbytes -= len(chunk)
    return crc


def denser_hint(payload_dtype: str, how: str) -> str:
    """The clause of a too-small-budget message that suggests a denser payload; empty at int4."""
    return "" if payload_dtype == "int4" else f", use {how} (the densest)"
