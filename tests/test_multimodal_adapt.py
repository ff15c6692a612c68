"""`edgekv adapt` on image+text data for tiny random LLaVA and Idefics3 models, against PyTorch.

One memory per family is adapted through the CLI (image paths relative to the data file)
on 6 image+text examples (2 prompts x 3 pictures) and 2 text-only ones; the model is
exported once. References come from Hugging Face: its processor makes the ids and pixels,
its model the prefix KV / hidden states / logits. Each equivalence has a control showing
the check can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from reference import cache_layers
from tiny_vlms import card

from edgekv.data import Example

FAMILIES = ["llava", "idefics3"]
M = 12  # pooled length of the test memories (fp16 payload: the KV check is not quantisation-bound)
PROMPTS = ["what colour is the square?", "describe the picture"]
ANSWERS = {("a", 0): "red", ("a", 1): "blue", ("a", 2): "green", ("b", 0): "a dog", ("b", 1): "a cat",
           ("b", 2): "a bird"}


def write_task(folder) -> list[dict]:
    """Images under folder/img/ and folder/data.jsonl with image paths relative to it."""
    os.makedirs(folder / "img", exist_ok=True)
    recs = []
    for n in range(3):
        card(10 + n).save(folder / "img" / f"p{n}.png")
        for p, tag in zip(PROMPTS, "ab", strict=True):
            recs.append({"id": f"{tag}{n}", "image": f"img/p{n}.png", "prompt": p, "answer": ANSWERS[(tag, n)]})
    recs += [{"id": "t0", "prompt": "what is the code of apple?", "answer": "Q8C"},
             {"id": "t1", "prompt": "what is the code of pear?", "answer": "Z3K"}]
    with open(folder / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return recs


class Case:
    """One family: model folder, data, memory (adapted through the CLI), export, HF reference."""

    def __init__(self, family, root):
        import transformers
        from tiny_vlms import make_tiny_vlm
        from typer.testing import CliRunner

        from edgekv.cli import app
        from edgekv.export.pipeline import export_model

        self.family, self.root = family, root
        self.model_dir = make_tiny_vlm(family, str(root / "model"))
        self.recs = write_task(root / "task")
        self.memory = str(root / "mem.ekv")
        res = CliRunner().invoke(app, ["adapt", "--model", self.model_dir, "--data", str(root / "task" / "data.jsonl"),
                                       "--memory", self.memory, "--budget", "64KiB", "--pooled-len", str(M),
                                       "--payload", "fp16", "--steps", "2", "-k", "2", "--threads", "1",
                                       "--no-progress", "--json"])
        assert res.exit_code == 0, res.output[-3000:]
        self.summary = json.loads(res.output)
        self.artifacts = str(root / "artifacts")
        export_model(self.model_dir, self.artifacts, progress=False)
        tok = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        ip = transformers.AutoImageProcessor.from_pretrained(self.model_dir, use_fast=False)
        if family == "llava":
            self.model = transformers.LlavaForConditionalGeneration.from_pretrained(self.model_dir).eval()
            self.proc = transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=6,
                                                    num_additional_image_tokens=1, chat_template=tok.chat_template,
                                                    vision_feature_select_strategy="default")
        else:
            self.model = transformers.Idefics3ForConditionalGeneration.from_pretrained(self.model_dir).eval()
            self.proc = transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                                       chat_template=tok.chat_template)
        self.tok = tok

    def image(self, rec: dict) -> str:
        return str(self.root / "task" / rec["image"])

    def hf_inputs(self, messages: list[dict], gen: bool, image: str | None):
        """(ids, pixel_values or None) of chat-templated ``messages`` by the HF processor."""
        import torch
        from PIL import Image

        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        if image is None:
            return list(self.tok(text, add_special_tokens=False).input_ids), None
        img = Image.open(image)
        imgs = [[img]] if self.family == "idefics3" else [img]
        enc = self.proc(images=imgs, text=text, return_tensors="np", add_special_tokens=False)
        return [int(t) for t in enc["input_ids"][0]], torch.from_numpy(enc["pixel_values"])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def user(prompt: str, image: bool) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}] if image else prompt}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin on the shared cores
    cache: dict = {}

    def get(family: str) -> Case:
        if family not in cache:
            cache[family] = Case(family, tmp_path_factory.mktemp(f"mmadapt-{family}"))
        return cache[family]

    yield get
    torch.set_num_threads(threads)


def stored_entries(path: str) -> dict:
    """source id -> (raw key [R], K [L, H, m, D], V) of every entry in the memory (dequantised)."""
    from edgekv.format import Memory
    from edgekv.induction import entry_kv

    out = {}
    with Memory(path) as mem:
        for slot in mem.occupied().tolist():
            e = mem.read_entry(int(slot))
            k, v = entry_kv(e, 1.0, np.ones(mem.spec.num_layers, np.float32))
            out[e.source_id] = (np.asarray(e.key, np.float32), k, v)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_entries_equal_pytorch_prefix_kv_of_the_image_text_conversation(family, case, record_property):
    """Stored K/V == HF prefix KV (pixel_values through the HF model) of [user: image + prompt,
    assistant: answer], RoPE removed, pooled by the entry's pooling matrix (fp16 payload)."""
    import torch

    from edgekv.host.models import load_backbone
    from edgekv.induce.entries import (
        Encoded,
        EntryConfig,
        entry_pooling_matrix,
        template_prefix_len,
    )
    from edgekv.rope import remove_rope

    c = case(family)
    assert c.summary["num_used"] == len(c.recs)  # every example kept (room for all)
    stored = stored_entries(c.memory)
    bb = load_backbone(c.model_dir)
    plen = template_prefix_len(c.tok)
    worst, ctrl = 0.0, np.inf
    for rec in c.recs:
        img = c.image(rec) if "image" in rec else None
        conv = [user(rec["prompt"], img is not None), {"role": "assistant", "content": rec["answer"]}]
        ids, pixels = c.hf_inputs(conv, False, img)
        q, _ = c.hf_inputs([user(rec["prompt"], img is not None)], True, img)
        start = common_prefix(q, ids)
        end = next(i + 1 for i in range(start, len(ids)) if ids[i] in bb.eos_token_ids)
        first_img = ids.index(bb.vision.token_id) if img else len(ids)
        enc = Encoded(tuple(ids), start, end, min(plen, start, first_img))
        W = entry_pooling_matrix(enc, EntryConfig(pooled_len=M)).numpy()  # [m, T]
        with torch.no_grad():
            out = c.model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=True)
        layers = cache_layers(out.past_key_values)
        K = np.stack([k[0].numpy() for k, _ in layers])  # [L, H, T, D]
        V = np.stack([v[0].numpy() for _, v in layers])
        K = remove_rope(K, bb.rope, np.arange(K.shape[2]))
        k_ref, v_ref = np.einsum("mt,lhtd->lhmd", W, K), np.einsum("mt,lhtd->lhmd", W, V)
        _, k, v = stored[rec["id"]]
        scale = max(np.abs(k_ref).max(), np.abs(v_ref).max())
        worst = max(worst, np.abs(k - k_ref).max() / scale, np.abs(v - v_ref).max() / scale)
        if img is not None:  # control: the same text with another picture is another entry
            other = next(r for r in c.recs if r.get("image") and r["prompt"] == rec["prompt"] and r["id"] != rec["id"])
            ctrl = min(ctrl, np.abs(stored[other["id"]][1] - k).max() / scale)
    record_property("kv_rel_diff", float(worst))
    record_property("kv_rel_diff_other_image", float(ctrl))
    assert worst <= 1e-3  # fp16 storage (relative precision 2^-11)
    assert ctrl > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_host_prefix_kv_on_spliced_embeddings_equals_pixel_values_forward(family, case, record_property):
    """The host's embeddings (table rows + torch VisionEncoder features) give the HF model's own
    prefix KV (it splices with pixel_values) within float error."""
    import torch

    from edgekv.host.models import load_backbone
    from edgekv.induce.entries import encode_image_example, prefix_kv

    c = case(family)
    bb = load_backbone(c.model_dir)
    rec = c.recs[0]
    conv = [user(rec["prompt"], True), {"role": "assistant", "content": rec["answer"]}]
    ids, pixels = c.hf_inputs(conv, False, c.image(rec))
    enc = encode_image_example(bb.vision, bb.tokenizer, Example(rec["id"], rec["prompt"], rec["answer"],
                                                                c.image(rec)), bb.eos_token_ids, 0)
    assert list(enc.ids) == ids  # the host's conversation ids == the HF processor's
    embeds, _ = bb.vision.embed_batch([ids], [c.image(rec)])
    (K, V), = prefix_kv(bb.model, [ids], embeds)
    with torch.no_grad():
        out = c.model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=True)
    layers = cache_layers(out.past_key_values)
    K_ref = np.stack([k[0].numpy() for k, _ in layers])
    record_property("host_k_abs_diff", float(np.abs(K.numpy() - K_ref).max()))
    assert np.abs(K.numpy() - K_ref).max() <= 1e-5
    assert np.abs(V.numpy() - np.stack([v[0].numpy() for _, v in layers])).max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_keys_cover_the_image_and_equal_the_onnx_key_graph(family, case, record_property):
    """Stored raw keys == HF hidden states at the key layer (mean over "<image>\\nprompt", image
    spliced by HF) == the exported key graph on the runtime's embeddings; another picture with
    the same prompt changes the key; text-only examples keep the text key."""
    import torch

    from edgekv.format import Memory
    from edgekv.retrieval import effective_keys
    from edgekv.runtime import Runtime

    c = case(family)
    stored = stored_entries(c.memory)
    with Memory(c.memory) as mem:
        key_layer, proj = mem.spec.key_layer, mem.projection
    with open(os.path.join(c.artifacts, "manifest.json")) as f:
        assert json.load(f)["key"]["input"] == "inputs_embeds"
    rt = Runtime.load(c.artifacts, memory=c.memory, k=2)
    try:
        worst_hf, worst_onnx = 0.0, 0.0
        for rec in c.recs:
            img = c.image(rec) if "image" in rec else None
            if img is None:
                ids = list(c.tok(rec["prompt"]).input_ids)
                pixels = None
            else:
                from PIL import Image

                imgs = [[Image.open(img)]] if family == "idefics3" else [Image.open(img)]
                enc = c.proc(images=imgs, text="<image>\n" + rec["prompt"], return_tensors="np")
                ids, pixels = [int(t) for t in enc["input_ids"][0]], torch.from_numpy(enc["pixel_values"])
            with torch.no_grad():
                hs = c.model(input_ids=torch.tensor([ids]), pixel_values=pixels, output_hidden_states=True)
            ref = hs.hidden_states[key_layer][0].mean(0).numpy()  # [R]
            raw = stored[rec["id"]][0]
            worst_hf = max(worst_hf, np.abs(raw - ref).max() / np.abs(ref).max())
            q = rt.query_key(rec["prompt"], None if img is None else rt.encode_image(img))
            worst_onnx = max(worst_onnx, np.abs(q - effective_keys(raw, proj)).max())
        a0, a1 = stored["a0"][0], stored["a1"][0]  # same prompt, other picture
        for name, value in (("key_rel_diff_hf", worst_hf), ("key_abs_diff_onnx", worst_onnx),
                            ("key_rel_diff_other_image", np.abs(a0 - a1).max() / np.abs(a0).max())):
            record_property(name, float(value))
        assert worst_hf <= 1e-4 and worst_onnx <= 1e-4
        assert np.abs(a0 - a1).max() / np.abs(a0).max() > 1e-2
        assert rt.retrieve(PROMPTS[0], 1, rt.encode_image(c.image(c.recs[2])))[0].source_id == "a1"
    finally:
        rt.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_with_memory_equals_pytorch_and_the_evaluation_helper(family, case, record_property):
    """Runtime (exported graphs + memory, image query): retrieved entries and logits == PyTorch
    (HF model with pixel_values, the retrieved entries as past); greedy tokens == answer_examples."""
    import torch

    from edgekv.format import Memory
    from edgekv.host.models import load_backbone
    from edgekv.induce.evaluate import answer_examples
    from edgekv.induce.torch_induction import bank_from_entries, make_cache, memory_kv
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import past_from_memory

    c = case(family)
    path = c.image(c.recs[2])
    rt = Runtime.load(c.artifacts, memory=c.memory, k=2)
    try:
        img = rt.encode_image(path)
        retrieved = rt.retrieve(PROMPTS[0], image=img)
        ids = rt.vision.prompt_ids(rt.tokenizer, PROMPTS[0], True, img)
        logits, _ = rt.vision.forward_ids(ids, img.features, past_from_memory(*rt.memory_kv(retrieved)))
        res = rt.generate(PROMPTS[0], max_new_tokens=5, image=path)
        text_res = rt.generate("what is the code of apple?", max_new_tokens=5)
        with Memory(c.memory) as mem:
            entries = [mem.read_entry(r.slot) for r in retrieved]
            spec, cal = mem.spec, mem.calibration
    finally:
        rt.close()
    bank = bank_from_entries(entries, spec.num_layers, spec.key_dim, spec.payload_shape)
    idx = torch.arange(len(entries))[None]
    alpha = torch.tensor([[r.alpha for r in retrieved]], dtype=torch.float32)
    k_mem, v_mem = memory_kv(bank.K, bank.V, idx, alpha, torch.tensor(cal.gates), spec.rope)
    T = k_mem.shape[3]
    ref_ids, pixels = c.hf_inputs([user(PROMPTS[0], True)], True, path)
    assert ids == ref_ids
    with torch.no_grad():
        ref = c.model(input_ids=torch.tensor([ids]), pixel_values=pixels,
                      position_ids=torch.arange(T, T + len(ids))[None],
                      past_key_values=make_cache(k_mem, v_mem, spec.num_layers), use_cache=True).logits[0].numpy()
        alone = c.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].numpy()
    record_property("logits_abs_diff", float(np.abs(logits[0] - ref).max()))
    record_property("logits_abs_diff_no_memory", float(np.abs(alone - ref).max()))
    assert np.abs(logits[0] - ref).max() <= 1e-4
    assert np.abs(alone - ref).max() > 1e-3  # control: the memory changes the logits

    bb = load_backbone(c.model_dir)
    ans = answer_examples(bb, [Example("q", PROMPTS[0], "", path), Example("t", "what is the code of apple?", "")],
                          c.memory, top_k=2, max_new_tokens=5)
    assert ans[0].retrieved == [r.source_id for r in res.retrieved]
    assert ans[0].token_ids == res.token_ids and ans[0].text == res.text.strip()
    assert ans[1].retrieved == [r.source_id for r in text_res.retrieved]
    assert ans[1].token_ids == text_res.token_ids
    no_mem = answer_examples(bb, [Example("q", PROMPTS[0], "", path)], None, max_new_tokens=5)
    assert no_mem[0].retrieved == []


