"""Device time to first token per method (edgekv.bench.device) on a tiny exported model.

A small memory (random KV, keys from the export's own key graph) and a prompt-text state
(stored examples + their keys) are timed on the onnxruntime runtime; timings are only
checked for being positive (the machine is shared), what each path feeds is checked exactly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edgekv.data import Example

EXAMPLES = [
    Example("e0", "what colour is the triangle?", "the triangle is green"),
    Example("e1", "how many dots are there?", "three dots"),
    Example("e2", "code for apple?", "K7"),
    Example("e3", "code for river?", "Q2"),
    Example("e4", "hello world", "this is a tiny tokenizer"),
    Example("e5", "name the capital of glorp", "zibble"),
]
QUERIES = [Example("q0", "code for river?", "Q2"), Example("q1", "what colour is the square?", "red")]


def _raw_keys(rt, key_session, prompts):
    """Raw pooled keys [N, R] of prompts through the export's key graph (the contract: no template)."""
    out = []
    for p in prompts:
        ids = rt.tokenizer.encode(p)
        mask = np.ones((1, len(ids)), np.int64)
        feed = {"attention_mask": mask}
        if rt.manifest["key"].get("input") == "inputs_embeds":
            feed["inputs_embeds"] = rt.decoder.embed(np.asarray([ids], np.int64))
        else:
            feed["input_ids"] = np.asarray([ids], np.int64)
        out.append(key_session.run(["pooled"], feed)[0][0])
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def setup(exported, tmp_path_factory):
    """(artifacts, memory path, prompt-text state folder, raw keys of EXAMPLES)."""
    from edgekv.format import Calibration, Entry, MemorySpec, commit_update, create_memory
    from edgekv.retrieval import fit_projection
    from edgekv.rope import RopeSpec
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import open_session

    art = exported("llama")
    tmp = tmp_path_factory.mktemp("device-ttft")
    m = json.load(open(os.path.join(art, "manifest.json")))
    with Runtime.load(art, threads=1) as rt:
        keys = _raw_keys(rt, open_session(os.path.join(art, m["key"]["file"]), 1), [e.prompt for e in EXAMPLES])
    L, H, D, R = m["num_layers"], m["num_kv_heads"], m["head_dim"], m["hidden_size"]
    rope = RopeSpec(tuple(m["rope"]["inv_freq"]), float(m["rope"]["attention_scaling"])) if m.get("rope") else None
    spec = MemorySpec(L, H, D, 4, R, m["model_fingerprint"], "int8", rope, key_layer=int(m["key"]["layer"]),
                      key_pooling=m["key"]["pooling"])
    mem = str(tmp / "memory.ekv")
    create_memory(mem, spec, spec.file_bytes_for(len(EXAMPLES) + 2), Calibration(0.1, (1.0,) * L)).close()
    rng = np.random.default_rng(0)
    put = {i: Entry.from_float(keys[i], rng.standard_normal((L, H, 4, D)).astype(np.float32),
                               rng.standard_normal((L, H, 4, D)).astype(np.float32), "int8", task="t",
                               source_id=e.id) for i, e in enumerate(EXAMPLES)}
    commit_update(mem, put, projection=fit_projection(keys, 3))
    # a prompt-text state as PromptText.save writes it
    state = tmp / "prompt-state"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"items": [["t", e.__dict__] for e in EXAMPLES]}))
    np.save(state / "keys.npy", keys)
    return art, mem, str(state), keys


def test_measure_every_kind(setup):
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.device import (
        MethodState,
        measure_device_ttft,
        read_prompt_state,
        ttft_seconds,
    )

    art, mem, state, _ = setup
    cfg = BenchConfig(top_k=2)
    states = {"induce": MethodState("memory", memory=mem), "prompt-text": read_prompt_state(state, proj_dirs=3),
              "zero-shot": MethodState("plain"), "lora": MethodState("plain")}
    res = measure_device_ttft(art, states, QUERIES, cfg, repeats=1)
    assert set(res["methods"]) == set(states)
    for name, r in res["methods"].items():
        assert r["median_ms"] > 0 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"], name
        assert r["n"] == len(QUERIES)
        assert r["over_induce"] == pytest.approx(r["median_ms"] / res["methods"]["induce"]["median_ms"])
    assert res["methods"]["induce"]["kind"] == "memory" and res["methods"]["induce"]["memory_tokens"] == 2 * 4
    assert res["methods"]["zero-shot"]["memory_tokens"] == 0
    pt = res["methods"]["prompt-text"]
    assert pt["kind"] == "prompt" and pt["shots"] == 2
    assert pt["prompt_tokens"] > res["methods"]["zero-shot"]["prompt_tokens"]  # the shots are in the prompt
    assert res["threads"] == 2 and "exact" in res["retrieval"] and res["images"] is None
    assert set(ttft_seconds(res)) == {f"{n}_s" for n in states}


