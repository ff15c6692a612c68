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


def _make_memory(m: dict, keys: np.ndarray, examples, path: str) -> str:
    """A memory for the export of manifest ``m``: one entry of 4 random KV tokens per example, keyed by ``keys``."""
    from edgekv.format import Calibration, Entry, MemorySpec, commit_update, create_memory
    from edgekv.retrieval import fit_projection
    from edgekv.rope import RopeSpec

    L, H, D, R = m["num_layers"], m["num_kv_heads"], m["head_dim"], m["hidden_size"]
    rope = RopeSpec(tuple(m["rope"]["inv_freq"]), float(m["rope"]["attention_scaling"])) if m.get("rope") else None
    spec = MemorySpec(L, H, D, 4, R, m["model_fingerprint"], "int8", rope, key_layer=int(m["key"]["layer"]),
                      key_pooling=m["key"]["pooling"])
    create_memory(path, spec, spec.file_bytes_for(len(examples) + 2), Calibration(0.1, (1.0,) * L)).close()
    rng = np.random.default_rng(0)
    put = {i: Entry.from_float(keys[i], rng.standard_normal((L, H, 4, D)).astype(np.float32),
                               rng.standard_normal((L, H, 4, D)).astype(np.float32), "int8", task="t",
                               source_id=e.id) for i, e in enumerate(examples)}
    commit_update(path, put, projection=fit_projection(keys, 3))
    return path


@pytest.fixture(scope="module")
def setup(exported, tmp_path_factory):
    """(artifacts, memory path, prompt-text state folder, raw keys of EXAMPLES)."""
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import open_session

    art = exported("llama")
    tmp = tmp_path_factory.mktemp("device-ttft")
    m = json.load(open(os.path.join(art, "manifest.json")))
    with Runtime.load(art, threads=1) as rt:
        keys = _raw_keys(rt, open_session(os.path.join(art, m["key"]["file"]), 1), [e.prompt for e in EXAMPLES])
    mem = _make_memory(m, keys, EXAMPLES, str(tmp / "memory.ekv"))
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


def test_a_text_export_times_image_queries_as_text(setup):
    from edgekv.bench.device import TEXT_EXPORT_NOTE, MethodState, measure_device_ttft

    art, _, _, _ = setup
    qs = [QUERIES[0], Example("qi", "what colour is the square?", "red", "no-such-image.png")]
    res = measure_device_ttft(art, {"zero-shot": MethodState("plain")}, qs, repeats=1, threads=1)
    zs = res["methods"]["zero-shot"]
    assert res["queries"] == 2 and res["image_queries"] == 0 and "image" not in zs and zs["n"] == 2
    assert zs["image_tokens"] == 0 and res["images"] == TEXT_EXPORT_NOTE


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
vlm_source: list[str] = []  # the tiny LLaVA's folder (vlm_setup), for the host backbone
@pytest.fixture(scope="module")
def vlm_setup(tmp_path_factory):
    """(artifacts of a tiny LLaVA, stored examples (some with images), their raw keys)."""
    from tiny_vlms import card, make_tiny_vlm

    from edgekv.export.pipeline import export_model
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import open_session

    tmp = tmp_path_factory.mktemp("device-ttft-vlm")
    src = make_tiny_vlm("llava", str(tmp / "model"))
    vlm_source.append(src)
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


@pytest.fixture(scope="module")
def vlm_memory(vlm_setup, tmp_path_factory):
    """A memory for the tiny LLaVA export: one entry per stored example, keyed by its prompt + image key."""
    art, items, keys, _ = vlm_setup
    m = json.load(open(os.path.join(art, "manifest.json")))
    return _make_memory(m, keys, items, str(tmp_path_factory.mktemp("device-ttft-vlm-memory") / "memory.ekv"))


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
    assert pt["shots"] == pt["image"]["shots"] == 3 and "spliced" in res["images"]
    assert pt["shot_images"] + pt["image"]["shot_images"] >= 1
    assert pt["prompt_tokens"] > res["methods"]["zero-shot"]["prompt_tokens"]
    assert pt["image"]["prompt_tokens"] > res["methods"]["zero-shot"]["image"]["prompt_tokens"]

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