def test_anchors_keep_resolved_image_paths(case):
    from edgekv.induce.adapt import read_anchors

    c = case("llava")
    anchors = read_anchors(c.memory)
    with_image = [ex for _, ex in anchors if ex.image]
    assert len(anchors) == len(c.recs) and len(with_image) == 6
    assert all(os.path.isabs(ex.image) and os.path.isfile(ex.image) for ex in with_image)


DEVICE_SCRIPT = """
import json, sys
from edgekv.runtime import Runtime
rt = Runtime.load(sys.argv[1], memory=sys.argv[2], k=2)
res = rt.generate("what colour is the square?", max_new_tokens=3, image=sys.argv[3])
print(json.dumps({"retrieved": [r.source_id for r in res.retrieved], "prompt": res.num_prompt_tokens,
                  "forbidden": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum"))}))
"""


def test_device_image_path_with_memory_imports_no_torch(case):
    c = case("llava")
    res = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, c.artifacts, c.memory, c.image(c.recs[0])],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["forbidden"] == []
    assert len(report["retrieved"]) == 2 and report["prompt"] > 25  # memory and image really used


def test_answer_examples_on_a_text_backbone_equals_the_runtime(backbone, exported, tmp_path):
    """The text path of the evaluation helper: same retrieved entries and greedy tokens as the
    ONNX runtime with the memory, and the model alone without one."""
    import torch

    from edgekv.induce.adapt import AdaptConfig, adapt
    from edgekv.induce.evaluate import Answer, answer_examples, exact_match
    from edgekv.induce.select import SelectionConfig
    from edgekv.runtime import Runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bb = backbone("llama")
        train = [Example(f"w{i}", f"what is the code of item {i}?", f"K{i}Z") for i in range(6)]
        mem = str(tmp_path / "m.ekv")
        adapt(bb, train, mem, 48 << 10, "codes", AdaptConfig(top_k=2, selection=SelectionConfig(steps=1)))
        queries = [Example("q0", "the code of item 3, please?", "K3Z"), Example("q1", "item 5: code?", "K5Z")]
        ans = answer_examples(bb, queries, mem, top_k=2, max_new_tokens=4)
        alone = answer_examples(bb, queries[:1], None, max_new_tokens=4)
    finally:
        torch.set_num_threads(threads)
    with Runtime.load(exported("llama"), memory=mem, k=2) as rt:
        for a, q in zip(ans, queries, strict=True):
            res = rt.generate(q.prompt, max_new_tokens=4)
            assert a.retrieved == [r.source_id for r in res.retrieved] and len(a.retrieved) == 2
            assert a.token_ids == res.token_ids
        res = rt.generate(queries[0].prompt, max_new_tokens=4, use_memory=False)
    assert alone[0].token_ids == res.token_ids and alone[0].retrieved == []
    assert exact_match([Answer("K3Z"), Answer("K5")], queries) == 0.5