def test_prompt_path_feeds_the_top_shots(setup):
    from edgekv.bench.device import MethodState, close_methods, open_methods
    from edgekv.retrieval import effective_keys, fit_projection

    art, _, _, keys = setup
    proj = fit_projection(keys, 3)
    base, methods = open_methods(art, {"prompt-text": MethodState("prompt", items=tuple(EXAMPLES), keys=keys,
                                                                  projection=proj, top_k=3),
                                       "zero-shot": MethodState("plain")}, threads=1)
    try:
        pt = methods["prompt-text"]
        P = effective_keys(keys, proj)
        for q in QUERIES:
            qkey = effective_keys(_raw_keys(base, pt.keyrt.key_session, [q.prompt])[0], proj)
            want = np.argsort(-(P @ qkey), kind="stable")[:3][::-1].tolist()  # numpy ranking, best last
            pt.run(q)
            assert pt.last_rows == want
            ids = pt.last_ids
            alone = base.prompt_ids(q.prompt)
            assert len(ids) > len(alone)
            assert ids[-len(alone) + 1:] == alone[-len(alone) + 1:] or q.prompt in base.tokenizer.decode(ids)
            text = base.tokenizer.decode(ids)
            for r in want:  # every shot's prompt and answer, in order, best last (right before the query)
                assert EXAMPLES[r].prompt in text and EXAMPLES[r].answer in text
            at = [text.index(EXAMPLES[r].answer) for r in want]
            assert at == sorted(at) and text.rindex(q.prompt) > at[-1]
        # the exact-match query (QUERIES[0] is EXAMPLES[3]'s prompt) gets that example as its best shot
        pt.run(QUERIES[0])
        assert pt.last_rows[-1] == 3
        # the whole conversation is the device tokenizer's chat template of these turns
        msgs = []
        for r in pt.last_rows:
            msgs += [{"role": "user", "content": EXAMPLES[r].prompt}, {"role": "assistant", "content": EXAMPLES[r].answer}]
        assert pt.last_ids == base.tokenizer.encode_chat(msgs + [{"role": "user", "content": QUERIES[0].prompt}])
    finally:
        close_methods(base, methods)


def test_memory_path_retrieves_as_the_runtime(setup):
    from edgekv.bench.device import MethodState, close_methods, open_methods
    from edgekv.runtime import Runtime

    art, mem, _, _ = setup
    base, methods = open_methods(art, {"induce": MethodState("memory", memory=mem, top_k=3)}, threads=1)
    try:
        t = methods["induce"]
        assert t.rt.retriever.mode == "exact" and t.rt.decoder is base.decoder
        with Runtime.load(art, memory=mem, k=3, threads=1) as ref:
            for q in QUERIES:
                t.run(q)
                want = ref.generate(q.prompt, max_new_tokens=1)
                assert [(r.slot, r.entry_id) for r in t.last.retrieved] == [(r.slot, r.entry_id) for r in ref.retrieve(q.prompt)]
                assert [r.slot for r in t.last.retrieved] == [r.slot for r in want.retrieved]
                assert t.last.token_ids == want.token_ids and t.last.num_memory_tokens == 3 * 4
    finally:
        close_methods(base, methods)


def test_states_from_a_bench_folder(setup, tmp_path):
    import shutil

    from edgekv.bench.config import BenchConfig
    from edgekv.bench.device import method_states_from_bench
    from edgekv.bench.runner import stage_dir

    _, mem, state, keys = setup
    T, budget = 2, 4096
    os.makedirs(os.path.join(stage_dir(str(tmp_path), "induce", budget, T - 1), "state"))
    shutil.copyfile(mem, os.path.join(stage_dir(str(tmp_path), "induce", budget, T - 1), "state", "memory.ekv"))
    shutil.copytree(state, os.path.join(stage_dir(str(tmp_path), "prompt-text", budget, T - 1), "state"))
    got = method_states_from_bench(str(tmp_path), ["zero-shot", "induce", "reservoir", "prompt-text", "lora"],
                                   budget, T, BenchConfig())
    assert set(got) == {"zero-shot", "induce", "prompt-text", "lora"}  # reservoir never ran: left out
    assert got["zero-shot"].kind == got["lora"].kind == "plain"
    assert got["induce"].kind == "memory" and got["induce"].memory.endswith("memory.ekv")
    pt = got["prompt-text"]
    assert pt.kind == "prompt" and [e.id for e in pt.items] == [e.id for e in EXAMPLES]
    np.testing.assert_array_equal(pt.keys, keys)
    assert pt.projection is not None


def test_export_for_bench_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    from edgekv.bench import device
    from edgekv.manifest import read_manifest

    src = tiny_model_dir("llama")
    art = device.export_for_bench(src, str(tmp_path))
    fp = read_manifest(art)["model_fingerprint"]
    calls = []
    import edgekv.export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "export_model", lambda *a, **k: calls.append(a))
    assert device.export_for_bench(src, str(tmp_path)) == art
    assert device.export_for_bench(src, str(tmp_path), fingerprint=fp) == art
    assert calls == []
    device.export_for_bench(src, str(tmp_path), fingerprint="0" * 64)  # another model: exported again
    assert len(calls) == 1
    with open(os.path.join(art, "tokenizer.json"), "a") as f:  # an incomplete / altered export: again
        f.write(" ")
    device.export_for_bench(src, str(tmp_path), fingerprint=fp)
    assert len(calls) == 2


