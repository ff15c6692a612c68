"""tiny-vlm: procedural scenes, the MobileNetV2 tower, the projector asset, export + runtime.

Fast tests use a tiny random Llama as the language model (same folder layout and code path
as the real model); the ``slow`` ones use the built-in ``tiny-vlm`` (SmolLM2-135M).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgekv.data import scenes

PROMPT = "Describe the image."


# --- scenes ----------------------------------------------------------------------------------
def test_scenes_are_deterministic_per_seed():
    a = [scenes.random_scene(np.random.default_rng(5), (1, 4)) for _ in range(2)]
    b = scenes.random_scene(np.random.default_rng(6), (1, 4))
    assert a[0] == a[1] and a[0] != b
    assert np.array_equal(np.asarray(scenes.render_scene(a[0])), np.asarray(scenes.render_scene(a[1])))
    for sc in (scenes.random_scene(np.random.default_rng(s), 3) for s in range(20)):
        assert len(sc.objects) == 3
        for i, o in enumerate(sc.objects):  # non-overlapping and inside the canvas
            assert o.size / 2 <= o.x <= 1 - o.size / 2 and o.size / 2 <= o.y <= 1 - o.size / 2
            assert all(np.hypot(o.x - p.x, o.y - p.y) >= (o.size + p.size) / 2 for p in sc.objects[i + 1:])


@pytest.mark.parametrize("obj, text", [
    (scenes.Obj("triangle", "red", 0.2, 0.5, 0.3), "a red triangle on the left"),
    (scenes.Obj("star", "orange", 0.55, 0.45, 0.3), "an orange star in the centre"),
    (scenes.Obj("circle", "blue", 0.6, 0.85, 0.2), "a blue circle on the bottom"),
    (scenes.Obj("square", "green", 0.8, 0.3, 0.2), "a green square on the right"),
    (scenes.Obj("square", "purple", 0.45, 0.15, 0.2), "a purple square on the top"),
])
def test_caption_of_one_object_names_its_parameters(obj, text):
    assert scenes.caption(scenes.Scene((obj,))) == text


def test_caption_counts_and_groups():
    sc = scenes.count_scene(np.random.default_rng(0), 3, "square", "blue")
    assert scenes.caption(sc) == "three blue squares"
    mixed = scenes.Scene((scenes.Obj("circle", "red", 0.2, 0.2, 0.2), scenes.Obj("star", "green", 0.8, 0.8, 0.2),
                          scenes.Obj("star", "green", 0.2, 0.8, 0.2)))
    assert scenes.caption(mixed) == "a red circle on the left and two green stars"
    with pytest.raises(ValueError, match="shape"):
        scenes.Obj("hexagon", "red", 0.5, 0.5, 0.2)
    with pytest.raises(ValueError, match="outside"):
        scenes.Obj("circle", "red", 1.5, 0.5, 0.2)


@pytest.mark.parametrize("shape", scenes.SHAPES)
def test_render_draws_the_colour_at_the_centre_only(shape):
    for colour, rgb in scenes.COLOURS.items():
        img = np.asarray(scenes.render_scene(scenes.Scene((scenes.Obj(shape, colour, 0.5, 0.5, 0.5),)), 64))
        assert np.abs(img[32, 32].astype(int) - rgb).max() <= 2  # the shape's inside
        assert (img[1, 1] == 255).all() and (img[62, 62] == 255).all()  # corners stay background


def test_digit_and_text_images():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    train, test = set(scenes.digit_indices(split="train")), set(scenes.digit_indices(split="test"))
    assert not train & test and len(train | test) == len(targets)
    assert all(targets[i] == 4 for i in scenes.digit_indices(4, "test"))
    img, d = scenes.digit_image(np.random.default_rng(3), digit=7, size=64, split="test")
    img2, _ = scenes.digit_image(np.random.default_rng(3), digit=7, size=64, split="test")
    arr = np.asarray(img)
    assert d == 7 and img.size == (64, 64) and np.array_equal(arr, np.asarray(img2))
    assert arr.min() < 60 and (arr[0] == 255).all()  # dark ink, white margin
    a = np.asarray(scenes.text_image("cat", np.random.default_rng(1), 96))
    b = np.asarray(scenes.text_image("cat", np.random.default_rng(1), 96))
    c = np.asarray(scenes.text_image("dog", np.random.default_rng(1), 96))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ink = (a < 128).all(axis=-1)
    assert 0.02 < ink.mean() < 0.4 and ink[:, :10].sum() == 0  # legible, centred-ish, not clipped


# --- MobileNetV2 ---------------------------------------------------------------------------
def _conv_ref(x, w, stride, groups):
    """Direct 3x3 / 1x1 convolution with zero padding (k-1)/2: x [C, H, W], w [O, C/g, k, k]."""
    k = w.shape[-1]
    pad = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out_h = (x.shape[1] + 2 * pad - k) // stride + 1
    out = np.zeros((w.shape[0], out_h, out_h))
    per_in, per_out = x.shape[0] // groups, w.shape[0] // groups
    for o in range(w.shape[0]):
        g = o // per_out
        for i in range(out_h):
            for j in range(out_h):
                patch = xp[g * per_in:(g + 1) * per_in, i * stride:i * stride + k, j * stride:j * stride + k]
                out[o, i, j] = (patch * w[o]).sum()
    return out


def _bn_ref(x, state, prefix, eps=1e-5):
    g, b, m, v = (state[f"{prefix}.{n}"].double().numpy() for n in ("weight", "bias", "running_mean", "running_var"))
    return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + eps) * g[:, None, None] + b[:, None, None]


def test_mobilenet_v2_loads_strictly_and_matches_a_direct_computation():
    import torch

    from edgekv.host.tiny_vlm import load_mobilenet_v2, mobilenet_weights_path

    state = torch.load(mobilenet_weights_path(), map_location="cpu", weights_only=True)
    net = load_mobilenet_v2()
    assert set(net.state_dict()) == set(state) and not net.training
    assert all(not p.requires_grad for p in net.parameters())
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f0 = net.features[0](x)  # conv 3x3 s2 + BN + ReLU6
        f1 = net.features[1](f0)  # depthwise 3x3 + BN + ReLU6, 1x1 32->16 + BN
        grid = net.features(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)))
    s = {k: v for k, v in state.items()}
    r0 = np.clip(_bn_ref(_conv_ref(x[0].double().numpy(), s["features.0.0.weight"].double().numpy(), 2, 1),
                         s, "features.0.1"), 0, 6)
    dw = np.clip(_bn_ref(_conv_ref(r0, s["features.1.conv.0.0.weight"].double().numpy(), 1, 32), s,
                         "features.1.conv.0.1"), 0, 6)
    r1 = _bn_ref(_conv_ref(dw, s["features.1.conv.1.weight"].double().numpy(), 1, 1), s, "features.1.conv.2")
    np.testing.assert_allclose(f0[0].numpy(), r0, atol=1e-4)
    np.testing.assert_allclose(f1[0].numpy(), r1, atol=1e-4)
    assert grid.shape == (2, 1280, 4, 4) and float(grid.min()) >= 0 and float(grid.max()) <= 6  # ReLU6 output


# --- projector asset ------------------------------------------------------------------------
def test_projector_asset_loads_and_is_small():
    import torch
    from safetensors import safe_open

    from edgekv.host.tiny_vlm import ASSET, TinyVLMConfig, load_projector

    assert os.path.getsize(ASSET) < 4 * 2 ** 20
    with safe_open(ASSET, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    cfg = TinyVLMConfig()
    proj = load_projector(cfg)
    out = proj(torch.randn(1, cfg.num_image_tokens, cfg.feature_dim, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 16, 576) and torch.isfinite(out).all()
    assert float(proj.pos.abs().max()) > 0  # trained (the init is zeros)


# --- the model folder, export and runtime on a tiny random language model -------------------------
@pytest.fixture(scope="module")
def tiny_vlm_folder(tiny_model_dir, tmp_path_factory):
    from tiny_vlms import make_tiny_vlm_folder

    return make_tiny_vlm_folder(tiny_model_dir("llama"), str(tmp_path_factory.mktemp("tiny-vlm")))


@pytest.fixture(scope="module")
def tiny_vlm_export(tiny_vlm_folder, tmp_path_factory):
    from edgekv.export.pipeline import export_model

    out = str(tmp_path_factory.mktemp("tiny-vlm-export") / "artifacts")
    summary = export_model(tiny_vlm_folder, out, progress=False)
    return out, summary


def test_folder_loads_like_other_vlms(tiny_vlm_folder):
    import torch

    from edgekv.host.models import load_vlm, text_decoder
    from edgekv.host.vlm import VLM_TYPES, vision_encoder, vlm_type

    assert vlm_type(tiny_vlm_folder) == "edgekv_tiny_vlm"
    assert vlm_type("tiny-vlm") == "edgekv_tiny_vlm"
    with open(os.path.join(tiny_vlm_folder, "config.json")) as f:
        assert json.load(f)["model_type"] == "edgekv_tiny_vlm"
    bb, proc = load_vlm(tiny_vlm_folder)
    cfg = bb.model.config
    tid = getattr(cfg, VLM_TYPES[cfg.model_type][1])
    assert bb.tokenizer.convert_ids_to_tokens(tid) == "<image>" and tid == cfg.text_config.vocab_size - 1
    emb = bb.model.get_input_embeddings().weight
    assert torch.equal(emb[tid], emb[0]) and torch.equal(bb.model.lm_head.weight[tid], bb.model.lm_head.weight[0])
    assert type(text_decoder(bb.model)).__name__ == "LlamaModel"
    assert proc.to_dict()["image_processor_type"] == "CLIPImageProcessor" and proc.crop_size["height"] == 128
    pixels = torch.from_numpy(proc(scenes.render_scene(scenes.random_scene(np.random.default_rng(0))),
                                   return_tensors="np")["pixel_values"])
    feats = vision_encoder(bb.model)(pixels)
    assert feats.shape == (1, 16, 64)
    assert bb.eos_token_ids == (bb.tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    # the same features reach the LM as the embeddings at the image positions
    ids = bb.tokenizer("<image>" * 16 + "hello", add_special_tokens=False).input_ids
    e = bb.model.embed(torch.tensor([ids]), feats)
    assert torch.equal(e[0, :16], feats[0]) and torch.equal(e[0, 16:], emb[ids[16:]])


def test_export_and_runtime_equal_pytorch(tiny_vlm_folder, tiny_vlm_export):
    import torch

    from edgekv.host.models import load_vlm
    from edgekv.runtime import Runtime

    folder, summary = tiny_vlm_export
    check = summary["decoder"]["fp32_check"]
    assert check["num_image_tokens"] == 16 and check["max_abs_diff_no_past"] < 1e-4
    bb, proc = load_vlm(tiny_vlm_folder)
    image = scenes.render_scene(scenes.random_scene(np.random.default_rng(9), 2))
    with Runtime.load(folder, k=0) as rt:
        img = rt.encode_image(image)
        ids = rt.vision.prompt_ids(rt.tokenizer, PROMPT, True, img)
        logits, _ = rt.vision.forward_ids(ids, img.features, rt.vision.decoder.empty_past())
        res = rt.generate(PROMPT, max_new_tokens=4, image=image)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = bb.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    want_ids = bb.tokenizer(text.replace("<image>", "<image>" * 16), add_special_tokens=False).input_ids
    assert ids == want_ids
    pixels = torch.from_numpy(proc(image, return_tensors="np")["pixel_values"])
    with torch.no_grad():
        ref = bb.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].numpy()
    assert np.abs(logits[0] - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert res.num_prompt_tokens == len(ids) and len(res.token_ids) >= 1


DEVICE_SCRIPT = """
import json, sys
from edgekv.runtime import Runtime
from edgekv.data import scenes
import numpy as np
rt = Runtime.load(sys.argv[1], k=0)
img = scenes.render_scene(scenes.random_scene(np.random.default_rng(0)))
res = rt.generate("Describe the image.", max_new_tokens=3, image=img)
print(json.dumps({"ids": res.token_ids, "prompt": res.num_prompt_tokens,
                  "forbidden": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum"))}))
"""


def test_device_image_path_and_scenes_import_no_torch(tiny_vlm_export):
    res = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, tiny_vlm_export[0]], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["forbidden"] == [] and report["prompt"] > 20 and len(report["ids"]) >= 1


# --- the built-in tiny-vlm (SmolLM2-135M) -------------------------------------------------------
@pytest.mark.slow
def test_builtin_tiny_vlm_export_equals_pytorch_and_captions_colours(exported):
    import torch

    from edgekv.host.models import load_vlm
    from edgekv.runtime import Runtime

    folder = exported("tiny-vlm")
    bb, proc = load_vlm("tiny-vlm")
    objs = [scenes.Obj(shape, colour, 0.5, 0.5, 0.45)
            for colour, shape in zip(scenes.COLOURS, ("circle", "square", "triangle", "star", "circle", "square"),
                                     strict=True)]
    named = 0
    with Runtime.load(folder, k=0) as rt:
        for i, obj in enumerate(objs):
            image = scenes.render_scene(scenes.Scene((obj,)))
            img = rt.encode_image(image)
            ids = rt.vision.prompt_ids(rt.tokenizer, PROMPT, True, img)
            if i == 0:
                logits, _ = rt.vision.forward_ids(ids, img.features, rt.vision.decoder.empty_past())
                pixels = torch.from_numpy(proc(image, return_tensors="np")["pixel_values"])
                with torch.no_grad():
                    ref = bb.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].numpy()
                assert np.abs(logits[0] - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
            named += obj.colour in rt.generate(PROMPT, max_new_tokens=8, image=image).text
    assert named >= 3  # the trained projector names the colour (chance 1/6 each; held-out rate 0.47)
