"""The exported decoder (``model.onnx``, optimum's text-generation-with-past layout) in onnxruntime.

Inputs: ``input_ids`` [B, S], ``attention_mask`` [B, P+S], ``position_ids`` [B, S] (when the
graph has it), ``past_key_values.{l}.key|value`` [B, H, P, D]. Outputs: ``logits``
[B, S, V], ``present.{l}.key|value`` [B, H, P+S, D].

Three ways to carry the cache between calls of :meth:`DecoderSession.forward`:

* :class:`KVCache` — graphs edgekv builds (metadata ``edgekv.kv_buffer = shared``): one
  preallocated buffer per layer, K and V [1, H, capacity, D], bound with I/O binding as
  both ``past`` and ``present``; GroupQueryAttention appends the new positions in place
  and reads the valid length from ``attention_mask``. Nothing is copied per token; the
  buffers double (one copy) when full.
* :class:`BoundPast` — other graphs (optimum's): ``present`` stays an onnxruntime value
  and is bound as the next ``past``, so the cache never makes a numpy round trip (the
  graph's own Concat still copies it).
* a plain list of numpy (K, V) per layer (:data:`Past`), for callers and tests;
  ``forward`` turns it into one of the above, :meth:`DecoderSession.forward_numpy` runs
  the plain ``sess.run`` path.

All three index like the list: ``past[layer] -> (K, V)`` [1, H, P, D], ``len(past)``.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np

from edgekv.errors import CorruptFileError, InputError

Past = list[tuple[np.ndarray, np.ndarray]]  # per layer: K, V [1, H, P, D] float32
KV_BUFFER_META = "edgekv.kv_buffer"  # written by export/decoder_graph.py
MIN_CAPACITY = 256  # positions a new KVCache holds beyond what it is created with
LOGITS_TO_KEEP = "logits_to_keep"  # optional decoder input (export/decoder_graph.py), as transformers' argument
CACHE_POOL = 2  # finished sequences' caches a DecoderSession keeps for the next ones
WRITE_LAYERS = 4  # layers write_entries handles per step (an entry's slice then fits the L2 cache)


def map_row_tables(folder: str, tables: dict) -> dict:
    """OrtValues over tables the graphs only read by row (manifest ``decoder.row_tables``):
    each weights file memory-mapped once, read-only, without read-ahead (MADV_RANDOM), so
    only the rows of looked-up tokens become resident and both sessions share the pages.
    -> {name: OrtValue}; the values keep their mapping alive."""
    import mmap

    import onnxruntime as ort

    maps: dict[str, mmap.mmap] = {}
    out = {}
    for name, t in sorted(tables.items()):
        path = os.path.join(folder, os.path.basename(t["file"]))
        if t["file"] not in maps:
            with open(path, "rb") as f:
                maps[t["file"]] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_RANDOM"):
                maps[t["file"]].madvise(mmap.MADV_RANDOM)
        try:
            dtype = np.dtype(t["dtype"])
            arr = np.frombuffer(maps[t["file"]], dtype, int(t["length"]) // dtype.itemsize, int(t["offset"]))
            out[name] = ort.OrtValue.ortvalue_from_numpy(arr.reshape([int(d) for d in t["shape"]]))
        except (ValueError, TypeError, KeyError) as e:
            raise CorruptFileError(f"{path}: table {name} does not match manifest.json ({e}); re-export the model") from None
    return out


def session_options(threads: int | None, initializers: dict | None = None, spin: bool = True):
    """CPU session options; ``initializers`` {name: OrtValue} replace the graph's own (shared buffers).

    ``spin=False`` for graphs run once per query (the retrieval key, the vision encoder): their
    idle worker threads would otherwise spin-wait on the cores the decoder runs on next (a
    15-token prefill right after the key pass took 118 ms instead of 32 ms with 2 threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for name, value in (initializers or {}).items():
        so.add_initializer(name, value)
    return so


def open_session(path: str, threads: int | None, options=None):
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise InputError(f"{path}: missing from the artifacts; re-export the model")
    try:
        return ort.InferenceSession(path, options or session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception classes
        raise CorruptFileError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None


def lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of zeros whose memory is resident only where it is written.

    Anonymous ``mmap`` with 4 KiB pages: numpy's own allocations of this size ask for 2 MiB
    transparent huge pages, with which the first write to a layer's slice would make its whole
    neighbourhood resident (a cache with spare capacity cost its full size). -> zeros [shape]
    """
    import mmap

    n = int(np.prod(shape)) * 4
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.float32, int(np.prod(shape))).reshape(shape)


class KVCache:
    """Per-layer K, V buffers [1, H, capacity, D] that the decoder appends to in place.

    Invariant: positions 0..length-1 of every buffer hold the valid cache; the rest is
    scratch. One cache belongs to one sequence (and one thread) at a time.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int):
        import onnxruntime as ort

        self.length = 0
        self.capacity = capacity
        # one array per K / V, [L, 1, H, capacity, D]; layer l's buffer is the contiguous view [l]
        shape = (num_layers, 1, num_kv_heads, capacity, head_dim)
        self.k_all, self.v_all = lazy_zeros(shape), lazy_zeros(shape)
        self.keys, self.values = list(self.k_all), list(self.v_all)
        # OrtValues over the numpy buffers (no copy): bound as both past and present.
        self.ort_keys = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.keys]
        self.ort_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.values]
        self.binding = None  # the session's IOBinding with the buffers bound (set by DecoderSession)
        self._scratch = None  # write_entries' rotation buffers, one per thread [WRITE_LAYERS, H, m, D]

    def fill(self, K: np.ndarray, V: np.ndarray) -> None:
        """Write K, V [L, H, T, D] at positions 0..T-1 (the injected memory); length = T."""
        T = K.shape[2]
        if T > self.capacity:  # the runtime sizes the cache for memory + prompt + new tokens
            raise RuntimeError(f"{T} positions do not fit a cache of {self.capacity}")
        self.k_all[:, 0, :, :T] = K
        self.v_all[:, 0, :, :T] = V
        self.length = T

    def write_entries(self, entries: list, alphas: np.ndarray, gates, rope, threads: int = 1) -> None:
        """Dequantise retrieved entries (layout order) straight into positions 0..k*m-1.

        The arithmetic of :func:`edgekv.induction.assemble_memory_kv` (its ``entry_scale`` and
        ``entry_kv``; keys rotated to their positions) without its concatenation and copies:
        each entry's int8 payload is scaled into the buffers and its keys rotated there in
        place, with one cos/sin table per runtime (tests hold the two equal). ``threads`` > 1
        splits the layers between threads (numpy releases the GIL; the decoder is idle while
        this runs). length = k*m.
        """
        from edgekv.induction import entry_scale

        gates = np.asarray(gates, np.float32)
        total = sum(e.k.shape[2] for e in entries)
        if total > self.capacity:  # the runtime sizes the cache for memory + prompt + new tokens
            raise RuntimeError(f"{total} positions do not fit a cache of {self.capacity}")
        table = None if rope is None else rope_table(rope, total, self.k_all.shape[-1])
        factors = [entry_scale(a, len(entries)) for a in alphas]
        if len(factors) != len(entries):
            raise RuntimeError(f"{len(entries)} entries but {len(factors)} weights")
        L = self.k_all.shape[0]
        n = max(1, min(int(threads or 1), L))
        parts = [slice(b * L // n, (b + 1) * L // n) for b in range(n)]
        if self._scratch is None or len(self._scratch) != len(parts):
            self._scratch = [None] * len(parts)

        def write(part: int) -> None:
            for lo in range(parts[part].start, parts[part].stop, WRITE_LAYERS):  # a few layers at a time:
                layers, pos = slice(lo, min(lo + WRITE_LAYERS, parts[part].stop)), 0  # the rotation stays in cache
                for e, f in zip(entries, factors, strict=True):
                    m = e.k.shape[2]
                    rows = None if table is None else (table[0][pos:pos + m], table[1][pos:pos + m], rope.rotary_dim)
                    k = e.k[layers]
                    want = (WRITE_LAYERS, *k.shape[1:])
                    if rows is not None and (self._scratch[part] is None or self._scratch[part].shape != want):
                        self._scratch[part] = np.empty(want, np.float32)  # kept: the next query reuses it
                    write_entry_into(self.k_all[layers, 0, :, pos:pos + m], self.v_all[layers, 0, :, pos:pos + m],
                                     k, e.v[layers], None if e.k_scale is None else e.k_scale[layers],
                                     None if e.v_scale is None else e.v_scale[layers], f, f * gates[layers], rows,
                                     None if rows is None else self._scratch[part][:len(k)])
                    pos += m

        if len(parts) == 1:
            write(0)
        else:
            list(worker_pool(len(parts)).map(write, range(len(parts))))
        self.length = total

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views K, V [1, H, length, D] of the valid positions (not copies)."""
        return self.keys[layer][:, :, :self.length], self.values[layer][:, :, :self.length]


class BoundPast:
    """The previous step's ``present`` values kept inside onnxruntime (graphs without a shared buffer)."""

    def __init__(self, ort_values: list, length: int):
        self.ort_values = ort_values  # [K0, V0, K1, V1, ...] OrtValues
        self.length = length

    def __len__(self) -> int:
        return len(self.ort_values) // 2

    def __getitem__(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies K, V [1, H, P, D] (for inspection; the decode loop never calls this)."""
        return self.ort_values[2 * layer].numpy(), self.ort_values[2 * layer + 1].numpy()


class DecoderSession:
    def __init__(self, path: str, num_layers: int, num_kv_heads: int, head_dim: int, threads: int | None = None,
                 options=None):
        self.sess = open_session(path, threads, options)
        names = {i.name for i in self.sess.get_inputs()}
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.past_names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(num_layers)]
        self.present_names = [(f"present.{i}.key", f"present.{i}.value") for i in range(num_layers)]
        missing = [n for pair in self.past_names for n in pair if n not in names] + \
                  [n for n in ("input_ids", "attention_mask") if n not in names]
        if missing:
            raise CorruptFileError(f"{path}: not a decoder-with-past graph edgekv understands (missing inputs {missing[:3]})")
        self.has_position_ids = "position_ids" in names
        self.output_names = ["logits"] + [n for pair in self.present_names for n in pair]
        meta = self.sess.get_modelmeta().custom_metadata_map
        self.shared_buffer = meta.get(KV_BUFFER_META) == "shared"
        # an optional input (an initializer, default 0 = all rows): how many last positions get logits
        self.keeps_logits = LOGITS_TO_KEEP in {i.name for i in self.sess.get_overridable_initializers()}
        if self.keeps_logits:
            import onnxruntime as ort

            self._keep = [ort.OrtValue.ortvalue_from_numpy(np.asarray(n, np.int64)) for n in (0, 1)]
        self.vocab_size = self.sess.get_outputs()[0].shape[-1]
        self._pool: list[KVCache] = []  # released caches: bound, their pages already mapped
        self._pool_lock = threading.Lock()

    def empty_past(self) -> Past:
        z = np.zeros((1, self.num_kv_heads, 0, self.head_dim), np.float32)
        return [(z, z) for _ in range(self.num_layers)]

    # --- the fast paths -------------------------------------------------------------
    def new_cache(self, capacity: int, K: np.ndarray | None = None, V: np.ndarray | None = None) -> KVCache:
        """A :class:`KVCache` for ``capacity`` positions, holding K, V [L, H, T, D] if given."""
        if not self.shared_buffer:
            raise InputError("this decoder graph has no shared KV buffer; re-export the model with this edgekv")
        cache = KVCache(self.num_layers, self.num_kv_heads, self.head_dim, capacity)
        if K is not None:
            cache.fill(K, V)
        self._bind_cache(cache)
        return cache

    def acquire_cache(self, capacity: int) -> KVCache:
        """An empty :class:`KVCache` for at least ``capacity`` positions: the smallest released
        one that fits (already bound, no allocation or page faults), else a new one (capacity
        rounded up to a multiple of ``MIN_CAPACITY``)."""
        with self._pool_lock:
            fits = [c for c in self._pool if c.capacity >= capacity]
            if fits:
                cache = min(fits, key=lambda c: c.capacity)
                self._pool.remove(cache)
                cache.length = 0
                return cache
        return self.new_cache(-(-capacity // MIN_CAPACITY) * MIN_CAPACITY)  # rounded up: later queries fit

    def release_cache(self, cache) -> None:
        """Hand back a cache from :meth:`acquire_cache` whose sequence is finished (it must not be
        used again by the caller); the session keeps the ``CACHE_POOL`` most recent."""
        if not isinstance(cache, KVCache):
            return
        with self._pool_lock:
            if all(c is not cache for c in self._pool):
                self._pool.append(cache)
            del self._pool[:-CACHE_POOL]

    def _bind_cache(self, cache: KVCache) -> None:
        io = self.sess.io_binding()
        io.bind_output("logits", "cpu")  # first output; onnxruntime allocates it (its length varies)
        for (pk, pv), (ok, ov), k, v in zip(self.past_names, self.present_names, cache.ort_keys, cache.ort_values,
                                            strict=True):
            io.bind_ortvalue_input(pk, k)
            io.bind_ortvalue_input(pv, v)
            io.bind_ortvalue_output(ok, k)  # present is past: GroupQueryAttention appends in place
            io.bind_ortvalue_output(ov, v)
        cache.binding = io

    def _grow(self, cache: KVCache, needed: int) -> None:
        """Reallocate ``cache`` to hold ``needed`` positions (doubling; one copy of the valid part)."""
        bigger = KVCache(self.num_layers, self.num_kv_heads, self.head_dim, max(needed, 2 * cache.capacity))
        bigger.k_all[:, :, :, :cache.length] = cache.k_all[:, :, :, :cache.length]
        bigger.v_all[:, :, :, :cache.length] = cache.v_all[:, :, :, :cache.length]
        bigger.length = cache.length
        cache.__dict__.update(bigger.__dict__)
        self._bind_cache(cache)

    def _bind_step(self, io, input_ids: np.ndarray, past_len: int, last_only: bool = False) -> None:
        """Bind input_ids [1, S], attention_mask (ones, past + S) and position_ids past..past+S-1
        (and ``logits_to_keep`` 1 for ``last_only`` where the graph has it, else 0 = all).
        The arrays are kept on ``io`` until the next step (onnxruntime reads them in place)."""
        seq = input_ids.shape[1]
        io.edgekv_inputs = feed = {
            "input_ids": np.ascontiguousarray(input_ids, np.int64),
            "attention_mask": np.ones((1, past_len + seq), np.int64),
            "position_ids": np.arange(past_len, past_len + seq, dtype=np.int64)[None, :]}
        if not self.has_position_ids:
            del feed["position_ids"]
        if self.keeps_logits:  # an initializer input: onnxruntime binds it only as an OrtValue
            io.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep[1 if last_only else 0])
        for name, value in feed.items():
            io.bind_cpu_input(name, value)

    def _step_cache(self, input_ids: np.ndarray, cache: KVCache, last_only: bool = False) -> np.ndarray:
        past_len, seq = cache.length, input_ids.shape[1]
        if past_len + seq > cache.capacity:
            self._grow(cache, past_len + seq)
        io = cache.binding
        self._bind_step(io, input_ids, past_len, last_only)
        io.bind_output("logits", "cpu")  # unallocated again: the last run's [1, S, V] may not fit
        self.sess.run_with_iobinding(io)
        cache.length = past_len + seq
        return io.get_outputs()[0].numpy()

    def _step_bound(self, input_ids: np.ndarray, past: BoundPast, last_only: bool = False
                    ) -> tuple[np.ndarray, BoundPast]:
        past_len, seq = past.length, input_ids.shape[1]
        io = self.sess.io_binding()
        self._bind_step(io, input_ids, past_len, last_only)
        for (pk, pv), i in zip(self.past_names, range(self.num_layers), strict=True):
            io.bind_ortvalue_input(pk, past.ort_values[2 * i])
            io.bind_ortvalue_input(pv, past.ort_values[2 * i + 1])
        for name in self.output_names:
            io.bind_output(name, "cpu")
        self.sess.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), BoundPast([out[i] for i in range(1, len(self.output_names))], past_len + seq)

    def forward(self, input_ids: np.ndarray, past, last_only: bool = False) -> tuple[np.ndarray, object]:
        """input_ids: [1, S] int64; past: P positions (Past list, KVCache or BoundPast)
        -> logits [1, S, V], the cache with P+S positions (a KVCache is updated in place).

        ``last_only``: logits [1, 1, V] of the last position only, where the graph can (an input
        ``logits_to_keep``; a prefill then skips the output layer for the other S-1 rows);
        graphs without it return all S rows."""
        if isinstance(past, KVCache):
            return self._step_cache(input_ids, past, last_only), past
        if isinstance(past, BoundPast):
            return self._step_bound(input_ids, past, last_only)
        past_len = past[0][0].shape[2]
        if self.shared_buffer:
            K = np.stack([np.asarray(k, np.float32)[0] for k, _ in past])
            V = np.stack([np.asarray(v, np.float32)[0] for _, v in past])
            cache = self.new_cache(past_len + input_ids.shape[1] + MIN_CAPACITY, K, V)
            return self._step_cache(input_ids, cache, last_only), cache
        import onnxruntime as ort

        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32)) for pair in past for a in pair]
        return self._step_bound(input_ids, BoundPast(values, past_len), last_only)

    # --- the plain path -------------------------------------------------------------
    def forward_numpy(self, input_ids: np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """``sess.run`` with numpy in and out (every step copies the cache out and back)."""
        past_len = past[0][0].shape[2]
        seq = input_ids.shape[1]
        feed = {"input_ids": input_ids.astype(np.int64),
                "attention_mask": np.ones((1, past_len + seq), np.int64)}
        if self.has_position_ids:
            feed["position_ids"] = np.arange(past_len, past_len + seq, dtype=np.int64)[None, :]
        for (kn, vn), (k, v) in zip(self.past_names, past, strict=True):
            feed[kn] = np.ascontiguousarray(k, np.float32)
            feed[vn] = np.ascontiguousarray(v, np.float32)
        out = self.sess.run(self.output_names, feed)
        present = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]
        return out[0], present


@functools.lru_cache(maxsize=8)
def _rope_table(rope, n: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    inv = np.asarray(rope.inv_freq, np.float32)
    ang = np.arange(n, dtype=np.float32)[:, None] * inv[None, :]  # [n, rd/2] float32 angles, as transformers
    scale = np.float32(rope.attention_scaling)
    c, s = np.cos(ang) * scale, np.sin(ang) * scale
    pad = head_dim - 2 * c.shape[1]  # dims past the rotary ones: kept as they are
    C = np.concatenate([c, c, np.ones((n, pad), np.float32)], axis=1)
    S = np.concatenate([-s, s, np.zeros((n, pad), np.float32)], axis=1)
    C.flags.writeable = S.flags.writeable = False
    return C, S


def rope_table(rope, n: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """C, S [>= n, head_dim] float32 for positions 0..: RoPE(x) = x * C + swap_halves(x) * S
    (HF's rotate_half: S = [-sin, sin], attention scaling folded in; past the rotary dims
    C = 1, S = 0). Computed once per model for a power-of-two length, then sliced."""
    return _rope_table(rope, max(1024, 1 << (max(n, 1) - 1).bit_length()), head_dim)


def rotate_in_place(x: np.ndarray, C: np.ndarray, S: np.ndarray, rotary_dim: int,
                    scratch: np.ndarray | None = None) -> None:
    """x [..., T, D] <- RoPE(x) with C, S [>= T, D] from :func:`rope_table` (rows = positions).

    Whole rows at a time (long inner loops): one swapped copy of x (into ``scratch``, x's shape,
    when given), then x*C + swapped*S."""
    T = x.shape[-2]
    half = rotary_dim // 2
    swapped = np.empty_like(x) if scratch is None else scratch
    swapped[..., :half] = x[..., half:2 * half]
    swapped[..., half:2 * half] = x[..., :half]
    swapped[..., 2 * half:] = 0
    swapped *= S[:T]
    x *= C[:T]
    x += swapped


@functools.lru_cache(maxsize=4)
def worker_pool(threads: int):
    """A thread pool of ``threads`` workers for the runtime's numpy work (shared, made once)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="edgekv-runtime")


def write_entry_into(dst_k: np.ndarray, dst_v: np.ndarray, k: np.ndarray, v: np.ndarray, k_scale: np.ndarray | None,
                     v_scale: np.ndarray | None, factor_k: float, factor_v: np.ndarray,
                     rope_rows: tuple[np.ndarray, np.ndarray, int] | None, scratch: np.ndarray | None = None) -> None:
    """One entry's K, V into dst_k, dst_v [L, H, m, D] (views of the cache).

    k, v [L, H, m, D]: int8 with k_scale [L, H, D] and v_scale [L, H, m] (f16), or float with
    no scales; scaled straight into the destination (:func:`edgekv.quant.dequantize_keys` /
    ``dequantize_values`` times factor_k / factor_v [L]); keys then rotated in place with
    rope_rows = (C, S [m, D] of :func:`rope_table`, rotary_dim) (None: no RoPE);
    ``scratch``: a reusable float32 array of dst_k's shape."""
    fv = np.asarray(factor_v, np.float32)[:, None, None]
    if k_scale is not None:
        np.multiply(k, (k_scale.astype(np.float32) * np.float32(factor_k))[:, :, None, :], out=dst_k)
        np.multiply(v, (v_scale.astype(np.float32) * fv)[..., None], out=dst_v)
    else:
        np.multiply(k, np.float32(factor_k), out=dst_k)
        np.multiply(v, fv[..., None], out=dst_v)
    if rope_rows is not None:
        rotate_in_place(dst_k, *rope_rows, scratch=scratch)


def past_from_memory(K: np.ndarray, V: np.ndarray) -> Past:
    """K, V: [L, H, T, D] -> per-layer [1, H, T, D] views."""
    return [(K[i][None], V[i][None]) for i in range(K.shape[0])]