# --- a vision-language export: shots keep their images ------------------------------
@pytest.fixture(scope="module")
def vlm_setup(tmp_path_factory):
    """(artifacts of a tiny LLaVA, stored examples (some with images), their raw keys)."""
    from tiny_vlms import card, make_tiny_vlm

    from edgekv.export.pipeline import export_model
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import open_session

    tmp = tmp_path_factory.mktemp("device-ttft-vlm")
    src = make_tiny_vlm("llava", str(tmp / "model"))
    art = str(tmp / "artifacts")
    export_model(src, art, progress=False)
    paths = []
    for i in range(3):
        paths.append(str(tmp / f"card{i}.png"))
        card(i).save(paths[-1])
    items = tuple(replace_image(e, paths[i] if i < 3 else None) for i, e in enumerate(EXAMPLES))
    with Runtime.load(art, threads=1) as rt:
        ks = open_session(os.path.join(art, rt.manifest["key"]["file"]), 1)
        keys = []
        for e in items:
            img = None if e.image is None else rt.encode_image(e.image)
            ids = rt.tokenizer.encode(e.prompt) if img is None else rt.vision.prompt_ids(rt.tokenizer, e.prompt,
                                                                                       False, img)
            emb = rt.decoder.embed(np.asarray([ids], np.int64)) if img is None else rt.vision.embed(ids, img.features)
            keys.append(ks.run(["pooled"], {"inputs_embeds": emb,
                                            "attention_mask": np.ones((1, len(ids)), np.int64)})[0][0])
    return art, items, np.stack(keys).astype(np.float32), paths


def replace_image(e: Example, image: str | None) -> Example:
    from dataclasses import replace

    return replace(e, image=image)


def test_vlm_shots_keep_their_images(vlm_setup):
    from edgekv.bench.device import MethodState, close_methods, measure_device_ttft, open_methods
    from edgekv.retrieval import fit_projection

    art, items, keys, paths = vlm_setup
    queries = [Example("q0", "what colour is the triangle?", ""), Example("q1", "how many dots?", "", paths[1])]
    states = {"prompt-text": MethodState("prompt", items=items, keys=keys, projection=fit_projection(keys, 3),
                                         top_k=3),
              "zero-shot": MethodState("plain")}
    res = measure_device_ttft(art, states, queries, repeats=1, threads=1)
    pt = res["methods"]["prompt-text"]
    assert pt["median_ms"] > 0 and res["methods"]["zero-shot"]["median_ms"] > 0
    assert pt["shots"] == 3 and pt["shot_images"] >= 1 and "spliced" in res["images"]
    assert pt["prompt_tokens"] > res["methods"]["zero-shot"]["prompt_tokens"]

    base, methods = open_methods(art, states, threads=1)
    try:
        t = methods["prompt-text"]
        v = base.vision
        for q in queries:
            t.prepare(q)
            qimg = None if q.image is None else base.encode_image(q.image)
            ids, feats, shots, rows = t.build(q, qimg)
            images = [s.image for s in shots if s.image is not None] + ([q.image] if q.image else [])
            n = sum(t.images[p].features.shape[1] if p in t.images else qimg.features.shape[1] for p in images)
            assert sum(1 for i in ids if i == v.image_token_id) == n == (0 if feats is None else feats.shape[1])
            assert len(ids) > len(base.prompt_ids(q.prompt))
            t.run(q)  # the prefill on embeddings with every image spliced in
            assert t.last_rows == rows
        # without shots, the query's prompt is exactly the runtime's own (one image turn / text turn)
        t.k = 0
        img = base.encode_image(paths[1])
        assert t.build(queries[1], img)[0] == v.prompt_ids(base.tokenizer, queries[1].prompt, True, img)
        assert t.build(queries[0])[0] == base.prompt_ids(queries[0].prompt)
    finally:
        close_methods(base, methods)


def test_prompt_path_matches_the_host_method(backbone, exported, tmp_path):
    """The device's shots and prompt ids are the host PromptText's (its torch keys, the export's key graph)."""
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.device import close_methods, open_methods, read_prompt_state
    from edgekv.bench.methods import Context, PromptText

    cfg = BenchConfig(top_k=3)
    pt = PromptText(Context(backbone("llama"), cfg, 1 << 20, str(tmp_path / "work")))
    pt.learn(0, "t", EXAMPLES)
    pt.save(str(tmp_path / "state"))
    base, methods = open_methods(exported("llama"), {"prompt-text": read_prompt_state(str(tmp_path / "state"))}, cfg,
                                 threads=1)
    try:
        t = methods["prompt-text"]
        for q in QUERIES + [Example("q2", "code for apple", "")]:
            assert [t.items[r].id for r in t.retrieve(q)] == pt.retrieved([q])[0]
            assert t.build(q)[0] == pt.prompt_ids([q])[0]
    finally:
        close_methods(base, methods)