def test_vlm_image_queries_are_timed_apart(vlm_setup, vlm_memory):
    """On a VLM export the image queries are timed for every kind of method (through the runtime's
    image path) and reported in each method's 'image' block; the tokens they fed are the runtime's own."""
    from edgekv.bench.device import MethodState, measure_device_ttft, ttft_seconds
    from edgekv.bench.report import device_ttft_table
    from edgekv.commands.bench import _device_ttft_cell
    from edgekv.retrieval import fit_projection
    from edgekv.runtime import Runtime

    art, items, keys, paths = vlm_setup
    text = [Example("q0", "what colour is the triangle?", ""), Example("q1", "code for river?", "")]
    image = [Example("q2", "how many dots?", "", paths[1]), Example("q3", "what colour is it?", "", paths[2])]
    states = {"induce": MethodState("memory", memory=vlm_memory, top_k=2),
              "prompt-text": MethodState("prompt", items=items, keys=keys, projection=fit_projection(keys, 3),
                                         top_k=3),
              "zero-shot": MethodState("plain")}
    res = measure_device_ttft(art, states, text + image, repeats=2, threads=1)
    assert res["queries"] == 2 and res["image_queries"] == 2 and res["reference"] == "induce"
    assert "image queries" in res["images"] and "spliced" in res["images"]
    with Runtime.load(art, threads=1) as rt:
        enc = {p: rt.encode_image(p) for p in paths}
        per_image = {p: int(e.features.shape[1]) for p, e in enc.items()}
        want_text = np.mean([len(rt.prompt_ids(q.prompt)) for q in text])
        want_image = np.mean([len(rt.vision.prompt_ids(rt.tokenizer, q.prompt, rt.config.chat, enc[q.image]))
                              for q in image])
    ind = res["methods"]["induce"]
    for name, r in res["methods"].items():
        for block, ref in ((r, ind), (r["image"], ind["image"])):
            assert block["n"] == 2 * 2, name  # 2 queries x 2 passes of each kind
            assert 0 < block["p25_ms"] <= block["median_ms"] <= block["p75_ms"], name
            assert block["over_induce"] == pytest.approx(block["median_ms"] / ref["median_ms"])
        assert r["image"]["image_tokens"] > 0, name
        # a text query's prompt holds no image, except a prompt method's shot images
        assert r["image_tokens"] == (25 * r["shot_images"] if r["kind"] == "prompt" else 0), name
    # the plain path: exactly the runtime's prompt, its image's feature positions included
    zs = res["methods"]["zero-shot"]
    assert zs["prompt_tokens"] == want_text and zs["image"]["prompt_tokens"] == want_image
    assert zs["image"]["image_tokens"] == np.mean([per_image[q.image] for q in image])
    assert want_image > zs["image"]["image_tokens"] + 1 and zs["memory_tokens"] == zs["image"]["memory_tokens"] == 0
    # the memory path: the same prompt after k x m memory tokens
    assert ind["memory_tokens"] == ind["image"]["memory_tokens"] == 2 * 4
    assert ind["image"]["prompt_tokens"] == want_image and ind["image"]["image_tokens"] == zs["image"]["image_tokens"]
    # the prompt path: the query's image and every shot image hold their features (LLaVA: 25 per image)
    pt = res["methods"]["prompt-text"]["image"]
    assert set(per_image.values()) == {25} and pt["shots"] == 3
    assert pt["image_tokens"] == 25 * (1 + pt["shot_images"]) and pt["shot_images"] >= 1
    assert pt["prompt_tokens"] > zs["image"]["prompt_tokens"] + 25 * pt["shot_images"]
    # results.md's table and the command's summary show both kinds of query
    md = "\n".join(device_ttft_table(res))
    assert "2 text + 2 image queries" in md and "| image tokens |" in md
    for name, r in res["methods"].items():
        assert f"| {name} | {r['kind']} | text | {r['median_ms']:.1f} |" in md
        assert f"| {name} | {r['kind']} | image | {r['image']['median_ms']:.1f} |" in md
    assert _device_ttft_cell(zs) == f"{zs['median_ms']:.1f} ms text, {zs['image']['median_ms']:.1f} ms image"
    assert set(ttft_seconds(res)) == {f"{n}_s" for n in states}