def test_tiny_vlm_family_entries_keys_and_runtime_agree(tiny_model_dir, tmp_path):
    """The built-in family (MobileNetV2 + projector + a Llama; here a tiny random Llama and a random
    projector): stored entries == its own PyTorch forward with pixel_values (prefix KV, RoPE removed,
    pooled), runtime query keys == stored keys, runtime greedy answer == answer_examples."""
    import torch
    from tiny_vlms import make_tiny_vlm_folder
    from typer.testing import CliRunner

    from edgekv.cli import app
    from edgekv.export.pipeline import export_model
    from edgekv.format import Memory
    from edgekv.host.models import load_backbone
    from edgekv.induce.entries import (
        EntryConfig,
        encode_image_example,
        entry_pooling_matrix,
        template_prefix_len,
    )
    from edgekv.induce.evaluate import answer_examples
    from edgekv.retrieval import effective_keys
    from edgekv.rope import remove_rope
    from edgekv.runtime import Runtime
    from edgekv.runtime.vision import preprocess

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = make_tiny_vlm_folder(tiny_model_dir("llama"), str(tmp_path / "tiny-vlm"))
        recs = write_task(tmp_path / "task")
        mem = str(tmp_path / "m.ekv")
        res = CliRunner().invoke(app, ["adapt", "--model", folder, "--data", str(tmp_path / "task" / "data.jsonl"),
                                       "--memory", mem, "--budget", "64KiB", "--pooled-len", str(M), "--payload", "fp16",
                                       "--steps", "1", "-k", "2", "--threads", "1", "--no-progress", "--json"])
        assert res.exit_code == 0, res.output[-3000:]
        bb = load_backbone(folder)
        stored = stored_entries(mem)
        rec = recs[2]  # an image example
        path = str(tmp_path / "task" / rec["image"])
        enc = encode_image_example(bb.vision, bb.tokenizer, Example(rec["id"], rec["prompt"], rec["answer"], path),
                                   bb.eos_token_ids, template_prefix_len(bb.tokenizer))
        pixels = torch.from_numpy(preprocess(path, bb.vision.processor).pixel_values)
        with torch.no_grad():
            out = bb.model(input_ids=torch.tensor([list(enc.ids)]), pixel_values=pixels, use_cache=True)
        layers = cache_layers(out.past_key_values)
        K = remove_rope(np.stack([k[0].numpy() for k, _ in layers]), bb.rope, np.arange(len(enc.ids)))
        W = entry_pooling_matrix(enc, EntryConfig(pooled_len=M)).numpy()
        k_ref = np.einsum("mt,lhtd->lhmd", W, K)
        assert np.abs(stored[rec["id"]][1] - k_ref).max() <= 1e-3 * np.abs(k_ref).max()
        ans = answer_examples(bb, [Example("q", rec["prompt"], "", path)], mem, top_k=2, max_new_tokens=5)
    finally:
        torch.set_num_threads(threads)
    art = str(tmp_path / "art")
    export_model(folder, art, progress=False)
    with Memory(mem) as m:
        projection = m.projection
    with Runtime.load(art, memory=mem, k=2) as rt:
        q = rt.query_key(rec["prompt"], rt.encode_image(path))
        assert np.abs(q - effective_keys(stored[rec["id"]][0], projection)).max() <= 1e-4
        out = rt.generate(rec["prompt"], max_new_tokens=5, image=path)
    assert ans[0].retrieved == [r.source_id for r in out.retrieved] and ans[0].retrieved[-1] == rec["id"]
    assert ans[0].token_ids == out.token_ids


def test_manifest_key_input_is_validated(case):
    from edgekv.manifest import validate

    with open(os.path.join(case("llava").artifacts, "manifest.json")) as f:
        data = json.load(f)
    validate(data)
    for key_input, vision in (("pixels", data["vision"]), ("inputs_embeds", None)):
        bad = {**data, "key": {**data["key"], "input": key_input}, "vision": vision}
        with pytest.raises(ValueError, match="key.input"):
            validate(bad)


def test_adapt_with_a_missing_image_is_an_input_error(case, tmp_path):
    from typer.testing import CliRunner

    from edgekv.cli import app

    c = case("llava")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "x", "image": "nope.png", "prompt": "hi", "answer": "yo"}) + "\n")
    res = CliRunner().invoke(app, ["adapt", "--model", c.model_dir, "--data", str(tmp_path / "d.jsonl"), "--memory",
                                   str(tmp_path / "m.ekv"), "--budget", "64KiB", "--threads", "1", "--no-progress"])
    assert res.exit_code == 3
    assert "nope.png not found" in res.output and str(tmp_path) in res.output
    assert not (tmp_path / "m.ekv").exists()  # refused before the memory is created
