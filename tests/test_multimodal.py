"""Image + text on the device runtime against PyTorch, for tiny random LLaVA and Idefics3 models.

The exports (vision.onnx + decoder_embeds.onnx + embed_tokens.npy) are made once per run;
token ids and pixels of the references come from the Hugging Face processors.
Each equivalence comes with a control showing that the check can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from reference import cache_layers
from tiny_vlms import card

from edgekv.errors import InputError
from edgekv.rope import remove_rope

PROMPT = "what colour is the triangle?"
ANSWER = "the triangle is green"
QUERY = "how many dots are there?"


FAMILIES = ["llava", "idefics3"]


@pytest.fixture(scope="session")
def vlm_export(tmp_path_factory):
    """family -> (model folder, artifacts folder, export summary), built and exported once per run."""
    from tiny_vlms import make_tiny_vlm

    from edgekv.export.pipeline import export_model

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            src = make_tiny_vlm(family, str(tmp_path_factory.mktemp(f"tiny-{family}") / "model"))
            out = tmp_path_factory.mktemp(f"export-{family}") / "artifacts"
            cache[family] = (src, str(out), export_model(src, str(out), progress=False))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def hf(vlm_export):
    """family -> Hf(model, tokenizer, processor) in PyTorch, loaded once per run."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            import transformers

            src = vlm_export(family)[0]
            tok = transformers.AutoTokenizer.from_pretrained(src)
            ip = transformers.AutoImageProcessor.from_pretrained(src, use_fast=False)
            if family == "llava":
                model = transformers.LlavaForConditionalGeneration.from_pretrained(src).eval()
                proc = transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=6,
                                                   num_additional_image_tokens=1, chat_template=tok.chat_template,
                                                   vision_feature_select_strategy="default")
            else:
                model = transformers.Idefics3ForConditionalGeneration.from_pretrained(src).eval()
                proc = transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                                      chat_template=tok.chat_template)
            cache[family] = Hf(family, model, tok, proc)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def runtimes(vlm_export):
    from edgekv.runtime import Runtime

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = Runtime.load(vlm_export(family)[1], k=0)
        return cache[family]

    return get