def test_bench_device_ttft_adds_image_queries_on_a_vlm(vlm_setup, tmp_path, monkeypatch):
    """The bench's device TTFT (grid.bench_device_ttft) times the run's image test queries on a VLM
    backbone, as many as text ones, last task first; on a text backbone the text ones only."""
    from types import SimpleNamespace

    from edgekv.bench import device, grid
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.report import _ttft_points

    art, _, _, paths = vlm_setup
    monkeypatch.setattr(device, "export_for_bench", lambda *a, **k: art)
    tasks = [SimpleNamespace(name="a", test=[Example("t0", "what colour is the triangle?", "green"),
                                             Example("i0", "how many dots?", "3", paths[0])]),
             SimpleNamespace(name="b", test=[Example("i1", "what colour?", "red", paths[1]),
                                             Example("t1", "code for river?", "Q2"),
                                             Example("i2", "what shape?", "a square", paths[2])])]
    cfg = BenchConfig(ttft_queries=2)
    vlm = SimpleNamespace(vision=object(), fingerprint="f" * 64, source="tiny-llava")
    res = grid.bench_device_ttft(vlm, tasks, str(tmp_path), str(tmp_path), ["zero-shot"], 4096, cfg)
    zs = res["methods"]["zero-shot"]
    assert res["queries"] == 2 and res["image_queries"] == 2 and res["repeats"] == 2
    assert zs["n"] == zs["image"]["n"] == 2 * 2 and zs["image"]["image_tokens"] == 25
    assert _ttft_points({"ttft_device": res})[0]["zero-shot"][0] == zs["median_ms"]  # the plot: text queries
    # only image queries: the text figures are empty, the plot takes the image ones
    only = [SimpleNamespace(name="c", test=[e for t in tasks for e in t.test if e.image is not None])]
    res = grid.bench_device_ttft(vlm, only, str(tmp_path), str(tmp_path), ["zero-shot"], 4096, cfg)
    zs = res["methods"]["zero-shot"]
    assert res["queries"] == 0 and zs["median_ms"] is None and zs["n"] == 0 and zs["image"]["n"] == 4
    points, source = _ttft_points({"ttft_device": res})
    assert points["zero-shot"][0] == zs["image"]["median_ms"] and "image" in source
    # a text backbone: text queries only (images are not part of its prompts)
    text_bb = SimpleNamespace(vision=None, fingerprint="f" * 64, source="tiny-llama")
    res = grid.bench_device_ttft(text_bb, tasks, str(tmp_path), str(tmp_path), ["zero-shot"], 4096, cfg)
    assert res["queries"] == 2 and res["image_queries"] == 0 and "image" not in res["methods"]["zero-shot"]
    assert grid.bench_device_ttft(text_bb, only, str(tmp_path), str(tmp_path), ["zero-shot"], 4096, cfg) == {
        "error": "no text test query to time (image queries are timed on a vision-language model only)"}


def test_vlm_prompt_path_matches_the_host_method(vlm_setup, tmp_path):
    """On a VLM, the device's shots and prompt ids (images spliced in each shot's turn) are the host
    PromptText's: the same retrieved examples, the same ids, the same image positions."""
    import torch

    from edgekv.bench.config import BenchConfig
    from edgekv.bench.device import close_methods, open_methods, read_prompt_state
    from edgekv.bench.methods import Context, PromptText
    from edgekv.host.models import load_backbone

    art, items, _, paths = vlm_setup
    torch.set_num_threads(1)
    cfg = BenchConfig(top_k=3)
    pt = PromptText(Context(load_backbone(vlm_source[0]), cfg, 1 << 22, str(tmp_path / "work")))
    pt.learn(0, "t", list(items))
    pt.save(str(tmp_path / "state"))
    base, methods = open_methods(art, {"prompt-text": read_prompt_state(str(tmp_path / "state"))}, cfg, threads=1)
    try:
        t = methods["prompt-text"]
        for q in [Example("q0", "what colour is the triangle?", ""), Example("q1", "how many dots?", "", paths[1]),
                  Example("q2", "code for apple?", "", paths[0])]:
            qimg = None if q.image is None else base.encode_image(q.image)
            ids, _, shots, rows = t.build(q, qimg)
            assert [t.items[r].id for r in rows] == pt.retrieved([q])[0]
            assert ids == pt.shot_ids(shots, q)
            assert ids == pt.chat(q)[0]
    finally:
        close_methods(base, methods)


def test_prompt_path_generates_whole_answers(vlm_setup):
    """``_PromptShots.generate`` (the demo's prompt-text answers): the prompt ``build`` makes (what
    ``run`` times), then greedy decoding through the runtime's cache; each token is the argmax of a
    prefill of everything so far without a cache, and the first is ``run``'s."""
    from edgekv.bench.device import MethodState, close_methods, open_methods
    from edgekv.retrieval import fit_projection

    art, items, keys, paths = vlm_setup
    state = MethodState("prompt", items=items, keys=keys, projection=fit_projection(keys, 3), top_k=3)
    base, methods = open_methods(art, {"prompt-text": state}, threads=1)
    try:
        t = methods["prompt-text"]
        for q in [Example("q0", "code for apple?", "K7"), Example("q1", "how many dots?", "three", paths[1])]:
            t.prepare(q)
            res = t.generate(q, 4)
            qimg = None if q.image is None else base.encode_image(q.image)
            ids, feats, _, rows = t.build(q, qimg)
            assert res.num_prompt_tokens == len(ids) and t.last_rows == rows and res.ttft_ms > 0
            assert 1 <= len(res.token_ids) <= 4 and res.stop_reason in ("eos", "length")
            assert res.text == base.tokenizer.decode(res.token_ids)
            seq = list(ids)
            for tok in res.token_ids + ([] if res.stop_reason == "length" else [next(iter(base.eos_ids))]):
                past = base.decoder.empty_past()
                logits = base.decoder.forward(np.asarray([seq], np.int64), past, last_only=True)[0] if feats is None \
                    else base.vision.forward_ids(seq, feats, past)[0]
                assert int(np.argmax(logits[0, -1])) == tok
                seq.append(tok)
        with pytest.raises(Exception, match="max_new_tokens"):
            t.generate(q, 0)
    finally:
        close_methods(base, methods)
