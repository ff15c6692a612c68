"""The fast paths give the same answers as the plain ones (speed itself is measured only in
benchmarks/perf_bench.py): the shared-buffer KVCache and the I/O-bound past decode token for
token like ``sess.run`` with numpy; weight-only int8 / int4 exports agree with fp32 on argmax.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from tiny_models import FAMILIES  # noqa: E402


def _decoder(art: str):
    from edgekv.manifest import read_manifest
    from edgekv.runtime.decoder import DecoderSession

    m = read_manifest(art)
    return DecoderSession(os.path.join(art, m["decoder"]["file"]), int(m["num_layers"]), int(m["num_kv_heads"]),
                          int(m["head_dim"]), threads=1)


def _memory(dec, T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (dec.num_layers, dec.num_kv_heads, T, dec.head_dim)
    return rng.normal(size=shape).astype(np.float32), 0.5 * rng.normal(size=shape).astype(np.float32)


def _greedy(dec, step, past, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """n greedy tokens after ``prompt`` with ``step(ids, past) -> (logits, past)``; the tokens and last logits."""
    logits, past = step(np.asarray([prompt], np.int64), past)
    toks, rows = [], [logits[0, -1]]
    for _ in range(n):
        toks.append(int(logits[0, -1].argmax()))
        logits, past = step(np.asarray([[toks[-1]]], np.int64), past)
        rows.append(logits[0, -1])
    return toks, rows


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_equals_numpy_decode(family, exported):
    """Shared past/present buffer (created small so it grows twice) == sess.run with numpy, token for token."""
    from edgekv.runtime.decoder import KVCache, past_from_memory

    dec = _decoder(exported(family))
    assert dec.shared_buffer
    K, V = _memory(dec, 12)
    prompt = [5, 9, 14, 3, 22, 7]
    want, want_rows = _greedy(dec, dec.forward_numpy, past_from_memory(K, V), prompt, 40)
    cache = dec.new_cache(20, K, V)  # 12 + 6 + 40 positions: doubles to 40, then to 80
    got, got_rows = _greedy(dec, dec.forward, cache, prompt, 40)
    assert got == want and len(set(want)) > 1
    assert max(float(np.abs(a - b).max()) for a, b in zip(got_rows, want_rows, strict=True)) <= 1e-5
    assert isinstance(cache, KVCache) and cache.length == 12 + 6 + 40 and cache.capacity == 80
    # the buffer holds the memory untouched, then the appended positions: equal to numpy's present
    _, present = dec.forward_numpy(np.asarray([prompt + want], np.int64), past_from_memory(K, V))
    assert np.array_equal(cache[0][0][:, :, :12], K[0][None])
    assert np.abs(cache[1][1] - present[1][1]).max() <= 1e-5 and cache[1][1].shape == present[1][1].shape
    # control: a different memory changes the logits
    logits_other, _ = dec.forward(np.asarray([prompt], np.int64), dec.new_cache(64, *_memory(dec, 12, seed=1)))
    assert np.abs(logits_other[0, -1] - want_rows[0]).max() > 1e-3


def test_list_past_is_converted_once_and_keeps_the_past_interface(exported):
    """forward(ids, list) returns a KVCache that indexes like the list (past[l] -> K, V [1, H, P, D])."""
    from edgekv.runtime.decoder import KVCache, past_from_memory

    dec = _decoder(exported("llama"))
    K, V = _memory(dec, 7)
    logits, past = dec.forward(np.asarray([[4, 5, 6]], np.int64), past_from_memory(K, V))
    assert isinstance(past, KVCache) and len(past) == dec.num_layers
    assert past[0][0].shape == (1, dec.num_kv_heads, 10, dec.head_dim)
    assert np.array_equal(past[2][1][:, :, :7], V[2][None])
    empty_logits, empty = dec.forward(np.asarray([[4, 5, 6]], np.int64), dec.empty_past())
    assert empty[0][0].shape[2] == 3 and np.abs(empty_logits - logits).max() > 1e-4  # control: memory matters


def test_io_bound_past_on_an_optimum_graph_equals_numpy(tmp_path, tiny_model_dir):
    """Graphs without a shared buffer (optimum's): present stays in onnxruntime and is bound as the next past."""
    from edgekv.export.pipeline import export_model
    from edgekv.runtime.decoder import BoundPast, past_from_memory

    art = str(tmp_path / "optimum")
    export_model(tiny_model_dir("llama"), art, progress=False, graph="optimum")
    dec = _decoder(art)
    assert not dec.shared_buffer
    K, V = _memory(dec, 9)
    prompt = [7, 8, 30, 2, 11]
    want, want_rows = _greedy(dec, dec.forward_numpy, past_from_memory(K, V), prompt, 24)
    bound = []

    def step(ids, past):
        logits, past = dec.forward(ids, past)
        bound.append(isinstance(past, BoundPast))
        return logits, past

    got, got_rows = _greedy(dec, step, past_from_memory(K, V), prompt, 24)
    assert all(bound) and got == want
    assert max(float(np.abs(a - b).max()) for a, b in zip(got_rows, want_rows, strict=True)) <= 1e-5
    with pytest.raises(Exception, match="no shared KV buffer"):
        dec.new_cache(16)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantised_export_runs_and_agrees_with_fp32(weights, exported, backbone):
    """Teacher-forced argmax of int8 / int4 vs the fp32 export on a tiny model (near-flat random
    logits make top-1 a weak signal here: SmolLM2's is measured by perf_bench); generation on the
    quantised graph with the KVCache equals its own numpy path."""
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import KVCache

    bb = backbone("llama")
    ids = list(bb.tokenizer("code for apple is K7, code for river is Q2 what is the code for river? "
                            "the quick brown fox jumps over the lazy dog").input_ids)
    f32, q = _decoder(exported("llama")), _decoder(exported("llama", quantize_weights=weights))
    a = f32.forward_numpy(np.asarray([ids], np.int64), f32.empty_past())[0][0]
    b = q.forward_numpy(np.asarray([ids], np.int64), q.empty_past())[0][0]
    agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    assert agree >= (0.9 if weights == "int8" else 0.6), agree
    assert float(np.mean(a.argmax(-1) == np.roll(b.argmax(-1), 1))) < agree  # control: misaligned disagrees
    want, _ = _greedy(q, q.forward_numpy, q.empty_past(), ids[:8], 12)
    got, _ = _greedy(q, q.forward, q.new_cache(32), ids[:8], 12)
    assert got == want
    rt = Runtime.load(exported("llama", quantize_weights=weights), k=0)
    assert isinstance(rt._start_past(None, 40), KVCache)
    res = rt.generate("code for river?", max_new_tokens=6)
    assert len(res.token_ids) > 0 and rt.manifest["decoder"]["weights"] == weights


def test_runtime_generation_uses_one_buffer_and_matches_the_numpy_loop(exported, backbone):
    """Runtime.generate with injected memory (KVCache, memory written once) == a greedy numpy loop."""
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import past_from_memory

    rt = Runtime.load(exported("qwen2"), k=0)
    K, V = _memory(rt.decoder, 10, seed=3)
    res = rt.generate("what is the code for river?", max_new_tokens=10, inject=(K, V))
    rk, rv = rt.rotate(K, V)
    want, _ = _greedy(rt.decoder, rt.decoder.forward_numpy, past_from_memory(rk, rv),
                      rt.prompt_ids("what is the code for river?"), 10)
    eos = [i for i, t in enumerate(want) if t in rt.eos_ids]
    assert res.token_ids == want[:eos[0] if eos else 10]


@pytest.mark.parametrize("payload", ["int8", "fp16", "int4"])
def test_entries_written_into_the_cache_equal_assemble_memory_kv(payload, exported, backbone, tmp_path):
    """KVCache.write_entries (dequantise + rotate in place) == edgekv.induction.assemble_memory_kv,
    and Runtime.generate with retrieval (which uses it) == decoding after the assembled past."""
    from test_runtime import build_memory

    from edgekv.induction import assemble_memory_kv
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import past_from_memory

    bb = backbone("llama")
    mem = str(tmp_path / "m.ekv")
    build_memory(mem, bb, payload=payload)
    with Runtime.load(exported("llama"), memory=mem, k=3) as rt:
        retrieved = rt.retrieve("code for river?")
        entries = [rt.memory.read_entry(r.slot) for r in retrieved]
        alphas = np.array([r.alpha for r in retrieved])
        K, V = assemble_memory_kv(entries, alphas, rt.memory.calibration.gates, rt.rope)
        for threads in (1, 2, 64):  # layers split between threads (64: more threads than layers)
            cache = rt.decoder.new_cache(K.shape[2] + 4)
            cache.write_entries(entries, alphas, rt.memory.calibration.gates, rt.rope, threads)
            assert cache.length == K.shape[2] == 24
            assert np.abs(cache.k_all[:, 0, :, :24] - K).max() <= 1e-5 * max(1.0, np.abs(K).max())
            assert np.array_equal(cache.v_all[:, 0, :, :24], V)
        assert np.abs(K).max() > 0 and np.abs(cache.k_all[:, 0, :, :24] - K[:, :, ::-1]).max() > 1e-3  # control
        res = rt.generate("code for river?", max_new_tokens=8)
        want, _ = _greedy(rt.decoder, rt.decoder.forward_numpy, past_from_memory(K, V),
                          rt.prompt_ids("code for river?"), 8)
        eos = [i for i, t in enumerate(want) if t in rt.eos_ids]
        assert res.token_ids == want[:eos[0] if eos else 8]
        assert [r.slot for r in res.retrieved] == [r.slot for r in retrieved]


def test_int4_entries_from_a_file_reach_the_cache_within_the_dequantisation_bound(tmp_path):
    """int4 entries read from a memory file (unpacked int8 codes in [-7, 7]): KVCache.write_entries
    (the runtime path, rotation included) == assemble_memory_kv, and both are the float K/V the
    entries came from, scaled by entry_scale (keys) and entry_scale * gate (values), to within
    the dequantisation bound scale / 2 times those factors."""
    from edgekv.format import Entry, Memory, MemorySpec, commit_update, create_memory
    from edgekv.induction import assemble_memory_kv, entry_scale
    from edgekv.quant import error_bound, quantize_keys
    from edgekv.rope import RopeSpec, remove_rope
    from edgekv.runtime.decoder import KVCache

    L, H, m, D, R = 3, 2, 6, 16, 12
    rope = RopeSpec(tuple(10000.0 ** (-np.arange(0, 12, 2) / 12)), 1.25)  # partial rotary dims, scaled
    spec = MemorySpec(L, H, D, m, R, "ab" * 32, "int4", rope)
    path = str(tmp_path / "m.ekv")
    create_memory(path, spec, spec.file_bytes_for(4)).close()
    rng = np.random.default_rng(5)
    floats = [(rng.normal(size=R).astype(np.float32),
               (rng.normal(size=(L, H, m, D)) * rng.uniform(0.2, 5, size=D)).astype(np.float32),
               rng.normal(size=(L, H, m, D)).astype(np.float32)) for _ in range(3)]
    commit_update(path, put={s: Entry.from_float(*f, "int4", "t", f"ex{s}") for s, f in enumerate(floats)})
    with Memory(path) as mem:
        entries = [mem.read_entry(s) for s in (2, 0, 1)]  # layout order
    floats = [floats[s] for s in (2, 0, 1)]
    assert all(e.k.dtype == np.int8 and e.k.shape == (L, H, m, D) and np.abs(e.k).max() <= 7 for e in entries)
    alphas, gates = np.array([0.5, 0.3, 0.2]), np.array([0.5, 1.0, 2.0], np.float32)
    K, V = assemble_memory_kv(entries, alphas, gates, rope)
    cache = KVCache(L, H, D, 3 * m + 2)
    cache.write_entries(entries, alphas, gates, rope)
    ck, cv = cache.k_all[:, 0, :, :3 * m], cache.v_all[:, 0, :, :3 * m]
    assert np.abs(ck - K).max() <= 1e-5 * np.abs(K).max() and np.array_equal(cv, V)
    # against the float reference, per entry (keys back to position-free)
    free = remove_rope(ck, rope, np.arange(3 * m))
    past_int8 = False
    for i, (e, (_, k, v), a) in enumerate(zip(entries, floats, alphas, strict=True)):
        f = entry_scale(a, 3)
        pos = slice(i * m, (i + 1) * m)
        kb = f * error_bound(e.k_scale)[..., None, :] + 1e-5 * np.abs(k).max() * f  # float32 rotation slack
        vb = f * gates[:, None, None, None] * error_bound(e.v_scale)[..., :, None]
        assert np.all(np.abs(free[:, :, pos] - f * k) <= kb), i
        assert np.all(np.abs(cv[:, :, pos] - f * gates[:, None, None, None] * v) <= vb * (1 + 1e-5)), i
        past_int8 |= bool(np.any(np.abs(free[:, :, pos] - f * k) > f * error_bound(quantize_keys(k)[1])[..., None, :]))
    assert past_int8  # control: the error is 4-bit sized, beyond what int8 codes would leave


def test_row_tables_are_mapped_once_for_both_sessions(exported, backbone, tmp_path):
    """The quantised embedding (read only by row in the decoder and the key graph) is listed in the
    manifest, memory-mapped once and handed to both sessions; a table past the file's end is refused."""
    import json
    import shutil

    from test_runtime import build_memory

    from edgekv.errors import CorruptFileError
    from edgekv.manifest import MANIFEST_FILE
    from edgekv.runtime import Runtime

    art = str(tmp_path / "art")
    shutil.copytree(exported("llama", quantize_weights="int8"), art)
    mem = str(tmp_path / "m.ekv")
    build_memory(mem, backbone("llama"))
    with Runtime.load(art, memory=mem, k=2) as rt:
        tables = rt.manifest["decoder"]["row_tables"]
        assert set(tables) == set(rt._tables) == {"embed_tokens.qweight", "embed_tokens.scales"}
        q, s = rt._tables["embed_tokens.qweight"], rt._tables["embed_tokens.scales"]
        # one mapping: the two views sit at their file offsets' distance from each other
        assert s.data_ptr() - q.data_ptr() == tables["embed_tokens.scales"]["offset"] - tables["embed_tokens.qweight"]["offset"]
        assert len(rt.generate("code for river?", max_new_tokens=4).retrieved) == 2
    path = f"{art}/{MANIFEST_FILE}"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["decoder"]["row_tables"]["embed_tokens.qweight"]["offset"] = 1 << 40
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    with pytest.raises(CorruptFileError, match="embed_tokens.qweight does not match manifest.json"):
        Runtime.load(art, k=0)


@pytest.mark.parametrize("rotary_dim,scaling", [(16, 1.0), (8, 1.25)])
def test_rotate_in_place_equals_apply_rope(rotary_dim, scaling):
    """The whole-row rotation the cache writer uses == edgekv.rope.apply_rope, partial rotary
    dims (left as they are) and attention scaling included, at an offset past 1,024 positions."""
    from edgekv.rope import RopeSpec, apply_rope
    from edgekv.runtime.decoder import rope_table, rotate_in_place

    rope = RopeSpec(tuple(10000.0 ** (-np.arange(0, rotary_dim, 2) / rotary_dim)), scaling)
    k = np.random.default_rng(0).normal(size=(2, 3, 7, 16)).astype(np.float32)
    C, S = rope_table(rope, 1500, 16)
    assert C.shape[0] >= 1500
    x = k.copy()
    rotate_in_place(x, C[1490:], S[1490:], rotary_dim)
    want = apply_rope(k, rope, np.arange(1490, 1497))
    assert np.abs(x - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(x - k).max() > 1e-2  # it rotated


def test_runtime_reuses_its_cache_and_answers_alike(exported, tmp_path):
    """A finished generation's KVCache goes back to the decoder and the next one reuses it
    (stale positions past the valid length are never read): the same prompt and memory give
    the same tokens before and after other generations with other memories, and a generation
    the caller stops early hands its cache back too."""
    from edgekv.runtime import Runtime

    rt = Runtime.load(exported("qwen2"), k=0)
    K, V = _memory(rt.decoder, 10, seed=3)
    first = rt.generate("what is the code for river?", max_new_tokens=10, inject=(K, V))
    assert len(rt.decoder._pool) == 1
    pooled = rt.decoder._pool[0]
    other = rt.generate("and for the lake?", max_new_tokens=12, inject=_memory(rt.decoder, 30, seed=4))
    assert rt.decoder._pool == [pooled]  # reused, not a second buffer
    stream = rt.stream("and for the lake?", max_new_tokens=12)
    next(stream)
    stream.close()  # stopped early: the cache is handed back all the same
    assert rt.decoder._pool == [pooled]
    again = rt.generate("what is the code for river?", max_new_tokens=10, inject=(K, V))
    assert again.token_ids == first.token_ids and other.token_ids != first.token_ids
    a, b = rt.decoder.acquire_cache(8), rt.decoder.acquire_cache(8)
    assert a is pooled and b is not a  # one sequence per cache
    rt.decoder.release_cache(a), rt.decoder.release_cache(b), rt.decoder.release_cache(b)
    assert len(rt.decoder._pool) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_with_last_logits_only_equals_the_last_row(family, exported):
    """logits_to_keep (an optional input, default all rows): a prompt run with last_only gives
    one row, equal to the last row of the full run, and the same cache; callers that do not pass
    it (forward_numpy, optimum) still get every position."""
    dec = _decoder(exported(family))
    assert dec.keeps_logits
    K, V = _memory(dec, 9)
    prompt = np.asarray([[5, 17, 3, 44, 8, 21]], np.int64)
    full, c_full = dec.forward(prompt, dec.new_cache(32, K, V))
    last, c_last = dec.forward(prompt, dec.new_cache(32, K, V), last_only=True)
    assert full.shape[1] == 6 and last.shape[1] == 1
    assert np.abs(last[0, 0] - full[0, -1]).max() <= 1e-5 * np.abs(full).max()
    assert np.array_equal(c_last.k_all[:, :, :, :15], c_full.k_all[:, :, :, :15])
    step = np.asarray([[int(last[0, 0].argmax())]], np.int64)
    assert np.abs(dec.forward(step, c_last)[0] - dec.forward(step, c_full)[0]).max() <= 1e-5 * np.abs(full).max()
    numpy_logits, _ = dec.forward_numpy(prompt, dec.empty_past())
    assert numpy_logits.shape[1] == 6