class Hf:
    """The Hugging Face reference: the processor makes ids and pixels, the model the logits."""

    def __init__(self, family, model, tok, proc):
        self.family, self.model, self.tok, self.proc = family, model, tok, proc

    def text(self, messages: list[dict], gen: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def inputs(self, text: str, images: list) -> tuple[list[int], object]:
        """(ids, pixel_values tensor or None) of templated ``text`` with ``images`` (in order)."""
        import torch

        if not images:
            return list(self.tok(text, add_special_tokens=False).input_ids), None
        imgs = [images] if self.family == "idefics3" else images
        enc = self.proc(images=imgs, text=text, return_tensors="np", add_special_tokens=False)
        return [int(t) for t in enc["input_ids"][0]], torch.from_numpy(enc["pixel_values"])

    def logits(self, ids: list[int], pixels) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].numpy()

    def prefix_kv(self, ids: list[int], pixels) -> tuple[np.ndarray, np.ndarray]:
        """Cached K (RoPE applied) and V of an image+text prefix -> [L, H, T, D] x2."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=True)
        layers = cache_layers(out.past_key_values)
        return np.stack([k[0].numpy() for k, _ in layers]), np.stack([v[0].numpy() for _, v in layers])


def user(prompt: str, image: bool = True) -> dict:
    content = [{"type": "image"}, {"type": "text", "text": prompt}] if image else prompt
    return {"role": "user", "content": content}


# --- export ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_vision_files_and_checks_them(family, vlm_export):
    _, folder, summary = vlm_export(family)
    manifest = json.load(open(f"{folder}/manifest.json"))
    assert manifest["decoder"]["file"] == "decoder_embeds.onnx"
    v = manifest["vision"]
    assert (v["family"], v["file"], v["embeddings"], v["image_token"]) == (family, "vision.onnx",
                                                                           "embed_tokens.npy", "<image>")
    assert {"vision.onnx", "decoder_embeds.onnx", "embed_tokens.npy", "key.onnx", "tokenizer.json"} <= \
        set(manifest["files"])
    check = summary["decoder"]["fp32_check"]
    assert check["num_image_tokens"] == {"llava": 25, "idefics3": 20}[family]  # idefics3: 2x2 tiles + global, 4 each
    assert max(check["max_abs_diff_no_past"], check["max_abs_diff_with_past"]) <= 1e-4


def test_manifest_vision_section_is_validated(vlm_export, tmp_path):
    import shutil

    from edgekv.errors import CorruptFileError
    from edgekv.manifest import read_manifest

    folder = tmp_path / "artifacts"
    shutil.copytree(vlm_export("llava")[1], folder)
    good = json.loads((folder / "manifest.json").read_text())
    cases = [(lambda v: v.pop("image_token_id"), "field vision.'image_token_id' is missing"),
             (lambda v: v.update(file="elsewhere.onnx"), "vision file 'elsewhere.onnx' is not listed"),
             (lambda v: v.update(processor=[1]), "field vision.'processor' must be dict")]
    for breakage, msg in cases:
        data = json.loads(json.dumps(good))
        breakage(data["vision"])
        (folder / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(CorruptFileError, match=msg.replace("(", r"\(").replace(".", r"\.")):
            read_manifest(str(folder), verify_hashes=False)


# --- equivalence with PyTorch ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_image_prompt_ids_and_pixels_equal_hugging_face_processor(family, runtimes, hf):
    from edgekv.runtime.vision import preprocess

    rt, ref = runtimes(family), hf(family)
    for img in (card(1), card(11, (20, 90)), card(12, (16, 16))):
        want_ids, want_px = ref.inputs(ref.text([user(PROMPT)], True), [img])
        assert rt.vision.prompt_ids(rt.tokenizer, PROMPT, True, rt.encode_image(img)) == want_ids
        got_px = preprocess(img, rt.vision.processor).pixel_values
        assert np.abs(got_px - want_px.numpy().reshape(got_px.shape)).max() <= 1e-6


def test_idefics3_image_text_equals_hugging_face_prompt_string():
    """Every tile grid, incl. no splitting (rows = cols = 0), as Idefics3Processor writes it."""
    from transformers.models.idefics3.processing_idefics3 import get_image_prompt_string

    from edgekv.runtime.multimodal import EncodedImage, ImageTokens

    tokens = ImageTokens("idefics3", "<image>", 4)
    for rows, cols in [(0, 0), (1, 2), (2, 2), (3, 1), (4, 4)]:
        image = EncodedImage(np.zeros((1, 4 * (rows * cols + 1), 8), np.float32), rows, cols)
        assert tokens.text(image) == get_image_prompt_string(rows, cols, 4, "<fake_token_around_image>", "<image>",
                                                             "<global-img>")
    with pytest.raises(InputError, match="do not fill"):
        tokens.text(EncodedImage(np.zeros((1, 7, 8), np.float32), 1, 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_image_text_logits_equal_pytorch(family, runtimes, hf):
    rt, ref = runtimes(family), hf(family)
    img = card(2)
    ids, pixels = ref.inputs(ref.text([user(PROMPT)], True), [img])
    enc_img = rt.encode_image(img)
    got = rt.vision.forward_ids(ids, enc_img.features, rt.decoder.empty_past())[0][0]
    want = ref.logits(ids, pixels)
    diff = np.abs(got - want).max()
    assert diff <= 1e-4, diff
    # control: another image changes the logits
    other = rt.vision.forward_ids(ids, rt.encode_image(card(3)).features, rt.decoder.empty_past())[0][0]
    assert np.abs(other - want).max() > 1e-3


@pytest.mark.parametrize("query_image", [False, True], ids=["text-query", "image-query"])
@pytest.mark.parametrize("family", FAMILIES)
def test_image_text_prefix_injected_as_memory_equals_joint_sequence(family, query_image, runtimes, hf):
    """Prefix KV of image+text from PyTorch, RoPE removed (the stored form), rotated back by the
    runtime and injected as past: the query's logits equal PyTorch on prefix + query as one sequence."""
    from edgekv.runtime.decoder import past_from_memory

    rt, ref = runtimes(family), hf(family)
    img_p, img_q = card(4), card(5, (64, 48))
    prefix_text = ref.text([user(PROMPT), {"role": "assistant", "content": ANSWER}], False)
    prefix, px_p = ref.inputs(prefix_text, [img_p])
    K, V = ref.prefix_kv(prefix, px_p)
    Kfree = remove_rope(K, rt.rope, np.arange(len(prefix)))
    past = past_from_memory(*rt.rotate(Kfree, V))
    query_text = ref.text([user(QUERY, image=query_image)], True)
    joint, px_joint = ref.inputs(prefix_text + query_text, [img_p, img_q] if query_image else [img_p])
    want = ref.logits(joint, px_joint)[len(prefix):]
    if query_image:
        enc_q = rt.encode_image(img_q)
        query = rt.vision.prompt_ids(rt.tokenizer, QUERY, True, enc_q)
        got = rt.vision.forward_ids(query, enc_q.features, past)[0][0]
        alone = rt.vision.forward_ids(query, enc_q.features, rt.decoder.empty_past())[0][0]
    else:
        query = rt.prompt_ids(QUERY)
        got, alone = rt.logits(query, *rt.rotate(Kfree, V)), rt.logits(query)
    assert prefix + query == joint  # the runtime's query ids are the processor's
    diff = np.abs(got - want).max()
    assert diff <= 1e-4, diff
    assert np.abs(alone - want).max() > 1e-2  # control: without the memory the logits differ


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_image_equals_pytorch_greedy(family, runtimes, hf):
    import torch

    rt, ref = runtimes(family), hf(family)
    img = card(6)
    res = rt.generate(PROMPT, max_new_tokens=8, image=img)
    ids, pixels = ref.inputs(ref.text([user(PROMPT)], True), [img])
    want: list[int] = []
    with torch.no_grad():
        out = ref.model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=True)
        for _ in range(8):
            t = int(out.logits[0, -1].argmax())
            if t in rt.eos_ids:
                break
            want.append(t)
            out = ref.model(input_ids=torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
    assert res.token_ids == want and len(want) > 0
    assert res.num_prompt_tokens == len(ids)


# --- errors, CLI, import boundary -------------------------------------------------------
def test_bad_images_and_prompts_are_input_errors(runtimes, tmp_path):
    rt = runtimes("llava")
    with pytest.raises(InputError, match="not found"):
        rt.generate(PROMPT, image=str(tmp_path / "nope.png"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(InputError, match="cannot be read"):
        rt.generate(PROMPT, image=str(bad))
    with pytest.raises(InputError, match="image token"):
        rt.generate("<image> twice", image=card(0))


def test_text_only_artifacts_refuse_an_image(exported):
    from edgekv.runtime import Runtime

    with Runtime.load(exported("llama"), k=0) as text_rt, pytest.raises(InputError, match="text-only model"):
        text_rt.generate(PROMPT, image=card(0))


def test_cli_run_with_image(vlm_export, tmp_path):
    folder = vlm_export("llava")[1]
    from typer.testing import CliRunner

    from edgekv.cli import app

    path = tmp_path / "card.png"
    card(7).save(path)
    runner = CliRunner()
    res = runner.invoke(app, ["run", folder, "--image", str(path), "--prompt", PROMPT, "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["num_prompt_tokens"] > 25 and len(data["token_ids"]) >= 1
    res = runner.invoke(app, ["run", folder, "--image", str(tmp_path / "missing.png"), "--prompt", PROMPT])
    assert res.exit_code == 3 and "missing.png not found" in res.output and "Traceback" not in res.output


DEVICE_SCRIPT = """
import json, sys
from PIL import Image
import numpy as np
from edgekv.runtime import Runtime
rt = Runtime.load(sys.argv[1], k=0)
img = Image.fromarray((np.arange(40 * 50 * 3) % 251).astype(np.uint8).reshape(40, 50, 3))
res = rt.generate("what colour is the triangle?", max_new_tokens=3, image=img)
res2 = rt.generate("what colour is the triangle?", max_new_tokens=3, image=sys.argv[2])
print(json.dumps({"ids": res.token_ids, "ids2": res2.token_ids, "prompt": res.num_prompt_tokens,
                  "forbidden": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum"))}))
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_device_image_path_imports_no_torch_or_transformers(family, vlm_export, tmp_path):
    path = tmp_path / "card.png"
    card(8).save(path)
    res = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, vlm_export(family)[1], str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["forbidden"] == []
    assert report["prompt"] > 20 and len(report["ids"]) >= 1  # the image path really ran


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantised_vlm_decoder_is_smaller_close_and_takes_memory(weights, vlm_export, tmp_path):
    """--quantize-weights for a VLM: the decoder's linears become MatMulNBits (vision and key
    graphs stay fp32); logits stay close to PyTorch fp32, and an injected prefix moves them as
    it moves the fp32 export's."""
    import json
    import os

    from edgekv.export.pipeline import export_model
    from edgekv.runtime import Runtime

    src, fp32_art, _ = vlm_export("llava")
    out = str(tmp_path / "art")
    s = export_model(src, out, progress=False, quantize_weights=weights)
    q = s["decoder"]["quantised"]
    assert q["linears"] == 3 * 7 + 1  # every projection of 3 layers + the LM head
    assert q["bytes"] < (0.5 if weights == "int8" else 0.42) * q["fp32_bytes"]
    scale = q["check"]["logit_scale"]
    tol = 0.02 if weights == "int8" else 0.2
    assert q["check"]["max_abs_diff_no_past"] <= tol * scale and q["check"]["max_abs_diff_with_past"] <= tol * scale
    if weights == "int8":
        assert q["check"]["top1_no_past"] == q["check"]["top1_with_past"] == 1.0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["decoder"]["weights"] == weights and manifest["vision"]["file"] == "vision.onnx"
    with Runtime.load(out, k=0) as rq, Runtime.load(fp32_art, k=0) as rf:
        img = card(4)
        a, b = rq.generate(QUERY, 4, image=img), rf.generate(QUERY, 4, image=img)
        assert a.num_prompt_tokens == b.num_prompt_tokens and len(a.token_ids) > 0
        ids = rf.prompt_ids(QUERY)
        rng = np.random.default_rng(0)
        shape = (rf.num_layers, int(rf.manifest["num_kv_heads"]), 6, int(rf.manifest["head_dim"]))
        K, V = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
        lq, lf = rq.logits(ids, *rq.rotate(K, V)), rf.logits(ids, *rf.rotate(K, V))
        assert np.abs(lq - lf).max() <= tol * max(1.0, np.abs(lf).max())
        assert np.abs(rq.logits(ids) - lq).max() > 1e-3  # control: the injected past matters
