"""Device runtime against PyTorch references, for tiny Llama, Qwen2 and Gemma models.

Each equivalence is checked together with a control showing the check can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from reference import greedy, joint_logits, prefix_kv
from tiny_models import FAMILIES  # noqa: E402 - every family the fused graph covers

from edgekv.errors import InputError, MismatchError
from edgekv.format import Calibration, Entry, MemorySpec, commit_update, create_memory
from edgekv.rope import apply_rope, remove_rope

PREFIX = "code for apple is K7, code for river is Q2"
QUERY = " what is the code for river?"
EXAMPLES = [
    ("what colour is the triangle?", "the triangle is green"),
    ("how many dots are there?", "three dots"),
    ("code for apple?", "K7"),
    ("code for river?", "Q2"),
    ("hello world", "this is a tiny tokenizer"),
]


def _tok_ids(bb, text: str, special: bool = True) -> list[int]:
    return bb.tokenizer(text, add_special_tokens=special).input_ids


def _chat_ids(bb, messages, gen: bool) -> list[int]:
    out = bb.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def _pool(x: np.ndarray, m: int) -> np.ndarray:
    """Reference adaptive average pooling over axis 2: [L, H, T, D] -> [L, H, m, D]."""
    T = x.shape[2]
    bounds = [(i * T // m, -(-(i + 1) * T // m)) for i in range(m)]
    return np.stack([x[:, :, a:b].mean(axis=2) for a, b in bounds], axis=2)


def build_memory(path: str, bb, m: int = 8, payload: str = "int8", tau: float = 0.1) -> None:
    """A memory of EXAMPLES computed plainly: keys by KeyModel, KV position-free and pooled."""
    import torch

    from edgekv.host.keymodel import KeyModel
    from edgekv.host.models import default_key_layer

    s = bb.shape
    key_layer = default_key_layer(s.num_layers)
    spec = MemorySpec(s.num_layers, s.num_kv_heads, s.head_dim, m, s.hidden_size, bb.fingerprint, payload,
                      bb.rope, key_layer=key_layer)
    one = spec.header_bytes + 64 + spec.slot_bytes
    create_memory(path, spec, one * (len(EXAMPLES) + 2), Calibration(tau, (1.0,) * s.num_layers)).close()
    km = KeyModel(bb.decoder, key_layer)
    put = {}
    for i, (q, a) in enumerate(EXAMPLES):
        ids = _chat_ids(bb, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], False)
        K, V = prefix_kv(bb.model, ids)
        K = remove_rope(K, bb.rope, np.arange(len(ids)))
        qi = torch.tensor([_tok_ids(bb, q)])
        with torch.no_grad():
            key = km(qi, torch.ones_like(qi))[0].numpy()
        put[i] = Entry.from_float(key, _pool(K, m), _pool(V, m), payload, task="t", source_id=f"ex{i}")
    commit_update(path, put)


# --- equivalence with PyTorch ------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_injected_prefix_equals_joint_sequence(family, exported, backbone):
    from edgekv.runtime import Runtime

    bb = backbone(family)
    rt = Runtime.load(exported(family), k=0)
    prefix, query = _tok_ids(bb, PREFIX), _tok_ids(bb, QUERY, special=False)
    K, V = prefix_kv(bb.model, prefix)
    Kfree = remove_rope(K, bb.rope, np.arange(len(prefix)))  # stored form: position-free
    got = rt.logits(query, *rt.rotate(Kfree, V))
    want = joint_logits(bb.model, prefix + query)[len(prefix):]
    assert np.abs(got - want).max() <= 1e-4
    # control: without the prefix the logits are clearly different
    assert np.abs(rt.logits(query) - want).max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_unpooled_float_entry_equals_pytorch(family, exported, backbone):
    from edgekv.runtime import Runtime

    bb = backbone(family)
    rt = Runtime.load(exported(family), k=0)
    prompt = "what is the code for river?"
    prefix = _chat_ids(bb, [{"role": "user", "content": "code for river?"}, {"role": "assistant", "content": "Q2"}], False)
    query = rt.prompt_ids(prompt)
    assert query == _chat_ids(bb, [{"role": "user", "content": prompt}], True)  # device tokenizer == HF
    K, V = prefix_kv(bb.model, prefix)
    res = rt.generate(prompt, max_new_tokens=16, inject=(remove_rope(K, bb.rope, np.arange(len(prefix))), V))
    want = greedy(bb.model, prefix + query, 16, set(bb.eos_token_ids))
    assert res.token_ids == want and len(want) > 0
    assert res.num_memory_tokens == len(prefix) and res.ttft_ms > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_round_trip_equals_pytorch_at_new_positions(family, backbone):
    """Keys made position-free then rotated to positions c.. equal the keys PyTorch caches
    when the same tokens sit at positions c.. (RoPE is relative, so nothing else moves)."""
    bb = backbone(family)
    ids = _tok_ids(bb, PREFIX)
    K0, _ = prefix_kv(bb.model, ids)
    for c in (5, 37):
        Kc, _ = prefix_kv(bb.model, ids, position_offset=c)
        free = remove_rope(K0, bb.rope, np.arange(len(ids)))
        moved = apply_rope(free, bb.rope, np.arange(c, c + len(ids)))
        assert np.abs(moved - Kc).max() <= 1e-4 * max(1.0, np.abs(Kc).max())
        assert np.abs(K0 - Kc).max() > 1e-3  # control: positions do change the cached keys


@pytest.mark.parametrize("family, payload", [("llama", "int8"), ("llama", "fp16"), ("llama", "int4"),
                                             ("mistral", "int4"), ("qwen3", "int4"), ("phi3", "int4")])
def test_memory_path_matches_pytorch_with_same_cache(family, payload, exported, backbone, tmp_path):
    """Retrieval, alpha, dequantisation and injection: runtime logits equal PyTorch's on the
    KV the runtime assembled; the query key graph equals KeyModel; search equals brute force."""
    import torch
    from transformers import DynamicCache

    from edgekv.host.keymodel import KeyModel
    from edgekv.retrieval import effective_keys
    from edgekv.runtime import Runtime

    bb = backbone(family)
    mem = str(tmp_path / "m.ekv")
    build_memory(mem, bb, payload=payload)
    with Runtime.load(exported(family), memory=mem, k=3) as rt:
        prompt = "code for river?"
        # key graph (ONNX) == KeyModel (torch)
        km = KeyModel(bb.decoder, rt.memory.spec.key_layer)
        qi = torch.tensor([_tok_ids(bb, prompt)])
        with torch.no_grad():
            ref_key = effective_keys(km(qi, torch.ones_like(qi))[0].numpy(), rt.memory.projection)
        assert np.abs(rt.query_key(prompt) - ref_key).max() <= 1e-5
        retrieved = rt.retrieve(prompt)
        assert retrieved[-1].source_id == "ex3"  # identical prompt: the best entry, laid out last
        assert abs(sum(r.alpha for r in retrieved) - 1) < 1e-5
        assert [r.sim for r in retrieved] == sorted(r.sim for r in retrieved)
        K, V = rt.memory_kv(retrieved)
        assert K.shape == (bb.shape.num_layers, bb.shape.num_kv_heads, 3 * 8, bb.shape.head_dim)
        query = rt.prompt_ids(prompt)
        got = rt.logits(query, K, V)
        cache = DynamicCache()
        for layer in range(K.shape[0]):
            cache.update(torch.from_numpy(K[layer][None]), torch.from_numpy(V[layer][None]), layer)
        with torch.no_grad():
            want = bb.model(input_ids=torch.tensor([query]), past_key_values=cache,
                            position_ids=torch.arange(K.shape[2], K.shape[2] + len(query))[None]).logits[0].numpy()
        assert np.abs(got - want).max() <= 1e-4
        res = rt.generate(prompt, max_new_tokens=4)
        assert [r.slot for r in res.retrieved] == [r.slot for r in retrieved]


def test_int8_memory_close_to_float_memory(exported, backbone, tmp_path):
    from edgekv.runtime import Runtime

    bb = backbone("llama")
    out = {}
    for payload in ("int8", "fp16"):
        mem = str(tmp_path / f"{payload}.ekv")
        build_memory(mem, bb, payload=payload)
        with Runtime.load(exported("llama"), memory=mem, k=3) as rt:
            K, V = rt.memory_kv(rt.retrieve("code for apple?"))
            out[payload] = (K, V, rt.logits(rt.prompt_ids("code for apple?"), K, V))
    kq, vq, lq = out["int8"]
    kf, vf, lf = out["fp16"]
    assert np.abs(kq - kf).max() <= 0.02 * np.abs(kf).max() + 1e-3
    assert np.abs(lq - lf).max() <= 0.05 * np.abs(lf).max()
    assert np.array_equal(lq.argmax(-1), lf.argmax(-1))


# --- retrieval --------------------------------------------------------------------
def test_hnsw_recall_against_brute_force(tmp_path):
    """recall@10 >= 0.95 on 10,000 seeded random keys, through the memory file and index."""
    from edgekv.format import Memory
    from edgekv.index import Retriever, build_index

    rng = np.random.default_rng(0)
    n, dim, k = 10_000, 64, 10
    spec = MemorySpec(1, 1, 8, 1, dim, "ab" * 32, "fp16", None)
    path = str(tmp_path / "big.ekv")
    create_memory(path, spec, spec.file_bytes_for(n)).close()
    zeros = np.zeros((1, 1, 1, 8), np.float16)
    keys = rng.normal(size=(n, dim)).astype(np.float32)
    commit_update(path, {i: Entry(keys[i], zeros, zeros, task="t") for i in range(n)})
    build_index(path, str(tmp_path))
    with Memory(path) as mem:
        exact = Retriever(mem, str(tmp_path), force="exact")
        ann = Retriever(mem, str(tmp_path), force="hnsw")
        assert exact.mode == "exact" and ann.mode == "hnsw"
        queries = rng.normal(size=(200, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        hits = 0
        for q in queries:
            e, _ = exact.search(q, k)
            a, _ = ann.search(q, k)
            hits += len(set(e.tolist()) & set(a.tolist()))
        recall = hits / (len(queries) * k)
    assert recall >= 0.95, recall


def test_index_for_another_memory_is_never_used(tmp_path):
    """An index bound to another memory (or state) is bypassed: exact search without the cache,
    and with it an index of this memory built and cached beside it; the foreign one is untouched."""
    from edgekv.format import Memory
    from edgekv.index import Retriever, build_index, cache_paths

    spec = MemorySpec(1, 1, 8, 1, 16, "ab" * 32, "fp16", None)
    zeros = np.zeros((1, 1, 1, 8), np.float16)
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        create_memory(str(tmp_path / f"{name}.ekv"), spec, spec.file_bytes_for(4)).close()
        commit_update(str(tmp_path / f"{name}.ekv"),
                      {i: Entry(rng.normal(size=16), zeros, zeros, task="t") for i in range(4)})
    meta = build_index(str(tmp_path / "a.ekv"), str(tmp_path / "idx"))
    with Memory(str(tmp_path / "b.ekv")) as mem:
        r = Retriever(mem, str(tmp_path / "idx"), force="hnsw", cache=False)
        assert r.mode == "exact" and "another memory state (not used)" in r.reason
        assert not os.path.exists(cache_paths(mem.path)[0])
        r = Retriever(mem, str(tmp_path / "idx"), force="hnsw")
        assert r.mode == "hnsw" and r.reason.startswith("built on the device") and "cached beside" in r.reason
        assert Retriever(mem, str(tmp_path / "idx"), force="hnsw").reason.startswith("the cached index matches the memory")
        q = rng.normal(size=16).astype(np.float32)
        assert r.search(q / np.linalg.norm(q), 4)[0].tolist() == \
            Retriever(mem, force="exact").search(q / np.linalg.norm(q), 4)[0].tolist()
    assert json.load(open(tmp_path / "idx" / "index.json")) == meta


# --- boundaries and errors ------------------------------------------------------
def test_memory_for_another_model_is_refused(exported, backbone, tmp_path):
    from edgekv.runtime import Runtime

    mem = str(tmp_path / "m.ekv")
    build_memory(mem, backbone("qwen2"))
    with pytest.raises(MismatchError, match="another model"):
        Runtime.load(exported("llama"), memory=mem)


def test_bad_generation_inputs(exported, backbone, tmp_path):
    from edgekv.runtime import Runtime

    mem = str(tmp_path / "m.ekv")
    build_memory(mem, backbone("llama"))
    with pytest.raises(InputError, match="larger than the memory"):
        Runtime.load(exported("llama"), memory=mem, k=50)
    with Runtime.load(exported("llama"), memory=mem, k=2) as rt:
        with pytest.raises(InputError, match="empty"):
            rt.generate("   ")
        with pytest.raises(InputError, match="exceeds the model's context"):
            rt.generate("apple " * 600)


def test_generate_with_memory_imports_no_torch(exported, backbone, tmp_path):
    """Nor Jinja: the one user turn the runtime renders is pre-rendered in the manifest."""
    mem = str(tmp_path / "m.ekv")
    build_memory(mem, backbone("llama"))
    art = exported("llama")
    script = (
        "import sys, json\n"
        "from edgekv.runtime import Runtime\n"
        f"rt = Runtime.load({art!r}, memory={mem!r}, k=2)\n"
        "r = rt.generate('code for river?', max_new_tokens=5)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum', 'jinja2'))\n"
        "print(json.dumps({'bad': bad, 'n': len(r.token_ids), 'retrieved': len(r.retrieved)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["bad"] == [] and data["retrieved"] == 2 and data["n"] > 0


def test_cli_run_json_and_stream(exported, backbone, tmp_path):
    from typer.testing import CliRunner

    from edgekv.cli import app

    mem = str(tmp_path / "m.ekv")
    build_memory(mem, backbone("llama"))
    runner = CliRunner()
    res = runner.invoke(app, ["run", exported("llama"), "--memory", mem, "-k", "2", "--prompt", "code for river?",
                              "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    for key in ("text", "retrieved", "ttft_ms", "tokens_per_s"):
        assert key in data
    assert len(data["retrieved"]) == 2 and {"entry_id", "alpha"} <= set(data["retrieved"][0])
    res = runner.invoke(app, ["run", exported("llama"), "--prompt", "hello", "-n", "4"])
    assert res.exit_code == 0
    res = runner.invoke(app, ["run", str(tmp_path / "nope"), "--prompt", "hello"])
    assert res.exit_code == 3 and "Traceback" not in res.output and "error:" in res.output


@pytest.mark.slow
def test_smollm2_injected_prefix_equals_joint_sequence(exported, backbone):
    from edgekv.runtime import Runtime

    bb = backbone("smollm2-135m")
    rt = Runtime.load(exported("smollm2-135m"), k=0, threads=2)
    prefix = _chat_ids(bb, [{"role": "user", "content": "The secret code for the red door is 4417."},
                            {"role": "assistant", "content": "Understood: red door, code 4417."}], False)
    query = rt.prompt_ids("What is the secret code for the red door?")
    K, V = prefix_kv(bb.model, prefix)
    Kfree = remove_rope(K, bb.rope, np.arange(len(prefix)))
    got = rt.logits(query, *rt.rotate(Kfree, V))
    want = joint_logits(bb.model, prefix + query)[len(prefix):]
    assert np.abs(got - want).max() <= 1e-4
    res = rt.generate("What is the secret code for the red door?", max_new_tokens=12, inject=(Kfree, V))
    assert res.token_ids == greedy(bb.model, prefix + query, 12, set(bb.eos_token_ids))


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_pre_rendered_chat_turn_equals_the_template(family, exported, backbone, tmp_path):
    """The manifest's chat_turn (prefix + message + suffix) gives the ids Hugging Face's
    apply_chat_template gives, for awkward messages too; a template edited after export no
    longer matches its hash and is rendered by the sandbox instead."""
    from edgekv.runtime import Runtime
    from edgekv.runtime.tokenizer import DeviceTokenizer

    bb, art = backbone(family), exported(family)
    with open(os.path.join(art, "manifest.json")) as f:
        tk = json.load(f)["tokenizer"]
    assert tk["chat_turn"] is not None and tk["chat_turn"]["prefix"]
    rt = Runtime.load(art)
    assert rt.tokenizer.chat_turn is not None and rt.tokenizer._compiled is None  # Jinja never compiled
    for text in ("code for river?", "  spaced {{ x }} {% if %}\nsecond line ", "<|im_end|> inside"):
        assert rt.prompt_ids(text) == _chat_ids(bb, [{"role": "user", "content": text}], True), text
    special = {"bos_token": tk["bos_token"], "eos_token": tk["eos_token"]}
    edited = DeviceTokenizer.load(os.path.join(art, "tokenizer.json"), "EDITED {{ messages[0]['content'] }}", special,
                                  tk["chat_turn"])
    assert edited.chat_turn is None and edited.render_chat([{"role": "user", "content": "hi"}]) == "EDITED hi"
    kept = DeviceTokenizer.load(os.path.join(art, "tokenizer.json"), tk["chat_template"], special, tk["chat_turn"])
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert kept.render_chat(two, False) == bb.tokenizer.apply_chat_template(two, tokenize=False)  # other turns: Jinja
