"""How well the built-in tiny-vlm captions held-out procedural images, in PyTorch and through ONNX.

    python benchmarks/tiny_vlm_eval.py [--num-scenes 100] [--num-digits 50] [--artifacts DIR]

Held-out data (seeds differ from scripts/train_tiny_vlm.py's seed 0): single-object scenes
(seed 1001), digits of sklearn's test split (odd indices; training uses the even ones, seed 1002)
and rendered words (seed 1003). Prompt "Describe the image.", greedy, at most 12 new tokens.

A caption names the right colour (shape, position) when the first colour (shape, position) word
in it is the scene's; digits: the first digit character is the label; words: the word appears.
PyTorch: the loaded model with Hugging Face's tokenizer, chat template and CLIPImageProcessor.
ONNX: ``edgekv.runtime.Runtime`` on the exported artifacts (``edgekv export --model tiny-vlm``; exported
into a temporary folder unless ``--artifacts`` holds one). Writes
benchmarks/results/tiny_vlm_eval.json and tiny_vlm_eval.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edgekv.data import scenes  # noqa: E402

PROMPT = "Describe the image."
MAX_NEW = 12
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "car", "house", "bird", "moon")
OUT = os.path.join(ROOT, "benchmarks", "results")


def first_of(text: str, names) -> str | None:
    """The first of ``names`` (singular; plurals count) that occurs as a word in ``text``."""
    best = None
    for name in names:
        m = re.search(rf"\b{re.escape(name)}s?\b", text.lower())
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), name)
    return None if best is None else best[1]


def held_out(num_scenes: int, num_digits: int, num_words: int) -> list[dict]:
    items = []
    rng = np.random.default_rng(1001)
    for _ in range(num_scenes):
        sc = scenes.random_scene(rng, 1)
        o = sc.objects[0]
        items.append({"kind": "scene", "image": scenes.render_scene(sc), "caption": scenes.caption(sc),
                      "colour": o.colour, "shape": o.shape, "position": scenes.position_name(o)})
    rng = np.random.default_rng(1002)
    for i in range(num_digits):
        image, digit = scenes.digit_image(rng, digit=i % 10, split="test")
        items.append({"kind": "digit", "image": image, "caption": f"the digit {digit}", "digit": digit})
    rng = np.random.default_rng(1003)
    for i in range(num_words):
        word = WORDS[i % len(WORDS)]
        items.append({"kind": "word", "image": scenes.text_image(word, rng), "caption": f"the word '{word}'",
                      "word": word})
    return items


def score(items: list[dict], captions: list[str]) -> dict:
    sc = [(it, c) for it, c in zip(items, captions, strict=True) if it["kind"] == "scene"]
    colour = [first_of(c, scenes.COLOURS) == it["colour"] for it, c in sc]
    shape = [first_of(c, scenes.SHAPES) == it["shape"] for it, c in sc]
    position = [first_of(c, scenes.POSITIONS) == it["position"] for it, c in sc]
    digits = [(re.search(r"\d", c) or [None])[0] == str(it["digit"])
              for it, c in zip(items, captions, strict=True) if it["kind"] == "digit"]
    words = [it["word"] in c.lower() for it, c in zip(items, captions, strict=True) if it["kind"] == "word"]
    exact = [c.strip().rstrip(".").lower() == it["caption"] for it, c in sc]

    def frac(xs):
        return round(float(np.mean(xs)), 4) if xs else None

    return {"scenes": len(sc), "colour": frac(colour), "shape": frac(shape),
            "colour_and_shape": frac([a and b for a, b in zip(colour, shape, strict=True)]),
            "position": frac(position), "exact_caption": frac(exact), "digits": len(digits),
            "digit": frac(digits), "words": len(words), "word": frac(words)}


def torch_captions(items: list[dict]) -> tuple[list[str], float]:
    import torch

    from edgekv.host.models import load_vlm
    from edgekv.host.tiny_vlm import TinyVLMConfig

    torch.set_num_threads(2)
    bb, proc = load_vlm("tiny-vlm")
    tok, model = bb.tokenizer, bb.model
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    n = TinyVLMConfig(**model.config.vision_config).num_image_tokens
    text = text.replace("<image>", "<image>" * n)
    ids = tok(text, add_special_tokens=False).input_ids
    out_texts, t0 = [], time.perf_counter()
    for it in items:
        pixels = torch.from_numpy(proc(it["image"], return_tensors="np")["pixel_values"])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=True)
            new: list[int] = []
            for _ in range(MAX_NEW):
                t = int(out.logits[0, -1].argmax())
                if t in bb.eos_token_ids:
                    break
                new.append(t)
                out = model(input_ids=torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
        out_texts.append(tok.decode(new, skip_special_tokens=True))
    return out_texts, time.perf_counter() - t0


def onnx_captions(items: list[dict], artifacts: str) -> tuple[list[str], float]:
    from edgekv.runtime import Runtime

    texts, t0 = [], time.perf_counter()
    with Runtime.load(artifacts, k=0) as rt:
        for it in items:
            texts.append(rt.generate(PROMPT, max_new_tokens=MAX_NEW, image=it["image"]).text)
    return texts, time.perf_counter() - t0


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["colour", "shape", "colour_and_shape", "position", "digit", "word"]
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, name in enumerate(("pytorch", "onnx")):
        vals = [res[name][k] or 0.0 for k in keys]
        ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=name)
    ax.axhline(1 / len(scenes.COLOURS), color="grey", lw=0.8, ls=":", label="chance (colour)")
    ax.set_xticks(x, keys)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction correct")
    ax.set_title(f"tiny-vlm on held-out images ({res['pytorch']['scenes']} scenes, {res['pytorch']['digits']} digits)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-scenes", type=int, default=100)
    ap.add_argument("--num-digits", type=int, default=50)
    ap.add_argument("--num-words", type=int, default=20)
    ap.add_argument("--artifacts", default=None, help="tiny-vlm export to use (exported here when missing)")
    ap.add_argument("--out", default=os.path.join(OUT, "tiny_vlm_eval.json"))
    args = ap.parse_args()

    items = held_out(args.num_scenes, args.num_digits, args.num_words)
    pt, pt_s = torch_captions(items)
    artifacts = args.artifacts or os.path.join(tempfile.mkdtemp(prefix="tiny-vlm-"), "artifacts")
    if not os.path.isfile(os.path.join(artifacts, "manifest.json")):
        from edgekv.export.pipeline import export_model

        export_model("tiny-vlm", artifacts, progress=False)
    ox, ox_s = onnx_captions(items, artifacts)
    same = float(np.mean([a == b for a, b in zip(pt, ox, strict=True)]))
    res = {"prompt": PROMPT, "max_new_tokens": MAX_NEW, "seeds": {"scenes": 1001, "digits": 1002, "words": 1003},
           "pytorch": score(items, pt), "onnx": score(items, ox), "same_caption_pytorch_vs_onnx": round(same, 4),
           "seconds": {"pytorch": round(pt_s, 1), "onnx": round(ox_s, 1)},
           "examples": [{"truth": it["caption"], "pytorch": a, "onnx": b}
                        for it, a, b in list(zip(items, pt, ox, strict=True))[:: max(1, len(items) // 24)]]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
    plot(res, os.path.splitext(args.out)[0] + ".png")
    print(json.dumps({k: res[k] for k in ("pytorch", "onnx", "same_caption_pytorch_vs_onnx")}, indent=1))


if __name__ == "__main__":
    main()
